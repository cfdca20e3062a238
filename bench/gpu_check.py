"""The GPU check: real-shape SD v1.5 and SDXL models on one CUDA GPU, random weights, no network.

One command proves the GPU code paths of selma_ray that the CPU suite cannot reach, and measures
throughput against the chip's peak:

- training (``ExpertTrainer.train_step``: autocast, GradScaler, the non-finite-loss guard) of a
  rank-128 LoRA on to_q/k/v/out.0, bf16 and fp16: SD v1.5 at 512 px and SDXL at 1024 px (with
  gradient checkpointing), batch 64 as micro-batch x accumulation of the sd14 / sdxl presets
  (SD v1.4 and v1.5 share one architecture); steps/s, peak GPU memory and MFU;
- generation: SD v1.5 at 512 px, 50 steps, CFG 7.5, batch 8 and 32 (fp16): images/s and MFU;
- serving: one image at a time, switching among 6 loaded rank-128 adapters (``set_adapters``,
  as ``selma_ray.diffusion.engine`` does) vs one fused adapter: p50 seconds per image;
- merge (``selma_ray.lora.methods.merge``) of 5 SD v1.5 rank-128 adapters on the GPU, every
  method;
- correctness: the VAE encodes in float32 under fp16 training; an injected NaN loss is skipped
  and counted; the LoRA weights stay float32 under autocast; the loss after the run's steps is
  finite for both dtypes; an adapter trained on the GPU loads on the CPU and renders the same
  image there as on the GPU (fp32, TF32 off; tolerance ``RENDER_TOLERANCE``).

The models are built from their published configs with random weights (no download), the
tokenizer is a byte-level CLIP tokenizer built in memory (both in ``bench/_gpu_models.py``).
MFU counts the UNet's matmul and convolution FLOPs (``torch.utils.flop_counter``,
forward+backward for training, forward per denoising step plus the VAE decode for generation;
recomputation under gradient checkpointing is not counted) against ``--peak-tflops`` (the
chip's dense bf16 peak; about 790 TFLOP/s measured on the H200).

Output: ``GPU <what>: <value> (<unit>)`` per figure, ``RATIO gpu-mfu <what>: <x>x (goal >= ...)``
per MFU, and everything in ``$OUT/gpu_check.json`` when ``OUT`` is set. A failing section is
recorded as failed and the others still run; the exit status is 1 if any section failed.
Needs no Ray (and imports no pydantic or pyarrow): see README "GPU check".

    python bench/gpu_check.py [--tiny] [--peak-tflops 790] [--only train_sd15,merge,...]

``--tiny``: tiny shapes (2-block UNets of 32/64 channels, 64 px), 2 steps; runs on the CPU in
the test suite so that the check cannot rot.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import logging
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from _common import ratio_line
from _gpu_models import TARGETS, Spec, build_pipeline, count_flops, spec, trainer_config

log = logging.getLogger("gpu_check")

PEAK_TFLOPS = 790.0  # dense bf16, measured on the H200 this project borrows
DTYPES = ("bf16", "fp16")  # training mixed precision, both measured
TRAIN_MFU_GOAL = 0.4
GENERATE_MFU_GOAL = 0.5
FP16_BACKOFF_SKIPS = 5  # steps GradScaler may skip while it finds its loss scale
RENDER_TOLERANCE = 0.01  # max |CPU - GPU| per pixel, images in [0, 1]
PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "huggingface_hub",
    "numpy",
    "pillow",
    "pyyaml",
    "requests",
    "selma_ray",
    "ray",
)
# ---------------------------------------------------------------------------- recording


class CheckFailed(RuntimeError):
    """A correctness check of a section did not hold."""


@dataclass
class Section:
    """One section's figures, ratios and checks, printed as they come."""

    name: str
    status: str = "running"
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def figure(self, what: str, value: float, unit: str) -> None:
        self.figures[what] = {"value": value, "unit": unit}
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"GPU {what}: {text} ({unit})", flush=True)

    def mfu(self, what: str, value: float, goal: float) -> None:
        line = ratio_line("gpu-mfu", what, value, ">=", goal)
        self.ratios[what] = {"value": value, "goal": goal, "line": line}
        print(line, flush=True)

    def check(self, what: str, ok: bool, detail: str) -> None:
        self.checks[what] = {"ok": bool(ok), "detail": detail}
        print(f"CHECK {'ok' if ok else 'FAILED'} {what}: {detail}", flush=True)

    def failed_checks(self) -> list[str]:
        return [k for k, v in self.checks.items() if not v["ok"]]


