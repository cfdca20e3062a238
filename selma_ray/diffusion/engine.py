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

from selma_ray.config import SelmaConfig, validate
from selma_ray.core import layout
from selma_ray.core.lora_io import WEIGHT_NAME, adapter_file
from selma_ray.core.rundir import RunDir

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
    from selma_ray.core.lora_io import load_adapter

    run = RunDir(run_dir)
    found = {BASE: AdapterInfo(BASE, "base", None, None, None)}
    candidates = []
    experts_dir = run.path(layout.EXPERTS)
    if experts_dir.is_dir():
        candidates += [(p.name, "expert", p.name, p) for p in sorted(experts_dir.iterdir())]
    candidates.append(("merged", "merged", None, run.path(layout.MERGED)))
    merges_dir = run.path(layout.MERGES)
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

        from selma_ray.diffusion.common import torch_device_and_dtype
        from selma_ray.models import resolve

        self.config = load_run_config(run_dir)
        res = self.config.resources.serve
        self.device, dtype = torch_device_and_dtype(res.num_gpus, "auto")
        pipe = AutoPipelineForText2Image.from_pretrained(
            resolve(self.config.models.base), dtype=dtype
        )
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.adapters: dict[str, AdapterInfo] = {}
        self._lock = threading.Lock()
        self._torch = torch
        self._load_adapters(run_dir)
        self._native = pipe.unet.config.sample_size * pipe.vae_scale_factor

    @property
    def native_size(self) -> int:
        """The run's image size (or the model's native one)."""
        return self.config.images.resolution or self._native

    def _load_adapters(self, run_dir: str | Path) -> None:
        found = find_adapters(run_dir)
        for info in found.values():
            if info.path:
                self.pipe.load_lora_weights(
                    info.path, weight_name=WEIGHT_NAME, adapter_name=info.name
                )
        self.adapters = found
        log.info("serving %s with adapters %s", self.config.models.base, sorted(found))

    def reload(self, run_dir: str | Path) -> None:
        """Swap in the adapters of another run of the same base model, without a restart."""
        config = load_run_config(run_dir)
        if config.models.base != self.config.models.base:
            raise ValueError(
                f"{run_dir} was trained on {config.models.base}, but this replica serves "
                f"{self.config.models.base}; deploy a new application for another base model"
            )
        with self._lock:
            loaded = [n for n, a in self.adapters.items() if a.path]
            if loaded:
                self.pipe.delete_adapters(loaded)
            self.config = config
            self._load_adapters(run_dir)

    def describe(self) -> list[dict[str, Any]]:
        return [asdict(a) for a in self.adapters.values()]

    def _activate(self, spec: AdapterSpec) -> None:
        if spec == ((BASE, 1.0),):
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters([n for n, _ in spec], [w for _, w in spec])

    def generate_many(
        self,
        spec: AdapterSpec,
        prompts: list[str],
        seeds: list[int],
        steps: int,
        guidance_scale: float,
        width: int,
        height: int,
        negative_prompt: str | None = None,
    ) -> list[bytes]:
        """Render one image per (prompt, seed) with one adapter spec in one forward pass.

        Each image has its own generator, so it does not depend on what it is batched with.
        """
        from selma_ray.diffusion.common import png_bytes

        with self._lock:  # the pipeline is not re-entrant
            missing = sorted({name for name, _ in spec} - set(self.adapters))
            if missing:  # e.g. a request validated just before a hot reload removed them
                raise KeyError(f"unknown adapters {missing}; valid: {sorted(self.adapters)}")
            self._activate(spec)
            out = self.pipe(
                prompt=prompts,
                negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                generator=[self._torch.Generator(self.device).manual_seed(s) for s in seeds],
                output_type="np",
            )
        return [png_bytes(img) for img in out.images]

    def generate(
        self,
        prompt: str,
        adapter: str | dict[str, float],
        seed: int,
        steps: int,
        guidance_scale: float,
        size: int,
        negative_prompt: str | None = None,
    ) -> bytes:
        """One square image; ``adapter`` is a name or a weighted mix."""
        spec = parse_adapter_spec(adapter, set(self.adapters))
        return self.generate_many(
            spec, [prompt], [seed], steps, guidance_scale, size, size, negative_prompt
        )[0]


AdapterSpec = tuple[tuple[str, float], ...]


def parse_adapter_spec(adapter: str | dict[str, float], valid: set[str]) -> AdapterSpec:
    """A request's ``adapter`` (a name, or a mix such as ``{"counting": 0.7, "merged": 0.3}``)
    as a canonical, hashable spec. Raises KeyError for unknown names, ValueError otherwise."""
    if isinstance(adapter, str):
        if adapter not in valid:
            raise KeyError(f"unknown adapter {adapter!r}; valid: {sorted(valid)}")
        return ((adapter, 1.0),)
    if not isinstance(adapter, dict) or not adapter:
        raise ValueError("adapter must be a name or a non-empty mapping of names to weights")
    unknown = sorted(set(adapter) - valid)
    if unknown:
        raise KeyError(f"unknown adapters {unknown} in the mix; valid: {sorted(valid)}")
    if BASE in adapter:
        raise ValueError("'base' means no adapter and cannot be mixed; leave it out of the mix")
    bad = {k: w for k, w in adapter.items() if not (isinstance(w, int | float) and 0 <= w <= 10)}
    if bad or not any(w > 0 for w in adapter.values()):
        raise ValueError(f"mix weights must be numbers in [0, 10], at least one > 0; got {adapter}")
    return tuple(sorted((k, float(w)) for k, w in adapter.items() if w > 0))
