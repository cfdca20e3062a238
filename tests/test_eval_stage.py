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
            "5. Three striped umbrellas lined up along an empty beach.",
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
    # held-out counting prompts keep the training count rule (prompts.max_count: 3)
    assert not [p for p in by_skill["counting"] if "Seven" in p.prompt]
    assert [p for p in by_skill["everyday_scenes"] if "Seven" in p.prompt]
    assert len({p.id for p in prompts}) == len(prompts)
    again, _ = eval_inputs.load_eval_prompts(cfg, RunDir(root))
    assert [p.prompt for p in again] == [p.prompt for p in prompts] and len(calls) == 1


def _llm_answer(prompt: str) -> str:
    """A well-formed DSG answer about ``prompt`` (its questions share its content words)."""
    from selma_ray.eval.dsg import content_words

    word = sorted(content_words(prompt))[0]
    return f"1 | 0 | Is there a {word}?\n2 | 1 | Is the {word} in the picture?\n"


def test_prompts_without_parseable_questions_are_counted_per_variant_in_metrics_and_report(
    tmp_path, monkeypatch
):
    from selma_ray.eval import dsg
    from selma_ray.eval import stats as eval_stats

    prompts = read_prompts("builtin:tiny_eval.csv")[:5]
    ids = [p.id for p in prompts]
    # prompts 1 and 3 get nothing usable: a copy of the instruction's example (no word of the
    # prompt: dropped) and a failed request; the other three get two questions each
    answers = {
        ids[0]: {"generated_text": _llm_answer(prompts[0].prompt), "error": ""},
        ids[1]: {"generated_text": "1 | 0 | Are there apples?\n2 | 1 | Are the apples red?"},
        ids[2]: {"generated_text": _llm_answer(prompts[2].prompt), "error": ""},
        ids[3]: {"generated_text": "", "error": "HTTP 500"},
        ids[4]: {"generated_text": _llm_answer(prompts[4].prompt), "error": ""},
    }
    calls = []

    def fake_llm(cfg, items, sampling, model=None):  # stands in for vLLM
        calls.append(len(items))
        return {i["key"]: {**answers[i["key"]], "key": i["key"]} for i in items}

    monkeypatch.setattr(dsg, "llm_pass", fake_llm)
    root = tmp_path / "run"
    run = RunDir(root)
    cfg = _cfg(root, "eval.scorers=[dsg]", "eval.bootstrap=100")
    eval_inputs.attach_questions(cfg, prompts, run)
    # the second time the questions come from eval/questions/ and keep their source
    prompts = read_prompts("builtin:tiny_eval.csv")[:5]
    eval_inputs.attach_questions(cfg, prompts, run)
    assert calls == [5]
    fallback = {ids[1], ids[3]}
    for p in prompts:
        expected = "holistic" if p.id in fallback else "llm"
        assert [q.source for q in p.questions] == [expected] * (1 if p.id in fallback else 2)

    # base is scored on all 5 prompts; merged's DSG score for prompt 3 failed (NaN), so
    # merged's counts cover the other 4 prompts only
    table = [
        {
            "variant": v,
            "prompt_id": pid,
            "seed_index": k,
            "score_dsg": float("nan") if (v, pid) == ("merged", ids[3]) else 0.25 * (k + 1),
        }
        for v in ("base", "merged")
        for pid in ids
        for k in range(2)
    ]
    scorers = evaluate.scorer_status(cfg)
    metrics = eval_stats.aggregate(table, ["dsg"], {p.id: p.category for p in prompts}, n_boot=100)
    doc = evaluate.build_doc(cfg, run, prompts, [], scorers, ["base", "merged"], table, metrics)
    evaluate.write_outputs(run, doc, table, prompts, [])

    saved = run.read_json("eval", "metrics.json")
    dsg_metrics = saved["metrics"]["dsg"]  # the key stays "dsg"
    zero = {"from_file": 0, "no_questions": 0}
    assert dsg_metrics["base"]["questions"] == {
        "llm_written": 3,
        "holistic_fallback": 2,
        **zero,
        "prompts": 5,
    }
    assert dsg_metrics["merged"]["questions"] == {
        "llm_written": 3,
        "holistic_fallback": 1,
        **zero,
        "prompts": 4,
    }
    assert [dsg_metrics[v]["n"] for v in ("base", "merged")] == [5, 4]
    scorer = saved["scorers"]["dsg"]
    assert scorer["label"] == "DSG-style" and "not the published DSG-1K" in scorer["protocol"]
    assert scorer["holistic_fallback_prompts"] == [ids[1], ids[3]]
    written = [json.loads(x) for x in run.read_text("eval", "questions.jsonl").splitlines()]
    assert [r["id"] for r in written if r["questions"][0]["source"] == "holistic"] == [
        ids[1],
        ids[3],
    ]

    html = run.read_text("eval", "report.html")
    assert "<h2>DSG-style</h2>" in html and "<h2>DSG</h2>" not in html
    rows = dict(re.findall(r"<tr><th>(base|merged)</th>(.*?)</tr>", html))
    assert rows["base"].endswith("<td>3 LLM-written · <b class='warn'>2 holistic fallback</b></td>")
    assert rows["merged"].endswith(
        "<td>3 LLM-written · <b class='warn'>1 holistic fallback</b></td>"
    )
    assert "2 prompt(s) got no parseable LLM-written questions" in html
    assert f"instead (per variant: column “questions”): {ids[1]}, {ids[3]}." in html


