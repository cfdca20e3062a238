"""Broken renders (NaN, all black, one colour) are re-rendered once, then dropped."""

from __future__ import annotations

import numpy as np
import pytest

from selma_ray.core.seeds import stable_seed
from selma_ray.images.stage import DiffusionRenderer, is_broken


def test_is_broken_flags_nan_black_and_constant_images() -> None:
    rng = np.random.default_rng(0)
    good = rng.random((8, 8, 3))
    nan = good.copy()
    nan[3, 4, 1] = np.nan
    assert not is_broken(good)
    assert is_broken(nan)
    assert is_broken(np.zeros((8, 8, 3)))
    assert is_broken(np.full((8, 8, 3), 0.7))
    assert is_broken(np.zeros((0, 0, 3)))


@pytest.fixture(scope="module")
def renderer() -> DiffusionRenderer:
    import os

    os.environ.setdefault("SELMA_CACHE", "/tmp/selma_cache")
    r = DiffusionRenderer("tiny-sd", 0, "float32", steps=2, guidance_scale=7.5, resolution=32)
    return r


def test_broken_images_are_retried_then_dropped(
    renderer: DiffusionRenderer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_render = renderer.render
    nan_once, always_black = 11, 22
    calls = []

    def flaky(prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        calls.append(list(seeds))
        images = real_render(prompts, seeds)
        for i, s in enumerate(seeds):
            if s == nan_once:
                images[i] = np.full_like(images[i], np.nan)
            if s in (always_black, stable_seed(always_black, "retry")):
                images[i] = np.zeros_like(images[i])
        return images

    monkeypatch.setattr(renderer, "render", flaky)
    batch = {
        "prompt_id": np.array(["p0", "p1", "p2", "p3"], dtype=object),
        "prompt": np.array(["a cat", "a dog", "a cow", "a hen"], dtype=object),
        "seed": np.array([1, nan_once, always_black, 3]),
    }
    out = renderer(batch)
    retry = [stable_seed(nan_once, "retry"), stable_seed(always_black, "retry")]
    assert calls == [[1, nan_once, always_black, 3], retry]
    assert list(out["prompt_id"]) == ["p0", "p1", "p3"]
    assert list(out["seed"]) == [1, retry[0], 3]
    assert set(out) == {"prompt_id", "prompt", "seed", "image", "width", "height", "generator"}
    assert all(len(col) == 3 for col in out.values())
    assert all(img.startswith(b"\x89PNG") for img in out["image"])


def test_clean_batch_renders_once(
    renderer: DiffusionRenderer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_render = renderer.render

    def counted(prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        calls.append(seeds)
        return real_render(prompts, seeds)

    monkeypatch.setattr(renderer, "render", counted)
    out = renderer({"prompt": np.array(["a cat", "a dog"], dtype=object), "seed": np.array([5, 6])})
    assert len(calls) == 1 and list(out["seed"]) == [5, 6]
    with pytest.raises(ValueError, match="needs columns"):
        renderer({"prompt": np.array(["x"], dtype=object)})
