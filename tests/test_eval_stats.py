"""Eval aggregation: bootstrap CI width, paired differences, per-category means."""

from __future__ import annotations

import math

import numpy as np
import pytest

from selma_ray.eval.stats import aggregate, bootstrap_ci, paired, summarize


@pytest.mark.parametrize("sigma,n", [(1.0, 400), (3.0, 200)])
def test_bootstrap_ci_width_matches_normal_theory(sigma, n):
    x = np.random.default_rng(1).normal(5.0, sigma, size=n)
    lo, hi = bootstrap_ci(x, n_boot=2000, seed=0)
    expected = 2 * 1.96 * sigma / math.sqrt(n)
    assert hi - lo == pytest.approx(expected, rel=0.15)
    assert lo < x.mean() < hi


def test_bootstrap_ci_is_deterministic_and_handles_tiny_inputs():
    x = [1.0, 2.0, 4.0, 8.0]
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci([2.5]) == (2.5, 2.5)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert summarize([1.0, 3.0])["mean"] == 2.0


def test_paired_difference_removes_prompt_spread():
    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 10, size=50)  # large spread between prompts
    base = {f"p{i}": float(v) for i, v in enumerate(prompt_effect)}
    better = {k: v + 0.5 + rng.normal(0, 0.1) for k, v in base.items()}
    out = paired(better, base, n_boot=1000)
    assert out["mean"] == pytest.approx(0.5, abs=0.05)
    assert out["ci"][0] > 0.4 and out["ci"][1] < 0.6  # unpaired CIs would overlap widely
    assert out["win_rate"] == 1.0 and out["n"] == 50


def test_aggregate_averages_seeds_then_prompts_per_variant_and_category():
    rows = []
    values = {"base": {"a": [1, 3], "b": [4, 4], "c": [0, 0]}, "merged": {"a": [3, 3], "b": [5, 5]}}
    for variant, by_prompt in values.items():
        for pid, seeds in by_prompt.items():
            for k, v in enumerate(seeds):
                rows.append({"variant": variant, "prompt_id": pid, "seed_index": k, "score_x": v})
    rows.append({"variant": "merged", "prompt_id": "c", "seed_index": 0, "score_x": float("nan")})
    cats = {"a": "counting", "b": "counting", "c": "scenes"}
    out = aggregate(rows, ["x"], cats, n_boot=200)["x"]
    assert out["base"]["mean"] == pytest.approx((2 + 4 + 0) / 3)
    assert out["base"]["by_category"]["counting"]["mean"] == pytest.approx(3.0)
    assert out["base"]["by_category"]["scenes"]["n"] == 1
    assert "vs_base" not in out["base"]
    merged = out["merged"]
    assert merged["n"] == 2  # the NaN score is skipped
    assert merged["vs_base"]["mean"] == pytest.approx(((3 - 2) + (5 - 4)) / 2)
    assert merged["vs_base"]["n"] == 2 and merged["vs_base"]["win_rate"] == 1.0
    assert merged["vs_base_by_category"]["counting"]["mean"] == pytest.approx(1.0)
