"""Stage 4, merge: a Ray actor combines the skill experts into one adapter, ``merged``.

The paper's rule (SELMA Sec. 3.4) averages the experts' LoRA A matrices and, separately,
their B matrices: A = sum_i w_i A_i, B = sum_i w_i B_i with w_i = 1/N by default. The rank is
kept. Note that the merged update B A is *not* the mean of the experts' updates B_i A_i: it
also has cross terms B_i A_j.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from selma_ray import experts as experts_stage
from selma_ray.config import SelmaConfig
from selma_ray.lora_io import WEIGHT_NAME, adapter_file, load_adapter, save_adapter
from selma_ray.rundir import RunDir

log = logging.getLogger(__name__)
STAGE = "merged"


def check_weights(names: list[str], weights: dict[str, float] | None) -> list[float]:
    """Per-adapter weights in ``names`` order; None means the paper's 1/N."""
    if not names:
        raise ValueError("merge needs at least one adapter")
    if weights is None:
        return [1.0 / len(names)] * len(names)
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"merge weights name unknown adapters {unknown}; adapters: {names}")
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"merge weights are missing for {missing}; give one weight per adapter")
    bad = {n: w for n, w in weights.items() if not w >= 0}
    if bad or sum(weights.values()) <= 0:
        raise ValueError(f"merge weights must be >= 0 and not all zero, got {weights}")
    return [float(weights[n]) for n in names]


def paper_merge(states: list[dict[str, Any]], weights: list[float]) -> dict[str, Any]:
    """The paper's merge: weighted sum of each LoRA matrix, key by key, in float32."""
    import torch

    if not states:
        raise ValueError("merge needs at least one adapter")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} adapters but {len(weights)} weights")
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys:
            diff = sorted(keys.symmetric_difference(s))[:3]
            raise ValueError(f"adapter {i} targets different modules than adapter 0 (e.g. {diff})")
    merged = {}
    for key in sorted(keys):
        shapes = {tuple(s[key].shape) for s in states}
        if len(shapes) > 1:
            raise ValueError(
                f"{key}: shapes differ {sorted(shapes)}; the paper merge needs equal ranks"
            )
        dtype = states[0][key].dtype
        acc = sum(w * s[key].to(torch.float32) for w, s in zip(weights, states, strict=True))
        merged[key] = acc.to(dtype)
    return merged


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def merge_adapters(
    inputs: dict[str, str], weights: dict[str, float] | None, out_dir: str
) -> dict[str, Any]:
    """Merge adapter folders or files by the paper rule into ``out_dir``; returns metadata."""
    names = list(inputs)
    w = check_weights(names, weights)
    loaded = [load_adapter(Path(inputs[n])) for n in names]
    configs = [c for _, c in loaded]
    for key in ("r", "lora_alpha"):
        values = {c.get(key) for c in configs}
        if len(values) > 1:
            raise ValueError(
                f"adapters disagree on LoRA {key} ({values}); the paper merge needs one"
            )
    merged = paper_merge([s for s, _ in loaded], w)
    save_adapter(Path(out_dir), merged, configs[0])
    return {
        "method": "paper",
        "weights": dict(zip(names, w, strict=True)),
        "inputs": {n: file_sha256(adapter_file(Path(p))) for n, p in inputs.items()},
        "adapter": str(Path(out_dir) / WEIGHT_NAME),
    }


class MergeActor:
    """Ray actor that merges on the resources given to it (CPU by default)."""

    def merge(
        self, inputs: dict[str, str], weights: dict[str, float] | None, out_dir: str
    ) -> dict[str, Any]:
        return merge_adapters(inputs, weights, out_dir)


def fingerprint(cfg: SelmaConfig) -> str:
    experts = {s: experts_stage.fingerprint(cfg, s) for s in cfg.prompts.skills}
    return cfg.fingerprint("merge", extra={"experts": experts})


def run_merge(cfg: SelmaConfig, run: RunDir) -> dict[str, Any]:
    """Merge the experts of this run into ``merged/``; returns the stage summary."""
    import ray

    fp = fingerprint(cfg)
    if run.is_done(fp, STAGE):
        log.info("merge: finished earlier with the same config, skipping")
        return {**(run.read_manifest(STAGE) or {}), "skipped": True}
    inputs = {s: str(run.path(experts_stage.STAGE, s)) for s in cfg.prompts.skills}
    res = cfg.resources.merge
    actor = ray.remote(MergeActor).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus).remote()
    try:
        info = ray.get(actor.merge.remote(inputs, cfg.merge.weights, str(run.path(STAGE))))
    finally:
        ray.kill(actor)
    log.info("merge: %s merge of %d experts -> %s", info["method"], len(inputs), info["adapter"])
    return run.write_manifest(fp, STAGE, **info)
