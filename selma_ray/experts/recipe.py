"""The LoRA training loop of one expert: ``ExpertTrainer`` (model, optimizer, one step,
validation loss, checkpoints) and ``train_expert``, the Ray Train loop around it.

Plain diffusion fine-tuning as in the paper: a peft LoRA on the UNet attention projections
(optionally one on the text encoder too), AdamW with an lr schedule, gradient accumulation,
gradient clipping that really clips, the noise-prediction MSE loss following the scheduler's
prediction type (epsilon or v), with the usual options of LoRA trainers: min-SNR gamma
weighting, offset noise and gradient checkpointing. With several Ray Train workers, data
parallel: each worker trains on its own split of the rows, and the LoRA gradients (UNet in
DDP, text encoder averaged by hand) are averaged every step, so all ranks keep one adapter.
On GPU, fp16/bf16 autocast with the LoRA weights kept in fp32, and the VAE in float32 (the stock
SDXL VAE overflows to NaN in fp16) unless ``models.vae`` names an fp16-safe one. A step whose loss
or gradients are not finite is skipped and counted; ``max_nonfinite_steps`` of them in a row stop
the expert. Every expert's LoRA starts from the same weights, drawn from the run seed alone
(``shared_init``), as the paper's merge of A's and B's assumes. SD 1.x/2.x and SDXL bases (two
text encoders, pooled embeddings and time ids from each image's original size and crop).
Inputs come from ``ray.train.get_dataset_shard("train")`` as token ids and pixels, or as
cached latents and text embeddings (``selma_ray.experts.data``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from selma_ray.core.lora_io import WEIGHT_NAME
from selma_ray.core.rundir import RunDir
from selma_ray.core.seeds import stable_seed
from selma_ray.diffusion.denoise import FixedNoise, TextConditioner, denoising_target

log = logging.getLogger(__name__)
STATE_FILE = "training_state.pt"
NONFINITE_STOP = "nonfinite-stop.json"  # in an expert's work folder: why it was stopped


class NonFiniteTrainingError(RuntimeError):
    """``max_nonfinite_steps`` steps in a row had a non-finite loss or gradients."""


def _weight_dtype(mixed_precision: str, device):
    import torch

    if device.type != "cuda" or mixed_precision == "no":
        return torch.float32
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


def _vae_dtype(weight_dtype, custom_vae: bool):
    """The VAE's dtype: float32, whatever the training dtype (the stock SDXL VAE's activations
    overflow fp16 and give NaN latents), unless a separately configured VAE (``models.vae``,
    meant to be an fp16-safe one) is given: that one runs in the training dtype, as in the
    diffusers SDXL script's ``--pretrained_vae_model_name_or_path``."""
    import torch

    return weight_dtype if custom_vae else torch.float32


def lora_init_seed(config: dict[str, Any]) -> int:
    """The seed the LoRA weights are drawn with: the run seed alone, so that every expert
    starts from the same A0 (``shared_init``, what the paper's merge assumes), or the run seed
    and the skill (independent starts)."""
    if config["shared_init"]:
        return int(config["seed"])
    if not config.get("skill"):
        raise ValueError(
            "experts.shared_init=false seeds each expert's LoRA by run seed and skill, but this "
            "trainer's config names no skill"
        )
    return stable_seed(config["seed"], "lora-init", config["skill"])


def _lr_scheduler(optimizer, kind: str, max_steps: int):
    import torch

    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if kind == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / max_steps))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_steps)