@dataclass
class Settings:
    device: Any
    tiny: bool
    peak_tflops: float
    work: Path
    train_steps: dict[str, tuple[int, int]]  # model -> (warm-up, timed) steps per dtype
    micro: dict[str, tuple[int, int]]  # model -> (micro-batch, accumulation)
    rank: int
    gen_steps: int
    gen_batches: tuple[int, ...]
    gen_repeats: int
    serve_adapters: int
    serve_requests: int
    merge_adapters: int
    render_size: int
    render_steps: int
    adapters: dict[str, Path] = field(default_factory=dict)  # dtype -> trained SD v1.5 LoRA

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def settings(args: argparse.Namespace, work: Path) -> Settings:
    """The paper's settings (batches from the presets), or tiny ones for the CPU test."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    common = {"device": device, "tiny": args.tiny, "peak_tflops": args.peak_tflops, "work": work}
    if args.tiny:
        return Settings(
            **common,
            train_steps={"sd15": (1, 1), "sdxl": (1, 1)},
            micro={"sd15": (2, 2), "sdxl": (2, 2)},
            rank=4,
            gen_steps=2,
            gen_batches=(2, 4),
            gen_repeats=1,
            serve_adapters=6,
            serve_requests=2,
            merge_adapters=5,
            render_size=64,
            render_steps=2,
        )
    micro = {}
    for name, preset in (("sd15", "sd14"), ("sdxl", "sdxl")):
        cfg = trainer_config(preset)
        micro[name] = (int(cfg["batch_size"]), int(cfg["gradient_accumulation"]))
    return Settings(
        **common,
        train_steps={"sd15": (5, 15), "sdxl": (2, 3)},  # SD v1.5: the loss after 20 steps
        micro=micro,
        rank=128,
        gen_steps=50,
        gen_batches=(8, 32),
        gen_repeats=2,
        serve_adapters=6,
        serve_requests=6,  # per pass, A B B A
        merge_adapters=5,
        render_size=256,  # the CPU renders too: 256 px, 5 steps keep it to seconds
        render_steps=5,
    )


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device) -> tuple[float, str]:
    """(peak, unit): GPU memory allocated by torch since the last reset, or the process RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "GiB, torch peak allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "GiB, process peak RSS"


def reset_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------- training


def training_batches(trainer, s: Spec, micro: int, accumulation: int, device) -> list[dict]:
    """``accumulation`` micro-batches of random pixels at the native size and token ids."""
    import torch

    prompts = [f"{i} red apples on a wooden table" for i in range(micro)]
    ids = trainer.text.tokenize(trainer.pipe, prompts)
    gen = torch.Generator(device).manual_seed(0)
    out = []
    for _ in range(accumulation):
        pixels = torch.rand(micro, 3, s.resolution, s.resolution, generator=gen, device=device)
        out.append({"pixel_values": pixels * 2 - 1, **{k: v.to(device) for k, v in ids.items()}})
    return out


def unet_train_flops(trainer, batch: dict[str, Any]) -> int:
    """The UNet's forward+backward FLOPs for one image of ``batch`` (model FLOPs: gradient
    checkpointing is off while counting, so recomputation is not counted)."""
    import torch

    one = {k: v[:1] for k, v in batch.items()}
    latents = trainer.latents(one)
    size = latents.shape[-1] * trainer.pipe.vae_scale_factor
    with torch.no_grad():
        hidden, added = trainer.conditioning(one, size)
    noise, t = trainer.noise(latents)
    noisy = trainer.noise_scheduler.add_noise(latents, noise, t)
    checkpointing = trainer.unet.is_gradient_checkpointing
    if checkpointing:
        trainer.unet.disable_gradient_checkpointing()

    def step() -> None:
        amp = trainer.dtype != torch.float32
        with torch.autocast(trainer.device.type, dtype=trainer.dtype, enabled=amp):
            pred = trainer.unet(noisy, t, encoder_hidden_states=hidden, added_cond_kwargs=added)
        pred.sample.float().square().mean().backward()

    try:
        return count_flops(step)
    finally:
        if checkpointing:
            trainer.unet.enable_gradient_checkpointing()
        trainer.optimizer.zero_grad(set_to_none=True)


