"""The stage plan: what a config would run, on which models and resources, without running it.

``python jobs/full_pipeline.py --config weak_to_strong --plan`` prints it. Nothing is loaded
or downloaded: the model family and native resolution of well-known hub ids come from a
table, local model folders are read from their configs, and anything else is "unknown"
until the stage loads it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from selma_ray.config import SelmaConfig
from selma_ray.models import TINY_SD
from selma_ray.models.llm_data import engine_bundles

PIPELINES = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}
# Well-known checkpoints: family and native (training) resolution.
KNOWN_MODELS: dict[str, tuple[str, int]] = {
    TINY_SD: ("sd1", 32),
    "CompVis/stable-diffusion-v1-4": ("sd1", 512),
    "runwayml/stable-diffusion-v1-5": ("sd1", 512),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("sd1", 512),
    "stabilityai/stable-diffusion-2": ("sd2", 768),
    "stabilityai/stable-diffusion-2-1": ("sd2", 768),
    "stabilityai/stable-diffusion-2-base": ("sd2", 512),
    "stabilityai/stable-diffusion-2-1-base": ("sd2", 512),
    "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", 1024),
}


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
        source = "built-in" if model == TINY_SD else "known hub id"
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
    rendered = [s for s in skills if s not in ic.real_data]
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
                "lora": {"rank": ec.rank, "alpha": ec.alpha, "targets": ec.target_modules},
                "learning_rate": ec.learning_rate,
                "lr_scheduler": ec.lr_scheduler,
                "batch_size": ec.batch_size,
                "max_steps": ec.max_steps,
                "mixed_precision": ec.mixed_precision,
                "experts": len(skills),
                "at_once": min(res.experts.max_concurrent, len(skills)),
                "per_expert": f"{res.experts.workers_per_expert} worker(s) x "
                f"{_gpus(1 if res.experts.use_gpu else 0)}",
                "peak_gpus": per_expert_gpus * min(res.experts.max_concurrent, len(skills)),
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
    ev, res = cfg.eval, cfg.resources.eval
    models = {"clip": ev.clip_model, "pick": f"{ev.pick_model} ({ev.pick_processor} processor)"}
    models["dsg"] = f"questions: {ev.questions} ({ev.question_llm or cfg.models.llm}), "
    models["dsg"] += f"answers: {ev.vqa_model}"
    models["image_reward"], models["hps"] = ev.image_reward_model, f"HPS {ev.hps_version}"
    return {
        "enabled": ev.enabled,
        "prompts": ev.prompts_file,
        "variants": ev.variants or ["base", *cfg.prompts.skills, "merged"],
        "scorers": {name: models[name] for name in ev.scorers},
        "steps": ev.steps or cfg.images.steps,
        "seeds_per_prompt": ev.seeds_per_prompt,
        "actors": f"{res.min_size}-{res.max_size} x {_gpus(res.num_gpus)}",
    }


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
