"""The HTML report from a handmade metrics document: tables, charts, grid, notes."""

from __future__ import annotations

import base64
import io
import re

from selma_ray.eval.report import image_grid, render_html


def _png(color: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def _entry(mean: float, cats: dict[str, float], delta: float | None = None) -> dict:
    e = {
        "mean": mean,
        "ci": [mean - 0.1, mean + 0.1],
        "n": 4,
        "by_category": {c: {"mean": m, "ci": [m - 0.2, m + 0.2], "n": 2} for c, m in cats.items()},
    }
    if delta is not None:
        e["vs_base"] = {"mean": delta, "ci": [delta - 0.05, delta + 0.05], "n": 4, "win_rate": 0.75}
    return e


DOC = {
    "run_dir": "/runs/x",
    "note": "tiny, randomly initialised models: plumbing only",
    "models": {"base": "tiny-sd", "questions": "written by smollm2-135m-instruct"},
    "scorers": {
        "clip": {
            "label": "CLIPScore",
            "status": "ok",
            "reason": None,
            "model_ids": {"model": "m1"},
        },
        "hps": {
            "label": "HPS v2",
            "status": "skipped",
            "reason": "package 'hpsv2' is not installed",
            "model_ids": {"version": "v2.1"},
        },
    },
    "prompts": {"source": "builtin:tiny_eval.csv", "count": 4, "dropped_overlap": ["a cat"]},
    "variants": ["base", "merged"],
    "seeds_per_prompt": 1,
    "steps": 10,
    "metrics": {
        "clip": {
            "base": _entry(20.0, {"counting": 19.0, "scenes": 21.0}),
            "merged": _entry(21.5, {"counting": 22.0, "scenes": 21.0}, delta=1.5),
        }
    },
    "dsg_questions": {"base": {"entity": {"accuracy": 0.5, "n": 8}}},
}


def test_report_is_self_contained_with_tables_charts_grid_and_notes():
    grid = [("two red apples", {"base": _png("red"), "merged": _png("blue")})]
    html = render_html(DOC, grid)
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert "plumbing only" in html and "skipped: package &#x27;hpsv2&#x27;" in html
    assert "m1" in html and "tiny-sd" in html and "smollm2" in html
    assert "+1.5" in html or "1.5 <small>" in html
    assert "win 75%" in html and "counting" in html and "entity" in html
    assert "1 eval prompt(s) dropped" in html
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(pngs) == 2  # one bar chart (one metric) and one grid
    assert all(base64.b64decode(p)[:4] == b"\x89PNG" for p in pngs)


def test_image_grid_has_a_column_per_variant_and_a_row_per_prompt():
    from PIL import Image

    rows = [("p1", {"base": _png("red"), "merged": _png("blue")}), ("p2", {"base": _png("red")})]
    grid = Image.open(io.BytesIO(image_grid(rows, ["base", "merged"])))
    side, cell, head = 220, 128, 18
    assert grid.size == (side + 2 * cell, head + 2 * cell)
    assert grid.getpixel((side + 10, head + 10)) == (255, 0, 0)
    assert grid.getpixel((side + cell + 10, head + 10)) == (0, 0, 255)
    assert grid.getpixel((side + cell + 10, head + cell + 10)) == (255, 255, 255)  # missing
