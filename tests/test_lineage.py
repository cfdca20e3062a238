"""Lineage by what was actually made, on the tiny preset: editing or deleting an output redoes
exactly what was made from it, a config key redoes only the stages that read it, and a skill
file counts by its content, not its path.

The prompts come from a deterministic stand-in for the LLM (this is a test of our lineage
logic; the real vLLM path is covered by the prompts and end-to-end tests). Images are real
tiny-sd renders on Ray Data. Experts, merge and eval are judged by the fingerprints the
pipeline gives them, which is what decides whether they run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import yaml

from selma_ray.config import load_config
from selma_ray.core.rundir import RunDir
from selma_ray.pipeline import GRAPH, ORDER, lineage, plan_status, run_stage
from selma_ray.testing import SeededLLM

pytestmark = pytest.mark.slow
SKILLS = ["counting", "everyday_scenes"]


def tiny(run_dir: Path, *overrides: str):
    return load_config(
        "tiny",
        [
            f"run.dir={run_dir}",
            f"prompts.skills=[{', '.join(SKILLS)}]",
            "prompts.per_skill=4",
            "prompts.requests_per_round=2",
            "images.steps=2",
            *overrides,
        ],
    )


def fingerprints(cfg, run: RunDir) -> dict[str, object]:
    experts = lineage("experts", cfg, run).units
    return {
        "prompts": lineage("prompts", cfg, run).units,
        "images": lineage("images", cfg, run).fingerprint,
        **{f"experts/{s}": experts[s] for s in SKILLS},
        "merge": lineage("merge", cfg, run).fingerprint,
        "eval": lineage("eval", cfg, run).fingerprint,
    }


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if before[k] != after[k]}


def redone(before: dict, after: dict) -> set[str]:
    """What a re-run redoes: the stages whose own inputs changed, and every stage downstream
    of them in the graph (their inputs change once the upstream writes new outputs)."""
    out = changed(before, after)
    for name in ORDER:
        if any(u in {k.split("/")[0] for k in out} for u in GRAPH[name].upstream):
            out.add(name)
    return out


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def made(tmp_path, cluster):
    """A run whose prompts and images stages are done."""
    cfg = tiny(tmp_path / "run")
    run = RunDir(cfg.run.dir)
    run_stage("prompts", cfg, run, generate=SeededLLM())
    run_stage("images", cfg, run)
    return cfg, run


def test_editing_a_prompts_file_redoes_that_skills_chain_and_nothing_else(made):
    cfg, run = made
    before = fingerprints(cfg, run)
    path = run.path("prompts", "counting.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["prompt"] = "three green kites over a quiet harbour at dawn"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    status = dict(plan_status(cfg))
    assert status["prompts"] == "its outputs were changed or deleted"
    assert status["images"].startswith("after prompts")

    llm = SeededLLM()
    prompts = run_stage("prompts", cfg, run, generate=llm)
    assert not prompts.get("skipped") and llm.asked == []  # the edit is taken, not regenerated
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    images = run_stage("images", cfg, run)
    assert not images.get("skipped")
    assert images["rendered"] == 1 and images["reused"] == 7  # only the edited prompt

    after = fingerprints(cfg, run)
    # The prompts stage's own inputs did not change, so neither did its fingerprints.
    assert changed(before, after) == {"images", "experts/counting", "merge", "eval"}


def test_deleting_a_prompts_file_regenerates_it_and_unchanged_data_redoes_nothing(made):
    cfg, run = made
    before = fingerprints(cfg, run)
    kept = run.path("prompts", "counting.jsonl").read_bytes()
    lost = run.path("prompts", "everyday_scenes.jsonl")
    old = lost.read_bytes()
    lost.unlink()
    assert dict(plan_status(cfg))["prompts"] == "its outputs were changed or deleted"

    llm = SeededLLM()
    run_stage("prompts", cfg, run, generate=llm)
    assert set(llm.asked) == {"everyday_scenes"}  # only the lost skill is asked for again
    assert lost.read_bytes() == old  # seeded: the same prompts come back
    assert run.path("prompts", "counting.jsonl").read_bytes() == kept
    assert run_stage("images", cfg, run)["skipped"]  # same prompts, same images: nothing redone
    assert fingerprints(cfg, run) == before
    assert dict(plan_status(cfg))["images"] == "done"


def test_changing_merge_methods_redoes_only_merge_and_eval(made):
    cfg, run = made
    other = tiny(Path(cfg.run.dir), "merge.methods=[paper, ties]")
    before, after = fingerprints(cfg, run), fingerprints(other, run)
    assert changed(before, after) == {"merge"}
    assert redone(before, after) == {"merge", "eval"}


def test_an_expert_setting_redoes_experts_merge_and_eval_only(made):
    cfg, run = made
    other = tiny(Path(cfg.run.dir), "experts.rank=8")
    before, after = fingerprints(cfg, run), fingerprints(other, run)
    assert changed(before, after) == {"experts/counting", "experts/everyday_scenes"}
    assert redone(before, after) == {
        "experts/counting",
        "experts/everyday_scenes",
        "merge",
        "eval",
    }


def test_a_joint_lora_or_a_subset_merge_redoes_only_what_uses_it(made):
    """Experiments add arms to a finished run: a joint LoRA is one more experts unit (the
    experts already trained and the merge stay done), a subset merge redoes only the merge,
    and settings left at their defaults keep the fingerprints of runs made before them."""
    cfg, run = made
    both = "{both: [counting, everyday_scenes]}"
    before = fingerprints(cfg, run)
    joint = tiny(Path(cfg.run.dir), f"experts.joint={both}")
    assert changed(before, fingerprints(joint, run)) == {"eval"}
    assert set(lineage("experts", joint, run).units) == {*SKILLS, "both"}
    subset = tiny(Path(cfg.run.dir), f"merge.subsets={both}")
    assert changed(before, fingerprints(subset, run)) == {"merge"}
    defaults = tiny(Path(cfg.run.dir), "images.real_data_use=pairs", "experts.joint={}")
    assert changed(before, fingerprints(defaults, run)) == set()


def test_a_skill_files_content_counts_not_its_path(tmp_path):
    skills_file = tmp_path / "skills.yaml"

    def write_skills(description: str) -> None:
        spec = {
            "name": "my_skill",
            "description": description,
            "seeds": ["a red cup on a desk", "two pens in a jar", "a lamp by a bed"],
        }
        skills_file.write_text(yaml.safe_dump({"skills": [spec]}))

    write_skills("small desk objects.")
    cfg = load_config(
        "tiny",
        [
            f"run.dir={tmp_path / 'run'}",
            f"prompts.skill_files=[{skills_file}]",
            "prompts.skills=[counting, my_skill]",
            "prompts.per_skill=4",
            "prompts.requests_per_round=2",
        ],
    )
    run = RunDir(cfg.run.dir)
    run_stage("prompts", cfg, run, generate=SeededLLM())
    counting = run.path("prompts", "counting.jsonl").read_bytes()
    before = lineage("prompts", cfg, run).units

    write_skills("small objects found on an office desk.")  # same path, new content
    after = lineage("prompts", cfg, run).units
    assert after["my_skill"] != before["my_skill"] and after["counting"] == before["counting"]
    assert dict(plan_status(cfg))["prompts"].startswith("my_skill (config) changed")

    llm = SeededLLM()
    run_stage("prompts", cfg, run, generate=llm)
    assert set(llm.asked) == {"my_skill"}  # only that skill's prompts are written again
    assert run.path("prompts", "counting.jsonl").read_bytes() == counting
