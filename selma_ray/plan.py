"""The stage plan: what a config would run, on which models and resources, without running it.

``python jobs/full_pipeline.py --config weak_to_strong --plan`` prints it. Nothing is loaded
or downloaded: the model family and native resolution of well-known hub ids come from a
table, local model folders are read from their configs, and anything else is "unknown"
until the stage loads it. For GPU training it also estimates the memory one expert's worker
needs (``expert_memory``) and warns when that exceeds ``resources.experts.gpu_memory_gb``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from selma_ray.config import SelmaConfig
from selma_ray.models import TINY_SD, TINY_SDXL, is_builtin
from selma_ray.models.llm_data import engine_bundles

PIPELINES = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}
# Well-known checkpoints: family and native (training) resolution.
KNOWN_MODELS: dict[str, tuple[str, int]] = {
    TINY_SD: ("sd1", 32),
    TINY_SDXL: ("sdxl", 32),
    "CompVis/stable-diffusion-v1-4": ("sd1", 512),
    "runwayml/stable-diffusion-v1-5": ("sd1", 512),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("sd1", 512),
    "stabilityai/stable-diffusion-2": ("sd2", 768),
    "stabilityai/stable-diffusion-2-1": ("sd2", 768),
    "stabilityai/stable-diffusion-2-base": ("sd2", 512),
    "stabilityai/stable-diffusion-2-1-base": ("sd2", 512),
    "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", 1024),
}


GIB = 2**30

# ---- the expert memory estimate ----------------------------------------------------------------
# An estimate from published architectures and measurements, not a guarantee: the allocator's
# fragmentation, other attention kernels and other library versions move it. Not counted: a
# text-encoder LoRA (train_text_encoder), the renders at checkpoints (sample_images), autocast's
# fp16 copies of the LoRA weights (a third of a GiB for SDXL at rank 128). The constants:
#
# Frozen parameters per family, in millions: UNet, text encoder(s), VAE (counted from the models'
# published configs, built on the meta device: scripts/measure_activation_memory.py).
FAMILY_PARAMS_M: dict[str, tuple[float, float, float]] = {
    "sd1": (859.52, 123.06, 83.65),  # CLIP ViT-L text encoder
    "sd2": (865.91, 340.39, 83.65),  # OpenCLIP ViT-H text encoder (23 layers)
    "sdxl": (2567.46, 123.06 + 694.66, 83.65),  # CLIP ViT-L + OpenCLIP ViT-bigG (projection)
}
# The UNet's transformer blocks, for the LoRA's size: (sum of their widths, their number, the
# cross-attention width). Each block has a self- and a cross-attention; a LoRA of rank r on a
# d_in -> d_out projection has r * (d_in + d_out) weights, so per block to_q and to_out.0 add
# 4*r*d each, to_k and to_v 3*r*d + r*c each (self: d -> d, cross: c -> d).
ATTENTION_BLOCKS: dict[str, tuple[int, int, int]] = {
    "sd1": (12480, 16, 768),  # 5 x 320, 5 x 640, 6 x 1280 wide
    "sd2": (12480, 16, 1024),
    "sdxl": (83200, 70, 2048),  # 10 x 640, 60 x 1280 wide
}
PER_TARGET = {"to_q": (4, 0), "to_k": (3, 1), "to_v": (3, 1), "to_out.0": (4, 0)}
# What autograd keeps per sample for the backward pass at the native resolution, in GiB, with
# the LoRA on the four attention projections and flash attention (SDPA on a GPU): (without,
# with gradient checkpointing), for the trainer's fp16/bf16 autocast ("mixed") and for fp32
# ("no"). Measured by counting the tensors saved in one forward pass of the real diffusers
# UNets on the meta device (the script named above; autocast emulated there: norms in fp32,
# matmuls and convolutions in fp16). With checkpointing (every ResNet and transformer block)
# it is what is saved outside the blocks, every block's inputs, and the one block recomputed
# during the backward pass. Measured at 3/4 of the native size too: activations scale with the
# pixel count (within 0.5%).
ACTIVATION_GIB: dict[str, dict[str, tuple[float, float]]] = {
    "sd1": {"mixed": (1.095, 0.243), "fp32": (1.648, 0.413)},  # at 512 px
    "sd2": {"mixed": (2.366, 0.456), "fp32": (3.513, 0.745)},  # at 768 px
    "sdxl": {"mixed": (7.270, 0.743), "fp32": (11.469, 1.165)},  # at 1024 px
}
LORA_STATE_BYTES = 16  # fp32 weight, its gradient and AdamW's two moments
# The VAE encodes one image at a time (slicing); its encoder's peak is this many 128-channel
# maps at full resolution (measured: an allocation tracker on the SD/SDXL VAE encoder, no
# gradients, at 128 and 256 px), beside the micro-batch's pixels.
VAE_ENCODE_MAPS = 5
OVERHEAD_GIB = 2.0  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack


def lora_parameters(family: str, rank: int, targets: list[str]) -> tuple[int, list[str]]:
    """(weights of a rank-``rank`` LoRA on ``targets`` of a ``family`` UNet, targets not
    counted: only the four attention projections are known here)."""
    widths, blocks, cross = ATTENTION_BLOCKS[family]
    total = 0
    for target in targets:
        if target in PER_TARGET:
            k, c = PER_TARGET[target]
            total += rank * (k * widths + c * blocks * cross)
    return total, [t for t in targets if t not in PER_TARGET]


def expert_memory(
    family: str,
    resolution: int,
    native: int,
    micro_batch: int,
    dtype_bytes: int,
    vae_bytes: int,
    rank: int,
    targets: list[str],
    checkpointing: bool,
    cache_latents: bool,
) -> dict[str, Any]:
    """GiB one expert's training worker needs on its GPU, by part:

    - ``weights``: the frozen UNet and text encoder(s) in the training dtype, the VAE in its own;
    - ``lora``: the LoRA's weights, gradients and AdamW moments, all fp32 (16 bytes a weight);
    - ``activations``: ``ACTIVATION_GIB`` per sample (mixed precision, or fp32 when
      ``dtype_bytes`` is 4) x micro-batch x (resolution / native)^2;
    - ``vae_encode``: the VAE encoder's peak while it encodes a micro-batch one image at a
      time (no gradients): ``VAE_ENCODE_MAPS`` 128-channel maps of one image plus the
      micro-batch's pixels, at full resolution; 0 with cached latents;
    - ``overhead``: ``OVERHEAD_GIB``.

    The encoder runs before the UNet's forward pass, when the last micro-batch's activations
    are freed, so ``total`` = weights + lora + max(activations, vae_encode) + overhead."""
    unet, text, vae = FAMILY_PARAMS_M[family]
    weights = ((unet + text) * dtype_bytes + vae * vae_bytes) * 1e6 / GIB
    lora, uncounted = lora_parameters(family, rank, targets)
    full, checkpointed = ACTIVATION_GIB[family]["fp32" if dtype_bytes == 4 else "mixed"]
    per_sample = (checkpointed if checkpointing else full) * (resolution / native) ** 2
    activations = micro_batch * per_sample
    vae_encode = 0.0
    if not cache_latents:
        maps = VAE_ENCODE_MAPS * 128 + micro_batch * 3
        vae_encode = maps * resolution**2 * vae_bytes / GIB
    parts = {
        "weights": weights,
        "lora": lora * LORA_STATE_BYTES / GIB,
        "activations": activations,
        "vae_encode": vae_encode,
        "overhead": OVERHEAD_GIB,
    }
    peak = max(activations, vae_encode)
    total = parts["weights"] + parts["lora"] + peak + OVERHEAD_GIB
    return {**parts, "total": total, "lora_parameters": lora, "uncounted_targets": uncounted}


def _expert_memory_plan(
    cfg: SelmaConfig, base: DiffusionModelInfo, train_res: int | None
) -> tuple[str, str | None]:
    """The plan's memory line for one expert worker, and a warning when it exceeds the card."""
    ec, res = cfg.experts, cfg.resources.experts
    if not res.use_gpu:
        return "not estimated (CPU training)", None
    if base.family not in FAMILY_PARAMS_M or not (train_res and base.native_resolution):
        return f"not estimated ({base.family} model)", None
    dtype_bytes = 4 if ec.mixed_precision == "no" else 2
    est = expert_memory(
        base.family,
        train_res,
        base.native_resolution,
        ec.batch_size,
        dtype_bytes,
        dtype_bytes if cfg.models.vae else 4,
        ec.rank,
        ec.target_modules,
        ec.gradient_checkpointing,
        ec.cache_latents,
    )
    parts = (
        f"weights {est['weights']:.1f}, LoRA + AdamW {est['lora']:.1f}, activations "
        f"{est['activations']:.1f} ({ec.batch_size} x {train_res}px"
        f"{', checkpointed' if ec.gradient_checkpointing else ''}), VAE encode "
        f"{est['vae_encode']:.1f}, overhead {est['overhead']:.1f}"
    )
    if est["uncounted_targets"]:
        parts += f"; LoRA on {est['uncounted_targets']} not counted"
    card = res.gpu_memory_gb
    if card is None:
        line = f"~{est['total']:.1f} GiB estimated ({parts}); set "
        return line + "resources.experts.gpu_memory_gb to compare", None
    line = f"~{est['total']:.1f} of {card:g} GiB estimated ({parts})"
    if est["total"] <= card:
        return line, None
    return line, (
        f"experts: ~{est['total']:.1f} GiB estimated per GPU exceeds "
        f"resources.experts.gpu_memory_gb={card:g}: lower experts.batch_size (the micro-batch) "
        "and raise experts.gradient_accumulation to keep the batch"
        + ("" if ec.gradient_checkpointing else ", or set experts.gradient_checkpointing=true")
    )


