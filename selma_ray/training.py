"""The LoRA training loop that runs inside each Ray Train worker (one expert, one skill).

Plain diffusion fine-tuning as in the paper: a peft LoRA on the UNet attention projections,
AdamW, the noise-prediction MSE loss following the scheduler's prediction type (epsilon or
v), gradient clipping, optional fp16/bf16 mixed precision on GPU with the LoRA weights kept
in fp32. Data comes from ``ray.train.get_dataset_shard("train")``; checkpoints (adapter
weights plus optimizer state and step) go through ``ray.train.report``.
"""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path
from typing import Any

from selma_ray.lora_io import save_adapter

log = logging.getLogger(__name__)
STATE_FILE = "training_state.pt"


def decode_images(pngs, size: int):
    """PNG bytes -> float tensor (N, 3, size, size) in [-1, 1], resized and centre-cropped."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for data in pngs:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        scale = size / min(img.size)
        img = img.resize(
            (max(size, round(img.width * scale)), max(size, round(img.height * scale))),
            Image.BICUBIC,
        )
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
        out.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _weight_dtype(mixed_precision: str, device):
    import torch

    if device.type != "cuda" or mixed_precision == "no":
        return torch.float32
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


def train_expert(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` for one expert; ``config`` is a plain dict."""
    import ray.train
    import ray.train.torch
    import torch
    from diffusers import DDPMScheduler, DiffusionPipeline
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    from selma_ray.logs import setup_logging
    from selma_ray.lora_io import load_adapter
    from selma_ray.models import resolve

    setup_logging()
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"] + ctx.get_world_rank())
    pipe = DiffusionPipeline.from_pretrained(resolve(config["base"]))
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise NotImplementedError(
            f"{config['base']}: SDXL expert training (two text encoders, time ids) is not "
            "supported yet; use an SD 1.x/2.x base"
        )
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    size = config["resolution"] or unet.config.sample_size * pipe.vae_scale_factor
    dtype = _weight_dtype(config["mixed_precision"], device)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(device, dtype=dtype)

    lora_config = LoraConfig(
        r=config["rank"],
        lora_alpha=config["alpha"],
        init_lora_weights="gaussian",
        target_modules=config["target_modules"],
    )
    unet.add_adapter(lora_config)
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["learning_rate"])
    lr_scheduler = _lr_scheduler(optimizer, config["lr_scheduler"], config["max_steps"])
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt:
            state, _ = load_adapter(Path(ckpt))
            set_peft_model_state_dict(unet, state)
            saved = torch.load(Path(ckpt) / STATE_FILE, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        lr_scheduler.load_state_dict(saved["lr_scheduler"])
        step = int(saved["step"])
        log.info("resumed expert %s at step %d", config["skill"], step)

    model = unet
    if ctx.get_world_size() > 1:
        model = ray.train.torch.prepare_model(unet, move_to_device=False)

    shard = ray.train.get_dataset_shard("train")
    losses: list[float] = []
    while step < config["max_steps"]:
        for batch in shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy"):
            pixels = decode_images(batch["image"], size).to(device, dtype=dtype)
            ids = tokenizer(
                [str(p) for p in batch["prompt"]],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                hidden = text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(
                0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device
            )
            noisy = scheduler.add_noise(latents, noise, t)
            if scheduler.config.prediction_type == "v_prediction":
                target = scheduler.get_velocity(latents, noise, t)
            else:
                target = noise
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                pred = model(noisy, t, encoder_hidden_states=hidden).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config["max_grad_norm"])
            scaler.step(optimizer)
            scaler.update()
            lr_scheduler.step()
            step += 1
            losses.append(loss.item())
            if step % config["checkpoint_every"] == 0 or step >= config["max_steps"]:
                metrics = {
                    "step": step,
                    "loss": sum(losses) / len(losses),
                    "skill": config["skill"],
                }
                _report(unet, lora_config, optimizer, lr_scheduler, step, metrics, ctx)
                losses.clear()
            if step >= config["max_steps"]:
                break


def _lr_scheduler(optimizer, kind: str, max_steps: int):
    import torch

    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if kind == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / max_steps))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_steps)


def _report(unet, lora_config, optimizer, lr_scheduler, step, metrics, ctx) -> None:
    import ray.train
    import torch
    from peft.utils import get_peft_model_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ctx.get_world_rank() == 0:
            out = Path(tmp) / "ckpt"
            save_adapter(out, get_peft_model_state_dict(unet), lora_config.to_dict())
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "step": step,
                },
                out / STATE_FILE,
            )
            checkpoint = ray.train.Checkpoint.from_directory(str(out))
        ray.train.report(metrics, checkpoint=checkpoint)
