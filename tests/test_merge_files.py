"""Merging adapter files: every method writes a diffusers LoRA that diffusers applies exactly,
foreign key styles are read, and the CLI merges any SD LoRAs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from selma_ray.core.lineage import file_sha256
from selma_ray.core.lora_io import WEIGHT_NAME, load_adapter, save_adapter
from selma_ray.lora import METHODS
from selma_ray.lora.files import read_lora
from selma_ray.lora.methods import delta_weight, merge
from selma_ray.merge.files import main, merge_adapters
from selma_ray.models import TINY_SD, resolve

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes() -> dict[str, torch.Size]:
    """Key -> shape of a rank-4 LoRA on the tiny-sd UNet."""
    unet = UNet2DConditionModel.from_pretrained(resolve(TINY_SD), subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    return {k: v.shape for k, v in get_peft_model_state_dict(unet).items()}


def random_state(shapes, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        shape = (rank, shape[1]) if ".lora_A." in key else (shape[0], rank)
        out[key] = torch.randn(shape, generator=g) * 0.3
    return out


def write_expert(folder: Path, shapes, seed: int, rank: int = 4, alpha: float = 4) -> Path:
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS).to_dict()
    return save_adapter(folder, random_state(shapes, seed, rank), config)


def unet_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """dW of every module as diffusers + peft apply the adapter to a fresh tiny-sd UNet."""
    unet = UNet2DConditionModel.from_pretrained(resolve(TINY_SD), subfolder="unet")
    unet.load_lora_adapter(
        str(adapter_dir), weight_name=WEIGHT_NAME, prefix="unet", adapter_name="x"
    )
    return {
        name: module.get_delta_weight("x").detach()
        for name, module in unet.named_modules()
        if isinstance(module, LoraLayer)
    }


def rel_err(x, ref) -> float:
    return (x.double() - ref.double()).norm().item() / ref.double().norm().item()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_writes_an_adapter_diffusers_applies_exactly(tmp_path, shapes, method):
    # Different alphas: the scale must be folded in, and diffusers must read it back right.
    inputs = {
        "counting": str(write_expert(tmp_path / "counting", shapes, 1, alpha=8).parent),
        "dense": str(write_expert(tmp_path / "dense", shapes, 2, alpha=2).parent),
    }
    info = merge_adapters(inputs, None, str(tmp_path / "out"), method, density=0.7, seed=3)
    assert info["method"] == method
    assert info["adapter"] == str(tmp_path / "out" / WEIGHT_NAME)
    assert info["inputs"] == {n: file_sha256(Path(p) / WEIGHT_NAME) for n, p in inputs.items()}
    assert set(info["weights"]) == set(inputs)
    experts = [read_lora(p)[0] for p in inputs.values()]
    expected = merge(experts, list(info["weights"].values()), method, density=0.7, seed=3)
    deltas = unet_deltas(tmp_path / "out")
    assert set(deltas) == set(expected)
    for name, delta in deltas.items():
        assert rel_err(delta, delta_weight(expected[name])) < 1e-6, name


def test_read_lora_gives_the_adapter_scale_from_its_config(tmp_path, shapes):
    write_expert(tmp_path / "a", shapes, 1, rank=4, alpha=2)
    adapter, config = read_lora(tmp_path / "a")
    assert config["lora_alpha"] == 2
    assert {m.scale for m in adapter.values()} == {0.5}


def test_output_dtype_is_configurable(tmp_path, shapes):
    inputs = {n: str(write_expert(tmp_path / n, shapes, i).parent) for i, n in enumerate("ab")}
    merge_adapters(inputs, None, str(tmp_path / "out"), "cat", dtype="float16")
    state, config = load_adapter(tmp_path / "out")
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert config["r"] == 8 and config["lora_alpha"] == 8


def test_nonexistent_weight_names_are_refused_before_loading(tmp_path, shapes):
    inputs = {"a": str(tmp_path / "missing"), "b": str(tmp_path / "missing2")}
    with pytest.raises(ValueError, match="unknown adapters"):
        merge_adapters(inputs, {"a": 1.0, "c": 1.0}, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_adapters(inputs, None, str(tmp_path / "out"), "average")


def test_merged_adapter_loads_in_a_plain_pipeline_and_changes_its_output(tmp_path, shapes):
    inputs = {n: str(write_expert(tmp_path / n, shapes, i).parent) for i, n in enumerate("ab")}
    merge_adapters(inputs, None, str(tmp_path / "merged"), "ties")
    pipe = StableDiffusionPipeline.from_pretrained(resolve(TINY_SD))
    pipe.set_progress_bar_config(disable=True)

    def image():
        gen = torch.Generator().manual_seed(0)
        kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np"}
        return pipe("two red apples", generator=gen, **kwargs).images[0]

    before = image()
    pipe.load_lora_weights(str(tmp_path / "merged"), adapter_name="merged")
    pipe.set_adapters(["merged"])
    after = image()
    assert before.shape == after.shape
    assert abs(after - before).max() > 1e-3


# ---------------------------------------------------------------- foreign files and the CLI


def kohya_file(path: Path, shapes, seed: int, alpha: float) -> dict[str, torch.Tensor]:
    """A kohya-style file (lora_unet_*, lora_down/lora_up, alpha); returns its peft state."""
    state = random_state(shapes, seed)
    raw = {}
    for key, value in state.items():
        module, factor = key.rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        raw[f"{stem}.{'lora_down' if factor.startswith('A') else 'lora_up'}.weight"] = value
        raw[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(raw, str(path))
    return state


def old_diffusers_file(path: Path, shapes, seed: int) -> dict[str, torch.Tensor]:
    """An attention-processor file (...attn1.processor.to_q_lora.down.weight, no prefix)."""
    state = random_state(shapes, seed)
    raw = {}
    for key, value in state.items():
        module, factor = key.rsplit(".lora_", 1)
        block, proj = module.removesuffix(".0").rsplit(".", 1)  # to_out.0 -> to_out_lora
        direction = "down" if factor.startswith("A") else "up"
        raw[f"{block}.processor.{proj}_lora.{direction}.weight"] = value
    save_file(raw, str(path))
    return state


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "selma_ray.merge", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def test_cli_merges_kohya_and_old_diffusers_files(tmp_path, shapes):
    kohya = kohya_file(tmp_path / "kohya.safetensors", shapes, 1, alpha=2.0)  # scale 0.5
    old = old_diffusers_file(tmp_path / "old.safetensors", shapes, 2)  # no alpha: scale 1
    out = tmp_path / "out"
    files = [str(tmp_path / "kohya.safetensors"), str(tmp_path / "old.safetensors")]
    result = run_cli("--method", "cat", "--weights", "0.25,0.75", "--out", str(out), *files)
    assert result.returncode == 0, result.stderr
    assert "cat merge of 2 adapters" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "cat" and list(manifest["weights"].values()) == [0.25, 0.75]
    deltas = unet_deltas(out)
    for key in kohya:
        if ".lora_A." not in key:
            continue
        name = key.removesuffix(".lora_A.weight")
        b = name + ".lora_B.weight"
        ref = 0.25 * 0.5 * kohya[b].double() @ kohya[key].double()
        ref += 0.75 * old[b].double() @ old[key].double()
        assert rel_err(deltas[name], ref) < 1e-6, name


def test_cli_error_exits_2_with_a_message_not_a_traceback(tmp_path):
    result = run_cli("--out", str(tmp_path / "out"), str(tmp_path / "a"), str(tmp_path / "b"))
    assert result.returncode == 2
    assert "error: no adapter at" in result.stderr and "Traceback" not in result.stderr


def test_cli_refuses_an_out_that_would_destroy_data(tmp_path, shapes, capsys):
    a = write_expert(tmp_path / "a", shapes, 1)
    b = write_expert(tmp_path / "b", shapes, 2)
    (tmp_path / "note.txt").write_text("keep me")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("keep me too")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cases = [
        (a, "is the input"),  # an input folder
        (a / "logs", "is the input"),  # inside one
        (tmp_path, "is the input"),  # holding one
        (tmp_path / "note.txt", "is a file"),
        (tmp_path / "full", "not empty; pass --force"),
    ]
    for out, message in cases:
        for force in ([], ["--force"]) if message != "not empty; pass --force" else ([],):
            assert main(["--out", str(out), *force, str(a), str(b)]) == 2, out
            assert message in capsys.readouterr().err, out
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert main(["--out", str(tmp_path / "full"), "--force", str(a), str(b)]) == 0
    assert not (tmp_path / "full" / "old.txt").exists()
    assert (tmp_path / "full" / "manifest.json").is_file()


def test_cli_warns_about_options_the_method_does_not_use(tmp_path, shapes, capsys):
    a = write_expert(tmp_path / "a", shapes, 1)
    b = write_expert(tmp_path / "b", shapes, 2)
    args = [str(a), str(b), "--out"]
    assert main([*args, str(tmp_path / "o1"), "--rank", "2", "--density", "0.3"]) == 0
    err = capsys.readouterr().err
    assert "--rank is not used by --method paper (only by svd)" in err
    assert "--density is not used by --method paper" in err
    assert main([*args, str(tmp_path / "o2"), "--method", "ties", "--density", "0.3"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_cli_names_the_device_flag_when_cuda_is_missing(tmp_path, shapes, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    a = write_expert(tmp_path / "a", shapes, 1)
    assert main([str(a), "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "error: --device cuda, but no CUDA device" in capsys.readouterr().err


def test_cli_errors_name_the_input_files(tmp_path, shapes, capsys):
    a = write_expert(tmp_path / "a", shapes, 1)
    b = write_expert(tmp_path / "b", shapes, 2, rank=2)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["--out", str(tmp_path / "o"), str(a), str(corrupt)]) == 2
    err = capsys.readouterr().err
    assert f"error: {corrupt}: cannot be read as a LoRA" in err and "Traceback" not in err
    assert main(["--out", str(tmp_path / "o"), str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "ranks differ" in err and f"{a} (rank 4)" in err and f"{b} (rank 2)" in err


def test_cli_reports_bad_input_with_exit_status_2(tmp_path, shapes, capsys):
    a = write_expert(tmp_path / "a", shapes, 1)
    b = write_expert(tmp_path / "b", shapes, 2, rank=2)
    out = str(tmp_path / "out")
    cases = [
        (["--out", out, str(a), str(tmp_path / "nope.safetensors")], "no adapter at"),
        (["--out", out, "--weights", "1", str(a), str(a.parent)], "1 weights for 2 adapters"),
        (["--out", out, "--weights", "1,-1", str(a), str(a.parent)], ">= 0"),
        (["--out", out, "--weights", "1,x", str(a), str(a.parent)], "must be numbers"),
        (["--out", out, str(a), str(b)], "ranks differ"),
        (["--out", out, str(a), str(a)], "given twice"),
        (["--out", out, "--density", "0", str(a), str(a.parent)], "density must be in"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        assert message in capsys.readouterr().err, args
    with pytest.raises(SystemExit) as exit_info:
        main(["--method", "mean", "--out", out, str(a)])
    assert exit_info.value.code == 2
    assert not (tmp_path / "out").exists()
