"""Stage 5, serving (engine side): the base model with every adapter of a run loaded once.

``find_adapters`` discovers what a run directory offers; ``DiffusionService`` holds one
diffusers pipeline with all of them loaded unfused and switches per request with
``set_adapters`` (or disables LoRA for ``base``), or renders images of different adapters in
one forward pass (``generate_mixed``, see ``mixed.py``). The HTTP layer lives in
``serving/app.py``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from selma_ray.config import SelmaConfig, validate
from selma_ray.core import layout
from selma_ray.core.lora_io import WEIGHT_NAME, header_config
from selma_ray.core.rundir import RunDir
from selma_ray.diffusion.mixed import InternalSpec

log = logging.getLogger(__name__)
BASE = "base"


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    kind: str  # "base", "expert" or "merged"
    skill: str | None
    rank: int | None
    path: str | None  # where it is in the run (a URI on object storage)
    sha256: str | None = None  # of its safetensors file, as its manifest recorded


RunRef = RunDir | str | Path | dict[str, Any]


def as_run(run: RunRef) -> RunDir:
    """A run directory from a RunDir, a local path or URI, or ``RunDir.spec`` data."""
    if isinstance(run, RunDir):
        return run
    if isinstance(run, dict):
        return RunDir.from_spec(run)
    return RunDir(str(run))


def load_run_config(run: RunRef) -> SelmaConfig:
    run = as_run(run)
    try:
        text = run.read_text("config.yaml")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{run.url('config.yaml')} not found: is {run.uri} a selma_ray run directory?"
        ) from None
    return validate(yaml.safe_load(text))


def find_adapters(run: RunRef) -> dict[str, AdapterInfo]:
    """Every committed adapter of a run, plus ``base``: the experts, ``merged`` and each
    method's merge as ``merged-<method>``. Reads manifests only; nothing is downloaded."""
    run = as_run(run)
    found = {BASE: AdapterInfo(BASE, "base", None, None, None)}
    candidates: list[tuple[str, str, str | None, tuple[str, ...]]] = []
    candidates += [(n, "expert", n, (layout.EXPERTS, n)) for n in run.listdir(layout.EXPERTS)]
    candidates.append(("merged", "merged", None, (layout.MERGED,)))
    merges = run.listdir(layout.MERGES)
    candidates += [(f"merged-{n}", "merged", None, (layout.MERGES, n)) for n in merges]
    for name, kind, skill, parts in candidates:
        manifest = run.read_manifest(*parts) if not name.startswith(".") else None
        if manifest is None:
            continue  # unfinished or temporary
        if name in found:  # e.g. a skill named like a merge
            log.warning("skipping adapter %s at %s: the name is taken", name, run.url(*parts))
            continue
        rel = "/".join([*parts, WEIGHT_NAME])
        listed = (manifest.get("outputs") or {}).get("files", {}).get(rel) or {}
        try:  # the header only: a ranged read on object storage, never the weights
            with run.fs.open_input_file(run.key(rel)) as f:
                rank = header_config(f).get("r")
        except (OSError, ValueError) as e:
            log.warning("skipping adapter %s: %s: %s", name, run.url(rel), e)
            continue
        found[name] = AdapterInfo(name, kind, skill, rank, rel, listed.get("sha256"))
    return found


def _listing_key(run: RunDir, info: AdapterInfo) -> str:
    """A cache key for an adapter whose manifest recorded no digest: its URI, size and time."""
    import hashlib

    stat = run.info(info.path)
    if stat.size is None:
        raise FileNotFoundError(f"adapter {info.name}: {run.url(info.path)} is missing")
    return hashlib.sha256(f"{run.url(info.path)}:{stat.size}:{stat.mtime_ns}".encode()).hexdigest()


