"""Training fidelity (issue 18): the VAE stays in float32 under fp16 unless an fp16-safe one is
configured, a non-finite step is skipped and counted (and too many in a row stop the expert),
every expert's LoRA starts from the same weights, and the plan's memory estimate adds up."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from test_training import loop_config, random_pngs

from selma_ray.config import load_config
from selma_ray.experts import data as train_data
from selma_ray.experts import recipe
from selma_ray.experts.recipe import ExpertTrainer, NonFiniteTrainingError
from selma_ray.plan import (
    ACTIVATION_GIB,
    FAMILY_PARAMS_M,
    OVERHEAD_GIB,
    build_plan,
    expert_memory,
    format_plan,
    lora_parameters,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # as a Train worker
GIB = 2**30
PAPER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def sdxl_batch(n: int = 2) -> dict:
    rows = {"prompt": np.array(["a cat", "two dogs"] * (n // 2)), "image": random_pngs(n)}
    return train_data.preprocess_batch(rows, "tiny-sdxl", 32, "center", False)


@pytest.fixture(scope="module")
def sd_batch() -> dict:
    rows = {"prompt": np.array(["a cat", "two dogs"]), "image": random_pngs(2)}
    return train_data.preprocess_batch(rows, "tiny-sd", 32, "center", False)


def lora_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


def gpu_dtypes(monkeypatch) -> None:
    """Place modules as on a GPU under fp16 (``_weight_dtype`` answers fp16 there): this CPU
    then runs the fp16 path for real, UNet and text encoders in fp16, fp16 autocast, a
    GradScaler."""
    monkeypatch.setattr(recipe, "_weight_dtype", lambda mp, device: torch.float16)


# ---- the VAE under fp16 -------------------------------------------------------------------------
def test_dtype_policy_keeps_the_stock_vae_in_float32_under_fp16_and_bf16():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
    assert recipe._weight_dtype("fp16", gpu) == torch.float16
    assert recipe._weight_dtype("bf16", gpu) == torch.bfloat16
    assert recipe._weight_dtype("fp16", cpu) == torch.float32  # CPU training runs in fp32
    for weights in (torch.float16, torch.bfloat16, torch.float32):
        assert recipe._vae_dtype(weights, custom_vae=False) == torch.float32
        assert recipe._vae_dtype(weights, custom_vae=True) == weights


@pytest.mark.slow
def test_on_cpu_an_fp16_config_trains_everything_in_float32():
    t = ExpertTrainer(loop_config(base="tiny-sdxl", mixed_precision="fp16"))
    assert t.dtype == t.vae_dtype == torch.float32
    assert {p.dtype for p in t.unet.parameters()} == {torch.float32}
    assert not t.scaler.is_enabled()


@pytest.mark.slow
def test_fp16_training_keeps_the_sdxl_vae_in_float32_and_encodes_in_float32(monkeypatch):
    gpu_dtypes(monkeypatch)
    t = ExpertTrainer(loop_config(base="tiny-sdxl", mixed_precision="fp16"))
    frozen = {p.dtype for n, p in t.unet.named_parameters() if "lora_" not in n}
    assert frozen == {torch.float16}
    assert {p.dtype for n, p in t.unet.named_parameters() if "lora_" in n} == {torch.float32}
    assert {p.dtype for e in t.text.encoders for p in e.parameters()} == {torch.float16}
    assert {p.dtype for p in t.vae.parameters()} == {torch.float32}
    assert t.scaler.is_enabled()

    seen = []
    t.vae.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    batch = sdxl_batch()
    latents = t.latents(batch, sample=False)
    # the pixels reach the encoder in float32, one image at a time (slicing) ...
    assert seen == [torch.float32] * 2
    assert latents.dtype == torch.float16  # ... and the UNet gets training-dtype latents

    # Why: a VAE whose activations pass fp16's range (65504), as the stock SDXL VAE's do, gives
    # NaN latents when it runs in fp16, and finite ones in float32, the trainer's way.
    with torch.no_grad():
        t.vae.encoder.conv_in.weight.mul_(1e5)  # its first maps pass 65504
        half = t.vae.to(torch.float16).encode(torch.as_tensor(batch["pixel_values"]).half())
        t.vae.to(torch.float32)
    assert not torch.isfinite(half.latent_dist.mean).all()
    assert torch.isfinite(t.latents(batch, sample=False)).all()
    # and the whole fp16 step runs (autocast, GradScaler) with a finite loss
    torch.manual_seed(0)
    out = t.train_step([batch])
    assert not out["skipped"] and math.isfinite(out["loss"]) and t.step == 1
    # checkpoint samples decode the fp16 UNet's latents with the float32 VAE
    assert t.render_samples(["a cat"]).startswith(b"\x89PNG")


@pytest.mark.slow
def test_a_configured_vae_replaces_the_base_vae_and_runs_in_the_training_dtype(
    tmp_path, monkeypatch
):
    from diffusers import AutoencoderKL

    from selma_ray.models import _tiny_vae

    torch.manual_seed(123)  # other weights than the base's own VAE
    _tiny_vae().save_pretrained(tmp_path / "vae")
    mine = AutoencoderKL.from_pretrained(tmp_path / "vae")
    gpu_dtypes(monkeypatch)
    t = ExpertTrainer(
        loop_config(base="tiny-sdxl", mixed_precision="fp16", vae=str(tmp_path / "vae"))
    )
    assert {p.dtype for p in t.vae.parameters()} == {torch.float16}
    for name, p in mine.named_parameters():
        assert torch.equal(t.vae.get_parameter(name).float(), p.half().float()), name
    # the latent cache encodes with the same VAE (on CPU, in float32)
    batch = sdxl_batch()
    cached = train_data.LatentEncoder("tiny-sdxl", vae=str(tmp_path / "vae"))(batch)
    with torch.no_grad():
        expected = mine.encode(torch.as_tensor(batch["pixel_values"])).latent_dist.mean
    assert cached["latent_mean"].dtype == np.float32
    np.testing.assert_allclose(cached["latent_mean"], expected.numpy(), rtol=1e-5, atol=1e-6)
    stock = train_data.LatentEncoder("tiny-sdxl")(batch)
    assert not np.allclose(stock["latent_mean"], cached["latent_mean"], atol=1e-3)


# ---- non-finite steps ---------------------------------------------------------------------------
def nan_batch(batch: dict) -> dict:
    bad = {k: v.copy() for k, v in batch.items()}
    bad["pixel_values"][0, 0, 0, 0] = np.nan  # the VAE spreads it: NaN latents, NaN loss
    return bad


def snapshot(t: ExpertTrainer) -> dict:
    opt = t.optimizer.state_dict()
    return {
        "lora": {n: p.detach().clone() for n, p in t.unet.named_parameters() if p.requires_grad},
        "adam": {i: {k: v.clone() for k, v in s.items()} for i, s in opt["state"].items()},
        "lr": t.lr_scheduler.state_dict(),
        "scaler": t.scaler.state_dict(),
        "step": t.step,
    }


def assert_unchanged(before: dict, after: dict) -> None:
    assert after["step"] == before["step"]
    assert after["lr"] == before["lr"] and after["scaler"] == before["scaler"]
    assert before["lora"].keys() == after["lora"].keys()
    for name, value in before["lora"].items():
        assert torch.equal(value, after["lora"][name]), name
    assert before["adam"].keys() == after["adam"].keys()
    for i, state in before["adam"].items():
        for key, value in state.items():
            assert torch.equal(value, after["adam"][i][key]), (i, key)


@pytest.mark.slow
def test_a_nan_loss_skips_the_step_without_any_update_and_is_counted(tmp_path, sd_batch, caplog):
    t = ExpertTrainer(loop_config(lr_scheduler="linear"))
    torch.manual_seed(0)
    assert not t.train_step([sd_batch])["skipped"]  # the optimizer has state to keep
    before = snapshot(t)
    with caplog.at_level(logging.WARNING, logger="selma_ray.experts.recipe"):
        torch.manual_seed(1)
        out = t.train_step([sd_batch, nan_batch(sd_batch)])  # one bad micro-batch of two
    assert out["skipped"] and math.isnan(out["loss"])
    assert_unchanged(before, snapshot(t))
    assert all(p.grad is None for p in t.params)
    assert (t.step, t.skipped_steps, t.nonfinite_in_a_row) == (1, 1, 1)
    assert "step 2 skipped: the loss is not finite" in caplog.text
    assert "1 in a row (limit 20)" in caplog.text
    # a good step applies again, as the second update, and ends the run of skips
    torch.manual_seed(2)
    out = t.train_step([sd_batch])
    assert not out["skipped"] and math.isfinite(out["loss"])
    assert (t.step, t.skipped_steps, t.nonfinite_in_a_row) == (2, 1, 0)
    assert t.lr_scheduler.last_epoch == 2
    # the count is part of the checkpoint
    t.save(tmp_path / "ckpt")
    u = ExpertTrainer(loop_config(lr_scheduler="linear"))
    u.load(tmp_path / "ckpt")
    assert (u.step, u.skipped_steps) == (2, 1)


@pytest.mark.slow
def test_non_finite_gradients_of_a_finite_loss_are_not_applied(sd_batch):
    t = ExpertTrainer(loop_config())
    torch.manual_seed(0)
    t.train_step([sd_batch])
    before = snapshot(t)
    lora_b = next(p for n, p in t.unet.named_parameters() if "lora_B" in n)
    hook = lora_b.register_hook(lambda g: g * math.inf)
    torch.manual_seed(1)
    out = t.train_step([sd_batch])
    hook.remove()
    assert out["skipped"] and math.isfinite(out["loss"]) and not math.isfinite(out["grad_norm"])
    assert_unchanged(before, snapshot(t))
    assert t.skipped_steps == 1


@pytest.mark.slow
def test_max_nonfinite_steps_in_a_row_stop_the_expert_with_a_clear_error(sd_batch):
    t = ExpertTrainer(loop_config(max_nonfinite_steps=3, skill="counting"))
    bad = nan_batch(sd_batch)
    for _ in range(2):
        assert t.train_step([bad])["skipped"]
    assert not t.train_step([sd_batch])["skipped"]  # a good step resets the run ...
    for _ in range(2):
        assert t.train_step([bad])["skipped"]  # ... so two more are still tolerated
    with pytest.raises(NonFiniteTrainingError) as failed:
        t.train_step([bad])
    message = str(failed.value)
    assert "expert counting: 3 steps in a row were skipped because the loss is not finite" in (
        message
    )
    assert "experts.max_nonfinite_steps=3" in message and "models.vae" in message
    assert (t.step, t.skipped_steps) == (1, 5)


def test_a_stopped_expert_is_not_retried(tmp_path):
    from selma_ray.core.rundir import RunDir

    run = RunDir(tmp_path / "run")
    config = {"work": {"run": run.spec, "prefix": "ray_results/expert-work/counting-fp"}}
    recipe._check_not_stopped(config)  # nothing recorded: starts
    recipe._record_stop(config, NonFiniteTrainingError("expert counting: 20 steps in a row"), 7)
    with pytest.raises(NonFiniteTrainingError, match="20 steps in a row.*not retried") as e:
        recipe._check_not_stopped(config)
    assert run.url("ray_results/expert-work/counting-fp", recipe.NONFINITE_STOP) in str(e.value)
    other = {"work": {"run": run.spec, "prefix": "ray_results/expert-work/counting-fp2"}}
    recipe._check_not_stopped(other)  # another fingerprint trains afresh


# ---- the LoRA's initial weights -----------------------------------------------------------------
def initial_lora(**overrides) -> dict[str, torch.Tensor]:
    t = ExpertTrainer(loop_config(train_text_encoder=True, **overrides))
    return {**lora_state(t.unet), **{f"te.{k}": v for k, v in lora_state(t.text_encoder).items()}}


def unrelated_rng_use() -> None:
    torch.manual_seed(987)
    torch.randn(1000)
    torch.rand(17)


@pytest.mark.slow
def test_experts_of_different_skills_start_from_the_same_lora_whatever_the_process_drew():
    a = initial_lora(skill="counting")
    unrelated_rng_use()
    b = initial_lora(skill="spatial")
    downs = [k for k in a if "lora_A" in k]
    assert any(k.startswith("te.") for k in downs) and any(not k.startswith("te.") for k in downs)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert all(a[k].std() > 0 for k in downs)  # drawn, not zeros
    # the draw follows run.seed
    other_run = initial_lora(skill="counting", seed=1)
    assert not torch.equal(a[downs[0]], other_run[downs[0]])


@pytest.mark.slow
def test_building_a_trainer_leaves_the_callers_random_stream_alone():
    torch.manual_seed(5)
    expected = torch.randn(4)
    torch.manual_seed(5)
    ExpertTrainer(loop_config())
    assert torch.equal(torch.randn(4), expected)


@pytest.mark.slow
def test_independent_initialisations_are_seeded_by_run_seed_and_skill():
    a = initial_lora(skill="counting", shared_init=False)
    unrelated_rng_use()
    again = initial_lora(skill="counting", shared_init=False)
    b = initial_lora(skill="spatial", shared_init=False)
    downs = [k for k in a if "lora_A" in k]
    assert all(torch.equal(a[k], again[k]) for k in a)  # reproducible
    assert not any(torch.equal(a[k], b[k]) for k in downs)  # independent per skill
    with pytest.raises(ValueError, match="names no skill"):
        ExpertTrainer(loop_config(shared_init=False))


# ---- the plan's memory estimate -----------------------------------------------------------------
def test_lora_size_follows_the_attention_projection_shapes():
    # SD 1.x: 16 transformer blocks, 5 x 320 + 5 x 640 + 6 x 1280 = 12480 wide in all,
    # cross-attention from 768; per block 14*d + 2*768 per unit of rank.
    sd1, none = lora_parameters("sd1", 128, PAPER_TARGETS)
    assert sd1 == 128 * (14 * 12480 + 2 * 768 * 16) == 25_509_888 and none == []
    # SDXL: 10 blocks 640 wide and 60 blocks 1280 wide, cross-attention from 2048
    sdxl, _ = lora_parameters("sdxl", 128, PAPER_TARGETS)
    assert sdxl == 128 * (14 * (10 * 640 + 60 * 1280) + 2 * 2048 * 70) == 185_794_560
    q_only, other = lora_parameters("sdxl", 4, ["to_q", "proj_in"])
    assert q_only == 4 * 4 * 83200 and other == ["proj_in"]


def test_expert_memory_estimate_adds_up_by_hand():
    full, checkpointed = ACTIVATION_GIB["sdxl"]["mixed"]
    est = expert_memory("sdxl", 1024, 1024, 8, 2, 4, 128, PAPER_TARGETS, True, False)
    unet, text, vae = FAMILY_PARAMS_M["sdxl"]
    assert est["weights"] == pytest.approx(((unet + text) * 2 + vae * 4) * 1e6 / GIB)
    assert est["lora"] == pytest.approx(185_794_560 * 16 / GIB)  # 2.77 GiB
    assert est["activations"] == pytest.approx(8 * checkpointed)
    # one image at a time: 5 maps x 128 channels, plus 8 images x 3 channels, of
    # 1024 x 1024 pixels x 4 bytes = 664 x 4 MiB
    assert est["vae_encode"] == pytest.approx(664 * 4 / 1024)
    peak = max(8 * checkpointed, 664 * 4 / 1024)
    assert est["total"] == pytest.approx(est["weights"] + est["lora"] + peak + OVERHEAD_GIB)
    # one checkpointed image: the encoder's peak (5 x 128 + 3 maps) is the larger transient
    one = expert_memory("sdxl", 1024, 1024, 1, 2, 4, 128, PAPER_TARGETS, True, False)
    assert one["activations"] < one["vae_encode"] == pytest.approx(643 * 4 / 1024)
    assert one["total"] == pytest.approx(one["weights"] + one["lora"] + 643 * 4 / 1024 + 2.0)
    # an fp16-safe VAE in fp16 halves the encoder; cached latents drop it
    fp16_vae = expert_memory("sdxl", 1024, 1024, 8, 2, 2, 128, PAPER_TARGETS, True, False)
    assert fp16_vae["vae_encode"] == pytest.approx(664 * 2 / 1024)
    cached = expert_memory("sdxl", 1024, 1024, 8, 2, 4, 128, PAPER_TARGETS, True, True)
    assert cached["vae_encode"] == 0.0
    # fp32, without checkpointing, at 768 px: 9/16 of the pixels
    fp32_full, _ = ACTIVATION_GIB["sdxl"]["fp32"]
    other = expert_memory("sdxl", 768, 1024, 2, 4, 4, 128, PAPER_TARGETS, False, True)
    assert other["activations"] == pytest.approx(2 * fp32_full * 9 / 16)
    assert other["weights"] == pytest.approx((unet + text + vae) * 4e6 / GIB)
    assert other["total"] == pytest.approx(
        other["weights"] + other["lora"] + other["activations"] + OVERHEAD_GIB
    )


def test_plan_prints_the_memory_per_gpu_and_warns_when_it_exceeds_the_card():
    plan = build_plan(load_config("sdxl"))
    experts = plan["stages"]["experts"]
    assert (experts["micro_batch_size"], experts["gradient_accumulation"]) == (16, 4)
    assert experts["batch_size"] == 64 and experts["gradient_checkpointing"] is True
    memory = experts["memory_per_gpu"]
    assert " of 80 GiB estimated (weights " in memory and "16 x 1024px, checkpointed" in memory
    assert float(memory.split()[0].lstrip("~")) < 80
    assert not any("exceeds" in w for w in plan["warnings"])
    assert f"memory_per_gpu: {memory}" in format_plan(plan)

    unchecked = build_plan(load_config("sdxl", ["experts.gradient_checkpointing=false"]))
    warning = [w for w in unchecked["warnings"] if "exceeds" in w]
    assert len(warning) == 1
    assert "resources.experts.gpu_memory_gb=80" in warning[0]
    assert "experts.gradient_checkpointing=true" in warning[0]
    assert f"! {warning[0]}" in format_plan(unchecked)

    no_card = build_plan(load_config("sdxl", ["resources.experts.gpu_memory_gb=null"]))
    assert no_card["stages"]["experts"]["memory_per_gpu"].endswith(
        "set resources.experts.gpu_memory_gb to compare"
    )
    assert not any("exceeds" in w for w in no_card["warnings"])
    tiny = build_plan(load_config("tiny"))
    assert tiny["stages"]["experts"]["memory_per_gpu"] == "not estimated (CPU training)"
