"""The merge section of the config: methods, default, selection and their validation."""

from __future__ import annotations

from typing import get_args

import pytest

from selma_ray.config import ConfigError, MergeSection, list_presets, load_config
from selma_ray.lora import METHODS


def test_defaults_are_the_paper_merge_alone():
    section = MergeSection()
    assert section.methods == ["paper"] and section.default == "paper"
    assert section.select == "default" and section.weights is None
    assert (section.density, section.svd_rank, section.seed) == (0.5, None, 0)
    assert (section.device, section.dtype) == ("cpu", "float32")


def test_config_offers_exactly_the_implemented_methods():
    assert get_args(MergeSection.model_fields["default"].annotation) == METHODS


def test_several_methods_and_options_load_from_overrides():
    cfg = load_config(
        "tiny",
        [
            "merge.methods=[paper, cat, svd, ties, dare_linear, dare_ties]",
            "merge.default=ties",
            "merge.select=validation",
            "merge.density=0.2",
            "merge.svd_rank=16",
            "merge.seed=3",
            "merge.dtype=bfloat16",
        ],
    )
    assert cfg.merge.methods[-1] == "dare_ties" and cfg.merge.default == "ties"
    assert (cfg.merge.density, cfg.merge.svd_rank, cfg.merge.seed) == (0.2, 16, 3)


@pytest.mark.parametrize(
    "override, message",
    [
        ("merge.default=ties", "default ('ties') must be one of methods ['paper']"),
        ("merge.methods=[paper, paper]", "methods must be unique"),
        ("merge.methods=[]", "merge.methods"),
        ("merge.methods=[mean]", "merge.methods.0"),
        ("merge.select=best", "merge.select"),
        ("merge.density=0", "merge.density"),
        ("merge.density=1.5", "merge.density"),
        ("merge.svd_rank=0", "merge.svd_rank"),
        ("merge.device=tpu", "merge.device"),
        ("merge.dtype=float64", "merge.dtype"),
    ],
)
def test_bad_merge_settings_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "weights", ["{counting: -1, dense_detail: 1}", "{counting: 0, dense_detail: 0}", "{}"]
)
def test_negative_or_all_zero_weights_are_refused(weights):
    with pytest.raises(ConfigError, match="weights must be >= 0 and not all zero"):
        load_config("tiny", ["prompts.skills=[counting, dense_detail]", f"merge.weights={weights}"])


def test_run_configs_written_with_the_old_method_key_still_load():
    section = MergeSection.model_validate({"method": "paper", "weights": None})
    assert section.methods == ["paper"] and section.default == "paper"


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_merges_with_the_paper_rule_by_default(preset):
    cfg = load_config(preset)
    assert cfg.merge.default in cfg.merge.methods
    assert cfg.merge.methods[0] == "paper"
