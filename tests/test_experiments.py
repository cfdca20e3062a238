"""The paper's comparisons as experiments (``selma_ray.experiments``): their arms and plans on
every preset, and a tiny ``table4`` run end to end on Ray (images and experts made once for
every arm, one results row per arm), plus the real-prompts data source of ``figure1``.

The prompts come from a deterministic stand-in for the LLM (the real vLLM path is covered by
the prompts and end-to-end tests); everything after them is the real pipeline."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from selma_ray.config import load_config
from selma_ray.core import layout
from selma_ray.experiments import NAMES, design
from selma_ray.experiments.results import markdown, run_experiment
from selma_ray.pipeline import open_run, run_pipeline, run_stage
from selma_ray.testing import SeededLLM, small_run

SKILLS = ["counting", "dense_detail", "everyday_scenes"]


def tiny(run_dir: Path, *overrides: str):
    return load_config(
        "tiny",
        [
            f"run.dir={run_dir}",
            *small_run(SKILLS),
            "eval.questions=none",  # LLM-written questions are covered elsewhere
            "eval.max_prompts=2",
            *overrides,
        ],
    )


def image_folder(root: Path, captions: list[str]) -> Path:
    root.mkdir(parents=True)
    lines = []
    for i, caption in enumerate(captions):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_table4_arms_are_experts_a_joint_lora_of_the_same_recipe_and_merges():
    cfg = load_config("sd2", [])
    exp = design.build("table4", cfg)
    run = exp.runs[design.GENERATED]
    skills = cfg.prompts.skills
    assert run.experts.joint == {"joint-3": skills[:3], "joint-all": skills}
    assert run.merge.subsets == {"3-skills": skills[:3]}
    # A joint LoRA is trained with an expert's recipe: same steps, batch and everything else.
    assert run.experts.model_dump(exclude={"joint"}) == cfg.experts.model_dump(exclude={"joint"})
    assert run.run.dir == cfg.run.dir  # arms share the run's prompts, images and experts
    names = [a.adapter for a in exp.arms]
    assert names == ["base", *skills, "joint-3", "joint-all", "merged-3-skills", "merged"]
    three = design.build("table4", tiny(Path("/tmp/x")))
    assert [a.adapter for a in three.arms if "joint" in a.adapter] == ["joint-all"]


def test_every_experiment_plans_on_the_tiny_preset_and_figure1_asks_for_real_data(tmp_path):
    folder = image_folder(tmp_path / "real", ["two cats", "three dogs"])
    for name in NAMES:
        extra = [f"images.real_data={{counting: [{folder}]}}"] if name == "figure1" else []
        plan = design.plan(design.build(name, tiny(tmp_path / "run", *extra)))
        assert plan["arms"] and plan["peak_gpus"] == 0  # the tiny preset runs on CPUs
        assert "GPU-hours in all" in design.format_plan(plan)
    fig = design.build(
        "figure1", tiny(tmp_path / "run", f"images.real_data={{counting: [{folder}]}}")
    )
    assert set(fig.runs) == {design.GENERATED, design.REAL_PAIRS, design.REAL_PROMPTS}
    assert fig.runs[design.GENERATED].images.real_data == {}
    assert fig.runs[design.REAL_PROMPTS].images.real_data_use == "prompts"
    assert len({c.run.dir for c in fig.runs.values()}) == 3
    with pytest.raises(ValueError, match="images.real_data"):
        design.build("figure1", tiny(tmp_path / "run"))


def test_the_sd2_table4_plan_counts_gpu_hours_and_peak_gpus():
    plan = design.plan(design.build("table4", load_config("sd2", [])))
    run = plan["runs"][design.GENERATED]
    assert run["gpu_hours"]["experts"] > 0 and plan["gpu_hours"] > 0
    assert plan["peak_gpus"] >= 1
    assert "7 LoRAs trained once for 10 arms" in run["shared"]


def test_paper_numbers_are_the_published_table1_with_their_columns():
    row = design.paper_row("table1", "sd2/selma")
    assert row == {"dsg": 77.7, "tifa": 83.2, "pick": 21.3, "image_reward": 0.72, "hps": 27.5}
    assert design.paper_model(load_config("sdxl", [])) == "sdxl"
    assert design.paper_model(load_config("tiny", [])) is None
    for table in design.paper_numbers()["tables"].values():
        for values in (table.get("rows") or {}).values():
            assert len(values) == len(design.PAPER_COLUMNS)


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_real_prompts_are_rendered_by_the_generator(cluster, tmp_path):
    captions = ["two red apples on a plate", "three blue cups on a shelf"]
    folder = image_folder(tmp_path / "real", captions)
    cfg = tiny(
        tmp_path / "run",
        "prompts.skills=[counting, dense_detail]",
        f"images.real_data={{counting: [{folder}]}}",
        "images.real_data_use=prompts",
    )
    run = open_run(cfg)
    run_stage("prompts", cfg, run, generate=SeededLLM())
    run_stage("images", cfg, run)
    rows = [
        r
        for f in layout.images_files(run)
        for r in pq.read_table(f, columns=["skill", "prompt", "generator", "image"]).to_pylist()
    ]
    counting = [r for r in rows if r["skill"] == "counting"]
    assert sorted(r["prompt"] for r in counting) == sorted(captions)
    assert {r["generator"] for r in counting} == {cfg.models.generator}  # rendered, not imported
    with Image.open(io.BytesIO(counting[0]["image"])) as img:
        assert img.size == (32, 32)  # the generator's resolution, not the real image's 40x40
    assert any(r["skill"] == "dense_detail" for r in rows)  # other skills keep LLM prompts


@pytest.fixture(scope="module")
def table4(cluster, tmp_path_factory):
    cfg = tiny(tmp_path_factory.mktemp("exp") / "run")
    exp = design.build("table4", cfg)
    pipeline = functools.partial(run_pipeline, stage_kwargs={"prompts": {"generate": SeededLLM()}})
    first = run_experiment(exp, cfg, pipeline)
    again = run_experiment(exp, cfg, pipeline)
    return cfg, exp, first, again


@pytest.mark.slow
def test_tiny_table4_runs_every_arm_once_and_writes_one_row_per_arm(table4):
    cfg, exp, first, again = table4
    run = open_run(cfg)
    assert first["stages"][design.GENERATED]["images"]  # made once, for every arm
    assert not any(again["stages"][design.GENERATED].values())  # nothing is made twice
    for unit in [*SKILLS, "joint-all"]:
        manifest = run.read_manifest("experts", unit)
        assert manifest["metrics"]["step"] == cfg.experts.max_steps
    assert run.read_manifest("experts", "joint-all")["export"]["skills"] == SKILLS
    assert [r["arm"] for r in first["rows"]] == [a.name for a in exp.arms]
    for row in first["rows"]:
        assert row["ours"], f"arm {row['arm']} has no scores"
    text = run.read_text("experiment", "table4", "results.md")
    assert text == markdown(first)
    assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + len(exp.arms)
    assert "<img" in run.read_text("experiment", "table4", "report.html")
    assert json.loads(run.read_text("experiment", "table4", "results.json"))["rows"]


def test_results_print_the_papers_figure_beside_ours_where_it_has_one():
    from selma_ray.experiments.results import results

    exp = design.build("table1", load_config("sd2", []))
    entry = {"mean": 0.5, "ci": [0.4, 0.6]}
    metrics = {"metrics": {"dsg": {"base": entry, "merged": entry}}}
    doc = results(exp, {design.GENERATED: metrics})
    assert doc["rows"][1]["paper"]["dsg"] == 77.7
    text = markdown(doc)
    assert "| SELMA (merged) | generated | 0.5 [0.4, 0.6] |" in text
    assert "77.7" in text and "Not yet checked" in text


def test_a_run_whose_every_skill_is_imported_writes_its_images_on_a_fresh_disk(tmp_path):
    """figure1's real-pairs data run: no skill is rendered, so nothing made the images folder
    before the import writes to it."""
    folder = image_folder(tmp_path / "real", ["two cats", "three dogs"])
    cfg = tiny(
        tmp_path / "run", "prompts.skills=[counting]", f"images.real_data={{counting: [{folder}]}}"
    )
    run = open_run(cfg)
    run_stage("prompts", cfg, run, generate=SeededLLM())
    run_stage("images", cfg, run)
    files = layout.images_files(run)
    prompts = [r["prompt"] for f in files for r in pq.read_table(f, columns=["prompt"]).to_pylist()]
    assert sorted(prompts) == ["three dogs", "two cats"]
