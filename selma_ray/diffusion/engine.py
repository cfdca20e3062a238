"""Stage 5, serving (engine side): the base model with every adapter of a run loaded once.

``find_adapters`` discovers what a run directory offers; ``DiffusionService`` holds one
diffusers pipeline with all of them loaded unfused and switches per request with
``set_adapters`` (or disables LoRA for ``base``), or renders images of different adapters in
one forward pass (``generate_mixed``, see ``mixed.py``). The HTTP layer lives in
``serving/app.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from selma_ray.config import SelmaConfig, validate
from selma_ray.core import layout
from selma_ray.core.lora_io import WEIGHT_NAME, header_config
from selma_ray.core.rundir import RunDir
from selma_ray.diffusion.mixed import InternalSpec
from selma_ray.lora import METHODS, OPTIONS

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


class BaseModelMismatch(ValueError):
    """A run trained on another base model than the one a pipeline holds."""


@dataclass
class RunSet:
    """Another run's adapters, loaded beside the main set in the same pipeline
    (``DiffusionService.add_run``)."""

    run: RunDir
    config: SelmaConfig
    adapters: dict[str, AdapterInfo]  # public name -> info (full URLs)
    internal: dict[str, str]  # public name -> name inside the pipeline (merges on demand too)
    files: dict[str, AdapterInfo]  # the adapters as found (paths relative to the run)


@dataclass(frozen=True)
class MergeSpec:
    """A merge of a run's experts that a request asks for and the run did not precompute:
    computed by the serving replica with ``selma_ray.lora`` (``DiffusionService.merge``)
    and kept in its LRU. ``weights`` (one per expert, in order) default to the method's own.

    Equal merges are equal specs, so they share a cache entry and a name: the fields are
    normalised (tuples, floats), and the options the method ignores are reset to their
    defaults (``selma_ray.lora.OPTIONS``). The experts' order is kept: DARE's drop masks
    depend on it."""

    method: str
    experts: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    density: float = 0.5
    rank: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        used = OPTIONS.get(self.method, ())
        for f in fields(self):
            if f.name in ("density", "rank", "seed") and f.name not in used:
                object.__setattr__(self, f.name, f.default)
        object.__setattr__(self, "experts", tuple(self.experts))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        object.__setattr__(self, "density", float(self.density))

    @property
    def name(self) -> str:
        """Its public name: the method and a digest of everything the weights depend on."""
        import hashlib

        return f"merge-{self.method}-{hashlib.sha256(repr(self).encode()).hexdigest()[:12]}"


# An on-demand merge in the LRU: the run set whose experts it merges (None: the main run).
MergeKey = tuple[int | None, MergeSpec]


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
        # On-demand merges of every run, least recently used first: (run token or None for
        # the main run, spec) -> name inside the pipeline.
        self._merges: OrderedDict[MergeKey, str] = OrderedDict()
        self._in_use: Counter[MergeKey] = Counter()  # merges requests are holding
        self._in_use_lock = threading.Lock()
        self._merge_lock = threading.Lock()  # one on-demand merge computed at a time
        self._merge_ids = itertools.count()
        self.merge_cache_size = self.config.serve.merge_cache_size
        self.merge_stats = {"computed": 0, "reused": 0, "evicted": 0}
        self._torch = torch
        self.adapters, self._internal, self._files = self._load_set(self.run)
        # Other runs' adapter sets (same base model), by the token add_run returned.
        self._runs: dict[int, RunSet] = {}
        self._runs_held: Counter[int] = Counter()  # sets requests are holding
        self._runs_dropped: set[int] = set()  # dropped while held: unload on release
        self._native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        log.info("serving %s with adapters %s", self.config.models.base, sorted(self.adapters))

    @property
    def native_size(self) -> int:
        """The run's image size (or the model's native one)."""
        return self.config.images.resolution or self._native

    def _load_set(
        self, run: RunDir
    ) -> tuple[dict[str, AdapterInfo], dict[str, str], dict[str, AdapterInfo]]:
        """Fetch and load every adapter of ``run`` under new internal names; on any failure,
        unload what this call loaded and raise (the current set is untouched). Returns the
        adapters for clients (full URLs), their internal names, and the adapters as found
        (paths relative to the run, which on-demand merges read)."""
        self._generation += 1
        found, internal, loaded = find_adapters(run), {}, []
        files = dict(found)
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
        return found, internal, files

    def _same_base(self, run: RunDir) -> SelmaConfig:
        """The run's config; BaseModelMismatch when it names another base model."""
        config = load_run_config(run)
        if config.models.base != self.config.models.base:
            raise BaseModelMismatch(
                f"{run.uri} was trained on {config.models.base}, but this replica serves "
                f"{self.config.models.base}; deploy a new application for another base model"
            )
        return config

    def reload(self, run: RunRef) -> None:
        """Swap in the adapters of another run of the same base model, without a restart.
        The new set is loaded in full before the old one goes."""
        run = as_run(run)
        config = self._same_base(run)
        with self._lock:
            found, internal, files = self._load_set(run)
            old = list(self._internal.values())  # the on-demand merges of the old run too
            self.adapters, self._internal, self.config, self.run = found, internal, config, run
            self._files = files
            for key in [k for k in self._merges if k[0] is None]:  # unloaded with `old`
                del self._merges[key]
            if old:
                self.pipe.delete_adapters(old)
        log.info("reloaded from %s: adapters %s", run.uri, sorted(found))

    def add_run(self, run: RunRef) -> int:
        """Load another run's adapters (same base model) beside the main set, under new
        internal names, and return the token that ``generate_mixed(run=...)``,
        ``describe`` and ``drop_run`` take. Raises BaseModelMismatch for a run of another
        base model; a load that fails part-way unloads what it loaded."""
        run = as_run(run)
        config = self._same_base(run)
        with self._lock:
            found, internal, files = self._load_set(run)
            token = self._generation
            self._runs[token] = RunSet(run, config, found, internal, files)
        log.info("loaded run %s as set %d: adapters %s", run.uri, token, sorted(found))
        return token

    def drop_run(self, token: int) -> None:
        """Unload a set ``add_run`` loaded; a set a request is ``holding_run`` goes when the
        last one lets go. Dropping a set twice, or an unknown one, does nothing."""
        with self._in_use_lock:
            if token not in self._runs:
                return
            if self._runs_held[token]:
                self._runs_dropped.add(token)
                return
        self._unload_run(token)

    def _unload_run(self, token: int) -> None:
        with self._lock:
            gone = self._runs.pop(token, None)
            for key in [k for k in self._merges if k[0] == token]:  # in gone.internal
                del self._merges[key]
            if gone is not None and gone.internal:
                self.pipe.delete_adapters(list(gone.internal.values()))
        if gone is not None:
            log.info("unloaded run %s (set %d)", gone.run.uri, token)

    @contextmanager
    def holding_run(self, token: int | None) -> Iterator[None]:
        """Keeps a set ``add_run`` loaded from being unloaded while a request uses it."""
        if token is None:
            yield
            return
        with self._in_use_lock:
            if token not in self._runs:
                raise KeyError(f"run set {token} is not loaded (it was unloaded); retry")
            self._runs_held[token] += 1
        try:
            yield
        finally:
            with self._in_use_lock:
                self._runs_held[token] -= 1
                release = not self._runs_held[token] and token in self._runs_dropped
                if not self._runs_held[token]:
                    del self._runs_held[token]
                if release:
                    self._runs_dropped.discard(token)
            if release:
                self._unload_run(token)

    def loaded_runs(self) -> dict[int, str]:
        """The sets ``add_run`` loaded: token -> run URI."""
        return {t: s.run.uri for t, s in self._runs.items()}

    def _set(self, run: int | None) -> tuple[dict[str, AdapterInfo], dict[str, str]]:
        """The public and internal adapter names of the main set (None) or an added run."""
        if run is None:
            return self.adapters, self._internal
        try:
            found = self._runs[run]
        except KeyError:
            raise KeyError(f"run set {run} is not loaded (it was unloaded); retry") from None
        return found.adapters, found.internal

    def describe(self, run: int | None = None) -> list[dict[str, Any]]:
        """The adapters of the main set, or of a run ``add_run`` loaded."""
        return [asdict(a) for a in self._set(run)[0].values()]

    def run_native_size(self, run: int | None = None) -> int:
        """The image size of the main run, or of a run ``add_run`` loaded."""
        if run is None:
            return self.native_size
        return self._runs[run].config.images.resolution or self._native

    def merge(self, spec: MergeSpec, run: int | None = None) -> AdapterSpec:
        """The adapter spec of an on-demand merge of the main run's experts (``run`` None) or
        of a run ``add_run`` loaded: taken from the LRU of ``merge_cache_size`` merges (all
        runs' together), or computed from the run's experts and loaded beside them. The merge
        maths and its file run outside the pipeline's lock, so requests go on rendering
        meanwhile (on-demand merges are computed one at a time); only loading the result
        takes the lock. When the LRU is full, the least recently used merges go first, but
        never this one nor one that a request is ``holding``. Raises KeyError for experts the
        run does not have (or a run set no longer loaded), ValueError for a bad spec."""
        import tempfile

        from selma_ray.models import cache_dir

        key = (run, spec)
        with self._merge_lock:
            while True:
                with self._lock:
                    adapters, _ = self._set(run)
                    check_merge(spec, adapters, self.merge_cache_size)
                    if key in self._merges:
                        self._merges.move_to_end(key)
                        self.merge_stats["reused"] += 1
                        return ((spec.name, 1.0),)
                    source, files = self._source(run)
                scratch = cache_dir() / "merges"
                scratch.mkdir(parents=True, exist_ok=True)
                # A fresh temporary folder, never a path made from a request's names.
                with tempfile.TemporaryDirectory(dir=scratch) as tmp:
                    out = _write_merge(spec, source, files, Path(tmp), self.device)
                    with self._lock:
                        if self._source(run)[1] is not files:  # reloaded: other experts
                            log.info("run reloaded during merge %s; merging again", spec.name)
                            continue
                        internal = f"g{self._generation}_m{next(self._merge_ids)}"
                        self.pipe.load_lora_weights(
                            str(out), weight_name=WEIGHT_NAME, adapter_name=internal
                        )
                        self._merges[key] = self._set(run)[1][spec.name] = internal
                        self.merge_stats["computed"] += 1
                        log.info("merged %s on demand: %s", spec.name, spec)
                        self._evict_merges(key)
                        return ((spec.name, 1.0),)

    def _source(self, run: int | None) -> tuple[RunDir, dict[str, AdapterInfo]]:
        """The run an on-demand merge reads, and its adapters as found."""
        if run is None:
            return self.run, self._files
        self._set(run)  # KeyError when the set is gone
        return self._runs[run].run, self._runs[run].files

    def _evict_merges(self, keep: MergeKey) -> None:
        """Unload the least recently used merges beyond ``merge_cache_size``, except ``keep``
        and those requests hold. Called under the pipeline's lock."""
        with self._in_use_lock:
            held = {keep, *self._in_use}
        for old in [k for k in self._merges if k not in held]:  # least recently used first
            if len(self._merges) <= self.merge_cache_size:
                break
            self.pipe.delete_adapters([self._merges.pop(old)])
            del self._set(old[0])[1][old[1].name]
            self.merge_stats["evicted"] += 1

    @contextmanager
    def holding(self, spec: MergeSpec, run: int | None = None) -> Iterator[None]:
        """Keeps an on-demand merge from eviction while a request uses it: from before its
        ``merge`` until its images are rendered (a concurrent merge could evict it between)."""
        key = (run, spec)
        with self._in_use_lock:
            self._in_use[key] += 1
        try:
            yield
        finally:
            with self._in_use_lock:
                self._in_use[key] -= 1
                if not self._in_use[key]:
                    del self._in_use[key]

    def cached_merges(self) -> list[dict[str, Any]]:
        """The on-demand merges held now, least recently used first, each with the URI of
        the run whose experts it merges."""
        runs = {None: self.run, **{t: r.run for t, r in list(self._runs.items())}}
        return [
            {"name": m.name, "run": runs[t].uri if t in runs else None, **asdict(m)}
            for t, m in list(self._merges)
        ]

    def _activate(self, spec: AdapterSpec, internal: dict[str, str] | None = None) -> None:
        if spec == ((BASE, 1.0),):
            self.pipe.disable_lora()
            return
        names = self._internal if internal is None else internal
        self.pipe.enable_lora()
        self.pipe.set_adapters([names[n] for n, _ in spec], [w for _, w in spec])

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
        n = len(prompts)  # one spec for all: generate_mixed's set_adapters path
        return self.generate_mixed(
            [spec] * n, prompts, seeds, steps, guidance_scale, width, height, [negative_prompt] * n
        )

    def _internal_spec(
        self, spec: AdapterSpec, internal: dict[str, str] | None = None
    ) -> InternalSpec:
        """A spec in the pipeline's adapter names; ``base`` is the empty spec."""
        names = self._internal if internal is None else internal
        return tuple((names[n], w) for n, w in spec if n != BASE)

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
        run: int | None = None,
    ) -> list[bytes]:
        """Render one image per (spec, prompt, seed, negative prompt) in one forward pass,
        each with its own adapter spec: single adapters, weighted mixes and ``base`` together
        (see ``selma_ray.diffusion.mixed``). Each image equals the one ``generate_many``
        renders for it alone, to within 1/255 per pixel; one spec for all is exactly
        ``generate_many``'s path. ``run``: the token of a run ``add_run`` loaded, whose
        adapters the specs name (default: the main set); one pass never mixes runs.

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
            public, internal = self._set(run)
            known = set(public) | set(internal)  # on-demand merges too
            missing = sorted({name for spec in specs for name, _ in spec} - known)
            if missing:  # e.g. a request validated just before a hot reload removed them
                raise KeyError(f"unknown adapters {missing}; valid: {sorted(public)}")
            if len(set(specs)) == 1:
                self._activate(specs[0], internal)
                mixing = contextlib.nullcontext()
            else:
                internal_specs = [self._internal_spec(s, internal) for s in specs]
                mixing = per_sample_adapters(self.pipe, internal_specs)
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


def _write_merge(
    spec: MergeSpec, run: RunDir, files: dict[str, AdapterInfo], tmp: Path, device: Any
) -> Path:
    """Merge the spec's experts of ``run`` into ``tmp``; returns the folder of the result."""
    from selma_ray.lora.files import merge_loaded, read_lora

    loaded = {e: read_lora(fetch_adapter(run, files[e])) for e in spec.experts}
    weights = dict(zip(spec.experts, spec.weights, strict=True)) if spec.weights else None
    out = tmp / "merge"
    merge_loaded(
        loaded,
        {},
        spec.method,
        weights,
        out,
        density=spec.density,
        rank=spec.rank,
        seed=spec.seed,
        device="cuda" if str(device).startswith("cuda") else "cpu",
    )
    return out


