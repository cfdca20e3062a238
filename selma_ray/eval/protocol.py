"""How the eval stage's numbers relate to the paper's: benchmark files, averaging, notes.

The paper reports DSG on DSG-1K (``eval.dsg_file``) and TIFA on TIFA v1.0 (``eval.tifa_file``),
each answered by a VQA model that generates its answer (``eval.vqa_mode=generate``).

- DSG averages: SELMA's DSG ``evaluation.py`` prints the mean over *all questions* of all
  prompts (each question's dependency-zeroed 0/1 score); DSG's own ``t2i_eval_dsg1k.py``
  averages per prompt first. Both are computed here; ``eval.dsg_average`` picks the headline
  (mean, CI, paired difference vs base, categories), and the other is kept beside it.
- TIFA averages per prompt (``tifa_score_benchmark``'s ``tifa_average``).
- Without a benchmark file the job evaluates ``eval.prompts_file`` (or generated) prompts, and
  says so: a WARNING and a note in metrics.json, the report and the stage summary.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np

from selma_ray.eval import dsg
from selma_ray.eval import stats as eval_stats

log = logging.getLogger(__name__)
QUESTION, PROMPT = "question", "prompt"
AVERAGE_TEXT = {
    QUESTION: "mean over all questions of all prompts (SELMA's DSG evaluation.py, the paper's)",
    PROMPT: "mean of the per-prompt scores (DSG's t2i_eval_dsg1k.py)",
}
WHERE = (
    "DSG-1K: dsg-1k-anns.csv from https://github.com/j-min/DSG; TIFA v1.0: "
    "tifa_v1.0/tifa_v1.0_question_answers.json from https://github.com/Yushi-Hu/tifa"
)


def benchmark_mode(ec: Any) -> bool:
    """Whether the eval prompts are the published benchmarks' (a DSG-1K or TIFA file given)."""
    return bool(ec.dsg_file or ec.tifa_file)


def notes(cfg: Any) -> list[str]:
    """What keeps this run's DSG/TIFA numbers from being comparable with the paper's, one
    sentence each (empty when nothing does). Logged as WARNINGs by the stage."""
    ec = cfg.eval
    vqa = [s for s in ("dsg", "tifa") if s in ec.scorers]
    if not vqa:
        return []
    out = []
    if not benchmark_mode(ec):
        source = (
            "prompts written by the LLM"
            if ec.prompts_file == "generated"
            else f"prompts from {ec.prompts_file}"
        )
        questions = {
            "llm": f"questions written by {ec.question_llm or cfg.models.llm}",
            "file": f"questions from {ec.questions_file or ec.prompts_file}",
            "none": "no questions",
        }[ec.questions]
        out.append(
            "No DSG-1K (eval.dsg_file) or TIFA v1.0 (eval.tifa_file) file was given: the "
            f"faithfulness numbers come from {source} with {questions} and are NOT comparable "
            f"with the paper's DSG/TIFA results (get the files at {WHERE})."
        )
    else:
        if "dsg" in vqa and not ec.dsg_file:
            out.append("No DSG-1K file (eval.dsg_file): DSG is not reported.")
        if "tifa" in vqa and not ec.tifa_file:
            out.append("No TIFA v1.0 file (eval.tifa_file): TIFA is not reported.")
    if ec.vqa_mode == "rank":
        out.append(
            "eval.vqa_mode=rank: answers are the choices the VQA model finds most likely, not "
            "generated as in the published DSG and TIFA protocols (eval.vqa_mode=generate)."
        )
    return out


def warn(cfg: Any) -> list[str]:
    """Log each of :func:`notes` as a WARNING (the job's first words about the eval numbers)
    and return them."""
    out = notes(cfg)
    for note in out:
        log.warning("eval: %s", note)
    return out


def questions_per_prompt(prompts: list[dsg.EvalPrompt]) -> dict[str, int]:
    return {p.id: len(p.questions) for p in prompts}


