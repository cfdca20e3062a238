"""Stage 6, eval: held-out prompts rendered by every variant, scored, aggregated, reported.

1. Prompts come from the published benchmark files (``eval.dsg_file``: DSG-1K,
   ``eval.tifa_file``: TIFA v1.0) or, without them, from ``eval.prompts_file`` (or the LLM),
   which makes numbers not comparable with the paper's (a WARNING and a note in the report
   and summary, ``selma_ray.eval.protocol``). Any that are also training prompts of this run
   are dropped (or fail the stage, ``eval.on_overlap=error``).
2. DSG-1K and TIFA prompts bring their questions. Other prompts' DSG questions are written by
   the LLM on Ray Data, read from a DSG-1K/TIFA file, or off. Only DSG-1K questions make the
   published DSG protocol; otherwise the metric is labelled "DSG-style" (its key stays
   ``dsg``), and prompts the LLM wrote no parseable questions for, asked one holistic
   question instead, are counted per variant.
3. Ray Data renders variant x prompt x seed on actors holding a ``DiffusionService`` (base,
   each expert, ``merged``, ``merged-<method>``); a prompt's seeds are the same for every
   variant, so differences against base are paired. Images go to ``eval/images/`` (Parquet).
4. Each scorer then runs over the images as its own Ray Data actor pass; the VQA scorers
   (dsg on DSG-1K or other prompts, tifa on TIFA prompts) answer by ``eval.vqa_mode``.
5. Means, bootstrap 95% CIs and paired differences vs base, per variant and per category,
   go to ``eval/metrics.json`` (DSG: both the per-question and the per-prompt average, the
   headline by ``eval.dsg_average``); ``eval/report.html`` shows them with charts and image
   grids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from selma_ray.config import SelmaConfig
from selma_ray.core.lineage import Lineage, digest
from selma_ray.core.rundir import RunDir
from selma_ray.core.seeds import stable_seed
from selma_ray.core.udf import require_columns
from selma_ray.eval import dsg, protocol
from selma_ray.eval.inputs import STAGE, attach_questions, load_eval_prompts
from selma_ray.eval.scorers import LABELS, VQA_SCORERS, model_ids, unavailable

log = logging.getLogger(__name__)
TINY_NOTE = (
    "The scorers of this run are tiny, randomly initialised models built locally (and the "
    "diffusion model is too): these numbers show only that the evaluation plumbing works, "
    "not whether the method does. Use a paper preset for real scores."
)
DSG_STYLE = "DSG-style"
# dsg.question_source() -> the key counting it in metrics.json (metrics.dsg.<variant>.questions)
SOURCE_KEYS = {
    dsg.LLM: "llm_written",
    dsg.HOLISTIC: "holistic_fallback",
    dsg.FROM_FILE: "from_file",
    "": "no_questions",
}


def steps(cfg: SelmaConfig) -> int:
    return cfg.eval.steps or cfg.images.steps


def guidance(cfg: SelmaConfig) -> float:
    g = cfg.eval.guidance_scale
    return cfg.images.guidance_scale if g is None else g


def render_rows(cfg: SelmaConfig, prompts: list[dsg.EvalPrompt], variants: list[str]):
    """variant x prompt x seed; a prompt's seeds do not depend on the variant."""
    rows = []
    for v in variants:
        for p in prompts:
            for k in range(cfg.eval.seeds_per_prompt):
                rows.append(
                    {
                        "variant": v,
                        "prompt_id": p.id,
                        "prompt": p.prompt,
                        "category": p.category,
                        "benchmark": p.benchmark,
                        "seed_index": k,
                        "seed": stable_seed(cfg.run.seed, "eval", p.id, k),
                    }
                )
    return rows


def scorer_questions(
    name: str, prompts: list[dsg.EvalPrompt]
) -> dict[str, list[dict[str, Any]]] | None:
    """The questions VQA scorer ``name`` asks, by prompt id: tifa those of TIFA v1.0 prompts,
    dsg those of every other prompt (DSG-1K or ``prompts_file``); None for other scorers."""
    if name not in VQA_SCORERS:
        return None
    tifa = name == "tifa"
    return {
        p.id: [q.to_dict() for q in p.questions]
        for p in prompts
        if (p.benchmark == dsg.TIFA) == tifa
    }


