"""Training inputs: resize + crop to the trained model's resolution from any image size
(weak-to-strong), flips, tokenizing, the deterministic validation split, and the Ray Data
path with its latent cache."""

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


def table(n: int):
    return pa.table(
        {"prompt": [f"p{i}" for i in range(n)], "image": [bytes([i]) for i in range(n)]}
    )


def test_validation_split_is_deterministic_disjoint_and_sized():
    t = table(20)
    train, val = train_data.split_rows(t, 0, "counting", 0.1, None)
    again = train_data.split_rows(t, 0, "counting", 0.1, None)
    assert val.num_rows == 2 and train.num_rows == 18
    assert val.column("prompt").to_pylist() == again[1].column("prompt").to_pylist()
    assert not set(val.column("prompt").to_pylist()) & set(train.column("prompt").to_pylist())
    other = train_data.split_rows(t, 1, "counting", 0.1, None)[1]
    assert other.column("prompt").to_pylist() != val.column("prompt").to_pylist()
    assert train_data.split_rows(t, 0, "counting", 0.1, 5)[1].num_rows == 5  # count wins
    assert train_data.split_rows(t, 0, "counting", 0.0, None)[1].num_rows == 0
    assert train_data.split_rows(table(3), 0, "x", 0.01, None)[1].num_rows == 1  # at least one
    with pytest.raises(ValueError, match="leaves none to train on"):
        train_data.split_rows(table(2), 0, "x", 0.5, 2)


def test_data_hash_follows_the_rows():
    t = table(4)
    assert train_data.data_hash(t) == train_data.data_hash(table(4))
    one_image = t.set_column(1, "image", pa.array([b"\x00", b"\x01", b"\x02", b"\x04"]))
    one_prompt = t.set_column(0, "prompt", pa.array(["p0", "p1", "p2", "p4"]))
    # the prompt/image boundary counts: "p0" + b"1" is not "p" + b"01"
    moved = pa.table({"prompt": ["p"], "image": [b"01"]})
    joined = pa.table({"prompt": ["p0"], "image": [b"1"]})
    hashes = [train_data.data_hash(x) for x in (t, one_image, one_prompt, table(5), moved, joined)]
    assert len(set(hashes)) == len(hashes) and all(len(h) == 16 for h in hashes)


@pytest.mark.slow
def test_ray_data_feed_and_latent_cache(tmp_path):
    import collections
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from selma_ray.config import load_config
    from selma_ray.experts.recipe import endless_batches

    loop = {**load_config("tiny", []).experts.model_dump(), "base": "tiny-sd", "seed": 0}
    rows = pa.table(
        {"prompt": ["a cat", "two dogs", "a red car"], "image": [png(48, 80, i) for i in range(3)]}
    )
    train, val = train_data.split_rows(rows, 0, "s", 0.0, 1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        plain = train_data.training_datasets(train, val, {**loop, "random_flip": True}, None, 0.5)
        batch = plain["train"].take_batch(8)
        assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["input_ids"].shape[0] == 2
        assert plain["validation"].count() == 1
        cache = (RunDir(tmp_path), "latents")
        cached = train_data.training_datasets(train, val, {**loop, "random_flip": True}, cache, 0.5)
        # Not repeated here: Ray Train would split whole copies among its workers.
        assert cached["train"].count() == 2
        batch = cached["train"].take_batch(2)
        assert batch["latent_mean"].shape == (2, 4, 16, 16) == batch["latent_mean_flip"].shape
        assert batch["hidden"].shape == (2, 77, 32) and "pixel_values" not in batch
        assert not np.allclose(batch["latent_mean"], batch["latent_mean_flip"])
        assert "latent_mean_flip" not in cached["validation"].take_batch(1)
        stamp = (tmp_path / "latents" / "train" / MANIFEST).stat().st_mtime_ns
        train_data.training_datasets(train, val, {**loop, "random_flip": True}, cache, 0.5)
        assert (tmp_path / "latents" / "train" / MANIFEST).stat().st_mtime_ns == stamp  # reused

        # Each worker repeats its own split instead (training.endless_batches): two readers
        # of a 2-way streaming split get disjoint rows, each cycled to cover the run.
        rows = ray.data.from_items([{"prompt": f"p{i}"} for i in range(4)]).materialize()
        assert train_data.repeated(rows, 10).count() == 12  # whole copies, to cover 10 rows

        def read(split) -> collections.Counter:
            batches = endless_batches(split, 1, rows_needed=6)
            return collections.Counter(str(b["prompt"][0]) for b in itertools.islice(batches, 6))

        with ThreadPoolExecutor(2) as pool:  # a streaming split is read by all at once
            got = list(pool.map(read, rows.streaming_split(2, equal=True)))
        assert [sorted(c.values()) for c in got] == [[3, 3], [3, 3]], got
        assert not set(got[0]) & set(got[1])
        assert set(got[0]) | set(got[1]) == {f"p{i}" for i in range(4)}
    finally:
        ray.shutdown()
