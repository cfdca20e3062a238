"""The expert training loop on the tiny model, without Ray: the loss falls on a fixed batch,
clipping clips, checkpoints round-trip, and each loop option runs and does what it says."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from selma_ray.config import load_config  # noqa: E402
from selma_ray.experts import data as train_data  # noqa: E402
from selma_ray.experts.recipe import ExpertTrainer  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Like a Ray Train worker with a fractional CPU; spinning threads crawl on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_loss_decreases_on_a_fixed_batch(batch):
    t = ExpertTrainer(loop_config(learning_rate=1e-2, max_grad_norm=10.0))
    t.set_validation(batch)
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
    assert applied.item() <= max_norm * 1.001  # ... and the optimizer saw the clipped one


def test_checkpoint_round_trip(tmp_path, batch):
    from peft.utils import get_peft_model_state_dict

    a = ExpertTrainer(loop_config(lr_scheduler="linear"))
    for i in range(2):
        torch.manual_seed(i)
        a.train_step([batch])
    a.save(tmp_path / "ckpt")
    b = ExpertTrainer(loop_config(lr_scheduler="linear"))
    b.load(tmp_path / "ckpt")
    assert b.step == a.step == 2
    sa, sb = get_peft_model_state_dict(a.unet), get_peft_model_state_dict(b.unet)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    for i, state in oa["state"].items():
        for key, value in state.items():
            assert torch.equal(value, ob["state"][i][key]), (i, key)
    assert a.lr_scheduler.state_dict() == b.lr_scheduler.state_dict()
    assert seeded_loss(a, batch) == seeded_loss(b, batch)


def test_min_snr_weighting_lowers_the_epsilon_loss(trainer, batch):
    plain = seeded_loss(trainer, batch)
    trainer.config["snr_gamma"] = 1.0
    try:
        weighted = seeded_loss(trainer, batch)
    finally:
        trainer.config["snr_gamma"] = None
    # min(snr, gamma) / snr <= 1 for every sample, so the weighted mean cannot be larger.
    assert weighted < plain


def test_noise_offset_changes_the_loss(trainer, batch):
    plain = seeded_loss(trainer, batch)
    trainer.config["noise_offset"] = 0.5
    try:
        offset = seeded_loss(trainer, batch)
    finally:
        trainer.config["noise_offset"] = 0.0
    assert offset != plain


def test_gradient_accumulation_makes_one_step_of_several_micro_batches(trainer, batch):
    half = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    step = trainer.step
    torch.manual_seed(0)
    out = trainer.train_step(half)
    assert trainer.step == step + 1 and np.isfinite(out["loss"]) and out["grad_norm"] > 0


def seeded_trainer(**overrides) -> ExpertTrainer:
    torch.manual_seed(0)  # the LoRA init draws from the global generator
    return ExpertTrainer(loop_config(**overrides))


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    plain, ckpt = (seeded_trainer(gradient_checkpointing=g) for g in (False, True))
    assert ckpt.unet.is_gradient_checkpointing and ckpt.unet.training
    grads = []
    for t in (plain, ckpt):
        torch.manual_seed(0)
        t.loss(batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in t.params]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_text_encoder_lora_trains_and_is_saved(tmp_path, batch):
    from safetensors import safe_open

    t = ExpertTrainer(loop_config(train_text_encoder=True))
    te_params = [p for p in t.text_encoder.parameters() if p.requires_grad]
    assert te_params and len(t.params) > len([p for p in t.unet.parameters() if p.requires_grad])
    before = [p.detach().clone() for p in te_params]
    torch.manual_seed(0)
    t.train_step([batch])
    assert any(not torch.equal(b, p) for b, p in zip(before, te_params, strict=True))
    t.save(tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("text_encoder.") for k in keys)
    assert any(k.startswith("unet.") for k in keys)
    u = ExpertTrainer(loop_config(train_text_encoder=True))
    u.load(tmp_path / "ckpt")
    assert seeded_loss(u, batch) == seeded_loss(t, batch)


def test_v_prediction_targets_the_velocity(trainer, batch):
    sched = trainer.noise_scheduler
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 500])
    assert torch.equal(trainer._target(latents, noise, t), noise)
    sched.register_to_config(prediction_type="v_prediction")
    try:
        assert torch.allclose(
            trainer._target(latents, noise, t), sched.get_velocity(latents, noise, t)
        )
        assert np.isfinite(seeded_loss(trainer, batch))
    finally:
        sched.register_to_config(prediction_type="epsilon")


def test_render_samples_writes_one_strip_of_the_prompts(trainer, tmp_path):
    out = tmp_path / "samples" / "step-000010.png"
    trainer.render_samples(["a cat", "two dogs"], out)
    with Image.open(out) as img:
        assert img.size == (64, 32)


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
    t.set_validation(batch)
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
