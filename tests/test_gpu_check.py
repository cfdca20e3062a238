"""The GPU check (``bench/gpu_check.py``) on the CPU: ``--tiny`` runs end to end with Ray,
pydantic and pyarrow made unimportable (the GPU machine has none of them), its FLOP counting
matches a hand count for one attention block, the core modules import without Ray, the
trainer config it reads from the presets agrees with the validated config, and a failing
section turns the run red without hiding the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import _gpu_models  # noqa: E402
import gpu_check  # noqa: E402

# What the GPU machine lacks; a None entry in sys.modules makes ``import x`` raise ImportError.
ABSENT_THERE = ("ray", "pydantic", "pyarrow")
BLOCK = f"import sys; sys.modules.update(dict.fromkeys({ABSENT_THERE!r}))"


def run_python(code: str, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path), "SELMA_CACHE": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_tiny_check_runs_end_to_end_without_ray_and_writes_every_section(tmp_path):
    code = (
        f"{BLOCK}; import runpy; sys.path.insert(0, {str(BENCH)!r}); "
        "sys.argv = ['bench/gpu_check.py', '--tiny']; "
        "runpy.run_path('bench/gpu_check.py', run_name='__main__')"
    )
    proc = run_python(code, tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-5000:]
    assert "ray absent" not in out  # it is installed here; only made unimportable
    for line in (
        "GPU train sd15 64px bf16 batch 4 (2x2) steps/s: ",
        "GPU train sd15 64px fp16 peak memory: ",
        "GPU train sdxl 64px fp16 UNet fwd+bwd per image: ",
        "GPU generate sd15 64px 2 steps cfg 7.5 batch 4 images/s: ",
        "GPU serve sd15 64px 2 steps switching among 6 rank-4 adapters p50: ",
        "GPU serve sd15 64px 2 steps fused adapter p50: ",
        "GPU merge dare_ties of 5 sd15 rank-4 adapters on cpu: ",
        "GPU render CPU vs device max |diff|: ",
        "RATIO gpu-mfu train sd15 64px bf16: ",
        "RATIO gpu-mfu train sdxl 64px fp16: ",
        "RATIO gpu-mfu generate sd15 64px 2 steps cfg 7.5 batch 2: ",
    ):
        assert line in out, f"missing {line!r} in:\n{out[-3000:]}"
    assert out.rstrip().splitlines()[-1].startswith("RATIO gpu-mfu ")  # the ratios come last
    assert "(goal >= 0.4)" in out and "(goal >= 0.5)" in out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert set(sections) == set(gpu_check.SECTIONS)
    assert {k: v["status"] for k, v in sections.items()} == dict.fromkeys(sections, "passed")
    assert report["failed"] == []
    checks = {name for s in sections.values() for name in s["checks"]}
    for dtype in ("bf16", "fp16"):
        for model in ("sd15", "sdxl"):
            label = f"train {model} 64px {dtype}"
            assert f"{label} NaN loss skipped and counted" in checks
            assert f"{label} VAE encodes in float32" in checks
            assert f"{label} LoRA weights stay float32 under autocast" in checks
            assert f"{label} loss finite after 2 steps" in checks
    assert "adapter trained here renders the same image on the CPU" in checks
    assert "the loaded adapter changes the image" in checks
    mfu = sections["train_sd15"]["ratios"]["train sd15 64px bf16"]
    assert mfu["value"] > 0 and mfu["goal"] == 0.4


def hand_attention_flops(b: int, n: int, m: int, dim: int, ctx: int, heads: int, d: int) -> int:
    """2*M*N*K per matmul: q and out projections over n tokens, k and v over m context
    tokens, then Q K^T and A V per head."""
    inner = heads * d
    projections = 2 * b * n * dim * inner * 2 + 2 * b * m * ctx * inner * 2
    attention = 2 * (2 * b * heads * n * m * d)
    return projections + attention


def test_flop_count_matches_a_hand_count_for_one_attention_block():
    from diffusers.models.attention_processor import Attention

    b, n, m, dim, ctx, heads, d = 2, 48, 12, 64, 40, 4, 16
    torch.manual_seed(0)
    block = Attention(query_dim=dim, cross_attention_dim=ctx, heads=heads, dim_head=d)
    x, context = torch.randn(b, n, dim), torch.randn(b, m, ctx)
    hand = hand_attention_flops(b, n, m, dim, ctx, heads, d)
    assert _gpu_models.count_flops(lambda: block(x, encoder_hidden_states=context)) == hand

    # Backward, with the context (like the UNet's text states) needing no gradient: the q and
    # out projections' gradients w.r.t. input and weight (2x their forward), the k and v
    # projections' w.r.t. weight only (1x), and five attention-sized matmuls (torch counts
    # fused attention's backward as dQ, dK, dV, dP plus the recomputed scores QK^T: 2.5x).
    x.requires_grad_(True)
    counted = _gpu_models.count_flops(
        lambda: block(x, encoder_hidden_states=context).square().sum().backward()
    )
    q_out = 2 * (2 * b * n * dim * heads * d)
    k_v = 2 * (2 * b * m * ctx * heads * d)
    scores = 2 * b * heads * n * m * d
    assert counted == hand + 2 * q_out + k_v + 5 * scores


@pytest.mark.parametrize(
    ("blocked", "modules"),
    [
        (  # the core modules: the training recipe, merge math, the diffusion engine
            ("ray",),
            "selma_ray.experts.recipe, selma_ray.experts.data, selma_ray.lora.methods, "
            "selma_ray.diffusion.engine, selma_ray.diffusion.denoise",
        ),
        (  # what the GPU check imports, on a machine without Ray, pydantic or pyarrow
            ABSENT_THERE,
            "selma_ray.experts.recipe, selma_ray.lora.methods, selma_ray.core.lora_io",
        ),
    ],
)
def test_core_modules_import_without_ray(tmp_path, blocked, modules):
    code = f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); import {modules}"
    proc = run_python(code + "; print('ok')", tmp_path, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("preset", ["sd14", "sdxl"])
def test_trainer_config_agrees_with_the_validated_preset(preset):
    from selma_ray.config import load_config

    cfg = load_config(preset, [])
    ours = _gpu_models.trainer_config(preset)
    experts = cfg.experts.model_dump()
    differ = {k: (v, experts[k]) for k, v in ours.items() if k in experts and experts[k] != v}
    assert differ == {}
    assert set(_gpu_models.EXPERT_DEFAULTS) <= set(experts)
    assert ours["base"] == cfg.models.base and ours["vae"] is None


def test_a_failing_section_is_recorded_and_fails_the_run(tmp_path, monkeypatch, capsys):
    def broken(sec, cfg):
        sec.figure("before the failure", 1.0, "x")
        raise RuntimeError("out of memory, say")

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setitem(gpu_check.SECTIONS, "merge", broken)
    assert gpu_check.main(["--tiny", "--cpu", "--only", "merge"]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    merge = report["sections"]["merge"]
    assert merge["status"] == "failed" and "out of memory, say" in merge["error"]
    assert merge["figures"]["before the failure"]["value"] == 1.0
    assert report["failed"] == ["merge"]
    assert "GPU check FAILED: merge" in capsys.readouterr().out


def test_a_missing_module_stops_the_check_before_it_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setitem(sys.modules, "requests", None)  # as on a machine without it
    assert gpu_check.main(["--tiny", "--cpu", "--only", "merge"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("BENCH gpu-check torch ")
    assert "MISSING modules the check imports: requests (requests)" in out
    assert not (tmp_path / "gpu_check.json").exists()
