"""Choosing ``merged`` by validation: the denoising loss of each merge on a seeded sample of
the run's images, at fixed timesteps with fixed noise: the same objective and conditioning
as the experts' own validation (``selma_ray.diffusion.denoise``), SDXL included."""

from __future__ import annotations

from typing import Any

from selma_ray.core.lora_io import WEIGHT_NAME


def validation_scores(
    base: str,
    images: tuple[Any, list[str]],
    adapters: dict[str, str],
    samples: int,
    seed: int,
    device: str,
) -> dict[str, float]:
    """Denoising loss (lower is better) of each adapter, and of ``base`` without one, on a
    seeded sample of the run's images (``images``: the run directory and its committed
    shards; only the sampled rows' images are read)."""
    import pyarrow.dataset as pads
    import torch
    from diffusers import DDPMScheduler, DiffusionPipeline

    from selma_ray.diffusion.common import decode_images
    from selma_ray.diffusion.denoise import FixedNoise, TextConditioner
    from selma_ray.models import resolve

    run, files = images
    dataset = pads.dataset(files, format="parquet", filesystem=run.fs) if files else None
    count = dataset.count_rows() if dataset is not None else 0
    if count == 0:
        raise RuntimeError(f"merge: no images in {run.url('images')} to score the merges on")
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(count, generator=gen)[:samples].tolist()
    table = dataset.take(picked, columns=["prompt", "image"])  # in the order picked
    rows = list(range(table.num_rows))
    pipe = DiffusionPipeline.from_pretrained(resolve(base)).to(device)
    pipe.set_progress_bar_config(disable=True)
    text = TextConditioner(pipe)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompts = table.column("prompt").take(rows).to_pylist()
    with torch.no_grad():
        pixels = decode_images(table.column("image").take(rows).to_pylist(), size).to(device)
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        batch = text.tokenize(pipe, prompts)
        hidden, pooled = text.encode(batch, torch.device(device))
        added = text.added_conditioning(batch, pooled, size, hidden.dtype)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    fixed = FixedNoise(scheduler, latents, seed, device)

    scores = {"base": fixed.loss(pipe.unet, hidden, added)}
    for name, path in adapters.items():
        pipe.load_lora_weights(path, weight_name=WEIGHT_NAME, adapter_name=name)
        pipe.set_adapters([name])
        scores[name] = fixed.loss(pipe.unet, hidden, added)
        pipe.delete_adapters(name)
    return scores