def render_key(cfg: SelmaConfig, rows: list[dict[str, Any]], adapters: Any) -> str:
    """What the rendered images depend on: the adapters (their output digests), sampler
    settings and the rows themselves (so changing scorers or report settings re-scores
    without re-rendering)."""
    plan = [(r["variant"], r["prompt_id"], r["prompt"], r["seed"]) for r in rows]
    settings = [steps(cfg), guidance(cfg), cfg.images.resolution, cfg.models.base]
    return digest([adapters, settings, plan])


class EvalRenderer:
    """Ray Data UDF: renders each row's prompt with its variant's adapter and its seed."""

    def __init__(self, run: dict[str, Any], num_gpus: float, steps: int, guidance_scale: float):
        from selma_ray.core.logs import setup_logging
        from selma_ray.diffusion.engine import DiffusionService

        setup_logging()
        # Adapters copied from the run's storage; the device follows the actor's GPUs.
        self.svc = DiffusionService(run, num_gpus)
        self.steps, self.guidance = steps, guidance_scale

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from selma_ray.diffusion.engine import parse_adapter_spec

        require_columns("EvalRenderer", batch, ("variant", "prompt", "seed"))
        variants = [str(v) for v in batch["variant"]]
        images: list[bytes] = [b""] * len(variants)
        size = self.svc.native_size
        for v in dict.fromkeys(variants):
            idx = [i for i, x in enumerate(variants) if x == v]
            spec = parse_adapter_spec(v, set(self.svc.adapters))
            pngs = self.svc.generate_many(
                spec,
                [str(batch["prompt"][i]) for i in idx],
                [int(batch["seed"][i]) for i in idx],
                self.steps,
                self.guidance,
                size,
                size,
            )
            for i, png in zip(idx, pngs, strict=True):
                images[i] = png
            log.info("eval: [%s] rendered %d images", v, len(idx))
        batch["image"] = np.array(images, dtype=object)
        return batch


def _pool(cfg: SelmaConfig) -> dict[str, Any]:
    import ray

    res = cfg.resources.eval
    return {
        "compute": ray.data.ActorPoolStrategy(min_size=res.min_size, max_size=res.max_size),
        "num_gpus": res.num_gpus,
        "num_cpus": res.num_cpus,
        "resources": res.custom,
        "batch_size": cfg.eval.batch_size,
    }


def render(cfg: SelmaConfig, run: RunDir, rows: list[dict[str, Any]], key: str) -> list[str]:
    """Render ``rows`` into ``eval/images/data`` unless images with the same ``key`` are
    committed there; returns the shards (paths in ``run.fs``)."""
    import ray

    from selma_ray.core import layout

    parts = (STAGE, "images")
    if run.is_done(key, *parts):
        log.info("eval: reusing %d rendered images from an earlier attempt", len(rows))
        return layout.images_files(run, "/".join(parts))
    run.drop_manifest(*parts)  # un-commit first, then clear strays and rewrite
    run.delete(*parts, "data")
    ds = ray.data.from_items(rows).map_batches(
        EvalRenderer,
        fn_constructor_kwargs={
            "run": run.spec,
            "num_gpus": cfg.resources.eval.num_gpus,
            "steps": steps(cfg),
            "guidance_scale": guidance(cfg),
        },
        **_pool(cfg),
    )
    ds.write_parquet(
        run.key(*parts, "data"), filesystem=run.fs, max_rows_per_file=layout.IMAGE_ROWS_PER_FILE
    )
    shards = run.files(*parts, "data", suffix=".parquet")
    run.write_manifest(key, *parts, count=len(rows), outputs=run.outputs(shards))
    return [run.key(f) for f in shards]


