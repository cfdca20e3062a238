"""Stage 5, serving (engine side): the base model with every adapter of a run loaded once.

``find_adapters`` discovers what a run directory offers; ``DiffusionService`` holds one
diffusers pipeline with all of them loaded unfused and switches per request with
``set_adapters`` (or disables LoRA for ``base``). The HTTP layer lives in ``serve/app.py``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from selma_ray import experts as experts_stage
from selma_ray import merge as merge_stage
from selma_ray.config import SelmaConfig, validate
from selma_ray.lora_io import WEIGHT_NAME, adapter_file
from selma_ray.rundir import RunDir

log = logging.getLogger(__name__)
BASE = "base"


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    kind: str  # "base", "expert" or "merged"
    skill: str | None
    rank: int | None
    path: str | None


def load_run_config(run_dir: str | Path) -> SelmaConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a selma_ray run directory?")
    return validate(yaml.safe_load(path.read_text()))


def find_adapters(run_dir: str | Path) -> dict[str, AdapterInfo]:
    """Every finished adapter of a run, plus ``base``: the experts, ``merged`` and each
    method's merge as ``merged-<method>``."""
    from selma_ray.lora_io import load_adapter

    run = RunDir(run_dir)
    found = {BASE: AdapterInfo(BASE, "base", None, None, None)}
    candidates = []
    experts_dir = run.path(experts_stage.STAGE)
    if experts_dir.is_dir():
        candidates += [(p.name, "expert", p.name, p) for p in sorted(experts_dir.iterdir())]
    candidates.append(("merged", "merged", None, run.path(merge_stage.STAGE)))
    merges_dir = run.path(merge_stage.MERGES)
    if merges_dir.is_dir():
        merges = [p for p in sorted(merges_dir.iterdir()) if not p.name.startswith(".")]
        candidates += [(f"merged-{p.name}", "merged", None, p) for p in merges]
    for name, kind, skill, folder in candidates:
        if name.startswith(".") or run.read_manifest(str(folder.relative_to(run.root))) is None:
            continue  # unfinished or temporary
        if name in found:  # e.g. a skill named like a merge
            log.warning("skipping adapter %s at %s: the name is taken", name, folder)
            continue
        try:
            _, lora_config = load_adapter(adapter_file(folder))
        except (FileNotFoundError, ValueError) as e:
            log.warning("skipping adapter %s: %s", name, e)
            continue
        found[name] = AdapterInfo(name, kind, skill, lora_config.get("r"), str(folder))
    return found


class DiffusionService:
    """One pipeline, all adapters loaded; ``generate`` is serialised by a lock."""

    def __init__(self, run_dir: str | Path):
        import torch
        from diffusers import AutoPipelineForText2Image

        from selma_ray.images import torch_device_and_dtype
        from selma_ray.models import resolve

        self.config = load_run_config(run_dir)
        res = self.config.resources.serve
        self.device, dtype = torch_device_and_dtype(res.num_gpus, "auto")
        pipe = AutoPipelineForText2Image.from_pretrained(
            resolve(self.config.models.base), dtype=dtype
        )
        pipe.set_progress_bar_config(disable=True)
        self.adapters = find_adapters(run_dir)
        for info in self.adapters.values():
            if info.path:
                pipe.load_lora_weights(info.path, weight_name=WEIGHT_NAME, adapter_name=info.name)
        self.pipe = pipe.to(self.device)
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.native_size = self.config.images.resolution or native
        self._lock = threading.Lock()
        self._torch = torch
        log.info("serving %s with adapters %s", self.config.models.base, sorted(self.adapters))

    def describe(self) -> list[dict[str, Any]]:
        return [asdict(a) for a in self.adapters.values()]

    def generate(
        self,
        prompt: str,
        adapter: str,
        seed: int,
        steps: int,
        guidance_scale: float,
        size: int,
        negative_prompt: str | None = None,
    ) -> bytes:
        from selma_ray.images import png_bytes

        if adapter not in self.adapters:
            raise KeyError(f"unknown adapter {adapter!r}; valid: {sorted(self.adapters)}")
        with self._lock:
            if adapter == BASE:
                self.pipe.disable_lora()
            else:
                self.pipe.enable_lora()
                self.pipe.set_adapters([adapter], [1.0])
            generator = self._torch.Generator(self.device).manual_seed(seed)
            out = self.pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=size,
                width=size,
                generator=generator,
                output_type="np",
            )
        return png_bytes(out.images[0])
