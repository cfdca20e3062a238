"""selma_ray: SELMA (skill-specific text-to-image LoRA experts from auto-generated data,
merged) as a distributed system on Ray.

The public API, imported lazily so that ``import selma_ray`` stays light::

    from selma_ray import load_config, run_pipeline
    cfg = load_config("tiny", ["run.dir=runs/mine"])
    run_pipeline(cfg)

One subpackage per stage (``prompts``, ``images``, ``experts``, ``merge``, ``eval``,
``serving``); what they share lives in ``config``, ``core``, ``models``, ``text``,
``diffusion`` and ``lora``; ``pipeline`` owns the graph between the stages.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "load_config": "selma_ray.config",
    "SelmaConfig": "selma_ray.config",
    "ConfigError": "selma_ray.config",
    "RunDir": "selma_ray.core.rundir",
    "run_pipeline": "selma_ray.pipeline",
    "run_stage": "selma_ray.pipeline",
    "plan_status": "selma_ray.pipeline",
    "merge_adapters": "selma_ray.merge.files",
    "build_app": "selma_ray.serving.app",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'selma_ray' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
