"""Training inputs: the trained model's resolution and tokenizers, a whole-batch
preprocessing UDF (decode, resize the shorter side, crop, flip, tokenize; any size and aspect,
so SD2's 768 px images can teach a 1024 px model), and the latent cache. With
``experts.cache_latents`` the inputs are encoded once by the VAE and the text encoder (both
orientations when flipping) and cached in the run's storage, so the training loop skips both
encoders, as kohya's and ai-toolkit's ``cache_latents`` do. How rows reach the trainers is
``selma_ray.experts.feed``.
"""

from __future__ import annotations

import functools
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
    return {**out, **token_ids(base, batch["prompt"])}


def token_ids(base: str, prompts) -> dict[str, Any]:
    """``input_ids`` (and SDXL's ``input_ids_2``) of ``prompts``. Computed where the text is
    encoded (the Train worker, the latent encoder), so that the feed's decode tasks never
    import transformers."""
    return {
        "input_ids" if i == 0 else f"input_ids_{i + 1}": tokenize(tok, prompts)
        for i, tok in enumerate(load_tokenizers(base))
    }


class LatentEncoder:
    """Ray Data actor UDF: pixels and token ids -> VAE latent mean/std (also of the flipped
    image when ``flip``) and text embeddings (``hidden``; SDXL: also ``pooled``). It runs on
    CPU in float32, with the VAE the trainer uses (``vae``: ``models.vae``, or the base's own
    when None), so cached latents match those the trainer would encode."""

    def __init__(self, base: str, flip: bool = False, vae: str | None = None):
        import torch
        from diffusers import AutoencoderKL, DiffusionPipeline

        from selma_ray.diffusion.denoise import TextConditioner
        from selma_ray.models import resolve, resolve_vae

        components = {}
        if vae:
            path, subfolder = resolve_vae(vae)
            components["vae"] = AutoencoderKL.from_pretrained(path, subfolder=subfolder)
        pipe = DiffusionPipeline.from_pretrained(resolve(base), **components)
        pipe.to(torch.float32)
        self.vae = pipe.vae.eval()
        self.vae.enable_slicing()  # one image at a time, as the trainer
        self.text = TextConditioner(pipe)
        self.flip, self.base = flip, base

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        if "pixel_values" in batch:
            pixels = torch.from_numpy(batch["pixel_values"])
        else:  # the feed's uint8 centre crops (N, H, W, 3)
            u8 = np.ascontiguousarray(np.stack(list(batch["image"])).transpose(0, 3, 1, 2))
            pixels = torch.from_numpy(u8).float() / 127.5 - 1.0
        keep = ("key", "prompt", "original_size", "crop_top_left")
        out = {k: batch[k] for k in keep if k in batch}
        with torch.no_grad():
            for suffix, px in [("", pixels)] + ([("_flip", pixels.flip(-1))] if self.flip else []):
                dist = self.vae.encode(px).latent_dist
                out[f"latent_mean{suffix}"] = dist.mean.numpy()
                out[f"latent_std{suffix}"] = dist.std.numpy()
            tokens = token_ids(self.base, batch["prompt"])
            hidden, pooled = self.text.encode(tokens, torch.device("cpu"))
        out["hidden"] = hidden.numpy()
        if pooled is not None:
            out["pooled"] = pooled.numpy()
        return out


def cached_latents(ds, cache: tuple[Any, str], base: str, flip: bool, loop: dict[str, Any]):
    """Encode a decoded dataset once into ``cache`` (a run directory and a prefix in it) as
    Parquet, and return it read back lazily (streamed like the images); a later call with the
    same prefix only reads it. The Parquet goes to a fresh sub-prefix and ``complete.json``
    naming it is written last, so a killed encoding is never read back as a cache."""
    import uuid

    import ray

    from selma_ray.core import layout
    from selma_ray.experts.feed import DATA_CPUS, READ_TASKS

    run, prefix = cache
    done = run.read_manifest(prefix)
    if done is None:
        data = f"{prefix}/{uuid.uuid4().hex[:8]}"
        ds.map_batches(
            LatentEncoder,
            fn_constructor_kwargs={"base": base, "flip": flip, "vae": loop.get("vae")},
            batch_size=loop["batch_size"],
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=DATA_CPUS,
        ).write_parquet(run.key(data), filesystem=run.fs)
        done = run.write_manifest("latents", prefix, data=data)
        log.info("experts: cached latents in %s", run.url(data))
    return layout.read_dataset(run, [run.key(done["data"])], None, **READ_TASKS, whole_files=True)