def check_merge(spec: MergeSpec, adapters: dict[str, AdapterInfo], cache_size: int) -> None:
    """Refuses a merge the replica cannot compute: KeyError for an unknown expert (its name
    and the valid ones), ValueError for the rest."""
    from selma_ray.lora.methods import check_weights

    if cache_size < 1:
        raise ValueError("on-demand merges are off here (serve.merge_cache_size is 0)")
    if spec.method not in METHODS:
        raise ValueError(f"unknown merge method {spec.method!r}; choose one of {list(METHODS)}")
    experts = sorted(n for n, a in adapters.items() if a.kind == "expert")
    unknown = [e for e in spec.experts if e not in adapters]
    if unknown:
        raise KeyError(f"unknown experts {unknown} in the merge; valid: {experts}")
    if len(spec.experts) < 2 or len(set(spec.experts)) != len(spec.experts):
        raise ValueError(f"a merge needs two or more different experts, got {list(spec.experts)}")
    not_experts = [e for e in spec.experts if adapters[e].kind != "expert"]
    if not_experts:
        raise ValueError(
            f"only experts can be merged on demand, not {not_experts}; experts: {experts}"
        )
    if spec.weights is not None:
        if len(spec.weights) != len(spec.experts):
            raise ValueError(
                f"{len(spec.experts)} experts but {len(spec.weights)} weights; give one per expert"
            )
        check_weights(spec.experts, dict(zip(spec.experts, spec.weights, strict=True)))
    if not 0 < spec.density <= 1:
        raise ValueError(f"density must be in (0, 1], got {spec.density}")
    if spec.rank is not None and spec.rank < 1:
        raise ValueError(f"rank must be at least 1, got {spec.rank}")


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
