"""The expert training loop on the tiny model, without Ray: the loss falls on a fixed batch,
clipping clips to the limit, checkpoints round-trip, accumulated micro-batches give the full
batch's gradient, and each loop option (min-SNR, offset noise, v-prediction, gradient
checkpointing, text-encoder LoRA) computes what it says."""

from __future__ import annotations

import functools
import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from selma_ray.config import load_config
from selma_ray.experts import data as train_data
from selma_ray.experts.recipe import ExpertTrainer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def loop_config(**overrides):
    cfg = load_config("tiny", [])
    return {**cfg.experts.model_dump(), "base": "tiny-sd", "seed": 0, **overrides}


def random_pngs(n: int, size=(40, 56), seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def batch():
    prompts = np.array(["two red apples", "a cat", "three dogs", "a blue car"], dtype=object)
    rows = {"prompt": prompts, "image": np.array(random_pngs(4), dtype=object)}
    return train_data.preprocess_batch(rows, "tiny-sd", 32, "center", False)


@pytest.fixture(scope="module")
def trainer():
    return ExpertTrainer(loop_config())


def seeded_loss(trainer, batch, seed=0) -> float:
    torch.manual_seed(seed)
    with torch.no_grad():
        return trainer.loss(batch).item()


def recorded_loss(trainer, batch, monkeypatch, seed=0) -> tuple[float, dict[str, torch.Tensor]]:
    """A seeded loss, and what went into it: latents, noise and timesteps (as given to the
    scheduler's ``add_noise``), the loss target and the UNet's prediction."""
    seen: dict[str, torch.Tensor] = {}
    add_noise, target, model = trainer.noise_scheduler.add_noise, trainer._target, trainer.model

    def recording_add_noise(latents, noise, t):
        seen.update(latents=latents, noise=noise, t=t)
        return add_noise(latents, noise, t)

    def recording_target(latents, noise, t):
        seen["target"] = target(latents, noise, t)
        return seen["target"]

    def recording_model(*args, **kwargs):
        out = model(*args, **kwargs)
        seen["pred"] = out.sample
        return out

    with monkeypatch.context() as m:
        m.setattr(trainer.noise_scheduler, "add_noise", recording_add_noise)
        m.setattr(trainer, "_target", recording_target)
        m.setattr(trainer, "model", recording_model)
        loss = seeded_loss(trainer, batch, seed)
    return loss, seen


def snr(trainer, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of timesteps, from the schedule: alpha_bar / (1 - alpha_bar)."""
    a = trainer.noise_scheduler.alphas_cumprod[t].double()
    return a / (1 - a)


def test_loss_decreases_on_a_fixed_batch(batch):
    t = ExpertTrainer(loop_config(learning_rate=1e-2, max_grad_norm=10.0))
    t.set_validation([batch])
    before = t.validation_loss()
    assert t.validation_loss() == before  # fixed timesteps and noise: repeatable
    for i in range(10):
        torch.manual_seed(i)
        t.train_step([batch])
    after = t.validation_loss()
    assert t.step == 10
    assert after < before - 1e-3, (before, after)


def test_gradient_clipping_is_effective(trainer, batch):
    max_norm = 1e-4
    trainer.config["max_grad_norm"] = max_norm
    try:
        torch.manual_seed(0)
        out = trainer.train_step([batch])
    finally:
        trainer.config["max_grad_norm"] = loop_config()["max_grad_norm"]
    applied = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.params]))
    assert out["grad_norm"] > 10 * max_norm  # the raw gradient was larger ...
    # ... and the optimizer saw it scaled down to the limit (not zeroed, not left as it was)
    assert applied.item() == pytest.approx(max_norm, rel=1e-3)


def test_validation_set_up_in_mini_batches_scores_like_one_batch(batch):
    whole = ExpertTrainer(loop_config())
    whole.set_validation([batch])
    parts = ExpertTrainer(loop_config())
    parts.set_validation({k: v[i : i + 1] for k, v in batch.items()} for i in range(4))
    assert parts.val["fixed"].n == 4
    assert abs(parts.validation_loss() - whole.validation_loss()) < 1e-6


def test_checkpoint_round_trip(tmp_path, batch):
    from peft.utils import get_peft_model_state_dict

    a = ExpertTrainer(loop_config(lr_scheduler="linear"))
    for i in range(2):
        torch.manual_seed(i)
        a.train_step([batch])
    a.data_position = (3, 1)  # where the feed stood: epoch 3, one batch into it
    a.save(tmp_path / "ckpt")
    b = ExpertTrainer(loop_config(lr_scheduler="linear"))
    b.load(tmp_path / "ckpt")
    assert b.step == a.step == 2
    assert b.data_position == (3, 1)
    sa, sb = get_peft_model_state_dict(a.unet), get_peft_model_state_dict(b.unet)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    for i, state in oa["state"].items():
        for key, value in state.items():
            assert torch.equal(value, ob["state"][i][key]), (i, key)
    assert a.lr_scheduler.state_dict() == b.lr_scheduler.state_dict()
    assert seeded_loss(a, batch) == seeded_loss(b, batch)


def test_min_snr_weighting_scales_each_images_loss_by_min_snr_gamma_over_snr(
    trainer, batch, monkeypatch
):
    gamma = 1.0
    monkeypatch.setitem(trainer.config, "snr_gamma", gamma)
    loss, seen = recorded_loss(trainer, batch, monkeypatch)
    ratio = snr(trainer, seen["t"])
    # this seed's timesteps have images on both sides of gamma: clamped and not
    assert (ratio > gamma).any() and (ratio < gamma).any(), seen["t"]
    per_image = ((seen["pred"].double() - seen["noise"].double()) ** 2).mean(dim=(1, 2, 3))
    expected = (per_image * torch.clamp(ratio, max=gamma) / ratio).mean()
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_noise_offset_shifts_each_image_channel_by_one_constant_of_the_given_scale(
    trainer, batch, monkeypatch
):
    many = {k: np.concatenate([v] * 4) for k, v in batch.items()}  # 16 images x 4 channels
    noise = {}
    for offset in (0.0, 0.1, 0.5):
        monkeypatch.setitem(trainer.config, "noise_offset", offset)
        _, seen = recorded_loss(trainer, many, monkeypatch)
        assert torch.equal(seen["target"], seen["noise"])  # epsilon: the target is that noise
        noise[offset] = seen["noise"]
    # Same seed: the same Gaussian noise, plus the offset term, which is ...
    shift = noise[0.5] - noise[0.0]
    # ... one constant per (image, channel), the same over all pixels ...
    per_channel = shift[:, :, :1, :1]
    assert torch.allclose(shift, per_channel.expand_as(shift), atol=1e-5)
    # ... proportional to noise_offset ...
    assert torch.allclose(noise[0.1] - noise[0.0], 0.2 * shift, atol=1e-5)
    # ... and noise_offset times a standard normal draw (64 draws: a loose statistical band).
    z = per_channel.flatten() / 0.5
    assert 0.7 < z.std().item() < 1.3 and abs(z.mean().item()) < 0.4, z
    # Without the offset, the per-channel means are those of 256 N(0, 1) pixels (std 1/16).
    assert noise[0.0].mean(dim=(2, 3)).std().item() < 0.15


def fixed_noise(trainer, monkeypatch, noise: torch.Tensor, t: torch.Tensor) -> None:
    """Make the loss deterministic per image: VAE means instead of samples, and the rows of
    ``noise`` and ``t`` handed out in order, across micro-batches (rewound by calling again)."""
    used = [0]

    def next_rows(latents):
        i, n = used[0], latents.shape[0]
        used[0] += n
        return noise[i : i + n], t[i : i + n]

    monkeypatch.setattr(trainer, "noise", next_rows)
    monkeypatch.setattr(
        trainer, "latents", functools.partial(ExpertTrainer.latents, trainer, sample=False)
    )


def test_accumulated_micro_batches_give_one_step_with_the_full_batch_gradient(batch, monkeypatch):
    t = seeded_trainer(max_grad_norm=1e9)  # no clipping: compare the raw gradients
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(4, 4, 16, 16, generator=gen)
    steps = torch.tensor([50, 300, 600, 900])

    def grad_of(parts):
        fixed_noise(t, monkeypatch, noise, steps)
        loss = t.accumulate(parts)
        return loss, torch.cat([p.grad.flatten() for p in t.params]).clone()

    def rows(lo, hi):
        return {k: v[lo:hi] for k, v in batch.items()}

    full_loss, full = grad_of([batch])
    assert full.norm() > 0
    for cuts in ([0, 2, 4], [0, 1, 4], [0, 1, 2, 3, 4]):
        parts = [rows(a, b) for a, b in itertools.pairwise(cuts)]
        loss, grad = grad_of(parts)
        assert loss == pytest.approx(full_loss, rel=1e-5), cuts
        torch.testing.assert_close(
            grad, full, rtol=1e-4, atol=1e-6, msg=lambda m, cuts=cuts: f"split {cuts}: {m}"
        )
    # the comparison can tell: one micro-batch alone has another gradient
    _, first = grad_of([rows(0, 2)])
    assert not torch.allclose(first, full, rtol=1e-2, atol=1e-5)
    # train_step applies the accumulated gradient as one optimizer step
    before = [p.detach().clone() for p in t.params]
    fixed_noise(t, monkeypatch, noise, steps)
    out = t.train_step([rows(0, 1), rows(1, 4)])
    assert t.step == 1 and out["loss"] == pytest.approx(full_loss, rel=1e-5)
    assert out["grad_norm"] == pytest.approx(full.norm().item(), rel=1e-4)
    applied = torch.cat([p.grad.flatten() for p in t.params])
    torch.testing.assert_close(applied, full, rtol=1e-4, atol=1e-6)
    moved = [not torch.equal(b, p) for b, p in zip(before, t.params, strict=True)]
    assert all(m for m, p in zip(moved, t.params, strict=True) if p.grad.any())


def seeded_trainer(**overrides) -> ExpertTrainer:
    torch.manual_seed(0)  # the LoRA init has its own seed (run.seed); this seeds what follows
    return ExpertTrainer(loop_config(**overrides))


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    plain, ckpt = (seeded_trainer(gradient_checkpointing=g) for g in (False, True))
    assert ckpt.unet.is_gradient_checkpointing and ckpt.unet.training
    grads = []
    for t in (plain, ckpt):
        torch.manual_seed(0)
        t.loss(batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in t.params]))
    assert grads[0].norm() > 1e-3  # a real gradient, not two zero vectors
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_text_encoder_lora_trains_and_is_saved(tmp_path, batch):
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    t = ExpertTrainer(loop_config(train_text_encoder=True))
    te_params = {n: p for n, p in t.text_encoder.named_parameters() if p.requires_grad}
    assert te_params and len(t.params) > len([p for p in t.unet.parameters() if p.requires_grad])
    ups = {n: p for n, p in te_params.items() if "lora_B" in n}
    # B starts at zero (weight decay cannot move it): only a gradient through the text
    # encoder changes it, and it must reach every adapted projection of every layer.
    assert ups and all(not p.any() for p in ups.values())
    torch.manual_seed(0)
    t.train_step([batch])
    assert [n for n, p in ups.items() if not p.any()] == []
    t.save(tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "pytorch_lora_weights.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    te_state = get_peft_model_state_dict(t.text_encoder)
    assert len(te_state) == len(te_params)
    for name, value in te_state.items():
        assert torch.equal(saved[f"text_encoder.{name}"], value), name
    assert any(k.startswith("unet.") for k in saved)
    u = ExpertTrainer(loop_config(train_text_encoder=True))
    u.load(tmp_path / "ckpt")
    assert seeded_loss(u, batch) == seeded_loss(t, batch)


def test_v_prediction_targets_the_velocity(trainer, batch, monkeypatch):
    sched = trainer.noise_scheduler
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 500])
    assert torch.equal(trainer._target(latents, noise, t), noise)
    sched.register_to_config(prediction_type="v_prediction")
    try:
        assert torch.allclose(
            trainer._target(latents, noise, t), sched.get_velocity(latents, noise, t)
        )
        loss, seen = recorded_loss(trainer, batch, monkeypatch)
        gamma = 1.0
        monkeypatch.setitem(trainer.config, "snr_gamma", gamma)
        weighted, again = recorded_loss(trainer, batch, monkeypatch)
    finally:
        sched.register_to_config(prediction_type="epsilon")
    # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0, written out here
    a = sched.alphas_cumprod[seen["t"]].double().view(-1, 1, 1, 1)
    v = a.sqrt() * seen["noise"].double() - (1 - a).sqrt() * seen["latents"].double()
    per_image = ((seen["pred"].double() - v) ** 2).mean(dim=(1, 2, 3))
    assert loss == pytest.approx(per_image.mean().item(), rel=1e-5)
    # min-SNR for v-prediction: weight min(snr, gamma) / (snr + 1)
    assert torch.equal(again["t"], seen["t"]) and torch.equal(again["pred"], seen["pred"])
    ratio = snr(trainer, seen["t"])
    expected = (per_image * torch.clamp(ratio, max=gamma) / (ratio + 1)).mean()
    assert weighted == pytest.approx(expected.item(), rel=1e-5)


def test_render_samples_makes_one_png_strip_of_the_prompts(trainer):
    png = trainer.render_samples(["a cat", "two dogs"])
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG"
        assert img.size == (64, 32)
        strip = np.asarray(img.convert("RGB"), dtype=np.int16)
    assert np.abs(strip[:, :32] - strip[:, 32:]).max() > 0  # two prompts, two images


def test_sdxl_conditioning_trains_from_pixels_and_from_cached_latents(tmp_path):
    from diffusers import DiffusionPipeline

    from selma_ray.models import resolve

    rows = {"prompt": np.array(["a cat", "two dogs"] * 2), "image": random_pngs(4, (40, 56))}
    batch = train_data.preprocess_batch(rows, "tiny-sdxl", 32, "center", False)
    assert batch["input_ids_2"].shape == (4, 77)
    t = seeded_trainer(base="tiny-sdxl", learning_rate=1e-2, max_grad_norm=10.0)
    hidden, added = t.conditioning(batch, 32)
    assert hidden.shape == (4, 77, 64) and added["text_embeds"].shape == (4, 32)
    # time ids: original (h, w), crop (top, left) in the 32x45 resize, target (h, w)
    assert added["time_ids"][0].tolist() == [40, 56, 0, 6, 32, 32]
    t.set_validation([batch])
    before = t.validation_loss()
    for i in range(8):
        torch.manual_seed(i)
        t.train_step([batch])
    assert t.validation_loss() < before - 1e-3
    cached = train_data.LatentEncoder("tiny-sdxl", flip=True)(batch)
    assert cached["pooled"].shape == (4, 32) and cached["hidden"].shape == (4, 77, 64)
    torch.manual_seed(0)
    assert np.isfinite(t.train_step([cached])["loss"])
    t.save(tmp_path / "ckpt")
    pipe = DiffusionPipeline.from_pretrained(resolve("tiny-sdxl"))
    pipe.load_lora_weights(str(tmp_path / "ckpt"), adapter_name="x")
    assert "x" in pipe.get_list_adapters()["unet"]