def _load_pipeline(config: dict[str, Any]):
    """The base pipeline of ``config["base"]``, with ``config["vae"]`` (models.vae) if set."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    from selma_ray.models import resolve, resolve_vae

    components = {}
    if config.get("vae"):  # models.vae, passed through by the experts stage
        path, subfolder = resolve_vae(config["vae"])
        components["vae"] = AutoencoderKL.from_pretrained(path, subfolder=subfolder)
    return DiffusionPipeline.from_pretrained(resolve(config["base"]), **components)


class ExpertTrainer:
    """One expert's LoRA model, optimizer and step count; runs in a Ray Train worker, or
    alone in a plain process (tests, the P3 baseline)."""

    def __init__(self, config: dict[str, Any], device=None, pipe=None):
        """``pipe``: an already built pipeline to train on (the GPU check builds real-shape
        models from configs), whose VAE counts as ``models.vae`` (training dtype) only if
        ``config["vae"]`` is set; None loads ``config["base"]`` (and ``config["vae"]``)."""
        import torch
        from diffusers import DDPMScheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self.config = config
        self.device = device or torch.device("cpu")
        self.pipe = pipe if pipe is not None else _load_pipeline(config)
        self.pipe.set_progress_bar_config(disable=True)
        self.unet, self.vae = self.pipe.unet, self.pipe.vae
        self.vae.enable_slicing()  # encode one image at a time: a 1024 px micro-batch is large
        self.text_encoder = self.pipe.text_encoder
        self.text = TextConditioner(self.pipe)
        if self.text.sdxl and config["train_text_encoder"]:
            raise ValueError(
                f"{config['base']}: text-encoder LoRA training is not supported for SDXL bases "
                "yet; set experts.train_text_encoder=false"
            )
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.dtype = _weight_dtype(config["mixed_precision"], self.device)
        self.vae_dtype = _vae_dtype(self.dtype, bool(config.get("vae")))
        for module in (self.unet, self.vae, *self.text.encoders):
            module.requires_grad_(False)
            module.to(self.device, dtype=self.vae_dtype if module is self.vae else self.dtype)
        init = True if config["lora_init"] == "default" else "gaussian"
        self.lora_config = LoraConfig(
            r=config["rank"],
            lora_alpha=config["alpha"],
            init_lora_weights=init,
            target_modules=config["target_modules"],
        )
        trained = [self.unet]
        self.te_lora_config = None
        if config["train_text_encoder"]:
            self.te_lora_config = LoraConfig(
                r=config["rank"],
                lora_alpha=config["alpha"],
                init_lora_weights=init,
                target_modules=config["text_encoder_target_modules"],
            )
            trained.append(self.text_encoder)
        # The LoRA weights are drawn under their own seed (lora_init_seed), in a forked RNG:
        # whatever the process drew before, every expert of a run starts from the same A0, and
        # the caller's random stream is left as it was.
        gpus = list(range(torch.cuda.device_count())) if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpus):
            torch.manual_seed(lora_init_seed(config))
            self.unet.add_adapter(self.lora_config)
            if self.te_lora_config is not None:
                self.text_encoder.add_adapter(self.te_lora_config)
        if config["gradient_checkpointing"]:
            self.unet.enable_gradient_checkpointing()
            if config["train_text_encoder"]:
                self.text_encoder.gradient_checkpointing_enable()
            for module in trained:
                module.train()
        cast_training_params(trained, dtype=torch.float32)
        self.params = [p for m in trained for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config["learning_rate"])
        self.lr_scheduler = _lr_scheduler(
            self.optimizer, config["lr_scheduler"], config["max_steps"]
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.model = self.unet  # replaced by the DDP wrapper when there are several workers
        self.synced: list[torch.nn.Parameter] = []  # trained outside DDP, averaged by hand
        self.distributed = False  # set by distribute(): skip decisions are then taken jointly
        self.step = 0  # optimizer updates applied; a skipped (non-finite) step does not count
        self.skipped_steps = 0  # non-finite steps skipped, over the whole run (checkpointed)
        self.nonfinite_in_a_row = 0
        self.data_position = (0, 0)  # the feed's (epoch, batches taken in it)
        self.val: dict[str, Any] | None = None

    # ---- inputs ----------------------------------------------------------------------------
    def _tensor(self, value, dtype=None):
        import torch

        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        return t.to(self.device, dtype=dtype) if dtype is not None else t.to(self.device)

    def conditioning(self, batch: dict[str, Any], size: int):
        """(text hidden states, SDXL ``added_cond_kwargs`` or None) of a batch whose images
        are ``size`` pixels square: from cached embeddings or through the text encoder(s)."""
        if "hidden" in batch:
            hidden = self._tensor(batch["hidden"], self.dtype)
            pooled = self._tensor(batch["pooled"], self.dtype) if "pooled" in batch else None
        else:
            hidden, pooled = self.text.encode(batch, self.device)
        return hidden, self.text.added_conditioning(batch, pooled, size, hidden.dtype)

    def latents(self, batch: dict[str, Any], sample: bool = True):
        """Scaled VAE latents of a batch in the training dtype: sampled for training, the mean
        for validation. The VAE encodes in its own dtype (``vae_dtype``: float32 unless an
        fp16-safe ``models.vae`` is configured); cached latents are float32."""
        import torch

        if "latent_mean" in batch:
            mean = self._tensor(batch["latent_mean"], torch.float32)
            std = self._tensor(batch["latent_std"], torch.float32)
            latents = mean + std * torch.randn_like(mean) if sample else mean
        else:
            with torch.no_grad():
                pixels = self._tensor(batch["pixel_values"], self.vae_dtype)
                dist = self.vae.encode(pixels).latent_dist
            latents = dist.sample() if sample else dist.mean
        return (latents * self.vae.config.scaling_factor).to(self.dtype)

    # ---- loss --------------------------------------------------------------------------------
    def _target(self, latents, noise, t):
        return denoising_target(self.noise_scheduler, latents, noise, t)

    def noise(self, latents):
        """(noise, timesteps) for a batch of latents: Gaussian noise, plus with
        ``noise_offset`` a per-(image, channel) constant ``noise_offset * N(0, 1)`` (offset
        noise), and uniform random training timesteps."""
        import torch

        noise = torch.randn_like(latents)
        if self.config["noise_offset"]:
            noise = noise + self.config["noise_offset"] * torch.randn(
                latents.shape[0], latents.shape[1], 1, 1, device=self.device, dtype=latents.dtype
            )
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), device=self.device)
        return noise, t

    def loss(self, batch: dict[str, Any]):
        """Training loss of one micro-batch (random timesteps and noise)."""
        import torch
        from diffusers.training_utils import compute_snr

        latents = self.latents(batch)
        size = latents.shape[-1] * self.pipe.vae_scale_factor
        with torch.set_grad_enabled(self.te_lora_config is not None):
            hidden, added = self.conditioning(batch, size)
        noise, t = self.noise(latents)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = self._target(latents, noise, t)
        use_amp = self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=use_amp):
            pred = self.model(
                noisy, t, encoder_hidden_states=hidden, added_cond_kwargs=added
            ).sample
        gamma = self.config["snr_gamma"]
        if not gamma:
            return torch.nn.functional.mse_loss(pred.float(), target.float())
        snr = compute_snr(self.noise_scheduler, t)
        weight = torch.clamp(snr, max=gamma) / snr
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=gamma) / (snr + 1)
        per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
        return (per_sample.mean(dim=(1, 2, 3)) * weight).mean()

    def distribute(self) -> None:
        """Data-parallel training in a Ray Train worker group: the UNet in DDP (its LoRA
        gradients all-reduced during the last micro-batch's backward), and the text-encoder
        LoRA, which the UNet's DDP does not cover, started from rank 0's weights with its
        gradients averaged once per step in ``accumulate``."""
        import ray.train.torch
        import torch.distributed as dist

        self.model = ray.train.torch.prepare_model(self.unet, move_to_device=False)
        self.distributed = True
        if self.te_lora_config is not None:
            self.synced = [p for p in self.text_encoder.parameters() if p.requires_grad]
            for p in self.synced:
                dist.broadcast(p.data, src=0)

    def _average_synced_grads(self) -> None:
        """All-reduce (mean) the gradients of the parameters DDP does not cover."""
        import torch
        import torch.distributed as dist

        if not self.synced:
            return
        for p in self.synced:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in self.synced])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for p in self.synced:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def accumulate(self, micro_batches: list[dict[str, Any]]) -> float:
        """Zero the gradients, then backpropagate the loss of ``micro_batches`` (gradient
        accumulation): each micro-batch's mean loss weighted by its share of the rows, so the
        gradient is that of one batch of all of them. Under DDP, gradients are all-reduced once,
        after the last micro-batch (``no_sync`` before). Every micro-batch is backpropagated,
        even one with a non-finite loss, so that all ranks run the same collectives (the step
        is then skipped by ``train_step``). Returns the mean loss per row."""
        import contextlib

        from torch.nn.parallel import DistributedDataParallel

        if not micro_batches:
            raise ValueError("a training step needs at least one micro-batch")
        rows = [len(next(iter(b.values()))) for b in micro_batches]
        total_rows = sum(rows)
        ddp = isinstance(self.model, DistributedDataParallel)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i, (batch, n) in enumerate(zip(micro_batches, rows, strict=True)):
            last = i == len(micro_batches) - 1
            with self.model.no_sync() if ddp and not last else contextlib.nullcontext():
                loss = self.loss(batch) * (n / total_rows)
                self.scaler.scale(loss).backward()
            total += loss.item()
        self._average_synced_grads()
        return total

    def apply_gradients(self) -> float:
        """Unscale, clip and apply the accumulated gradients (optimizer and lr schedule step);
        returns the gradient norm before clipping. Gradients that are not finite are not
        applied: no optimizer, lr schedule or step-count update; under fp16 the loss scale
        backs off, as GradScaler does on an overflow. Every rank holds the same (all-reduced)
        gradients, so every rank decides alike."""
        import torch

        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config["max_grad_norm"]))
        if not math.isfinite(grad_norm):
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.step += 1
        return grad_norm

    def _finite_on_every_rank(self, value: float) -> bool:
        """Whether ``value`` is finite here and on every other rank of the worker group."""
        import torch
        import torch.distributed as dist

        finite = math.isfinite(value)
        if not self.distributed:
            return finite
        flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step over ``micro_batches`` (gradient accumulation); returns the mean
        loss, the gradient norm before clipping and whether the step was skipped.

        A step whose loss (on any rank) or gradients are not finite is skipped: the LoRA, the
        optimizer, the lr schedule, the loss scale (for a non-finite loss) and ``step`` stay as
        they were, and ``skipped_steps`` counts it. ``step`` counts applied updates only, so
        ``max_steps``, the lr schedule and ``checkpoint_every`` keep meaning updates, and a
        resumed run restarts at the same update; the skipped micro-batches are still consumed
        (the feed moves on rather than retrying a bad batch). ``max_nonfinite_steps`` skips in
        a row raise ``NonFiniteTrainingError``."""
        loss = self.accumulate(micro_batches)
        if not self._finite_on_every_rank(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(loss, math.nan, "the loss is not finite")
        grad_norm = self.apply_gradients()
        if not math.isfinite(grad_norm):
            return self._skip(loss, grad_norm, "the gradients are not finite")
        self.nonfinite_in_a_row = 0
        return {"loss": loss, "grad_norm": grad_norm, "skipped": False}

    def _skip(self, loss: float, grad_norm: float, why: str) -> dict[str, Any]:
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        limit = self.config["max_nonfinite_steps"]
        skill = self.config.get("skill", "?")
        log.warning(
            "experts: [%s] step %d skipped: %s (loss %s, grad norm %s); %d in a row (limit %d), "
            "%d skipped in all",
            skill,
            self.step + 1,
            why,
            loss,
            grad_norm,
            self.nonfinite_in_a_row,
            limit,
            self.skipped_steps,
        )
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteTrainingError(
                f"expert {skill}: {self.nonfinite_in_a_row} steps in a row were skipped because "
                f"{why} (after {self.step} applied updates; experts.max_nonfinite_steps="
                f"{limit}). Training stopped. Usual causes: an fp16 VAE that overflows (leave "
                "models.vae null to encode in float32, or use an fp16-safe VAE such as "
                "madebyollin/sdxl-vae-fp16-fix), a learning rate too high "
                "(experts.learning_rate), or broken images; bf16 "
                "(experts.mixed_precision=bf16) has fp32's range."
            )
        return {"loss": loss, "grad_norm": grad_norm, "skipped": True}

    # ---- validation --------------------------------------------------------------------------
    def set_validation(self, batches) -> None:
        """Fix the validation inputs from an iterable of mini-batches (each VAE-encoded on
        its own, so no more than one mini-batch of pixels is ever in memory): VAE means, and
        seeded noise at fixed timesteps."""
        import numpy as np
        import torch

        latents, kept = [], []
        for batch in batches:
            latents.append(self.latents(batch, sample=False).detach())
            kept.append({k: v for k, v in batch.items() if k != "pixel_values"})
        if not latents:
            return
        joined = {k: np.concatenate([b[k] for b in kept]) for k in kept[0]}
        fixed = FixedNoise(
            self.noise_scheduler, torch.cat(latents), self.config["seed"], self.device
        )
        self.val = {"batch": joined, "fixed": fixed}

    def validation_loss(self) -> float | None:
        """Denoising loss on the held-out images; comparable across checkpoints."""
        import torch

        if self.val is None:
            return None
        fixed = self.val["fixed"]
        with torch.no_grad():
            hidden, added = self.conditioning(self.val["batch"], fixed.size(self.pipe))
        return fixed.loss(self.unet, hidden, added)

    def render_samples(self, prompts: list[str]) -> bytes:
        """Render ``prompts`` with the current adapter (fixed seed) as one PNG strip. The
        latents are decoded here, in the VAE's own dtype (the pipelines would hand fp16
        latents to a float32 VAE)."""
        import io

        import torch
        from PIL import Image

        gen = torch.Generator().manual_seed(self.config["seed"])
        with torch.no_grad():
            latents = self.pipe(
                prompts, num_inference_steps=10, generator=gen, output_type="latent"
            ).images
            images = self.pipe.image_processor.postprocess(self.decode(latents), output_type="pil")
        strip = Image.new("RGB", (sum(i.width for i in images), images[0].height))
        x = 0
        for img in images:
            strip.paste(img, (x, 0))
            x += img.width
        buf = io.BytesIO()
        strip.save(buf, format="PNG")
        return buf.getvalue()

    def decode(self, latents):
        """Images in [-1, 1] from scaled latents, as the SD/SDXL pipelines decode them."""
        import torch

        cfg = self.vae.config
        latents = latents.to(self.vae_dtype)
        if getattr(cfg, "latents_mean", None) is not None and cfg.latents_std is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0]

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, out: Path) -> None:
        """Adapter(s) in the diffusers LoRA format plus optimizer/scheduler state and step."""
        import torch
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        def meta(cfg):
            return {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.to_dict().items()}

        out.mkdir(parents=True, exist_ok=True)
        te = None
        if self.te_lora_config is not None:
            te = get_peft_model_state_dict(self.text_encoder)
        StableDiffusionPipeline.save_lora_weights(
            out,
            unet_lora_layers={
                k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self.unet).items()
            },
            text_encoder_lora_layers=te and {k: v.detach().contiguous() for k, v in te.items()},
            unet_lora_adapter_metadata=meta(self.lora_config),
            text_encoder_lora_adapter_metadata=self.te_lora_config and meta(self.te_lora_config),
            safe_serialization=True,
        )
        state = {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "data_position": list(self.data_position),
        }
        torch.save(state, out / STATE_FILE)

    def load(self, ckpt: Path) -> None:
        import torch
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        tensors = load_file(str(Path(ckpt) / WEIGHT_NAME))
        for prefix, module in (("unet.", self.unet), ("text_encoder.", self.text_encoder)):
            part = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if part:
                set_peft_model_state_dict(module, part)
        saved = torch.load(Path(ckpt) / STATE_FILE, weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.step = int(saved["step"])
        self.skipped_steps = int(saved.get("skipped_steps", 0))
        self.data_position = saved_position(Path(ckpt), saved)


def saved_position(ckpt: Path, state: dict[str, Any] | None = None) -> tuple[int, int]:
    """The feed's (epoch, batches taken in it) a checkpoint was saved at ((0, 0) for a
    checkpoint older than the streamed feed)."""
    if state is None:
        import torch

        state = torch.load(Path(ckpt) / STATE_FILE, weights_only=True)
    epoch, taken = state.get("data_position", (0, 0))
    return int(epoch), int(taken)


def _work(config: dict[str, Any]) -> tuple[RunDir, str] | None:
    """The run directory and this expert's scratch prefix in it (attempts, logs, samples),
    on the run's storage so that any node sees them; ``None`` outside a pipeline run."""
    if not config.get("work"):
        return None
    return RunDir.from_spec(config["work"]["run"]), config["work"]["prefix"]


def _record_attempt(run: RunDir, work: str, step: int, position: tuple[int, int]) -> None:
    """Record the step this worker group starts from (0, or a checkpoint's step) and where
    its data feed starts (epoch, batches taken in it): one object per attempt, since object
    stores cannot append."""
    record = {"start_step": step, "data_position": list(position), "time": time.time()}
    run.write_json(record, work, "attempts", f"{time.time_ns()}-{step}.json")


def read_attempts(run: RunDir, work: str) -> list[int]:
    """Start steps of every attempt at training an expert (driver re-runs and retries)."""
    return [a["start_step"] for a in read_attempt_records(run, work)]


def read_attempt_records(run: RunDir, work: str) -> list[dict[str, Any]]:
    """Every attempt's record (start step, data position, time), oldest first."""
    names = sorted(run.listdir(work, "attempts"))
    return [run.read_json(work, "attempts", n) for n in names]


def _fault_drill(config: dict[str, Any], step: int) -> None:
    """Test hook: raise once at ``fail_at_step`` (a marker object per step stops the retry
    failing again)."""
    where = _work(config)
    if config.get("fail_at_step") != step or where is None:
        return
    run, work = where
    marker = f"fault-drill-{step}"
    if run.exists(work, marker):
        return
    run.write_bytes(b"", work, marker)
    raise RuntimeError(f"fault drill: expert {config['skill']} fails at step {step}")


def _check_not_stopped(config: dict[str, Any]) -> None:
    """Refuse to start an expert that an earlier attempt stopped for non-finite steps: the
    same config and data would only burn GPU time again until the same stop (Ray Train and
    Tune retry failed workers and trials). The record lives in the expert's work folder, which
    belongs to one (skill, fingerprint): a changed config trains afresh."""
    where = _work(config)
    if where is None or not where[0].exists(where[1], NONFINITE_STOP):
        return
    run, work = where
    record = run.read_json(work, NONFINITE_STOP)
    raise NonFiniteTrainingError(
        f"{record['error']} [recorded by an earlier attempt; not retried. Change the config, "
        f"or delete {run.url(work, NONFINITE_STOP)} to try the same again]"
    )


def _record_stop(config: dict[str, Any], error: NonFiniteTrainingError, step: int) -> None:
    where = _work(config)
    if where is not None:
        record = {"error": str(error), "step": step, "time": time.time()}
        where[0].write_json(record, where[1], NONFINITE_STOP)


def _upload_logs(run: RunDir, work: str, local: Path) -> None:
    """Copy TensorBoard's event files to the run's storage (each file whole, so earlier
    attempts' files stay)."""
    for f in sorted(local.glob("*")):
        if f.is_file():
            run.write_bytes(f.read_bytes(), work, "logs", f.name)


def train_expert(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` for one expert; ``config`` is a plain dict."""
    import ray.train
    import ray.train.torch
    import torch

    from selma_ray.core.logs import setup_logging
    from selma_ray.experts.feed import Feed, validation_batches

    setup_logging()
    _check_not_stopped(config)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as ckpt:
        # The feed starts first, from the checkpoint's data position: its first read then
        # overlaps the loading of the model.
        feed = Feed(
            ray.train.get_dataset_shard("train"),
            config,
            rank,
            saved_position(Path(ckpt)) if ckpt else (0, 0),
            config.get("feed_mode", "stream"),
        )
        batches = feed.start()
        trainer = ExpertTrainer(config, ray.train.torch.get_device())
        if ckpt:
            trainer.load(Path(ckpt))
    resumed_from = trainer.step
    if checkpoint:
        log.info(
            "experts: [%s] resumed at step %d (data: epoch %d, batch %d)",
            config["skill"],
            trainer.step,
            *trainer.data_position,
        )
    where = _work(config) if rank == 0 else None
    if where:
        _record_attempt(*where, trainer.step, trainer.data_position)
    torch.manual_seed(config["seed"] * 1_000_003 + rank * 7919 + trainer.step)
    if ctx.get_world_size() > 1:
        trainer.distribute()
    try:
        held_out = ray.train.get_dataset_shard("validation")
    except KeyError:
        held_out = None  # nothing held out (select=last)
    if held_out is not None:
        trainer.set_validation(validation_batches(held_out, config))
    writer, log_dir = None, None
    if where:
        from tensorboardX import SummaryWriter

        log_dir = Path(tempfile.mkdtemp(prefix="selma-tb-"))
        # After a resume, TensorBoard hides the failed attempt's steps past the checkpoint.
        writer = SummaryWriter(str(log_dir), purge_step=trainer.step + 1 if trainer.step else None)

    try:
        losses: list[float] = []
        start, start_step = time.perf_counter(), trainer.step
        last, step_seconds = start, []  # wall time per step, data fetch and reports included
        data_wait = 0.0  # of that, waiting for the feed's batches
        while trainer.step < config["max_steps"]:
            fetch = time.perf_counter()
            micro_batches = [next(batches) for _ in range(config["gradient_accumulation"])]
            data_wait += time.perf_counter() - fetch
            try:
                out = trainer.train_step(micro_batches)
            except NonFiniteTrainingError as e:
                if rank == 0:
                    _record_stop(config, e, trainer.step)
                raise
            trainer.data_position = feed.position
            now = time.perf_counter()
            step_seconds.append(now - last)
            last = now
            if out["skipped"]:  # nothing applied: no loss to average, no checkpoint
                if writer:
                    writer.add_scalar("train/skipped_steps", trainer.skipped_steps, trainer.step)
                continue
            losses.append(out["loss"])
            if writer:
                writer.add_scalar("train/loss", out["loss"], trainer.step)
                writer.add_scalar("train/grad_norm", out["grad_norm"], trainer.step)
                writer.add_scalar("train/lr", trainer.lr_scheduler.get_last_lr()[0], trainer.step)
            if rank == 0:
                _fault_drill(config, trainer.step)
            if trainer.step % config["checkpoint_every"] and trainer.step < config["max_steps"]:
                continue
            metrics = {
                "step": trainer.step,
                "loss": sum(losses) / len(losses),
                "grad_norm": out["grad_norm"],
                "lr": trainer.lr_scheduler.get_last_lr()[0],
                "resumed_from": resumed_from,
                "skipped_steps": trainer.skipped_steps,
                "workers": ctx.get_world_size(),
                "steps_per_second": (trainer.step - start_step) / (time.perf_counter() - start),
                "median_step_seconds": statistics.median(step_seconds),
                "data_wait_fraction": data_wait / (time.perf_counter() - start),
                "skill": config["skill"],
            }
            val_loss = trainer.validation_loss()
            if val_loss is not None:
                metrics["val_loss"] = val_loss
            if writer:
                if val_loss is not None:
                    writer.add_scalar("val/loss", val_loss, trainer.step)
                writer.flush()
                _upload_logs(*where, log_dir)
            if where and config.get("sample_prompts"):
                png = trainer.render_samples(config["sample_prompts"])
                where[0].write_bytes(png, where[1], "samples", f"step-{trainer.step:06d}.png")
            log.info(
                "experts: [%s] step %d/%d loss %.4f%s%s",
                config["skill"],
                trainer.step,
                config["max_steps"],
                metrics["loss"],
                f" val {val_loss:.4f}" if val_loss is not None else "",
                f" ({trainer.skipped_steps} non-finite steps skipped)"
                if trainer.skipped_steps
                else "",
            )
            _report(trainer, metrics, rank)
            losses.clear()
    finally:  # a failing attempt still leaves its curves on storage, and no local scratch
        # The feed's prefetch thread and Ray Data execution stop here, not when the worker
        # goes: they would read on, holding object-store blocks, while the run winds down.
        batches.close()
        if writer:
            writer.close()
            _upload_logs(*where, log_dir)
        if log_dir is not None:
            shutil.rmtree(log_dir, ignore_errors=True)


def _report(trainer: ExpertTrainer, metrics: dict[str, Any], rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            out = Path(tmp) / "ckpt"
            trainer.save(out)
            checkpoint = ray.train.Checkpoint.from_directory(str(out))
        ray.train.report(metrics, checkpoint=checkpoint)