def score(
    cfg: SelmaConfig,
    run: RunDir,
    images: list[str],
    name: str,
    questions: dict[str, list[dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """One Ray Data pass of scorer ``name`` over the rendered images (VQA scorers: over those
    whose prompt has ``questions``, the others get NaN)."""
    from selma_ray.core import layout
    from selma_ray.eval.scorers import ScoreBatch

    keep = ["variant", "prompt_id", "seed_index", f"score_{name}"]
    keep += [f"{name}_detail"] if name in VQA_SCORERS else []
    ds = layout.read_dataset(run, images, None).map_batches(
        ScoreBatch,
        fn_constructor_kwargs={
            "name": name,
            "ids": model_ids(name, cfg.eval),
            "num_gpus": cfg.resources.eval.num_gpus,
            "questions": questions,
        },
        **_pool(cfg),
    )
    return ds.select_columns(keep).take_all()


def grid_rows(
    run: RunDir, images: list[str], prompts: list[dsg.EvalPrompt], count: int
) -> list[tuple[str, dict[str, bytes]]]:
    """Up to ``count`` prompts (categories taken in turn), seed 0, image per variant; only
    those rows' images are read."""
    import pyarrow.dataset as pads

    from selma_ray.core import layout

    by_cat: dict[str, list[dsg.EvalPrompt]] = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    chosen: list[dsg.EvalPrompt] = []
    while len(chosen) < min(count, len(prompts)):
        for group in by_cat.values():
            if group and len(chosen) < count:
                chosen.append(group.pop(0))
    ids = [p.id for p in chosen]
    table = layout.read_table(
        run,
        images,
        ["variant", "prompt_id", "seed_index", "image"],
        filter=(pads.field("seed_index") == 0) & pads.field("prompt_id").isin(ids),
    )
    found: dict[str, dict[str, bytes]] = {i: {} for i in ids}
    for r in table.to_pylist():
        if r["seed_index"] == 0 and r["prompt_id"] in found:
            found[r["prompt_id"]][r["variant"]] = r["image"]
    text = {p.id: p.prompt for p in chosen}
    return [(text[i], found[i]) for i in ids]


def _distinct(run: RunDir, adapters: dict[str, Any]) -> list[str]:
    """Names of adapters with distinct weights: ``merged`` is a copy of its method's merge
    (``merged-<method>``), and rendering and scoring it twice would show the same numbers."""
    seen: dict[str, str] = {}
    keep = []
    for name, info in adapters.items():
        if info.path is not None:
            digest = info.sha256 or hashlib.sha256(run.read_bytes(info.path)).hexdigest()
            if digest in seen:
                log.info("eval: %s has the same weights as %s; evaluated once", name, seen[digest])
                continue
            seen[digest] = name
        keep.append(name)
    return keep


def select_variants(cfg: SelmaConfig, run: RunDir) -> list[str]:
    from selma_ray.diffusion.engine import find_adapters

    adapters = find_adapters(run)
    found = list(adapters)
    wanted = cfg.eval.variants
    if wanted is None:
        return _distinct(run, adapters)
    unknown = sorted(set(wanted) - set(found))
    if unknown:
        raise ValueError(f"eval.variants {unknown} are not adapters of this run; found {found}")
    return [v for v in found if v in wanted]


def question_accuracy(
    rows: list[dict[str, Any]], prompts: list[dsg.EvalPrompt], column: str = "dsg_detail"
) -> dict[str, dict[str, dict[str, float]]]:
    """variant -> question category (DSG: entity, attribute, relation, ...; TIFA: element type)
    -> share of raw VQA answers that were correct, before dependency zeroing, and the number
    of answers (``column``: the scorer's detail column)."""
    category = {(p.id, q.id): q.category or "all" for p in prompts for q in p.questions}
    counts: dict[str, dict[str, list[int]]] = {}
    for r in rows:
        for d in r.get(column) or []:
            cat = category.get((r["prompt_id"], d["id"]), "all")
            c = counts.setdefault(r["variant"], {}).setdefault(cat, [0, 0])
            c[0] += int(d["correct"])
            c[1] += 1
    return {
        v: {cat: {"accuracy": ok / n, "n": n} for cat, (ok, n) in sorted(cats.items())}
        for v, cats in counts.items()
    }


def headline(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """variant -> metric -> {mean, delta} for the job summary."""
    out: dict[str, dict[str, Any]] = {}
    for metric, entries in metrics.items():
        for v, e in entries.items():
            delta = e.get("vs_base", {}).get("mean")
            out.setdefault(v, {})[metric] = {"mean": e["mean"], "delta": delta}
    return out


def log_results(metrics: dict[str, dict[str, Any]], labels: dict[str, str] | None = None) -> None:
    """One line per metric and variant: mean, CI and the paired change vs base."""
    for name, entries in metrics.items():
        for v, e in entries.items():
            vs = e.get("vs_base")
            log.info(
                "eval: [%s] %-20s %.4g [%.4g, %.4g]%s",
                (labels or {}).get(name, LABELS[name]),
                v,
                e["mean"],
                *e["ci"],
                f"  vs base {vs['mean']:+.4g} [{vs['ci'][0]:+.4g}, {vs['ci'][1]:+.4g}]"
                if vs
                else "",
            )


def write_outputs(
    run: RunDir,
    doc: dict[str, Any],
    table: list[dict[str, Any]],
    prompts: list[dsg.EvalPrompt],
    grids: list[tuple[str, dict[str, bytes]]],
) -> None:
    """scores.jsonl, questions.jsonl, metrics.json and report.html under ``eval/``."""
    from selma_ray.eval import report as eval_report

    run.write_text("".join(json.dumps(r, default=str) + "\n" for r in table), STAGE, "scores.jsonl")
    questions = [
        {"id": p.id, "prompt": p.prompt, "questions": [q.to_dict() for q in p.questions]}
        for p in prompts
    ]
    run.write_text("".join(json.dumps(q) + "\n" for q in questions), STAGE, "questions.jsonl")
    run.write_json(doc, STAGE, "metrics.json")
    run.write_text(eval_report.render_html(doc, grids), STAGE, "report.html")
    log.info("eval: report at %s", run.url(STAGE, "report.html"))


def _answered_by(model: str, mode: str) -> str:
    how = {
        "generate": "generated answers, normalised (lower case, no punctuation)",
        "rank": "the choice the model finds most likely (vqa_mode=rank, not the published "
        "protocol)",
    }[mode]
    return f"answered by {model}: {how}"


def dsg_protocol(cfg: SelmaConfig) -> dict[str, str]:
    """The DSG metric's label and how its questions were made and answered. Only questions read
    from a DSG-1K-format CSV follow the published DSG protocol ("DSG"); questions written by the
    LLM, or TIFA questions, make it "DSG-style"."""
    ec = cfg.eval
    answered = _answered_by(ec.vqa_model, ec.vqa_mode)
    average = f"headline average: {protocol.AVERAGE_TEXT[ec.dsg_average]}"
    if ec.dsg_file:
        return {
            "label": LABELS["dsg"],
            "protocol": f"DSG-1K prompts, questions and dependencies read from {ec.dsg_file}, "
            f"{answered}; a question is right when the answer is 'yes', a child of a question "
            f"that scored 0 scores 0; {average}",
            "average": ec.dsg_average,
        }
    if ec.questions == "file":
        source = ec.questions_file or ec.prompts_file
        if Path(source).suffix == ".json":
            return {
                "label": DSG_STYLE,
                "protocol": f"TIFA questions read from {source} (multiple choice, no "
                f"dependencies), {answered}: DSG-style, not the published DSG; {average}",
                "average": ec.dsg_average,
            }
        return {
            "label": LABELS["dsg"],
            "protocol": f"questions read from {source} (DSG-1K CSV format, as in the published "
            f"DSG), {answered}; {average}",
            "average": ec.dsg_average,
        }
    llm = ec.question_llm or cfg.models.llm
    return {
        "label": DSG_STYLE,
        "protocol": f"questions written by {llm} in the DSG format, not the published DSG-1K "
        f"questions; a prompt without parseable questions is asked one holistic question; "
        f"{answered}; {average}",
        "average": ec.dsg_average,
    }


def tifa_protocol(cfg: SelmaConfig) -> dict[str, str]:
    ec = cfg.eval
    answered = _answered_by(ec.tifa_vqa_model or ec.vqa_model, ec.vqa_mode)
    mapped = (
        ", mapped to the nearest choice (same text, number words as digits, the one choice "
        "named in the answer, else difflib similarity; TIFA's code uses SBERT)"
        if ec.vqa_mode == "generate"
        else ""
    )
    return {
        "label": LABELS["tifa"],
        "protocol": f"TIFA v1.0 prompts and multiple-choice questions read from {ec.tifa_file}, "
        f"{answered}{mapped}; a prompt's score is the share answered right; headline average: "
        "mean of the per-prompt scores (TIFA's tifa_average)",
        "average": protocol.PROMPT,
    }


def _vqa_skip_reason(cfg: SelmaConfig, name: str) -> str | None:
    ec = cfg.eval
    if name == "tifa":
        return None if ec.tifa_file else "no TIFA v1.0 file (eval.tifa_file)"
    if protocol.benchmark_mode(ec):
        return None if ec.dsg_file else "no DSG-1K file (eval.dsg_file); eval.tifa_file only"
    return "eval.questions=none" if ec.questions == "none" else None


def scorer_status(cfg: SelmaConfig) -> dict[str, dict[str, Any]]:
    """Each configured scorer: label, model ids, and whether it runs (or why it is skipped)."""
    ec = cfg.eval
    scorers: dict[str, dict[str, Any]] = {}
    for name in ec.scorers:
        reason = unavailable(name)
        if name in VQA_SCORERS and not reason:
            reason = _vqa_skip_reason(cfg, name)
        scorers[name] = {
            "label": LABELS[name],
            "status": "skipped" if reason else "ok",
            "reason": reason,
            "model_ids": model_ids(name, ec),
        }
        if name == "dsg" and not reason:
            scorers[name].update(dsg_protocol(cfg))
        if name == "tifa" and not reason:
            scorers[name].update(tifa_protocol(cfg))
        if reason:
            log.warning("eval: scorer %s skipped: %s", LABELS[name], reason)
    for name, path in (("dsg", ec.dsg_file), ("tifa", ec.tifa_file)):
        if path and name not in ec.scorers:
            log.warning(
                "eval: %s is given but scorer %s is not in eval.scorers: its prompts are "
                "rendered and scored by the other scorers only",
                path,
                name,
            )
    return scorers


def question_sources(
    rows: list[dict[str, Any]], prompts: list[dsg.EvalPrompt]
) -> dict[str, dict[str, int]]:
    """variant -> over the prompts that variant was scored on (a finite DSG score), how many
    had LLM-written questions, the holistic fallback question, questions from a file, or none;
    ``prompts`` is their total (the metric's ``n``)."""
    from selma_ray.eval import stats as eval_stats

    kind = {p.id: SOURCE_KEYS[dsg.question_source(p)] for p in prompts}
    out: dict[str, dict[str, int]] = {}
    for variant, scores in eval_stats.per_prompt(rows, "score_dsg").items():
        counts = dict.fromkeys(SOURCE_KEYS.values(), 0)
        for pid in scores:
            counts[kind.get(pid, SOURCE_KEYS[""])] += 1
        out[variant] = {**counts, "prompts": len(scores)}
    return out


def build_doc(
    cfg: SelmaConfig,
    run: RunDir,
    prompts: list[dsg.EvalPrompt],
    dropped: list[str],
    scorers: dict[str, dict[str, Any]],
    variants: list[str],
    table: list[dict[str, Any]],
    metrics: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The metrics.json document: models, scorers, prompts, metrics, how comparable they are
    with the paper's (``benchmark``) and, for DSG, both averages (``protocol.dsg_averages``),
    the question accuracy by category and where each variant's scored prompts got their
    questions (added in place to ``metrics["dsg"][variant]["questions"]``, and the fallback
    prompts' ids to ``scorers["dsg"]``)."""
    from selma_ray.models import is_builtin

    ec = cfg.eval
    tiny = any(is_builtin(m) for s in scorers.values() for m in s["model_ids"].values())
    if "dsg" in metrics:
        protocol.dsg_averages(
            metrics["dsg"],
            table,
            [p for p in prompts if p.benchmark != dsg.TIFA],
            ec.dsg_average,
            {p.id: p.category for p in prompts},
            n_boot=ec.bootstrap,
            seed=cfg.run.seed,
        )
        fallback = [p.id for p in prompts if dsg.question_source(p) == dsg.HOLISTIC]
        scorers["dsg"]["holistic_fallback_prompts"] = fallback
        if fallback:
            log.warning(
                "eval: %d/%d prompts are scored with one holistic question (the LLM wrote no "
                "parseable questions for them): %s",
                len(fallback),
                len(prompts),
                fallback[:10],
            )
        for variant, counts in question_sources(table, prompts).items():
            metrics["dsg"][variant]["questions"] = counts
    return {
        "run_dir": run.uri,
        "note": TINY_NOTE if tiny or is_builtin(cfg.models.base) else "",
        "models": {
            "base": cfg.models.base,
            "questions": (
                "read from the benchmark files: "
                + " + ".join(f for f in (ec.dsg_file, ec.tifa_file) if f)
                if protocol.benchmark_mode(ec)
                else {
                    "llm": f"written by {ec.question_llm or cfg.models.llm}",
                    "file": f"read from {ec.questions_file or ec.prompts_file}",
                    "none": "none",
                }[ec.questions]
            ),
        },
        "scorers": scorers,
        "benchmark": {
            "dsg_file": ec.dsg_file,
            "tifa_file": ec.tifa_file,
            "vqa_mode": ec.vqa_mode,
            "dsg_average": ec.dsg_average,
            "notes": protocol.notes(cfg),
        },
        "prompts": {
            "source": " + ".join(f for f in (ec.dsg_file, ec.tifa_file) if f) or ec.prompts_file,
            "count": len(prompts),
            "by_benchmark": {
                b or "prompts_file": sum(p.benchmark == b for p in prompts)
                for b in dict.fromkeys(p.benchmark for p in prompts)
            },
            "categories": sorted({p.category for p in prompts if p.category}),
            "dropped_overlap": dropped,
        },
        "variants": variants,
        "seeds_per_prompt": ec.seeds_per_prompt,
        "steps": steps(cfg),
        "guidance_scale": guidance(cfg),
        "metrics": metrics,
        "dsg_questions": question_accuracy(table, prompts) if "dsg" in metrics else {},
        "tifa_questions": (
            question_accuracy(table, prompts, "tifa_detail") if "tifa" in metrics else {}
        ),
    }


def run_eval(cfg: SelmaConfig, run: RunDir, lineage: Lineage) -> dict[str, Any]:
    """Evaluate every variant of this run; returns the stage summary."""
    from selma_ray.eval import stats as eval_stats

    ec = cfg.eval
    if not ec.enabled:
        return {"skipped": True, "reason": "eval.enabled=false"}
    fp = lineage.fingerprint
    if run.is_done(fp, STAGE):
        log.info("eval: finished earlier with the same inputs, skipping")
        return {**(run.read_manifest(STAGE) or {}), "skipped": True}
    protocol.warn(cfg)  # e.g. no DSG-1K/TIFA file: not comparable with the paper's numbers
    prompts, dropped = load_eval_prompts(cfg, run)
    scorers = scorer_status(cfg)
    if scorers.get("dsg", {}).get("status") == "ok":
        attach_questions(cfg, prompts, run)
    variants = select_variants(cfg, run)
    rows = render_rows(cfg, prompts, variants)
    log.info(
        "eval: rendering %d images: %d variants %s x %d prompts x %d seed(s), %d steps",
        len(rows),
        len(variants),
        variants,
        len(prompts),
        ec.seeds_per_prompt,
        steps(cfg),
    )
    start = time.perf_counter()
    adapters = {k: lineage.upstream.get(k) for k in ("merge", "experts")}
    images = render(cfg, run, rows, render_key(cfg, rows, adapters))
    log.info("eval: images ready in %.1fs", time.perf_counter() - start)
    results = {(r["variant"], r["prompt_id"], r["seed_index"]): dict(r) for r in rows}
    active = [n for n, s in scorers.items() if s["status"] == "ok"]
    for name in active:
        start = time.perf_counter()
        for r in score(cfg, run, images, name, scorer_questions(name, prompts)):
            detail = f"{name}_detail"
            if detail in r:
                r[detail] = json.loads(r[detail])
            results[(r["variant"], r["prompt_id"], r["seed_index"])].update(r)
        log.info(
            "eval: %s scored %d images in %.1fs",
            scorers[name]["label"],
            len(rows),
            time.perf_counter() - start,
        )
    table = list(results.values())
    categories = {p.id: p.category for p in prompts}
    metrics = eval_stats.aggregate(
        table, active, categories, n_boot=ec.bootstrap, seed=cfg.run.seed
    )
    doc = build_doc(cfg, run, prompts, dropped, scorers, variants, table, metrics)
    log_results(metrics, {n: s["label"] for n, s in scorers.items()})
    if "dsg" in metrics:
        for v, e in metrics["dsg"].items():
            log.info(
                "eval: [%s] %-20s per-question average %.4g, per-prompt average %.4g (headline: "
                "per-%s)",
                scorers["dsg"]["label"],
                v,
                e["averages"]["question"]["mean"],
                e["averages"]["prompt"]["mean"],
                e["average"],
            )
    write_outputs(run, doc, table, prompts, grid_rows(run, images, prompts, ec.grid_prompts))
    written = [f"{STAGE}/metrics.json", f"{STAGE}/scores.jsonl"]
    return run.write_manifest(
        fp,
        STAGE,
        lineage=lineage.inputs,
        outputs=run.outputs(written),
        report=run.url(STAGE, "report.html"),
        metrics=run.url(STAGE, "metrics.json"),
        headline=headline(metrics),
        labels={n: s["label"] for n, s in scorers.items()},
        skipped_scorers={n: s["reason"] for n, s in scorers.items() if s["status"] != "ok"},
        averages={n: s["average"] for n, s in scorers.items() if s.get("average")},
        comparability=doc["benchmark"]["notes"],
        prompts=len(prompts),
        variants=variants,
    )