def test_dsg_is_labelled_dsg_style_unless_questions_come_from_a_dsg_1k_csv(tmp_path):
    root = tmp_path / "run"
    csv = _dsg_csv(tmp_path / "q.csv", ["dd1"])
    tifa = tmp_path / "tifa.json"

    def label(*overrides: str) -> str:
        return evaluate.dsg_protocol(_cfg(root, *overrides))["label"]

    labels = {
        "llm": label(),
        "csv": label("eval.questions=file", f"eval.questions_file={csv}"),
        "tifa": label("eval.questions=file", f"eval.questions_file={tifa}"),
    }
    assert labels == {"llm": "DSG-style", "csv": "DSG", "tifa": "DSG-style"}
    assert evaluate.scorer_status(_cfg(root, "eval.questions=none"))["dsg"]["label"] == "DSG"


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
    assert doc["scorers"]["dsg"]["label"] == "DSG"  # DSG-1K-format CSV: the published protocol
    assert doc["scorers"]["dsg"]["holistic_fallback_prompts"] == []
    for entry in doc["metrics"]["dsg"].values():
        assert entry["questions"] == {
            "llm_written": 0,
            "holistic_fallback": 0,
            "from_file": 4,
            "no_questions": 0,
            "prompts": 4,
        }
    assert doc["scorers"]["clip"]["model_ids"] == {"model": "tiny-clip"}
    assert "randomly initialised" in doc["note"]

    assert len(rows) == 4 * 4 * 2
    # every mean by hand from scores.jsonl: seeds averaged per prompt, then prompts
    for metric, entries in doc["metrics"].items():
        for v, e in entries.items():
            by_prompt: dict[str, list[float]] = {}
            for r in rows:
                if r["variant"] == v:
                    by_prompt.setdefault(r["prompt_id"], []).append(r[f"score_{metric}"])
            means = [sum(x) / len(x) for x in by_prompt.values()]
            assert e["mean"] == pytest.approx(sum(means) / len(means)), (metric, v)
    # each DSG score from its answers: "Is the thing red?" (2) depends on "Is there a thing?" (1)
    for r in rows:
        right = {d["id"]: d["correct"] for d in r["dsg_detail"]}
        assert r["score_dsg"] == (right["1"] + (right["1"] and right["2"])) / 2
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

    run = RunDir(tmp_path)

    def adapter(name: str, data: bytes) -> AdapterInfo:
        rel = f"{name}/pytorch_lora_weights.safetensors"
        run.write_bytes(data, rel)
        return AdapterInfo(name, "merged", None, 4, rel)

    found = {
        "base": AdapterInfo("base", "base", None, None, None),
        "counting": adapter("counting", b"counting"),
        "merged": adapter("merged", b"paper merge"),
        "merged-paper": adapter("merged-paper", b"paper merge"),  # merged is a copy of it
        "merged-ties": adapter("merged-ties", b"ties merge"),
    }
    assert evaluate._distinct(run, found) == ["base", "counting", "merged", "merged-ties"]
