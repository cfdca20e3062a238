"""images.scheduler: the sampler is a setting, built from the model's own scheduler config."""

from __future__ import annotations

import numpy as np
import pytest

from selma_ray.config import ConfigError, load_config
from selma_ray.images import SCHEDULERS, set_scheduler
from selma_ray.images.stage import DiffusionRenderer


@pytest.fixture(scope="module")
def renderers():
    kwargs = dict(
        model="tiny-sd", num_gpus=0, dtype="float32", steps=3, guidance_scale=7.5, resolution=32
    )
    return {name: DiffusionRenderer(**kwargs, scheduler=name) for name in ("default", "euler")}


def test_scheduler_is_swapped_and_keeps_the_model_noise_schedule(renderers):
    default, euler = renderers["default"].pipe.scheduler, renderers["euler"].pipe.scheduler
    assert type(default).__name__ == "DDIMScheduler"  # tiny-sd's own
    assert type(euler).__name__ == SCHEDULERS["euler"]
    for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert euler.config[key] == default.config[key]


def test_the_sampler_changes_the_images_for_the_same_seeds(renderers):
    batch = {"prompt": np.array(["two red apples"], dtype=object), "seed": np.array([7])}
    a = renderers["default"](dict(batch))["image"][0]
    b = renderers["euler"](dict(batch))["image"][0]
    again = renderers["euler"](dict(batch))["image"][0]
    assert a != b and b == again


def test_unknown_schedulers_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match="images.scheduler.*'euler'"):
        load_config("tiny", ["images.scheduler=eulerr"])
    with pytest.raises(ValueError, match="choose default or one of"):
        set_scheduler(object(), "nope")


def test_every_named_scheduler_exists_in_diffusers():
    import diffusers

    missing = [cls for cls in SCHEDULERS.values() if not hasattr(diffusers, cls)]
    assert not missing
