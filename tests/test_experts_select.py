"""Checkpoint selection on fake results, the expert fingerprint, and experts config checks."""

from __future__ import annotations

import pytest

from selma_ray.config import ConfigError, load_config
from selma_ray.core.rundir import RunDir
from selma_ray.experts.stage import select_checkpoint
from selma_ray.pipeline import lineage


def results(*val_losses):
    return [(f"ckpt-{i}", {"step": 2 * (i + 1), "val_loss": v}) for i, v in enumerate(val_losses)]


def test_best_picks_the_lowest_validation_loss():
    cands = results(0.9, 0.4, 0.6)
    assert select_checkpoint(cands, cands[-1], "best") == cands[1]


def test_best_breaks_ties_towards_the_later_step():
    cands = results(0.5, 0.5, 0.7)
    assert select_checkpoint(cands, cands[-1], "best")[0] == "ckpt-1"


def test_last_ignores_validation_loss():
    cands = results(0.1, 0.9)
    latest = ("ckpt-latest", {"step": 99, "val_loss": 3.0})
    assert select_checkpoint(cands, latest, "last") == latest


def test_best_without_any_validation_loss_fails_clearly():
    with pytest.raises(RuntimeError, match="no checkpoint reported a validation loss"):
        select_checkpoint([("c", {"step": 2})], ("c", {"step": 2}), "best")


def test_fingerprint_ignores_operational_settings_but_not_training_settings(tmp_path):
    run = RunDir(tmp_path)

    def fingerprint(cfg, skill):
        return lineage("experts", cfg, run).units[skill]

    cfg = load_config("tiny", [])
    same = load_config("tiny", ["experts.max_failures=0"])
    other = load_config("tiny", ["experts.snr_gamma=5"])
    assert fingerprint(cfg, "counting") == fingerprint(same, "counting")
    assert fingerprint(cfg, "counting") != fingerprint(other, "counting")
    assert fingerprint(cfg, "counting") != fingerprint(cfg, "everyday_scenes")


def test_fault_drill_is_an_environment_hook_not_a_config_key(monkeypatch):
    from selma_ray.config import ConfigError
    from selma_ray.experts.stage import FAULT_DRILL_ENV, fault_drill

    with pytest.raises(ConfigError, match="fail_at_step"):
        load_config("tiny", ["experts.fail_at_step={counting: 3}"])
    monkeypatch.setenv(FAULT_DRILL_ENV, "counting:3, everyday_scenes:5")
    assert fault_drill() == {"counting": 3, "everyday_scenes": 5}
    monkeypatch.setenv(FAULT_DRILL_ENV, "counting")
    with pytest.raises(ValueError, match="skill:step"):
        fault_drill()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["experts.cache_latents=true", "experts.crop=random"], "crop=random"),
        (["experts.cache_latents=true", "experts.train_text_encoder=true"], "train_text_encoder"),
        (["experts.validation_fraction=0"], "select=best needs a validation split"),
        (["experts.validation_count=0"], "select=best needs a validation split"),
        (["experts.select=sometimes"], "select"),
    ],
)
def test_bad_experts_settings_say_what_to_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_select_last_works_without_validation():
    cfg = load_config("tiny", ["experts.validation_fraction=0", "experts.select=last"])
    assert cfg.experts.select == "last"
