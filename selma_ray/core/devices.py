"""Which device a task, actor or replica computes on: the GPUs Ray actually assigned to it.

A Serve replica deployed with ``num_gpus: 1`` holds a GPU whatever the run's config says, and
one deployed with ``num_gpus: 0`` has none (Ray hides the node's GPUs from it through
``CUDA_VISIBLE_DEVICES``). So inside a Ray worker the device follows the worker's assigned
resources; only outside one (a driver, a script, a unit test) does the configured GPU count
decide.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def assigned_gpus() -> float | None:
    """GPUs Ray assigned to the calling task or actor (fractions included), or None when the
    caller is not a Ray worker."""
    import ray

    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:  # a driver: nothing is assigned to it
        return None
    return float(ctx.get_assigned_resources().get("GPU", 0.0))


def use_cuda(configured_gpus: float) -> bool:
    """Compute on CUDA? Inside a Ray worker: when Ray gave it a GPU (and CUDA sees one);
    elsewhere: when the config asks for GPUs and CUDA is there."""
    import torch

    assigned = assigned_gpus()
    wanted = configured_gpus if assigned is None else assigned
    if assigned is not None and (assigned > 0) != (configured_gpus > 0):
        log.info(
            "device: Ray assigned %g GPU(s) (the config says %g); using %s",
            assigned,
            configured_gpus,
            "cuda" if assigned > 0 else "cpu",
        )
    return wanted > 0 and torch.cuda.is_available()


def torch_device_and_dtype(num_gpus: float, dtype: str):
    """The device (see ``use_cuda``) and the dtype from config (auto: fp16 on GPU)."""
    import torch

    on_gpu = use_cuda(num_gpus)
    if dtype == "auto":
        return ("cuda" if on_gpu else "cpu"), (torch.float16 if on_gpu else torch.float32)
    return ("cuda" if on_gpu else "cpu"), getattr(torch, dtype)
