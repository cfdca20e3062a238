"""What the eval stage evaluates: the held-out prompts and the questions about them.

Prompts come from the published benchmarks (``eval.dsg_file``: DSG-1K, ``eval.tifa_file``: TIFA
v1.0, questions included), else from ``eval.prompts_file`` (``selma_ray.eval.dsg`` readers) or
the LLM (``eval.prompts_file=generated``); either way, any that are training prompts of the
run are dropped (or fail the stage). Questions of ``prompts_file`` prompts come from a
DSG-1K/TIFA file or the LLM. What the LLM writes is kept under ``eval/`` and reused while its
inputs match.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from selma_ray.config import SelmaConfig
from selma_ray.core import layout
from selma_ray.core.rundir import RunDir
from selma_ray.eval import dsg

log = logging.getLogger(__name__)
STAGE = "eval"
GENERATED = "generated"


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, spaces collapsed: how prompts are compared."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def load_eval_prompts(cfg: SelmaConfig, run: RunDir) -> tuple[list[dsg.EvalPrompt], list[str]]:
    """The held-out prompts, minus any that are training prompts of this run (returned too)."""
    ec = cfg.eval
    rows = layout.load_prompts(run, cfg.prompts.skills)
    if ec.dsg_file or ec.tifa_file:
        prompts = dsg.read_benchmarks(ec.dsg_file, ec.tifa_file)
        log.info(
            "eval: %d benchmark prompts (DSG-1K %s, TIFA v1.0 %s); eval.prompts_file is not used",
            len(prompts),
            ec.dsg_file or "-",
            ec.tifa_file or "-",
        )
    elif ec.prompts_file == GENERATED:
        prompts = generated_prompts(cfg, run, rows)
    else:
        prompts = dsg.read_prompts(ec.prompts_file)
    training = {normalize(r["prompt"]) for r in rows}
    overlap = [p.prompt for p in prompts if normalize(p.prompt) in training]
    if overlap and cfg.eval.on_overlap == "error":
        raise ValueError(
            f"eval: {len(overlap)} eval prompt(s) are also training prompts of this run, e.g. "
            f"{overlap[:3]}; use held-out prompts, or set eval.on_overlap=drop"
        )
    if overlap:
        log.warning("eval: dropped %d eval prompt(s) that are training prompts", len(overlap))
    kept = [p for p in prompts if normalize(p.prompt) not in training]
    if ec.max_prompts:  # the first N of each benchmark (one group without benchmark files)
        taken: dict[str, int] = {}
        first = []
        for p in kept:
            if taken.get(p.benchmark, 0) < ec.max_prompts:
                taken[p.benchmark] = taken.get(p.benchmark, 0) + 1
                first.append(p)
        kept = first
    if not kept:
        source = " and ".join(f for f in (ec.dsg_file, ec.tifa_file) if f) or ec.prompts_file
        raise ValueError(f"eval: no held-out prompts left in {source}")
    return kept, overlap


def generated_prompts(
    cfg: SelmaConfig, run: RunDir, rows: list[dict[str, Any]]
) -> list[dsg.EvalPrompt]:
    """Held-out prompts written by the LLM, kept in ``eval/prompts/`` and reused while the
    LLM, the prompts settings and the training prompts match."""
    training: dict[str, list[str]] = {}
    for r in rows:
        training.setdefault(r["skill"], []).append(r["prompt"])
    key = cfg.fingerprint(
        "prompts", extra=[cfg.models.llm, cfg.eval.generated_per_skill, cfg.run.seed, training]
    )
    cached = f"{STAGE}/prompts/prompts.json"
    if run.is_done(key, STAGE, "prompts") and run.is_file(cached):
        log.info("eval: reusing the held-out prompts generated earlier")
        return [dsg.EvalPrompt(**p) for p in run.read_json(cached)]
    start = time.perf_counter()
    prompts = dsg.generate_prompts(cfg, training)
    if not prompts:
        raise RuntimeError("eval: the LLM wrote no usable held-out prompts; use a prompts file")
    log.info(
        "eval: %d held-out prompts generated in %.1fs", len(prompts), time.perf_counter() - start
    )
    run.write_json(
        [{"id": p.id, "prompt": p.prompt, "category": p.category} for p in prompts], cached
    )
    run.write_manifest(key, STAGE, "prompts", count=len(prompts), outputs=run.outputs([cached]))
    return prompts


def attach_questions(
    cfg: SelmaConfig, prompts: list[dsg.EvalPrompt], run: RunDir | None = None
) -> None:
    """Fill each prompt's questions from the configured source (in place). LLM-written
    questions are kept in ``eval/questions/`` and reused while the LLM and prompts match.
    Benchmark prompts (``eval.dsg_file``/``eval.tifa_file``) keep the questions of their file."""
    ec = cfg.eval
    prompts = [p for p in prompts if not p.benchmark]
    if not prompts:
        return
    if ec.questions == "file":
        source = ec.questions_file or ec.prompts_file
        by_id = dsg.read_questions(source)
        missing = [p.id for p in prompts if not (p.questions or by_id.get(p.id))]
        if missing:
            raise ValueError(
                f"eval: {len(missing)} prompt(s) have no questions in {source}, e.g. {missing[:5]}"
                "; match ids (item_id) with the prompts file, or set eval.questions=llm"
            )
        for p in prompts:
            p.questions = p.questions or by_id[p.id]
    elif ec.questions == "llm":
        llm = ec.question_llm or cfg.models.llm
        key = cfg.fingerprint(
            extra=[llm, cfg.prompts.backend, ec.max_questions, [(p.id, p.prompt) for p in prompts]]
        )
        cached = f"{STAGE}/questions/questions.json"
        if run and run.is_done(key, STAGE, "questions") and run.is_file(cached):
            saved = run.read_json(cached)
            for p in prompts:
                p.questions = [dsg.Question.from_dict(q) for q in saved[p.id]]
            log.info("eval: reusing the questions %s wrote earlier", llm)
            return
        start = time.perf_counter()
        by_id = dsg.generate_questions(cfg, prompts)
        for p in prompts:
            p.questions = by_id[p.id]
        n = sum(len(p.questions) for p in prompts)
        log.info(
            "eval: %s wrote %d questions for %d prompts in %.1fs",
            llm,
            n,
            len(prompts),
            time.perf_counter() - start,
        )
        if run:
            run.write_json({p.id: [q.to_dict() for q in p.questions] for p in prompts}, cached)
            done = run.outputs([cached])
            run.write_manifest(key, STAGE, "questions", llm=llm, count=n, outputs=done)