def weighted_summary(
    values: Any, weights: Any, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """sum(w * x) / sum(w) with a percentile bootstrap 95% CI that resamples the units (prompts,
    each with its weight: its number of questions), as ``stats.summarize`` does unweighted."""
    x = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if x.size == 0 or w.sum() <= 0:
        return {"mean": float("nan"), "ci": [float("nan"), float("nan")], "n": int(x.size)}
    mean = float((w * x).sum() / w.sum())
    if x.size == 1:
        return {"mean": mean, "ci": [mean, mean], "n": 1}
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    ws = w[idx]
    means = (ws * x[idx]).sum(axis=1) / np.maximum(ws.sum(axis=1), 1e-12)
    lo, hi = np.quantile(means, [(1 - eval_stats.LEVEL) / 2, (1 + eval_stats.LEVEL) / 2])
    return {"mean": mean, "ci": [float(lo), float(hi)], "n": int(x.size)}


def _weighted(scores: dict[str, float], n_q: dict[str, int], n_boot: int, seed: int):
    ids = sorted(scores)
    out = weighted_summary([scores[i] for i in ids], [n_q.get(i, 0) for i in ids], n_boot, seed)
    out["n_questions"] = int(sum(n_q.get(i, 0) for i in ids))
    return out


def _paired_weighted(
    variant: dict[str, float], base: dict[str, float], n_q: dict[str, int], n_boot: int, seed: int
) -> dict[str, Any]:
    """Question-weighted mean of (variant - base) over the prompts both have, its CI, and the
    win rate over those prompts."""
    common = sorted(set(variant) & set(base))
    diff = {p: variant[p] - base[p] for p in common}
    out = _weighted(diff, n_q, n_boot, seed)
    d = np.array(list(diff.values()), dtype=np.float64)
    out["win_rate"] = float((d > 0).mean()) if d.size else float("nan")
    return out


def dsg_averages(
    entries: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
    prompts: list[dsg.EvalPrompt],
    headline: str,
    categories: dict[str, str],
    baseline: str = "base",
    n_boot: int = 1000,
    seed: int = 0,
) -> None:
    """Both DSG averages for each variant of ``entries`` (``stats.aggregate``'s per-prompt
    result for metric dsg), changed in place: ``averages`` holds ``question`` (mean over all
    questions, ``n_questions``) and ``prompt`` (mean of per-prompt scores, ``n``); with
    ``headline="question"`` the entry's mean, CI, categories and paired differences vs base
    become question-weighted. ``average`` names the headline. A prompt's seeds are averaged
    first; it weighs as many questions as it has."""
    if headline not in AVERAGE_TEXT:
        raise ValueError(f"dsg average {headline!r}: choose from {sorted(AVERAGE_TEXT)}")
    n_q = questions_per_prompt(prompts)
    table = eval_stats.per_prompt(rows, "score_dsg")
    base = table.get(baseline, {})
    for variant, entry in entries.items():
        scores = table.get(variant, {})
        by_prompt = {k: entry[k] for k in ("mean", "ci", "n", "vs_base") if k in entry}
        by_question = _weighted(scores, n_q, n_boot, seed)
        entry["averages"] = {QUESTION: by_question, PROMPT: by_prompt}
        entry["average"] = headline
        if headline != QUESTION:
            continue
        entry.update(mean=by_question["mean"], ci=by_question["ci"])
        cats: dict[str, dict[str, float]] = defaultdict(dict)
        for pid, value in scores.items():
            if categories.get(pid, ""):
                cats[categories[pid]][pid] = value
        entry["by_category"] = {c: _weighted(s, n_q, n_boot, seed) for c, s in sorted(cats.items())}
        if variant != baseline and base:
            entry["vs_base"] = _paired_weighted(scores, base, n_q, n_boot, seed)
            entry["vs_base_by_category"] = {
                c: _paired_weighted(s, base, n_q, n_boot, seed) for c, s in sorted(cats.items())
            }