@dataclass(frozen=True)
class DiffusionModelInfo:
    model: str
    family: str  # sd1, sd2, sdxl or unknown
    pipeline: str | None
    native_resolution: int | None
    source: str  # built-in, known hub id, local folder or unknown


def diffusion_model_info(model: str) -> DiffusionModelInfo:
    """Family and native resolution of a diffusion model id or folder, without loading it."""
    if model in KNOWN_MODELS:
        family, native = KNOWN_MODELS[model]
        source = "built-in" if model in (TINY_SD, TINY_SDXL) else "known hub id"
        return DiffusionModelInfo(model, family, PIPELINES[family], native, source)
    index = Path(model) / "model_index.json"
    if index.is_file():
        return _local_info(model, index)
    return DiffusionModelInfo(model, "unknown", None, None, "unknown (read when loaded)")


def _local_info(model: str, index: Path) -> DiffusionModelInfo:
    pipeline = json.loads(index.read_text()).get("_class_name")
    family = "sdxl" if pipeline and "XL" in pipeline else "sd1"
    native = None
    unet_cfg, vae_cfg = index.parent / "unet" / "config.json", index.parent / "vae" / "config.json"
    if unet_cfg.is_file() and vae_cfg.is_file():
        sample = json.loads(unet_cfg.read_text()).get("sample_size")
        blocks = json.loads(vae_cfg.read_text()).get("block_out_channels", [])
        if isinstance(sample, int) and blocks:
            native = sample * 2 ** (len(blocks) - 1)
    return DiffusionModelInfo(model, family, pipeline, native, "local folder")


