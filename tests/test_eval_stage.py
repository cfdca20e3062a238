"""The eval stage end to end on a synthetic tiny run, and the held-out prompt check."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from selma_ray.config import load_config
from selma_ray.core.rundir import RunDir
from selma_ray.eval import inputs as eval_inputs
from selma_ray.eval import stage as evaluate
from selma_ray.eval.dsg import read_prompts
from selma_ray.pipeline import run_stage

SKILLS = ["counting", "everyday_scenes"]
TRAINING = {  # the prompts stage's output format: prompts/<skill>.jsonl
    "counting": ["Three blue mugs on a shelf.", "four green frogs on a log"],
    "everyday_scenes": ["a man reading on a train"],
}


def _write_training_prompts(root: Path) -> None:
    for skill, prompts in TRAINING.items():
        rows = [{"id": f"{skill}-{i}", "skill": skill, "prompt": p} for i, p in enumerate(prompts)]
        (root / "prompts").mkdir(parents=True, exist_ok=True)
        (root / "prompts" / f"{skill}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )


def _dsg_csv(path: Path, ids: list[str]) -> Path:
    head = "item_id,proposition_id,dependency,category_broad,category_detailed,tuple,"
    lines = [head + "question_natural_language"]
    for i in ids:
        lines.append(f"{i},1,0,entity,whole,entity - whole (x),Is there a thing?")
        lines.append(f"{i},2,1,attribute,color,attribute - color (x),Is the thing red?")
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(root: Path, *overrides: str):
    return load_config(
        "tiny", [f"run.dir={root}", f"prompts.skills=[{', '.join(SKILLS)}]", *overrides]
    )


def test_eval_prompts_never_include_training_prompts(tmp_path):
    root = tmp_path / "run"
    _write_training_prompts(root)
    cfg = _cfg(root)
    prompts, dropped = eval_inputs.load_eval_prompts(cfg, RunDir(root))
    training = {eval_inputs.normalize(p) for ps in TRAINING.values() for p in ps}
    assert dropped == ["three blue mugs on a shelf"]  # the shipped file's ct1, same words
    assert not training & {eval_inputs.normalize(p.prompt) for p in prompts}
    assert len(prompts) == len(read_prompts(cfg.eval.prompts_file)) - 1
    with pytest.raises(ValueError, match="also training prompts"):
        eval_inputs.load_eval_prompts(_cfg(root, "eval.on_overlap=error"), RunDir(root))


def test_shipped_eval_prompts_are_not_skill_seeds():
    from selma_ray.core.skills import get_skills

    seeds = {
        eval_inputs.normalize(s)
        for sk in get_skills(list(load_config("tiny").prompts.skills))
        for s in sk.seeds
    }
    shipped = {eval_inputs.normalize(p.prompt) for p in read_prompts("builtin:tiny_eval.csv")}
    assert not seeds & shipped


def test_missing_questions_are_named(tmp_path):
    root = tmp_path / "run"
    cfg = _cfg(
        root, "eval.questions=file", f"eval.questions_file={_dsg_csv(tmp_path / 'q.csv', ['dd1'])}"
    )
    prompts = read_prompts(cfg.eval.prompts_file)
    with pytest.raises(ValueError, match="no questions"):
        eval_inputs.attach_questions(cfg, prompts)


def test_llm_questions_are_kept_and_reused_while_llm_and_prompts_match(tmp_path, monkeypatch):
    from selma_ray.eval import dsg as dsg

    calls = []

    def fake_llm(cfg, prompts):  # stands in for vLLM: this test is about the cache logic
        calls.append(len(prompts))
        return {p.id: [dsg.Question("1", f"Is there {p.prompt}?")] for p in prompts}

    monkeypatch.setattr(dsg, "generate_questions", fake_llm)
    run = RunDir(tmp_path / "run")
    for overrides in ([], [], ["eval.max_questions=3"]):
        prompts = read_prompts("builtin:tiny_eval.csv")[:3]
        eval_inputs.attach_questions(_cfg(run.root, *overrides), prompts, run)
        assert prompts[0].questions[0].question == f"Is there {prompts[0].prompt}?"
    assert calls == [3, 3]  # the second call reused the first one's questions


def test_generated_eval_prompts_are_held_out_from_training_prompts_and_seeds(tmp_path, monkeypatch):
    from selma_ray.core.skills import get_skills
    from selma_ray.eval import dsg as dsg

    seed = get_skills(["counting"])[0].seeds[0]
    answer = "\n".join(
        [
            f"1. {TRAINING['counting'][0]}",  # a training prompt, reworded only in case
            f"2. {seed}",  # an in-context seed
            "3. Seven tiny sailboats drifting across a calm lake at dawn.",
            "4. Two owls perched on a snowy fence post.",
            "5. Nine striped umbrellas lined up along an empty beach.",
        ]
    )
    calls = []

    def fake_llm(cfg, items, sampling, model=None):  # stands in for vLLM (filter logic only)
        calls.append(len(items))
        return {i["key"]: {"generated_text": answer, "error": ""} for i in items}

    monkeypatch.setattr(dsg, "llm_pass", fake_llm)
    root = tmp_path / "run"
    _write_training_prompts(root)
    cfg = _cfg(root, "eval.prompts_file=generated", "eval.generated_per_skill=2")
    prompts, dropped = eval_inputs.load_eval_prompts(cfg, RunDir(root))
    texts = {eval_inputs.normalize(p.prompt) for p in prompts}
    training = {eval_inputs.normalize(t) for ts in TRAINING.values() for t in ts}
    assert not texts & training and eval_inputs.normalize(seed) not in texts and not dropped
    by_skill = {s: [p for p in prompts if p.category == s] for s in SKILLS}
    assert all(len(ps) == 2 for ps in by_skill.values())
    assert len({p.id for p in prompts}) == len(prompts)
    again, _ = eval_inputs.load_eval_prompts(cfg, RunDir(root))
    assert [p.prompt for p in again] == [p.prompt for p in prompts] and len(calls) == 1


@pytest.mark.slow
def test_eval_stage_renders_scores_and_reports_every_variant(tmp_path):
    import ray

    from selma_ray.testing import make_run

    root = make_run(tmp_path / "run", SKILLS)
    _write_training_prompts(root)
    ids = [p.id for p in read_prompts("builtin:tiny_eval.csv")]
    questions = _dsg_csv(tmp_path / "questions.csv", ids)
    cfg = _cfg(
        root,
        "eval.questions=file",
        f"eval.questions_file={questions}",
        "eval.max_prompts=4",
        "eval.seeds_per_prompt=2",
        "eval.steps=2",
        "eval.bootstrap=200",
        "eval.grid_prompts=3",
    )
    run = RunDir(root)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_stage("eval", cfg, run)
        again = run_stage("eval", cfg, run)
        doc = json.loads((root / "eval" / "metrics.json").read_text())
        html = (root / "eval" / "report.html").read_text()
        rows = [json.loads(x) for x in (root / "eval" / "scores.jsonl").read_text().splitlines()]
        # only the scorers changed: the images are reused and scored again
        shards = {f: f.stat().st_mtime_ns for f in (root / "eval/images/data").iterdir()}
        cfg.eval.scorers = ["clip"]
        rescored = run_stage("eval", cfg, run)
    finally:
        ray.shutdown()
    assert again["skipped"] is True and not rescored.get("skipped")
    assert {f: f.stat().st_mtime_ns for f in (root / "eval/images/data").iterdir()} == shards
    second = json.loads((root / "eval" / "metrics.json").read_text())["metrics"]
    assert set(second) == {"clip"}
    assert {v: e["mean"] for v, e in second["clip"].items()} == {
        v: e["mean"] for v, e in doc["metrics"]["clip"].items()
    }

    variants = ["base", "counting", "everyday_scenes", "merged"]
    assert doc["variants"] == variants and doc["prompts"]["count"] == 4
    assert doc["prompts"]["dropped_overlap"] == ["three blue mugs on a shelf"]
    assert set(doc["metrics"]) == {"clip", "pick", "dsg"}
    for metric, entries in doc["metrics"].items():
        assert list(entries) == variants, metric
        assert entries["merged"]["n"] == 4 and "vs_base" in entries["merged"]
        lo, hi = entries["merged"]["ci"]
        assert lo <= entries["merged"]["mean"] <= hi
    assert 0.0 <= doc["metrics"]["dsg"]["base"]["mean"] <= 1.0
    assert doc["scorers"]["clip"]["model_ids"] == {"model": "tiny-clip"}
    assert "randomly initialised" in doc["note"]

    assert len(rows) == 4 * 4 * 2
    # the same prompt and seed index has the same seed in every variant
    seeds = {(r["prompt_id"], r["seed_index"]): set() for r in rows}
    for r in rows:
        seeds[(r["prompt_id"], r["seed_index"])].add(r["seed"])
    assert all(len(s) == 1 for s in seeds.values())
    base = {(r["prompt_id"], r["seed_index"]): r for r in rows if r["variant"] == "base"}
    assert any(
        r["score_pick"] != base[(r["prompt_id"], r["seed_index"])]["score_pick"]
        for r in rows
        if r["variant"] == "counting"
    ), "the adapters should change the images and so the scores"

    assert "randomly initialised" in html and "tiny-vqa" in html
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(images) == 3 + 1  # one chart per metric, one grid
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert 'src="http' not in html  # self-contained
    assert result["headline"]["merged"]["clip"]["delta"] is not None


def test_adapters_with_the_same_weights_are_evaluated_once(tmp_path):
    from selma_ray.diffusion.engine import AdapterInfo

    def adapter(name: str, data: bytes) -> AdapterInfo:
        (tmp_path / name).mkdir()
        (tmp_path / name / "pytorch_lora_weights.safetensors").write_bytes(data)
        return AdapterInfo(name, "merged", None, 4, str(tmp_path / name))

    found = {
        "base": AdapterInfo("base", "base", None, None, None),
        "counting": adapter("counting", b"counting"),
        "merged": adapter("merged", b"paper merge"),
        "merged-paper": adapter("merged-paper", b"paper merge"),  # merged is a copy of it
        "merged-ties": adapter("merged-ties", b"ties merge"),
    }
    assert evaluate._distinct(found) == ["base", "counting", "merged", "merged-ties"]
