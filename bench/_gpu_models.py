"""What the GPU check builds and counts: SD v1.5 and SDXL pipelines from their published
configs with random weights (no download; a byte-level CLIP tokenizer built in memory), the
trainer config read from a preset with plain YAML (the GPU machine has no pydantic), and the
FLOP counting behind MFU (``torch.utils.flop_counter``). Used by ``bench/gpu_check.py``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Keys ExpertTrainer reads that a preset may leave to the schema defaults (ExpertsSection);
# tests/test_gpu_check.py checks that they and the presets' values agree with load_config.
EXPERT_DEFAULTS: dict[str, Any] = {
    "rank": 128,
    "alpha": 128.0,
    "target_modules": TARGETS,
    "learning_rate": 3e-4,
    "lr_scheduler": "constant",
    "max_grad_norm": 1.0,
    "lora_init": "gaussian",
    "gradient_accumulation": 1,
    "gradient_checkpointing": False,
    "max_nonfinite_steps": 20,
    "shared_init": True,
    "snr_gamma": None,
    "noise_offset": 0.0,
    "train_text_encoder": False,
    "text_encoder_target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"],
}


# ---------------------------------------------------------------------------- FLOP counting


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls, convolutions and attention that ``fn`` runs, counted by
    ``torch.utils.flop_counter`` (2 per multiply-add). The CPU's fused attention kernel,
    which torch's table lacks, is counted with torch's own SDPA formulas."""
    import torch
    from torch.utils.flop_counter import (
        FlopCounterMode,
        sdpa_backward_flop_count,
        sdpa_flop_count,
    )

    def cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q, k, v)

    def cpu_sdpa_backward(grad, q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad, q, k, v)

    aten = torch.ops.aten
    extra = {
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward,
    }
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Spec:
    """A base model's shapes: UNet, VAE and text encoder configs, native resolution."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: list[dict[str, Any]]  # one per encoder; SDXL's second has a projection
    resolution: int

    @property
    def sdxl(self) -> bool:
        return len(self.text) == 2


def _vae(
    channels: tuple[int, ...], size: int, groups: int = 32, layers: int = 2, **extra: Any
) -> dict[str, Any]:
    return {
        "block_out_channels": channels,
        "down_block_types": ("DownEncoderBlock2D",) * len(channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(channels),
        "layers_per_block": layers,
        "latent_channels": 4,
        "norm_num_groups": groups,
        "sample_size": size,
        **extra,
    }


def _clip(hidden: int, layers: int, heads: int, act: str = "quick_gelu", **extra) -> dict:
    return {
        "vocab_size": extra.pop("vocab_size", 49408),
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        **extra,
    }


def spec(name: str, tiny: bool) -> Spec:
    """The published SD v1.5 / SDXL base 1.0 configs (``unet/``, ``vae/``, ``text_encoder*/``
    config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0),
    or tiny ones of the same structure (2-block UNets of 32/64 channels, 64 px images)."""
    if name not in ("sd15", "sdxl"):
        raise ValueError(f"unknown model {name!r}; choose sd15 or sdxl")
    if tiny:
        unet = {
            "sample_size": 32,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "norm_num_groups": 8,
        }
        vae = _vae((16, 32), 64, groups=8, layers=1)
        text = _clip(32, 2, 4, vocab_size=1000)  # the byte tokenizer's ids are < 514
        if name == "sd15":
            sd = {**unet, "cross_attention_dim": 32, "attention_head_dim": 8}
            return Spec(name, sd, vae, [text], 64)
        xl = {
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "transformer_layers_per_block": (1, 2),
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "cross_attention_dim": 64,
        }
        second = _clip(32, 2, 4, act="gelu", projection_dim=32, vocab_size=1000)
        return Spec(name, {**unet, **xl}, {**vae, "scaling_factor": 0.13025}, [text, second], 64)
    if name == "sd15":
        unet = {
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        }
        return Spec(name, unet, _vae((128, 256, 512, 512), 512), [_clip(768, 12, 12)], 512)
    unet = {
        "sample_size": 128,
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    }
    vae = _vae((128, 256, 512, 512), 1024, scaling_factor=0.13025, force_upcast=True)
    text = [_clip(768, 12, 12), _clip(1280, 32, 20, act="gelu", projection_dim=1280)]
    return Spec(name, unet, vae, text, 1024)


def byte_tokenizer():
    """A CLIP tokenizer over the 256 byte symbols (no merges): real token ids, no download."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_pipeline(s: Spec, device, seed: int = 0):
    """A float32 pipeline of ``s`` with random weights, built on ``device``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = byte_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    noise = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    with torch.device(device):
        unet = UNet2DConditionModel(**s.unet)
        vae = AutoencoderKL(**s.vae)
        encoders = [CLIPTextModel(CLIPTextConfig(**s.text[0], **ids))]
        if s.sdxl:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**s.text[1], **ids)))
    if not s.sdxl:
        scheduler = DDIMScheduler(
            **noise, clip_sample=False, set_alpha_to_one=False, steps_offset=1
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        scheduler = EulerDiscreteScheduler(**noise, steps_offset=1, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=tokenizer,
            tokenizer_2=byte_tokenizer(),
            unet=unet,
            scheduler=scheduler,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def presets_dir() -> Path:
    """The shipped presets (package data of selma_ray), read with plain YAML: the GPU machine
    has no pydantic, so ``selma_ray.config`` is not imported here."""
    import selma_ray

    return Path(selma_ray.__file__).parent / "config" / "presets"


def trainer_config(preset: str, **overrides: Any) -> dict[str, Any]:
    """ExpertTrainer's config from a preset's ``experts`` section over the schema defaults
    (``models.vae`` left out: the fp16-safe VAE cannot be downloaded, so the VAE is the base's
    own, in float32)."""
    data = yaml.safe_load((presets_dir() / f"{preset}.yaml").read_text())
    experts = {**EXPERT_DEFAULTS, **data["experts"]}
    return {**experts, "base": data["models"]["base"], "vae": None, "seed": 0, **overrides}
