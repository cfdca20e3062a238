"""Feeding training: a skill's Parquet rows -> model inputs, as Ray Data preprocessing.

Rows (``prompt``, ``image`` PNG bytes) are split into train and validation rows
deterministically by seed, then ``map_batches`` decodes, resizes the shorter side to the
trained model's resolution, crops (centre or random), optionally flips, and tokenizes. Images
of any size and aspect work, so SD2's 768 px images can teach a 1024 px model
(weak-to-strong). With ``experts.cache_latents`` the inputs are encoded once by the VAE and
the text encoder (both orientations when flipping) and cached in the run directory, so the
training loop skips both encoders, as kohya's and ai-toolkit's ``cache_latents`` do.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any

from selma_ray.core.udf import require_columns

# Pixel preparation lives with the other shared diffusion pieces; tests and benches use it here.
from selma_ray.diffusion.common import pixel_array, prepare_images  # noqa: F401

log = logging.getLogger(__name__)


def native_resolution(base: str) -> int:
    """The pixel size a base model trains at, read from its configs (no weights loaded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from selma_ray.models import resolve

    path = resolve(base)
    unet = UNet2DConditionModel.load_config(path, subfolder="unet")
    vae = AutoencoderKL.load_config(path, subfolder="vae")
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


@functools.lru_cache(maxsize=4)
def load_tokenizers(base: str) -> tuple[Any, ...]:
    """The base model's tokenizer, and SDXL's second one when it has two."""
    from diffusers import DiffusionPipeline
    from transformers import AutoTokenizer

    from selma_ray.models import resolve

    path = resolve(base)
    names = ["tokenizer"]
    if "tokenizer_2" in DiffusionPipeline.load_config(path):
        names.append("tokenizer_2")
    return tuple(AutoTokenizer.from_pretrained(path, subfolder=n) for n in names)


def tokenize(tokenizer, prompts) -> Any:
    return tokenizer(
        [str(p) for p in prompts],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids.astype("int64")


def preprocess_batch(
    batch: dict[str, Any], base: str, size: int, crop: str, flip: bool
) -> dict[str, Any]:
    """Ray Data UDF: ``prompt``/``image`` columns -> ``pixel_values``, ``input_ids`` (and
    ``input_ids_2`` for SDXL), ``original_size``, ``crop_top_left``. Random crops and flips are
    drawn afresh on every pass over the data."""
    import numpy as np

    require_columns("the training feed (preprocess_batch)", batch, ("prompt", "image"))
    pixels, sizes, crops = prepare_images(batch["image"], size, crop, flip)
    out = {
        "prompt": np.asarray([str(p) for p in batch["prompt"]], dtype=object),
        "pixel_values": pixels,
        "original_size": sizes,
        "crop_top_left": crops,
    }
    for i, tok in enumerate(load_tokenizers(base)):
        out["input_ids" if i == 0 else f"input_ids_{i + 1}"] = tokenize(tok, batch["prompt"])
    return out


def split_rows(table, seed: int, skill: str, fraction: float, count: int | None):
    """Deterministic (seed, skill) split of a skill's rows into (train, validation) tables."""
    import numpy as np

    n = table.num_rows
    want = count if count is not None else (max(1, round(fraction * n)) if fraction > 0 else 0)
    if want and want >= n:
        raise ValueError(
            f"skill {skill!r} has {n} image(s); a validation split of {want} leaves none to "
            "train on. Lower experts.validation_count/validation_fraction or add images"
        )
    key = int.from_bytes(hashlib.sha256(f"{seed}:{skill}".encode()).digest()[:8], "little")
    order = np.random.default_rng(key).permutation(n)
    return table.take(np.sort(order[want:])), table.take(np.sort(order[:want]))


def data_hash(table) -> str:
    """A short hash of a table's prompts and image bytes (the data an expert learned from)."""
    h = hashlib.sha256()
    for prompt, image in zip(
        table.column("prompt").to_pylist(), table.column("image").to_pylist(), strict=True
    ):
        h.update(str(prompt).encode() + b"\0" + bytes(image) + b"\0")
    return h.hexdigest()[:16]


class LatentEncoder:
    """Ray Data actor UDF: pixels and token ids -> VAE latent mean/std (also of the flipped
    image when ``flip``) and text embeddings (``hidden``; SDXL: also ``pooled``)."""

    def __init__(self, base: str, flip: bool = False):
        from diffusers import DiffusionPipeline

        from selma_ray.diffusion.denoise import TextConditioner
        from selma_ray.models import resolve

        pipe = DiffusionPipeline.from_pretrained(resolve(base))
        self.vae = pipe.vae.eval()
        self.text = TextConditioner(pipe)
        self.flip = flip

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        pixels = torch.from_numpy(batch["pixel_values"])
        keep = ("prompt", "original_size", "crop_top_left")
        out = {k: batch[k] for k in keep if k in batch}
        with torch.no_grad():
            for suffix, px in [("", pixels)] + ([("_flip", pixels.flip(-1))] if self.flip else []):
                dist = self.vae.encode(px).latent_dist
                out[f"latent_mean{suffix}"] = dist.mean.numpy()
                out[f"latent_std{suffix}"] = dist.std.numpy()
            hidden, pooled = self.text.encode(batch, torch.device("cpu"))
        out["hidden"] = hidden.numpy()
        if pooled is not None:
            out["pooled"] = pooled.numpy()
        return out


def cached_latents(
    ds, cache: tuple[Any, str], base: str, flip: bool, batch_size: int, num_cpus: float
):
    """Encode a preprocessed dataset once into ``cache`` (a run directory and a prefix in it)
    and return the cached dataset; a later call with the same prefix only reads it. The
    Parquet goes to a fresh sub-prefix and ``complete.json`` naming it is written last, so a
    killed encoding is never read back as a cache."""
    import uuid

    import ray

    run, prefix = cache
    done = run.read_manifest(prefix)
    if done is None:
        data = f"{prefix}/{uuid.uuid4().hex[:8]}"
        ds.map_batches(
            LatentEncoder,
            fn_constructor_kwargs={"base": base, "flip": flip},
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=num_cpus,
        ).write_parquet(run.key(data), filesystem=run.fs)
        done = run.write_manifest("latents", prefix, data=data)
        log.info("experts: cached latents in %s", run.url(data))
    return ray.data.read_parquet(run.key(done["data"]), filesystem=run.fs)


def training_datasets(
    train_table, val_table, loop: dict[str, Any], cache: tuple[Any, str] | None, num_cpus: float
) -> dict[str, Any]:
    """Ray Datasets ``train`` (and ``validation`` when rows are held out) of model inputs.
    Inputs that are the same every epoch (``fixed_inputs``) are materialized here, once; they
    are not repeated to cover the run here, because Ray Train would then split whole copies
    among its workers: each worker repeats its own split instead
    (``training.endless_batches``)."""
    import ray

    base, bs = loop["base"], loop["batch_size"]
    size = loop["resolution"] or native_resolution(base)
    # With a cache, flips come from the cached flipped latents, not from the pixels.
    flip_pixels = loop["random_flip"] and cache is None
    tables = {
        "train": (train_table, {"crop": loop["crop"], "flip": flip_pixels}),
        "validation": (val_table, {"crop": "center", "flip": False}),
    }
    datasets = {}
    for name, (table, aug) in tables.items():
        if table.num_rows == 0:
            continue
        ds = ray.data.from_arrow(table.select(["prompt", "image"])).map_batches(
            preprocess_batch,
            fn_kwargs={"base": base, "size": size, **aug},
            batch_size=bs,
            num_cpus=num_cpus,
        )
        if cache is not None:
            flip = loop["random_flip"] and name == "train"
            # Held in the object store (spilled to disk if large): re-reading Parquet every
            # epoch costs more than the tiny encoders it replaces.
            where = (cache[0], f"{cache[1]}/{name}")
            ds = cached_latents(ds, where, base, flip, bs, num_cpus).materialize()
        elif aug["crop"] == "center" and not aug["flip"]:
            ds = ds.materialize()  # deterministic: preprocess once, not on every epoch
        # Workers iterate these inside the trials; their progress bars would only linger on
        # the driver's console (a stopped worker never closes them).
        ds.context.enable_progress_bars = False
        datasets[name] = ds
    return datasets


MAX_REPEATS = 1000


def fixed_inputs(loop: dict[str, Any]) -> bool:
    """Whether the training inputs are the same every epoch (cached latents, or centre crops
    without flips): ``training_datasets`` then materializes them, and a worker can repeat
    its split instead of re-reading it every epoch."""
    return bool(loop["cache_latents"]) or (loop["crop"] == "center" and not loop["random_flip"])


def repeated(ds, rows_needed: int):
    """A materialized data set repeated (block references only) to at least ``rows_needed``
    rows (at most ``MAX_REPEATS`` times), so its reader iterates one long epoch instead of
    paying Ray Data's per-epoch start each pass. Repeat one reader's rows, never a data set
    Ray Train is about to split among workers (each would get whole copies: the same rows)."""
    rows = ds.count()
    if rows == 0:
        return ds
    times = min(MAX_REPEATS, max(1, -(-rows_needed // rows)))
    return ds.union(*[ds] * (times - 1)) if times > 1 else ds
