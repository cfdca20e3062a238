"""Saving/loading UNet LoRA adapters in the diffusers safetensors format, and merging files."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from selma_ray.core.lineage import file_sha256
from selma_ray.core.lora_io import WEIGHT_NAME, adapter_file, load_adapter, save_adapter
from selma_ray.merge.files import merge_adapters

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        sample_size=8,
        norm_num_groups=8,
        attention_head_dim=8,
    )


def lora_config(r: int = 4, alpha: int = 4) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="gaussian")


@pytest.fixture(scope="module")
def peft_lora():
    """(state dict, LoraConfig) of a freshly LoRA-wrapped tiny UNet."""
    torch.manual_seed(0)
    unet = tiny_unet()
    config = lora_config()
    unet.add_adapter(config)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}
    return state, config


def randomized(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Same keys and shapes, random values (peft initialises B to zero)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}


def test_peft_state_dict_covers_every_target_module(peft_lora):
    state, _ = peft_lora
    assert state
    for target in TARGETS:
        assert any(f".{target}.lora_A.weight" in k for k in state), target
        assert any(f".{target}.lora_B.weight" in k for k in state), target


def test_save_then_load_returns_identical_tensors_and_config(tmp_path, peft_lora):
    state, config = peft_lora
    path = save_adapter(tmp_path / "expert", state, config.to_dict())
    assert path == tmp_path / "expert" / WEIGHT_NAME
    assert path.is_file()
    loaded, loaded_config = load_adapter(tmp_path / "expert")
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value), key
    assert loaded_config["r"] == 4
    assert loaded_config["lora_alpha"] == 4
    assert sorted(loaded_config["target_modules"]) == sorted(TARGETS)


def test_saved_file_uses_diffusers_unet_prefix_and_metadata(tmp_path, peft_lora):
    state, config = peft_lora
    path = save_adapter(tmp_path / "expert", state, config.to_dict())
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("unet.") for k in keys)
    assert len(keys) == len(state)
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == 4


def test_saved_adapter_loads_into_a_plain_diffusers_unet(tmp_path, peft_lora):
    state, config = peft_lora
    weights = randomized(state, 3)
    save_adapter(tmp_path / "expert", weights, config.to_dict())
    unet = tiny_unet()
    unet.load_lora_adapter(
        str(tmp_path / "expert"), weight_name=WEIGHT_NAME, prefix="unet", adapter_name="expert"
    )
    assert unet.peft_config["expert"].r == 4
    assert unet.peft_config["expert"].lora_alpha == 4
    back = get_peft_model_state_dict(unet, adapter_name="expert")
    assert set(back) == set(weights)
    for key, value in weights.items():
        assert torch.equal(back[key], value), key


def test_save_replaces_an_existing_adapter_and_leaves_no_temp_folders(tmp_path, peft_lora):
    state, config = peft_lora
    save_adapter(tmp_path / "expert", randomized(state, 1), config.to_dict())
    second = randomized(state, 2)
    save_adapter(tmp_path / "expert", second, config.to_dict())
    loaded, _ = load_adapter(tmp_path / "expert" / WEIGHT_NAME)
    for key, value in second.items():
        assert torch.equal(loaded[key], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert"]
    assert sorted(p.name for p in (tmp_path / "expert").iterdir()) == [WEIGHT_NAME]


@pytest.mark.parametrize("name", ["adapter.bin", "adapter.pt", "adapter.ckpt"])
def test_adapter_file_refuses_non_safetensors(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x02pickle")
    with pytest.raises(ValueError, match="safetensors"):
        adapter_file(path)
    with pytest.raises(ValueError, match="safetensors"):
        load_adapter(path)


def test_adapter_file_of_a_folder_is_its_weight_file(tmp_path, peft_lora):
    state, config = peft_lora
    save_adapter(tmp_path / "a", state, config.to_dict())
    assert adapter_file(tmp_path / "a") == tmp_path / "a" / WEIGHT_NAME


def test_adapter_file_missing_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        adapter_file(tmp_path / "nothing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        adapter_file(tmp_path / "empty")


def test_load_rejects_safetensors_without_unet_keys(tmp_path):
    path = tmp_path / "text_encoder_only.safetensors"
    save_file({"text_encoder.x.lora_A.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="unet"):
        load_adapter(path)


# ---------------------------------------------------------------- merge_adapters on files


def test_merge_adapters_writes_loadable_mean_of_two_adapters(tmp_path, peft_lora):
    state, config = peft_lora
    first, second = randomized(state, 11), randomized(state, 12)
    save_adapter(tmp_path / "experts" / "counting", first, config.to_dict())
    save_adapter(tmp_path / "experts" / "dense_detail", second, config.to_dict())
    inputs = {
        "counting": str(tmp_path / "experts" / "counting"),
        "dense_detail": str(tmp_path / "experts" / "dense_detail"),
    }
    info = merge_adapters(inputs, None, str(tmp_path / "merged"))

    merged, merged_config = load_adapter(tmp_path / "merged")
    assert set(merged) == set(state)
    for key in state:
        expected = (first[key].double() + second[key].double()) / 2
        assert torch.allclose(merged[key].double(), expected, rtol=1e-6, atol=1e-7), key
    assert merged_config["r"] == 4 and merged_config["lora_alpha"] == 4

    assert info["method"] == "paper"
    assert info["weights"] == {"counting": 0.5, "dense_detail": 0.5}
    assert info["adapter"] == str(tmp_path / "merged" / WEIGHT_NAME)
    assert info["inputs"] == {
        n: file_sha256(tmp_path / "experts" / n / WEIGHT_NAME) for n in inputs
    }


def test_merge_adapters_applies_given_weights(tmp_path, peft_lora):
    state, config = peft_lora
    first, second = randomized(state, 21), randomized(state, 22)
    save_adapter(tmp_path / "a", first, config.to_dict())
    save_adapter(tmp_path / "b", second, config.to_dict())
    merge_adapters(
        {"a": str(tmp_path / "a"), "b": str(tmp_path / "b" / WEIGHT_NAME)},
        {"a": 0.75, "b": 0.25},
        str(tmp_path / "merged"),
    )
    merged, _ = load_adapter(tmp_path / "merged")
    for key in state:
        expected = 0.75 * first[key].double() + 0.25 * second[key].double()
        assert torch.allclose(merged[key].double(), expected, rtol=1e-6, atol=1e-6), key


def test_merge_adapters_folds_different_alphas_into_the_paper_merge(tmp_path, peft_lora):
    state, config = peft_lora
    first, second = randomized(state, 31), randomized(state, 32)
    save_adapter(tmp_path / "a", first, config.to_dict())  # alpha 4 / r 4: scale 1
    save_adapter(tmp_path / "b", second, lora_config(r=4, alpha=16).to_dict())  # scale 4
    merge_adapters({"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, None, str(tmp_path / "m"))
    merged, merged_config = load_adapter(tmp_path / "m")
    # Scales differ, so sqrt(scale_i) goes into both factors and the output has scale 1.
    assert merged_config["r"] == 4 and merged_config["lora_alpha"] == 4
    for key in state:
        expected = 0.5 * first[key].double() + 0.5 * 2.0 * second[key].double()
        assert torch.allclose(merged[key].double(), expected, rtol=1e-6, atol=1e-6), key
