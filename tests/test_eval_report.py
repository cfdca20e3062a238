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
    # one row per variant: mean [CI], prompts, paired change [CI] and win rate, per category
    assert (
        "<tr><th>merged</th><td>21.5 <small>[21.4, 21.6]</small></td><td>4</td>"
        "<td>1.5 <small>[1.45, 1.55]</small> <small>win 75%</small></td>"
        "<td>22 <small>[21.8, 22.2]</small></td><td>21 <small>[20.8, 21.2]</small></td></tr>"
    ) in html
    assert "<th>counting</th><th>scenes</th></tr><tr><th>base</th>" in html
    assert "<td>–</td>" in html.split("<tr><th>base</th>")[1].split("</tr>")[0]  # no delta
    assert "<tr><th>base</th><td>50% <small>of 8</small></td></tr>" in html  # DSG answers
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


def _dsg_doc(label: str, protocol: str, counts: dict[str, dict[str, int]], fallback: list[str]):
    entries = {v: {**_entry(0.5, {"counting": 0.5}), "questions": c} for v, c in counts.items()}
    return {
        **DOC,
        "scorers": {
            "dsg": {
                "label": label,
                "protocol": protocol,
                "status": "ok",
                "reason": None,
                "model_ids": {"vqa_model": "tiny-vqa"},
                "holistic_fallback_prompts": fallback,
            }
        },
        "metrics": {"dsg": entries},
    }


def _counts(llm: int = 0, holistic: int = 0, file: int = 0) -> dict[str, int]:
    return {
        "llm_written": llm,
        "holistic_fallback": holistic,
        "from_file": file,
        "no_questions": 0,
        "prompts": llm + holistic + file,
    }


def test_dsg_section_names_the_protocol_and_counts_question_sources():
    html = render_html(
        _dsg_doc(
            "DSG-style",
            "questions written by smollm2 in the DSG format",
            {"base": _counts(llm=4), "merged": _counts(llm=3, holistic=1)},
            ["ct2"],
        ),
        [],
    )
    assert "<h2>DSG-style</h2><p><small>protocol: questions written by smollm2" in html
    assert "<th>questions (prompts scored)</th></tr>" in html
    assert "<td>4 LLM-written · 0 holistic fallback</td></tr>" in html
    assert "<td>3 LLM-written · <b class='warn'>1 holistic fallback</b></td></tr>" in html
    assert "<p class='note'>1 prompt(s) got no parseable LLM-written questions" in html
    assert 'alt="DSG-style chart"' in html
    assert "<h3>DSG-style answers by question category" in html

    published = render_html(
        _dsg_doc("DSG", "questions read from dsg1k.csv", {"base": _counts(file=4)}, []), []
    )
    assert "<h2>DSG</h2>" in published and "<td>4 from file</td></tr>" in published
    assert "holistic" not in published and "class='note'>" not in published.split("<h2>DSG")[1]
