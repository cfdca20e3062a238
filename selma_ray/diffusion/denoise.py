"""The denoising objective, shared by expert training and merge validation: text
conditioning for SD 1.x/2.x and SDXL, the target (epsilon or velocity), and a fixed
validation set (seeded noise at set timesteps) whose loss compares checkpoints and merges."""

from __future__ import annotations

from typing import Any

# Validation noise levels, as fractions of the scheduler's training timesteps.
VAL_TIMESTEPS = (0.1, 0.3, 0.5, 0.7)


class TextConditioner:
    """Prompt token ids -> the UNet's text conditioning: the CLIP hidden states (SD 1.x/2.x),
    or for SDXL both encoders' penultimate hidden states side by side plus the second
    encoder's pooled embedding."""

    def __init__(self, pipe):
        self.encoders = [pipe.text_encoder]
        if getattr(pipe, "text_encoder_2", None) is not None:
            self.encoders.append(pipe.text_encoder_2)

    @property
    def sdxl(self) -> bool:
        return len(self.encoders) == 2

    def encode(self, batch: dict[str, Any], device):
        """(hidden states, pooled embedding or None)."""
        import torch

        ids = [torch.as_tensor(batch["input_ids"]).to(device)]
        if not self.sdxl:
            return self.encoders[0](ids[0])[0], None
        ids.append(torch.as_tensor(batch["input_ids_2"]).to(device))
        hidden, pooled = [], None
        for encoder, tokens in zip(self.encoders, ids, strict=True):
            out = encoder(tokens, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second (projection) encoder's text_embeds
        return torch.cat(hidden, dim=-1), pooled

    def tokenize(self, pipe, prompts: list[str]) -> dict[str, Any]:
        """A batch of token ids for ``encode``, with every tokenizer the pipeline has."""
        batch = {}
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if self.sdxl else [])
        for key, tokenizer in zip(("input_ids", "input_ids_2"), tokenizers, strict=False):
            batch[key] = tokenizer(
                [str(p) for p in prompts],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
        return batch

    def added_conditioning(self, batch: dict[str, Any], pooled, size: int, dtype):
        """SDXL's ``added_cond_kwargs`` (pooled embedding and time ids from each image's
        original size and crop, else the square ``size``); None for SD 1.x/2.x."""
        import torch

        if not self.sdxl:
            return None
        n = pooled.shape[0]
        orig = batch.get("original_size")
        orig = torch.full((n, 2), size) if orig is None else torch.as_tensor(orig)
        crop = batch.get("crop_top_left")
        crop = torch.zeros((n, 2), dtype=torch.long) if crop is None else torch.as_tensor(crop)
        time_ids = torch.cat([orig, crop, torch.full((n, 2), size)], dim=1)
        return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, dtype)}


def denoising_target(scheduler, latents, noise, t):
    """What the UNet learns to predict: the noise, or the velocity for v-prediction models."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return noise


class FixedNoise:
    """Latents noised with seeded noise at ``VAL_TIMESTEPS``: the same inputs for every model
    scored, so their losses compare."""

    def __init__(self, scheduler, latents, seed: int, device):
        import torch

        gen = torch.Generator().manual_seed(seed)
        steps = scheduler.config.num_train_timesteps
        self.n = latents.shape[0]
        ts = torch.tensor([int(f * steps) for f in VAL_TIMESTEPS]).repeat_interleave(self.n)
        lat = latents.repeat(len(VAL_TIMESTEPS), 1, 1, 1)
        noise = torch.randn(lat.shape, generator=gen).to(device, lat.dtype)
        self.t = ts.to(device)
        self.noisy = scheduler.add_noise(lat, noise, self.t)
        self.target = denoising_target(scheduler, lat, noise, self.t)

    def size(self, pipe) -> int:
        """The images' pixel size (for SDXL's time ids)."""
        return self.noisy.shape[-1] * pipe.vae_scale_factor

    def loss(self, unet, hidden, added: dict[str, Any] | None) -> float:
        """Mean denoising MSE over the timesteps, one image batch per timestep."""
        import torch

        total = 0.0
        with torch.no_grad():
            for i in range(0, len(self.t), self.n):
                pred = unet(
                    self.noisy[i : i + self.n],
                    self.t[i : i + self.n],
                    encoder_hidden_states=hidden,
                    added_cond_kwargs=added,
                ).sample
                total += torch.nn.functional.mse_loss(
                    pred.float(), self.target[i : i + self.n].float()
                ).item()
        return total / len(VAL_TIMESTEPS)
