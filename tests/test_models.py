"""Model sources: hub ids pass through; built-in models build deterministically and cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from selma_ray import models


def test_hub_ids_and_paths_pass_through_unchanged():
    assert models.resolve("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    assert models.resolve("/data/models/sd") == "/data/models/sd"


def test_empty_model_name_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        models.resolve("")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SELMA_CACHE", str(tmp_path / "cache"))
    assert models.cache_dir() == tmp_path / "cache"


def _unet_weights(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "unet" / "diffusion_pytorch_model.safetensors"))


def test_tiny_sd_builds_deterministically_into_the_cache(monkeypatch, tmp_path):
    import torch

    built = []
    for name in ("a", "b"):
        monkeypatch.setenv("SELMA_CACHE", str(tmp_path / name))
        built.append(models.resolve(models.TINY_SD))
    assert all((Path(p) / ".complete").is_file() for p in built)
    first, second = (_unet_weights(p) for p in built)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # A second resolve reuses the cache and leaves no temporary build folders behind.
    assert models.resolve(models.TINY_SD) == built[1]
    leftovers = [
        p.name for p in (tmp_path / "b").iterdir() if p.is_dir() and p.name.startswith(".")
    ]
    assert not leftovers


def test_tiny_sd_renders_with_plain_diffusers(monkeypatch, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("SELMA_CACHE", str(tmp_path))
    pipe = StableDiffusionPipeline.from_pretrained(models.resolve(models.TINY_SD))
    out = pipe(
        "a red cube",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 32, 32, 3)


def test_smollm2_checkpoint_loads_with_transformers():
    from transformers import AutoConfig, AutoTokenizer

    path = models.resolve(models.SMOLLM2)  # the shared cache: built once per machine
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "hi" in text
    assert (Path(path) / "model.safetensors").is_file()
