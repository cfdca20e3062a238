"""The serving engine without Ray: adapter discovery and per-request switching."""

from __future__ import annotations

from pathlib import Path

import pytest

from selma_ray.config import load_config
from selma_ray.lora_io import save_adapter
from selma_ray.merge import merge_adapters
from selma_ray.rundir import RunDir
from selma_ray.serving import DiffusionService, find_adapters


def _random_adapter(out: Path, seed: int) -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from selma_ray.models import TINY_SD, resolve

    unet = UNet2DConditionModel.from_pretrained(resolve(TINY_SD), subfolder="unet")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(v.shape, generator=gen) * 0.5
        for k, v in get_peft_model_state_dict(unet).items()
    }
    save_adapter(out, state, config.to_dict())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serving") / "run"
    cfg = load_config("tiny", [f"run.dir={root}", "prompts.skills=[counting, everyday_scenes]"])
    run = RunDir(root)
    (root / "config.yaml").write_text(cfg.to_yaml())
    for i, skill in enumerate(cfg.prompts.skills):
        _random_adapter(run.path("experts", skill), seed=i)
        run.write_manifest("fp", "experts", skill)
    merge_adapters(
        {s: str(run.path("experts", s)) for s in cfg.prompts.skills}, None, str(run.path("merged"))
    )
    run.write_manifest("fp", "merged")
    _random_adapter(run.path("experts", "unfinished"), seed=9)  # no manifest: not served
    return root


def test_find_adapters_lists_finished_experts_merged_and_base(run_dir):
    found = find_adapters(run_dir)
    assert set(found) == {"base", "counting", "everyday_scenes", "merged"}
    assert found["merged"].kind == "merged" and found["counting"].kind == "expert"
    assert found["counting"].rank == 4 and found["base"].path is None


@pytest.fixture(scope="module")
def service(run_dir) -> DiffusionService:
    return DiffusionService(run_dir)


def _png(service, adapter, seed=1):
    return service.generate(
        "two red apples", adapter, seed=seed, steps=2, guidance_scale=7.5, size=32
    )


def test_each_adapter_gives_a_different_image(service):
    images = {a: _png(service, a) for a in ["base", "counting", "everyday_scenes", "merged"]}
    assert len(set(images.values())) == 4


def test_switching_back_gives_the_same_image_as_before(service):
    first = _png(service, "counting")
    _png(service, "merged")
    _png(service, "base")
    assert _png(service, "counting") == first


def test_unknown_adapter_error_lists_valid_names(service):
    with pytest.raises(KeyError, match="valid: .*counting.*merged"):
        _png(service, "nope")