def engine_gpus(cfg: SelmaConfig) -> float:
    """GPUs one LLM engine reserves: its placement group's with tensor parallelism."""
    bundles = engine_bundles(cfg)
    if bundles is None:
        return cfg.resources.prompts.num_gpus if cfg.prompts.backend == "vllm" else 0.0
    return sum(b["GPU"] for b in bundles)


def _gpus(n: float) -> str:
    return f"{n:g} GPU" if n else "CPU"


def build_plan(cfg: SelmaConfig) -> dict[str, Any]:
    """Every stage's models, settings and resources, plus warnings worth reading first."""
    pc, ic, ec, res = cfg.prompts, cfg.images, cfg.experts, cfg.resources
    skills = pc.skills
    imported = ic.real_data if ic.real_data_use == "pairs" else {}  # else captions rendered
    rendered = [s for s in skills if s not in imported]
    gen = diffusion_model_info(cfg.models.generator)
    base = diffusion_model_info(cfg.models.base)
    data_res = ic.resolution or gen.native_resolution
    train_res = ec.resolution or base.native_resolution
    warnings: list[str] = []
    if gen.model != base.model:
        warnings.append(
            f"weak-to-strong: {gen.model} renders the data, {base.model} learns from it"
        )
    if data_res and train_res and data_res != train_res:
        warnings.append(
            f"training resizes {data_res}px images to {train_res}px (shorter side, then crop)"
        )
    if ec.mixed_precision != "no" and not res.experts.use_gpu:
        warnings.append("experts.mixed_precision applies on GPU only; CPU training runs in fp32")
    if gen.family == "unknown" or base.family == "unknown":
        warnings.append("a model is not in the known table: family/resolution read when loaded")
    memory, too_big = _expert_memory_plan(cfg, base, train_res)
    if too_big:
        warnings.append(too_big)
    if cfg.eval.enabled:
        from selma_ray.eval import protocol

        warnings += [f"eval: {note}" for note in protocol.notes(cfg)]
    per_expert_gpus = res.experts.workers_per_expert if res.experts.use_gpu else 0
    return {
        "run": {"name": cfg.run.name, "dir": cfg.run.dir, "seed": cfg.run.seed},
        "stages": {
            "prompts": {
                "llm": cfg.models.llm,
                "backend": pc.backend,
                "skills": skills,
                "per_skill": pc.per_skill,
                "total": pc.per_skill * len(skills),
                "rouge_threshold": pc.rouge_threshold,
                "actors": f"{res.prompts.min_size}-{res.prompts.max_size} x "
                f"{_gpus(engine_gpus(cfg))}",
            },
            "images": {
                "generator": asdict(gen),
                "resolution": data_res,
                "steps": ic.steps,
                "guidance_scale": ic.guidance_scale,
                "scheduler": ic.scheduler,
                "dtype": ic.dtype,
                "rendered_skills": rendered,
                "real_data_skills": sorted(ic.real_data),
                "images": pc.per_skill * len(rendered) * ic.images_per_prompt,
                "actors": f"{res.images.min_size}-{res.images.max_size} x "
                f"{_gpus(res.images.num_gpus)}",
            },
            "experts": {
                "base": asdict(base),
                "train_resolution": train_res,
                "data_resolution": data_res,
                "resize": bool(data_res and train_res and data_res != train_res),
                # the settings' own names (experts.rank, experts.alpha, ...)
                "rank": ec.rank,
                "alpha": ec.alpha,
                "target_modules": ec.target_modules,
                "learning_rate": ec.learning_rate,
                "lr_scheduler": ec.lr_scheduler,
                # the batch of one optimizer step: micro-batch x accumulation x workers
                "batch_size": ec.batch_size
                * ec.gradient_accumulation
                * res.experts.workers_per_expert,
                "micro_batch_size": ec.batch_size,
                "gradient_accumulation": ec.gradient_accumulation,
                "gradient_checkpointing": ec.gradient_checkpointing,
                "max_steps": ec.max_steps,
                "mixed_precision": ec.mixed_precision,
                "vae": cfg.models.vae or "the base's own, in float32",
                "memory_per_gpu": memory,
                "experts": len(cfg.expert_units()),  # joint LoRAs included
                "at_once": min(res.experts.max_concurrent, len(cfg.expert_units())),
                "per_expert": f"{res.experts.workers_per_expert} worker(s) x "
                f"{_gpus(1 if res.experts.use_gpu else 0)}",
                "peak_gpus": per_expert_gpus
                * min(res.experts.max_concurrent, len(cfg.expert_units())),
            },
            "merge": {
                "methods": cfg.merge.methods,
                "default": cfg.merge.default,
                "select": cfg.merge.select,
            },
            "eval": _eval_plan(cfg),
            "serve": {
                "deploy": cfg.serve.deploy,
                "replicas": f"{res.serve.min_replicas}-{res.serve.max_replicas} x "
                f"{_gpus(res.serve.num_gpus)}",
                "adapters": ["base", "merged", *skills],
                "limits": {
                    "max_n": cfg.serve.max_n,
                    "max_steps": cfg.serve.max_steps,
                    "sizes": f"{cfg.serve.min_size}-{cfg.serve.max_size}",
                },
            },
        },
        "warnings": warnings,
    }


