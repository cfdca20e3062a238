"""Choosing ``merged`` by validation: the denoising loss of each merge on a seeded sample of
the run's images, at fixed timesteps with fixed noise."""

from __future__ import annotations

from pathlib import Path

from selma_ray.core.lora_io import WEIGHT_NAME


def validation_scores(
    base: str, images_dir: Path, adapters: dict[str, str], samples: int, seed: int, device: str
) -> dict[str, float]:
    """Denoising loss (lower is better) of each adapter, and of ``base`` without one, on a
    seeded sample of the run's images at fixed timesteps with fixed noise."""
    import pyarrow.dataset as pads
    import torch
    from diffusers import DDPMScheduler, DiffusionPipeline

    from selma_ray.diffusion.common import decode_images
    from selma_ray.models import resolve

    table = pads.dataset(str(images_dir), format="parquet").to_table(columns=["prompt", "image"])
    if table.num_rows == 0:
        raise RuntimeError(f"merge: no images in {images_dir} to score the merges on")
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(table.num_rows, generator=gen)[:samples].tolist()
    pipe = DiffusionPipeline.from_pretrained(resolve(base)).to(device)
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise NotImplementedError(f"{base}: validation selection does not support SDXL yet")
    pipe.set_progress_bar_config(disable=True)
    unet, scheduler = pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
    size = unet.config.sample_size * pipe.vae_scale_factor
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.tensor([steps // 10, steps * 3 // 10, steps // 2, steps * 7 // 10])
    with torch.no_grad():
        pixels = decode_images(table.column("image").take(rows).to_pylist(), size).to(device)
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(
            [str(p) for p in table.column("prompt").take(rows).to_pylist()],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        hidden = pipe.text_encoder(ids.to(device))[0]
    n, t = len(rows), timesteps.repeat_interleave(len(rows)).to(device)
    latents, hidden = latents.repeat(len(timesteps), 1, 1, 1), hidden.repeat(len(timesteps), 1, 1)
    noise = torch.randn(latents.shape, generator=gen).to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, t) if v_pred else noise

    def loss() -> float:
        with torch.no_grad():
            total = 0.0
            for i in range(0, len(t), n):  # one image batch per timestep
                pred = unet(noisy[i : i + n], t[i : i + n], encoder_hidden_states=hidden[i : i + n])
                total += torch.nn.functional.mse_loss(pred.sample.float(), target[i : i + n]).item()
            return total / len(timesteps)

    scores = {"base": loss()}
    for name, path in adapters.items():
        pipe.load_lora_weights(path, weight_name=WEIGHT_NAME, adapter_name=name)
        pipe.set_adapters([name])
        scores[name] = loss()
        pipe.delete_adapters(name)
    return scores
