"""Aggregation of per-image scores: means with bootstrap 95% CIs and paired differences.

The unit is the prompt: scores of several seeds of one prompt are averaged first, then
prompts are resampled. Differences against ``base`` are paired over the same prompts (and
the same seeds), which removes the prompt-to-prompt spread from the comparison.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

LEVEL = 0.95


def bootstrap_ci(values: Any, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of the mean; (nan, nan) without data, (x, x) for one value."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(lo), float(hi)


def summarize(values: Any, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean()) if x.size else float("nan")
    return {"mean": mean, "ci": list(bootstrap_ci(x, n_boot, seed)), "n": int(x.size)}


def paired(
    variant: dict[str, float], base: dict[str, float], n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Mean of (variant - base) over the prompts both have, its CI, and the win rate."""
    common = sorted(set(variant) & set(base))
    diff = np.array([variant[k] - base[k] for k in common], dtype=np.float64)
    out = summarize(diff, n_boot, seed)
    out["win_rate"] = float((diff > 0).mean()) if diff.size else float("nan")
    return out


def per_prompt(rows: list[dict[str, Any]], column: str) -> dict[str, dict[str, float]]:
    """variant -> prompt id -> mean of ``column`` over that prompt's seeds (NaNs skipped)."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        value = r.get(column)
        if value is not None and np.isfinite(value):
            acc[r["variant"]][r["prompt_id"]].append(float(value))
    return {v: {p: float(np.mean(s)) for p, s in d.items()} for v, d in acc.items()}


def aggregate(
    rows: list[dict[str, Any]],
    metrics: list[str],
    categories: dict[str, str],
    baseline: str = "base",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """metric -> variant -> {mean, ci, n, by_category: {cat: {...}}, vs_base: {...}}.

    ``rows`` hold ``variant``, ``prompt_id`` and one ``score_<metric>`` column per metric;
    ``categories`` maps prompt id -> category ("" = none).
    """
    out: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        table = per_prompt(rows, f"score_{metric}")
        base = table.get(baseline, {})
        out[metric] = {}
        for variant, scores in table.items():
            entry = summarize(list(scores.values()), n_boot, seed)
            cats: dict[str, list[float]] = defaultdict(list)
            for pid, value in scores.items():
                cats[categories.get(pid, "")].append(value)
            entry["by_category"] = {
                c: summarize(v, n_boot, seed) for c, v in sorted(cats.items()) if c
            }
            if variant != baseline and base:
                entry["vs_base"] = paired(scores, base, n_boot, seed)
                entry["vs_base_by_category"] = {
                    c: paired(
                        {p: s for p, s in scores.items() if categories.get(p, "") == c},
                        base,
                        n_boot,
                        seed,
                    )
                    for c in entry["by_category"]
                }
            out[metric][variant] = entry
    return out