def _eval_plan(cfg: SelmaConfig) -> dict[str, Any]:
    from selma_ray.eval.scorers import unavailable

    ev, res = cfg.eval, cfg.resources.eval
    models = {"clip": ev.clip_model, "pick": f"{ev.pick_model} ({ev.pick_processor} processor)"}
    questions = (
        f"DSG-1K {ev.dsg_file}"
        if ev.dsg_file
        else f"questions: {ev.questions} ({ev.question_llm or cfg.models.llm})"
    )
    models["dsg"] = f"{questions}, answers: {ev.vqa_model} ({ev.vqa_mode})"
    models["tifa"] = (
        f"TIFA v1.0 {ev.tifa_file or '(no eval.tifa_file: skipped)'}, answers: "
        f"{ev.tifa_vqa_model or ev.vqa_model} ({ev.vqa_mode})"
    )
    models["image_reward"], models["hps"] = ev.image_reward_model, f"HPS {ev.hps_version}"
    for name in ev.scorers:
        if unavailable(name):
            models[name] += " (not installed here: skipped)"
    return {
        "enabled": ev.enabled,
        "prompts": " + ".join(f for f in (ev.dsg_file, ev.tifa_file) if f) or ev.prompts_file,
        "variants": ev.variants or ["base", *cfg.prompts.skills, "merged"],
        "scorers": {name: models[name] for name in ev.scorers},
        "steps": ev.steps or cfg.images.steps,
        "seeds_per_prompt": ev.seeds_per_prompt,
        "actors": f"{res.min_size}-{res.max_size} x {_gpus(res.num_gpus)}",
    }


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def config_problems(cfg: SelmaConfig) -> list[str]:
    """What the config names that is not there, found before any work (the job and ``--plan``
    stop on it): local model folders, eval files (``builtin:`` ones too) and real-data
    sources must exist, and real data must name a skill of the run. Hub ids are checked for
    their form only: they cannot be resolved offline. Checked where the job starts, not when
    a config is parsed: a config also loads on machines that do not hold these files."""
    from selma_ray.eval.dsg import resolve_path

    problems = []
    for key in ("llm", "generator", "base", "vae"):
        value = getattr(cfg.models, key)
        if value:
            problems += _model_problem(f"models.{key}", value)
    if cfg.eval.enabled:
        for key in ("prompts_file", "questions_file", "dsg_file", "tifa_file"):
            value = getattr(cfg.eval, key)
            if value and value != "generated" and "://" not in value:
                try:
                    resolve_path(value)
                except ValueError as e:
                    problems.append(f"eval.{key}: {e}")
    for skill, sources in cfg.images.real_data.items():
        if skill not in cfg.prompts.skills:
            problems.append(
                f"images.real_data: {skill!r} is not one of prompts.skills {cfg.prompts.skills}"
            )
        for source in sources:
            if "://" not in source and not Path(source).expanduser().exists():
                problems.append(f"images.real_data.{skill}: {source!r} does not exist")
    return problems


def _model_problem(key: str, value: str) -> list[str]:
    if is_builtin(value) or Path(value).expanduser().exists():
        return []
    if value.startswith(("/", "./", "../", "~")):
        return [f"{key}: the folder {value!r} does not exist"]
    if HUB_ID.match(value):
        return []  # a hub id: resolved when loaded
    return [f"{key}: {value!r} is neither a built-in model, a hub id (org/name) nor a folder"]


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as indented text for a terminal."""
    lines = [f"stage plan for run {plan['run']['name']!r} in {plan['run']['dir']}"]
    for stage, info in plan["stages"].items():
        lines.append(f"  {stage}:")
        for key, value in info.items():
            if isinstance(value, dict) and "model" in value:
                value = (
                    f"{value['model']} ({value['family']}, {value['pipeline'] or '?'}, "
                    f"native {value['native_resolution'] or '?'}px, {value['source']})"
                )
            lines.append(f"    {key}: {value}")
    lines += [f"  ! {w}" for w in plan["warnings"]]
    return "\n".join(lines)