def fetch_adapter(run: RunDir, info: AdapterInfo) -> Path:
    """A node-local copy of an adapter's safetensors file, cached by content digest (so a
    replica or renderer downloads each adapter once, and a later rewrite of the run cannot
    change what it loaded). The download is checked against the manifest's SHA-256."""
    import hashlib
    import os
    import tempfile

    from selma_ray.models import cache_dir

    if info.path is None:
        raise ValueError(f"{info.name} has no adapter file")
    key = info.sha256 or _listing_key(run, info)  # a known digest needs no request at all
    folder = cache_dir() / "adapters" / key[:32]
    if (folder / WEIGHT_NAME).is_file():
        return folder
    data = run.read_bytes(info.path)
    if info.sha256 and hashlib.sha256(data).hexdigest() != info.sha256:
        raise ValueError(f"adapter {info.name}: {run.url(info.path)} does not match its manifest")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=folder.parent))
    (tmp / WEIGHT_NAME).write_bytes(data)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class DiffusionService:
    """One pipeline, all adapters loaded; ``generate`` is serialised by a lock.

    Adapters load under internal names (``g<generation>_<n>``), so a hot reload loads the whole
    new set beside the old one and only then drops the old: a reload that fails part-way
    leaves the old set serving.

    The device follows the GPUs Ray assigned to the calling replica or actor; ``num_gpus``
    (default: the run's ``resources.serve.num_gpus``) decides only outside a Ray worker."""

    def __init__(self, run: RunRef, num_gpus: float | None = None):
        import torch
        from diffusers import AutoPipelineForText2Image

        from selma_ray.core.devices import torch_device_and_dtype
        from selma_ray.models import resolve

        self.run = as_run(run)
        self.config = load_run_config(self.run)
        configured = self.config.resources.serve.num_gpus if num_gpus is None else num_gpus
        self.device, dtype = torch_device_and_dtype(configured, "auto")
        pipe = AutoPipelineForText2Image.from_pretrained(
            resolve(self.config.models.base), dtype=dtype
        )
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.adapters: dict[str, AdapterInfo] = {}
        self._internal: dict[str, str] = {}  # public name -> name inside the pipeline
        self._generation = 0
        self._lock = threading.Lock()
        self._torch = torch
        self.adapters, self._internal = self._load_set(self.run)
        self._native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        log.info("serving %s with adapters %s", self.config.models.base, sorted(self.adapters))

    @property
    def native_size(self) -> int:
        """The run's image size (or the model's native one)."""
        return self.config.images.resolution or self._native

    def _load_set(self, run: RunDir) -> tuple[dict[str, AdapterInfo], dict[str, str]]:
        """Fetch and load every adapter of ``run`` under new internal names; on any failure,
        unload what this call loaded and raise (the current set is untouched)."""
        self._generation += 1
        found, internal, loaded = find_adapters(run), {}, []
        try:
            for i, info in enumerate(found.values()):
                if not info.path:
                    continue
                local = fetch_adapter(run, info)
                name = f"g{self._generation}_{i}"
                self.pipe.load_lora_weights(str(local), weight_name=WEIGHT_NAME, adapter_name=name)
                loaded.append(name)
                internal[info.name] = name
                found[info.name] = replace(info, path=run.url(info.path))
        except Exception:
            if loaded:
                self.pipe.delete_adapters(loaded)
            raise
        return found, internal

    def reload(self, run: RunRef) -> None:
        """Swap in the adapters of another run of the same base model, without a restart.
        The new set is loaded in full before the old one goes."""
        run = as_run(run)
        config = load_run_config(run)
        if config.models.base != self.config.models.base:
            raise ValueError(
                f"{run.uri} was trained on {config.models.base}, but this replica serves "
                f"{self.config.models.base}; deploy a new application for another base model"
            )
        with self._lock:
            found, internal = self._load_set(run)
            old = list(self._internal.values())
            self.adapters, self._internal, self.config, self.run = found, internal, config, run
            if old:
                self.pipe.delete_adapters(old)
        log.info("reloaded from %s: adapters %s", run.uri, sorted(found))

    def describe(self) -> list[dict[str, Any]]:
        return [asdict(a) for a in self.adapters.values()]

    def _activate(self, spec: AdapterSpec) -> None:
        if spec == ((BASE, 1.0),):
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters([self._internal[n] for n, _ in spec], [w for _, w in spec])

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

    def _internal_spec(self, spec: AdapterSpec) -> InternalSpec:
        """A spec in the pipeline's adapter names; ``base`` is the empty spec."""
        return tuple((self._internal[n], w) for n, w in spec if n != BASE)

    def mixed_batches(self) -> str | None:
        """Why the loaded adapters cannot share a forward pass (``generate_mixed`` with
        different specs), or None when they can."""
        from selma_ray.diffusion.mixed import lora_layers, unsupported

        with self._lock:
            return unsupported(lora_layers(self.pipe))

    def negative_prompt_group(self, negative_prompt: str | None) -> bool | None:
        """What of a negative prompt must match for images to share a forward pass.

        SD pipelines encode no negative prompt as "", so any negative prompts mix (None);
        SDXL's (``force_zeros_for_empty_prompt``) use zeros when the whole call has none, so
        images with and without one cannot share a call (True/False)."""
        if getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            return bool(negative_prompt)
        return None

    def generate_mixed(
        self,
        specs: Sequence[AdapterSpec],
        prompts: list[str],
        seeds: list[int],
        steps: int,
        guidance_scale: float,
        width: int,
        height: int,
        negative_prompts: Sequence[str | None] | None = None,
    ) -> list[bytes]:
        """Render one image per (spec, prompt, seed, negative prompt) in one forward pass,
        each with its own adapter spec: single adapters, weighted mixes and ``base`` together
        (see ``selma_ray.diffusion.mixed``). Each image equals the one ``generate_many``
        renders for it alone, to within 1/255 per pixel; one spec for all is exactly
        ``generate_many``'s path.

        Raises ValueError when the lists differ in length, or when negative prompts that
        ``negative_prompt_group`` keeps apart are mixed; ``mixed.UnsupportedMix`` for adapters
        that cannot mix (``mixed_batches`` says why)."""
        from selma_ray.diffusion.common import png_bytes
        from selma_ray.diffusion.mixed import per_sample_adapters

        negatives = list(negative_prompts or [None] * len(prompts))
        if not len(specs) == len(prompts) == len(seeds) == len(negatives):
            raise ValueError(
                f"one spec, seed and negative prompt per prompt: got {len(specs)} specs, "
                f"{len(prompts)} prompts, {len(seeds)} seeds, {len(negatives)} negative prompts"
            )
        if len({self.negative_prompt_group(n) for n in negatives}) > 1:
            raise ValueError(
                f"{type(self.pipe).__name__} treats a missing negative prompt unlike an empty "
                "one: images with and without a negative prompt need separate calls"
            )
        with self._lock:  # the pipeline is not re-entrant
            missing = sorted({name for spec in specs for name, _ in spec} - set(self.adapters))
            if missing:  # e.g. a request validated just before a hot reload removed them
                raise KeyError(f"unknown adapters {missing}; valid: {sorted(self.adapters)}")
            if len(set(specs)) == 1:
                self._activate(specs[0])
                mixing = contextlib.nullcontext()
            else:
                mixing = per_sample_adapters(self.pipe, [self._internal_spec(s) for s in specs])
            with mixing:
                out = self.pipe(
                    prompt=prompts,
                    negative_prompt=[n or "" for n in negatives] if any(negatives) else None,
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