def check_nan_guard(sec: Section, trainer, batches: list[dict], label: str) -> None:
    """Inject a NaN loss for one step: it must be skipped, counted, and change nothing."""
    import torch

    before = [p.detach().clone() for p in trainer.params]
    step, skipped = trainer.step, trainer.skipped_steps
    real_loss = trainer.loss
    trainer.loss = lambda batch: real_loss(batch) * float("nan")
    try:
        out = trainer.train_step(batches)
    finally:
        del trainer.loss  # the method again
    same = all(torch.equal(a, p.detach()) for a, p in zip(before, trainer.params, strict=True))
    ok = out["skipped"] and trainer.skipped_steps == skipped + 1 and trainer.step == step and same
    sec.check(
        f"{label} NaN loss skipped and counted",
        ok,
        f"skipped={out['skipped']}, skipped_steps {skipped}->{trainer.skipped_steps}, "
        f"step {step}->{trainer.step}, LoRA unchanged={same}",
    )
    after = trainer.train_step(batches)
    sec.check(
        f"{label} training goes on after the skip",
        not after["skipped"] and math.isfinite(after["loss"]),
        f"next step applied={not after['skipped']}, loss {after['loss']:.4g}",
    )


def train(sec: Section, cfg: Settings, model: str, preset: str, dtype: str) -> None:
    """Train ``model`` with ``dtype`` mixed precision at the preset's batch; time, count, check."""
    import torch

    from selma_ray.experts.recipe import ExpertTrainer

    s = spec(model, cfg.tiny)
    micro, accumulation = cfg.micro[model]
    warmup, timed = cfg.train_steps[model]
    label = f"train {model} {s.resolution}px {dtype}"
    config = trainer_config(
        preset,
        mixed_precision=dtype,
        rank=cfg.rank,
        alpha=float(cfg.rank),
        batch_size=micro,
        gradient_accumulation=accumulation,
        max_steps=warmup + timed + 10,
        skill="gpu-check",
    )
    reset_memory(cfg.device)
    trainer = ExpertTrainer(config, cfg.device, build_pipeline(s, cfg.device))
    encoded: list[torch.dtype] = []
    hook = trainer.vae.encoder.register_forward_pre_hook(lambda _m, a: encoded.append(a[0].dtype))
    batches = training_batches(trainer, s, micro, accumulation, cfg.device)
    flops = unet_train_flops(trainer, batches[0])
    losses = []
    for _ in range(warmup):
        losses.append(trainer.train_step(batches)["loss"])
    sync(cfg.device)
    reset_memory(cfg.device)
    start = time.perf_counter()
    for _ in range(timed):
        losses.append(trainer.train_step(batches)["loss"])
    sync(cfg.device)
    seconds = time.perf_counter() - start
    hook.remove()
    batch = micro * accumulation
    steps_per_s = timed / seconds
    sec.figure(f"{label} batch {batch} ({micro}x{accumulation}) steps/s", steps_per_s, "steps/s")
    sec.figure(f"{label} images/s", steps_per_s * batch, "images/s")
    peak, unit = peak_memory_gib(cfg.device)
    sec.figure(f"{label} peak memory", peak, unit)
    sec.figure(f"{label} UNet fwd+bwd per image", flops / 1e12, "TFLOP")
    sec.mfu(f"{label}", flops * batch * steps_per_s / (cfg.peak_tflops * 1e12), TRAIN_MFU_GOAL)
    want = "float32" if cfg.cuda else "float32 (no autocast off CUDA)"
    sec.check(
        f"{label} VAE encodes in float32",
        trainer.vae.dtype == torch.float32 and set(encoded) == {torch.float32},
        f"VAE weights {trainer.vae.dtype}, encoder inputs {sorted({str(d) for d in encoded})}, "
        f"want {want}",
    )
    lora = {p.dtype for p in trainer.params}
    base = {p.dtype for p in trainer.unet.parameters() if not p.requires_grad}
    # On CUDA the frozen UNet is cast to the training dtype and runs under autocast; off CUDA
    # ExpertTrainer trains in float32 (no autocast), so only the LoRA's dtype is meaningful.
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    expected_base = half if cfg.cuda else torch.float32
    sec.check(
        f"{label} LoRA weights stay float32 under autocast",
        lora == {torch.float32} and base == {expected_base} and len(trainer.params) > 0,
        f"{len(trainer.params)} LoRA tensors {sorted(map(str, lora))}, frozen UNet "
        f"{sorted(map(str, base))} (want {expected_base}), autocast dtype {trainer.dtype}",
    )
    # Under fp16, GradScaler starts at a loss scale of 2**16 and halves it at each overflow;
    # the guard skips those steps (finite loss, non-finite gradients), as it should.
    backoff = trainer.dtype == torch.float16
    allowed = FP16_BACKOFF_SKIPS if backoff else 0
    sec.check(
        f"{label} loss finite after {len(losses)} steps",
        all(math.isfinite(x) for x in losses) and trainer.skipped_steps <= allowed,
        f"last loss {losses[-1]:.4g}, {trainer.step} updates applied, {trainer.skipped_steps} "
        f"steps skipped (allowed {allowed}{', fp16 loss-scale backoff' if backoff else ''}), "
        f"loss scale {trainer.scaler.get_scale():g}",
    )
    check_nan_guard(sec, trainer, batches, label)
    if model == "sd15":
        out = cfg.work / f"adapter-{model}-{dtype}"
        trainer.save(out)
        cfg.adapters[dtype] = out
    del trainer, batches
    reset_memory(cfg.device)


