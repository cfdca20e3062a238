"""Training inputs: resize + crop to the trained model's resolution from any image size
(weak-to-strong), flips, tokenizing, and the latent cache on the Ray Data feed (the feed's
split, order and seeds: tests/test_feed.py)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from selma_ray.core.rundir import MANIFEST, RunDir
from selma_ray.experts import data as train_data


def png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def striped(width: int, height: int) -> bytes:
    """Left half black, right half white: shows crops and flips."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, width // 2 :] = 255
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(96, 64), (48, 80), (24, 24), (768, 768)])
def test_any_image_size_becomes_the_trained_resolution(size):
    # Weak-to-strong: e.g. 768 px SD2 images at a 1024 px model; here 32 px tiny-sd.
    out = train_data.pixel_array([png(*size)], 32)
    assert out.shape == (1, 3, 32, 32) and out.dtype == np.float32
    assert -1.0 <= out.min() and out.max() <= 1.0


def test_center_crop_keeps_the_middle_and_random_crops_stay_inside():
    wide = striped(128, 32)  # already 32 high: only the crop acts
    center = train_data.pixel_array([wide], 32)[0]
    assert center[:, :, :15].max() < -0.9 and center[:, :, 17:].min() > 0.9
    rng = np.random.default_rng(0)
    means = {train_data.pixel_array([wide], 32, crop="random", rng=rng).mean() for _ in range(20)}
    assert min(means) == pytest.approx(-1.0) and max(means) == pytest.approx(1.0)


def test_flip_mirrors_about_half_the_images():
    rng = np.random.default_rng(0)
    out = train_data.pixel_array([striped(32, 32)] * 40, 32, flip=True, rng=rng)
    mirrored = out[:, 0, 0, 0] > 0  # left column white
    assert 8 < int(mirrored.sum()) < 32
    assert np.array_equal(out[mirrored][0], out[~mirrored][0][:, :, ::-1])


def test_preprocess_batch_tokenizes_and_rejects_missing_columns():
    batch = {"prompt": np.array(["a cat", "two dogs"], dtype=object), "image": [png(40, 56)] * 2}
    out = train_data.preprocess_batch(batch, "tiny-sd", 32, "center", False)
    assert out["pixel_values"].shape == (2, 3, 32, 32)
    assert out["input_ids"].shape == (2, 77) and out["input_ids"].dtype == np.int64
    assert not np.array_equal(out["input_ids"][0], out["input_ids"][1])
    with pytest.raises(ValueError, match="needs columns"):
        train_data.preprocess_batch({"prompt": batch["prompt"]}, "tiny-sd", 32, "center", False)


def test_native_resolution_of_tiny_sd():
    assert train_data.native_resolution("tiny-sd") == 32


@pytest.mark.slow
def test_the_latent_cache_is_written_once_and_streamed_back(tmp_path):
    import ray

    from selma_ray.config import load_config
    from selma_ray.experts import feed

    loop = {**load_config("tiny", []).experts.model_dump(), "base": "tiny-sd", "seed": 0}
    loop.update(skill="s", random_flip=True, cache_latents=True)
    rows = pa.table(
        {
            "prompt_id": ["a", "b", "c"],
            "image_index": [0, 0, 0],
            "prompt": ["a cat", "two dogs", "a red car"],
            "image": [png(48, 80, i) for i in range(3)],
        }
    )
    cache = (RunDir(tmp_path), "latents")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        source = ray.data.from_arrow(rows)
        plain = feed.training_datasets(source, ["c/0"], {**loop, "cache_latents": False})
        batch = plain["train"].take_batch(8)  # decoded, not yet cropped: uint8, as stored
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (2, 32, 32, 3)
        assert plain["validation"].count() == 1
        cached = feed.training_datasets(source, ["c/0"], loop, cache)
        batch = cached["train"].take_batch(2)
        assert batch["latent_mean"].shape == (2, 4, 16, 16) == batch["latent_mean_flip"].shape
        assert batch["hidden"].shape == (2, 77, 32) and "image" not in batch
        assert not np.allclose(batch["latent_mean"], batch["latent_mean_flip"])
        assert "latent_mean_flip" not in cached["validation"].take_batch(1)
        # the worker picks plain or flipped latents per row, seeded
        picked = feed.augment(batch, 0, "s", 0, 32, "center", True)
        assert "latent_mean_flip" not in picked
        again = feed.augment(batch, 0, "s", 0, 32, "center", True)
        assert np.array_equal(picked["latent_mean"], again["latent_mean"])
        stamp = (tmp_path / "latents" / "train" / MANIFEST).stat().st_mtime_ns
        feed.training_datasets(source, ["c/0"], loop, cache)["train"].count()
        assert (tmp_path / "latents" / "train" / MANIFEST).stat().st_mtime_ns == stamp  # reused
    finally:
        ray.shutdown()
