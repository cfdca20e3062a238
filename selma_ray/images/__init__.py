"""Stage 2, images. The sampler names live here, light to import: the config schema reads
them (``images.scheduler``), ``set_scheduler`` applies them."""

from __future__ import annotations

from typing import Any

# images.scheduler -> diffusers scheduler class, built from the model's own scheduler config
# (so its training betas and prediction type carry over).
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpmsolver_multistep": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap ``pipe.scheduler`` for the named sampler (``default`` keeps the model's own)."""
    if name == "default":
        return
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose default or one of {list(SCHEDULERS)}")
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


SCHEDULER_NAMES: tuple[str, ...] = ("default", *SCHEDULERS)