def section_train_sd15(sec: Section, cfg: Settings) -> None:
    for dtype in DTYPES:
        train(sec, cfg, "sd15", "sd14", dtype)


def section_train_sdxl(sec: Section, cfg: Settings) -> None:
    for dtype in DTYPES:
        train(sec, cfg, "sdxl", "sdxl", dtype)


# ---------------------------------------------------------------------------- rendering


def render(pipe, size: int, steps: int, seed: int = 0):
    """One image (numpy HxWx3 in [0, 1]) from a CPU generator, so both devices start alike."""
    import torch

    with torch.no_grad():
        return pipe(
            "two red apples on a table",
            num_inference_steps=steps,
            guidance_scale=7.5,
            height=size,
            width=size,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        ).images[0]


def section_render_cpu_gpu(sec: Section, cfg: Settings) -> None:
    """The SD v1.5 adapter trained on this device (bf16) loads on the CPU and renders there
    the image it renders here (float32 both, TF32 off)."""
    import numpy as np
    import torch

    from selma_ray.core.lora_io import WEIGHT_NAME

    adapter = cfg.adapters.get("bf16")
    if adapter is None:
        raise RuntimeError("no trained SD v1.5 adapter: section train_sd15 did not finish")
    pipe = build_pipeline(spec("sd15", cfg.tiny), cfg.device, seed=1).to("cpu")
    pipe.load_lora_weights(str(adapter), weight_name=WEIGHT_NAME, adapter_name="expert")
    on_cpu = render(pipe, cfg.render_size, cfg.render_steps)
    pipe.to(cfg.device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        on_device = render(pipe, cfg.render_size, cfg.render_steps)
        pipe.disable_lora()  # the base alone: shows the adapter was loaded and matters
        base = render(pipe, cfg.render_size, cfg.render_steps)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    diff = float(np.abs(on_cpu - on_device).max())
    effect = float(np.abs(on_device - base).max())
    sec.figure("render CPU vs device max |diff|", diff, "of [0, 1]")
    sec.figure("render adapter vs base max |diff|", effect, "of [0, 1]")
    sec.check("the loaded adapter changes the image", effect > 0, f"max |diff| {effect:.2e}")
    sec.check(
        "adapter trained here renders the same image on the CPU",
        diff <= RENDER_TOLERANCE and float(on_cpu.std()) > 0,
        f"{cfg.render_size}px, {cfg.render_steps} steps, max |diff| {diff:.2e} "
        f"(tolerance {RENDER_TOLERANCE}), image std {float(on_cpu.std()):.3f}, "
        f"device {cfg.device}",
    )


# ---------------------------------------------------------------------------- generation


def generation_pipe(cfg: Settings):
    import torch

    dtype = torch.float16 if cfg.cuda else torch.float32  # images.dtype of the presets
    return build_pipeline(spec("sd15", cfg.tiny), cfg.device).to(dtype=dtype)


def generate(pipe, n: int, steps: int, size: int):
    import torch

    with torch.no_grad():
        return pipe(
            ["a photo of three dogs on the grass"] * n,
            num_inference_steps=steps,
            guidance_scale=7.5,
            height=size,
            width=size,
            output_type="np",
        ).images


def section_generate(sec: Section, cfg: Settings) -> None:
    """SD v1.5 images/s at 50 steps, CFG 7.5, and the MFU of the UNet steps plus VAE decode
    (FLOPs per image counted at 1 and 2 steps, then extrapolated: both are linear in steps)."""
    s = spec("sd15", cfg.tiny)
    pipe = generation_pipe(cfg)
    one, two = (count_flops(partial(generate, pipe, 1, n, s.resolution)) for n in (1, 2))
    per_image = one + (two - one) * (cfg.gen_steps - 1)
    what = f"generate sd15 {s.resolution}px {cfg.gen_steps} steps per image"
    sec.figure(what, per_image / 1e12, "TFLOP")
    generate(pipe, cfg.gen_batches[0], cfg.gen_steps, s.resolution)  # warm-up
    for batch in cfg.gen_batches:
        reset_memory(cfg.device)
        times = []
        for _ in range(cfg.gen_repeats):
            sync(cfg.device)
            start = time.perf_counter()
            images = generate(pipe, batch, cfg.gen_steps, s.resolution)
            sync(cfg.device)
            times.append(time.perf_counter() - start)
        rate = batch / min(times)
        label = f"generate sd15 {s.resolution}px {cfg.gen_steps} steps cfg 7.5 batch {batch}"
        sec.figure(f"{label} images/s", rate, "images/s")
        peak, unit = peak_memory_gib(cfg.device)
        sec.figure(f"{label} peak memory", peak, unit)
        sec.mfu(label, per_image * rate / (cfg.peak_tflops * 1e12), GENERATE_MFU_GOAL)
        if len(images) != batch:
            raise CheckFailed(f"asked for {batch} images, got {len(images)}")


# ---------------------------------------------------------------------------- serving


def random_adapter_state(unet, rank: int, seed: int) -> dict[str, Any]:
    """peft-format random rank-``rank`` LoRA factors for the UNet's attention projections."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if any(name.endswith("." + t) for t in TARGETS):
            state[f"{name}.lora_A.weight"] = torch.randn(
                rank, module.in_features, generator=gen
            ) / math.sqrt(module.in_features)
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen)
            state[f"{name}.lora_B.weight"] *= 0.01
    return state


def section_serve(sec: Section, cfg: Settings) -> None:
    """p50 seconds per image, one request at a time: switching among the loaded adapters
    (``set_adapters``, as the serving engine does per request) vs one adapter fused into the
    UNet. Order A B B A (switch, fused, fused, switch) so drift favours neither."""
    from peft import LoraConfig

    from selma_ray.core.lora_io import WEIGHT_NAME, save_adapter

    s = spec("sd15", cfg.tiny)
    pipe = generation_pipe(cfg)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=TARGETS).to_dict()
    states = [random_adapter_state(pipe.unet, cfg.rank, i) for i in range(cfg.serve_adapters)]
    names = []
    for i, state in enumerate(states):
        folder = save_adapter(cfg.work / f"serve-{i}", state, lora)
        names.append(f"a{i}")
        pipe.load_lora_weights(str(folder), weight_name=WEIGHT_NAME, adapter_name=names[-1])
    generate(pipe, 1, cfg.gen_steps, s.resolution)  # warm-up

    def timed(switch: bool) -> list[float]:
        out = []
        for i in range(cfg.serve_requests):
            sync(cfg.device)
            start = time.perf_counter()
            if switch:
                pipe.set_adapters([names[i % len(names)]], [1.0])
            generate(pipe, 1, cfg.gen_steps, s.resolution)
            sync(cfg.device)
            out.append(time.perf_counter() - start)
        return out

    switching = timed(True)
    pipe.set_adapters([names[0]], [1.0])
    pipe.fuse_lora(adapter_names=[names[0]])
    fused = timed(False) + timed(False)
    pipe.unfuse_lora()
    switching += timed(True)
    label = f"serve sd15 {s.resolution}px {cfg.gen_steps} steps"
    p50_switch, p50_fused = statistics.median(switching), statistics.median(fused)
    what = f"{label} switching among {len(names)} rank-{cfg.rank} adapters p50"
    sec.figure(what, p50_switch, "s/image")
    sec.figure(f"{label} fused adapter p50", p50_fused, "s/image")
    sec.figure(f"{label} switching / fused p50", p50_switch / p50_fused, "x")


# ---------------------------------------------------------------------------- merge


def section_merge(sec: Section, cfg: Settings) -> None:
    """Every merge method on ``merge_adapters`` random SD v1.5-shaped adapters, computed on
    the device (``merge(..., device=...)``); the paper merge also on the CPU, to compare."""
    import torch
    from diffusers import UNet2DConditionModel

    from selma_ray.lora import METHODS
    from selma_ray.lora.methods import default_weights, from_state, merge, to_state

    with torch.device("meta"):  # shapes only
        unet = UNet2DConditionModel(**spec("sd15", cfg.tiny).unet)
    adapters = [
        from_state(random_adapter_state(unet, cfg.rank, seed=i), {"lora_alpha": cfg.rank})
        for i in range(cfg.merge_adapters)
    ]
    n = cfg.merge_adapters
    merge(adapters, default_weights("paper", n), "paper", device=cfg.device)  # warm-up
    for method in METHODS:
        sync(cfg.device)
        start = time.perf_counter()
        merged = merge(adapters, default_weights(method, n), method, device=cfg.device, seed=0)
        _, rank, _ = to_state(merged)
        sync(cfg.device)
        sec.figure(
            f"merge {method} of {n} sd15 rank-{cfg.rank} adapters on {cfg.device.type}",
            time.perf_counter() - start,
            f"s, output rank {rank}",
        )
        if method == "paper":
            on_cpu = merge(adapters, default_weights("paper", n), "paper", device="cpu")
            diff = max(
                float((getattr(on_cpu[k], f) - getattr(merged[k], f)).abs().max())
                for k in merged
                for f in ("A", "B")
            )
            sec.check("paper merge on device equals the CPU merge", diff < 1e-5, f"max {diff:.1e}")


# ---------------------------------------------------------------------------- main

SECTIONS: dict[str, Callable[[Section, Settings], None]] = {
    "train_sd15": section_train_sd15,
    "render_cpu_gpu": section_render_cpu_gpu,
    "generate": section_generate,
    "serve": section_serve,
    "merge": section_merge,
    "train_sdxl": section_train_sdxl,  # the longest, last: a time limit leaves the rest measured
}


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


# Modules the check imports (module -> pip package); Ray, pydantic and pyarrow are not among them.
NEEDED = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "accelerate": "accelerate",
    "safetensors": "safetensors",
    "diffusers": "diffusers",
    "PIL": "pillow",
    "requests": "requests",  # diffusers' pipeline_utils imports it; transformers 5 does not
    "selma_ray": "selma_ray",
}


def missing_modules() -> list[str]:
    """The ``NEEDED`` modules that are not importable here, as ``module (pip package)``."""
    import importlib.util

    return [f"{m} ({pkg})" for m, pkg in NEEDED.items() if importlib.util.find_spec(m) is None]


def environment(device) -> dict[str, Any]:
    import diffusers
    import torch

    import selma_ray

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "selma_ray_from": str(Path(selma_ray.__file__).parent),
        "diffusers_from": str(Path(diffusers.__file__).parent),
        "platform": platform.platform(),
        "device": str(device),
        "torch_cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return env


def run_section(name: str, fn: Callable[[Section, Settings], None], cfg: Settings) -> Section:
    sec = Section(name)
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        fn(sec, cfg)
        failed = sec.failed_checks()
        if failed:
            raise CheckFailed(f"checks failed: {failed}")
        sec.status = "passed"
    except Exception as e:  # one failing section must not hide the others' figures
        sec.status = "failed"
        sec.error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    reset_memory(cfg.device)  # the section's models are gone with its frame
    sec.seconds = time.perf_counter() - start
    print(f"== {name}: {sec.status} in {sec.seconds:.1f} s", flush=True)
    return sec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, 2 steps (CPU test)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=PEAK_TFLOPS,
        help="the chip's dense bf16 peak in TFLOP/s, the MFU denominator (default: %(default)s, "
        "measured on the H200)",
    )
    parser.add_argument("--only", default="", help=f"comma-separated sections of {list(SECTIONS)}")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is there")
    args = parser.parse_args(argv)
    if args.peak_tflops <= 0:
        parser.error("--peak-tflops must be > 0")
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print("BENCH gpu-check " + ", ".join(f"{k} {v}" for k, v in versions().items()), flush=True)
    missing = missing_modules()
    if missing:
        print(
            f"MISSING modules the check imports: {', '.join(missing)}. Carry them as wheels "
            "(bash scripts/prepare_gpu_check.sh puts diffusers and selma_ray in gpu_wheels/, "
            "and requests and its dependencies in gpu_wheels/fallback/) and install them with "
            "pip install --no-deps.",
            flush=True,
        )
        return 2

    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # per-load notes (no text-encoder LoRA keys ...)

    threads = torch.get_num_threads()
    if args.tiny:  # the CPU suite runs beside other work: one thread, no spinning contention
        torch.set_num_threads(1)
    try:
        return _run(args, only)
    finally:
        torch.set_num_threads(threads)


def write_report(report: dict[str, Any], results: list[Section]) -> None:
    """``$OUT/gpu_check.json`` (when ``OUT`` is set), rewritten after every section, so a run
    stopped by the machine's time limit still leaves what it measured."""
    report["sections"] = {
        r.name: {
            "status": r.status,
            "seconds": r.seconds,
            "error": r.error,
            "figures": r.figures,
            "ratios": r.ratios,
            "checks": r.checks,
        }
        for r in results
    }
    report["failed"] = [r.name for r in results if r.status != "passed"]
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu_check.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))


def _run(args: argparse.Namespace, only: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        cfg = settings(args, Path(tmp))
        found = versions()
        env = environment(cfg.device)
        print("ENV " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
        if not cfg.cuda and not args.tiny:
            print("WARNING: no CUDA device; the full-size check on the CPU takes hours", flush=True)
        report: dict[str, Any] = {
            "tiny": args.tiny,
            "peak_tflops": args.peak_tflops,
            "versions": found,
            "environment": env,
        }
        start = time.perf_counter()
        results: list[Section] = []
        for name, fn in SECTIONS.items():
            if only and name not in only:
                continue
            results.append(run_section(name, fn, cfg))
            report["seconds"] = time.perf_counter() - start
            write_report(report, results)
    failed = report["failed"]
    if os.environ.get("OUT"):
        print(f"wrote {Path(os.environ['OUT']) / 'gpu_check.json'}", flush=True)
    print(
        f"GPU check {'FAILED: ' + ', '.join(failed) if failed else 'passed'} "
        f"({len(results)} sections, {report['seconds']:.0f} s)",
        flush=True,
    )
    for r in results:
        for ratio in r.ratios.values():
            print(ratio["line"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
