"""Stage 4, merge: a Ray actor merges the skill experts.

The rules are pure functions in ``selma_ray.lora.methods`` and adapter files are read and
written by ``selma_ray.lora.files``; this module runs the stage. Each method in
``merge.methods`` goes to ``merges/<method>/`` (the experts' diffusers LoRA format, with a
manifest: method, weights, input sha256, score), and each of ``merge.subsets`` (a merge of a
few experts with the default method) to ``merges/<name>/``. ``merged/`` gets ``merge.default``
or, with ``merge.select=validation``, the method with the lowest denoising loss on a fixed
sample of the run's images (``selma_ray.merge.validate``).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from selma_ray.config import SelmaConfig
from selma_ray.core import layout
from selma_ray.core.lineage import Lineage, file_sha256
from selma_ray.core.lora_io import WEIGHT_NAME
from selma_ray.core.rundir import RunDir
from selma_ray.lora.files import merge_loaded, read_lora, weight_file
from selma_ray.merge.validate import validation_scores

log = logging.getLogger(__name__)
STAGE = layout.MERGED
MERGES = layout.MERGES


def merge_run(job: dict[str, Any]) -> dict[str, Any]:
    """Write every configured merge of a run and choose ``merged``; returns its manifest info.

    Runs wherever the actor lands: the experts are copied from the run's storage into a local
    scratch folder, merged there, and the merges written back to the run's storage."""
    run = RunDir.from_spec(job["run"])
    methods = job["methods"]
    with tempfile.TemporaryDirectory(prefix="selma-merge-") as scratch:
        local = Path(scratch)
        inputs = {
            s: str(run.get_file(local / "in" / s / WEIGHT_NAME, *parts, WEIGHT_NAME).parent)
            for s, parts in job["inputs"].items()
        }
        loaded = {n: read_lora(p) for n, p in inputs.items()}
        shas = {n: file_sha256(weight_file(p)) for n, p in inputs.items()}
        done = {}
        for method in methods:
            out = local / "out" / method
            done[method] = merge_loaded(loaded, shas, method, job["weights"], out, **job["options"])
            log.info("merge: %s of %d experts -> %s", method, len(inputs), run.url(MERGES, method))
        for name, skills in job["subsets"].items():  # merges of a chosen few experts
            weights = job["weights"]
            done[name] = merge_loaded(
                {s: loaded[s] for s in skills},
                {s: shas[s] for s in skills},
                job["default"],
                {s: weights[s] for s in skills} if weights else None,
                local / "out" / name,
                **job["options"],
            )
            log.info("merge: %s of %s -> %s", job["default"], skills, run.url(MERGES, name))
        del loaded
        scores: dict[str, float] = {}
        chosen = job["default"]
        if job["select"] == "validation":
            paths = {m: str(local / "out" / m) for m in methods}
            opts = job["options"]
            scores = validation_scores(
                job["base"],
                (run, job["images"]),
                paths,
                job["samples"],
                opts["seed"],
                opts["device"],
            )
            chosen = min(methods, key=lambda m: scores[m])
            log.info("merge: validation losses %s -> %s", scores, chosen)
        for method, info in done.items():
            extra = {"score": scores[method]} if method in scores else {}
            run.drop_manifest(MERGES, method)
            run.put_dir(local / "out" / method, MERGES, method)
            adapter = run.url(MERGES, method, WEIGHT_NAME)
            done[method] = {**info, "adapter": adapter}
            written = run.outputs([f"{MERGES}/{method}/{WEIGHT_NAME}"])
            run.write_manifest(
                job["fingerprint"], MERGES, method, **done[method], **extra, outputs=written
            )
        run.put_dir(local / "out" / chosen, STAGE)
    return {
        "shas": dict(run.written),  # content digests, for the driver's manifest
        **done[chosen],
        "adapter": run.url(STAGE, WEIGHT_NAME),
        "selected_by": job["select"],
        "scores": scores,
        "merges": {m: info["adapter"] for m, info in done.items()},
    }


class MergeActor:
    """Ray actor that merges on the resources given to it (CPU by default)."""

    def __init__(self) -> None:
        from selma_ray.core.logs import setup_logging

        setup_logging()

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        return merge_run(job)


def merge_job(cfg: SelmaConfig, run: RunDir, fingerprint: str) -> dict[str, Any]:
    """What ``merge_run`` needs, as plain data for the actor."""
    mc = cfg.merge
    return {
        "run": run.spec,
        "inputs": {s: layout.expert_dir(s) for s in cfg.prompts.skills},
        "images": layout.images_files(run) if mc.select == "validation" else [],
        "methods": list(mc.methods),
        "subsets": dict(mc.subsets),
        "default": mc.default,
        "select": mc.select,
        "weights": mc.weights,
        "options": {
            "rank": mc.svd_rank,
            **mc.model_dump(include={"density", "seed", "device", "dtype"}),
        },
        "base": cfg.models.base,
        "samples": mc.val_samples,
        "fingerprint": fingerprint,
    }


def run_merge(cfg: SelmaConfig, run: RunDir, lineage: Lineage) -> dict[str, Any]:
    """Write every configured merge of this run's experts and ``merged/``; returns the summary."""
    import ray

    fp = lineage.fingerprint
    if run.is_done(fp, STAGE):
        log.info("merge: finished earlier with the same inputs, skipping")
        return {**(run.read_manifest(STAGE) or {}), "skipped": True}
    res = cfg.resources.merge
    if cfg.merge.device == "cuda" and res.num_gpus <= 0:
        raise ValueError("merge.device=cuda needs resources.merge.num_gpus > 0")
    run.drop_manifest(STAGE)  # un-commit: merged/ is rewritten below
    for old in run.listdir(MERGES):  # merges no longer configured would be served
        if old not in cfg.merge.methods and old not in cfg.merge.subsets:
            run.delete(MERGES, old)
    actor = (
        ray.remote(MergeActor)
        .options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, resources=res.custom)
        .remote()
    )
    try:
        info = ray.get(actor.run.remote(merge_job(cfg, run, fp)))
    finally:
        ray.kill(actor)
    run.written.update(info.pop("shas"))
    log.info("merge: 'merged' is %s (%s) -> %s", info["method"], cfg.merge.select, info["adapter"])
    written = [f"{STAGE}/{WEIGHT_NAME}"]
    written += [f"{MERGES}/{m}/{WEIGHT_NAME}" for m in [*cfg.merge.methods, *cfg.merge.subsets]]
    return run.write_manifest(
        fp, STAGE, **info, lineage=lineage.inputs, outputs=run.outputs(written)
    )
