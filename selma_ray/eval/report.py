"""The eval report: one self-contained HTML file (tables, bar charts, image grids, model ids).

Every image is embedded as a base64 PNG, so the file can be mailed or opened anywhere.
Charts are drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

from selma_ray.eval.scorers import LABELS


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _ci(entry: dict[str, Any]) -> str:
    lo, hi = entry["ci"]
    return f"{_fmt(entry['mean'])} <small>[{_fmt(lo)}, {_fmt(hi)}]</small>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def bar_chart(label: str, entries: dict[str, dict[str, Any]]) -> bytes:
    """Mean per variant (and per category when there are categories) with 95% CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    variants = list(entries)
    cats = sorted({c for e in entries.values() for c in e.get("by_category", {})})
    groups = ["all", *cats]
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(min(11.0, 2.0 + 0.22 * len(groups) * len(variants)), 3.2))
    for i, v in enumerate(variants):
        stats = [entries[v]] + [entries[v].get("by_category", {}).get(c) for c in groups[1:]]
        means = [s["mean"] if s else np.nan for s in stats]
        err = np.array(
            [
                [s["mean"] - s["ci"][0], s["ci"][1] - s["mean"]] if s else [np.nan, np.nan]
                for s in stats
            ]
        ).T
        xs = np.arange(len(groups)) + (i - (len(variants) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=err, capsize=2, label=v)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylabel(label)
    ax.set_title(f"{label}: mean and 95% bootstrap CI")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _figure_png(fig)


def image_grid(rows: list[tuple[str, dict[str, bytes]]], variants: list[str]) -> bytes:
    """One row per prompt, one column per variant (same seed across the row)."""
    from PIL import Image, ImageDraw

    cell, head, side = 128, 18, 220
    grid = Image.new("RGB", (side + cell * len(variants), head + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, v in enumerate(variants):
        draw.text((side + j * cell + 4, 3), v[:20], fill="black")
    for i, (prompt, images) in enumerate(rows):
        y = head + i * cell
        words, lines = prompt.split(), [""]
        for w in words:
            if len(lines[-1]) + len(w) > 34 and len(lines) < 8:
                lines.append("")
            lines[-1] = f"{lines[-1]} {w}".strip()
        draw.multiline_text((4, y + 4), "\n".join(lines), fill="black")
        for j, v in enumerate(variants):
            if v in images:
                img = Image.open(io.BytesIO(images[v])).convert("RGB").resize((cell, cell))
                grid.paste(img, (side + j * cell, y))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def _question_counts(counts: dict[str, int] | None) -> str:
    """One table cell: where the variant's scored prompts got their DSG questions (the
    holistic fallback count is always shown for LLM-written questions, and marked when > 0)."""
    if not counts:
        return "<td>–</td>"
    llm = counts.get("llm_written", 0) + counts.get("holistic_fallback", 0)
    parts = []
    for key, text, shown in (
        ("llm_written", "LLM-written", llm > 0),
        ("holistic_fallback", "holistic fallback", llm > 0),
        ("from_file", "from file", counts.get("from_file", 0) > 0),
        ("no_questions", "without questions", counts.get("no_questions", 0) > 0),
    ):
        if not shown:
            continue
        n = counts.get(key, 0)
        warn = key in ("holistic_fallback", "no_questions") and n > 0
        parts.append(f"<b class='warn'>{n} {text}</b>" if warn else f"{n} {text}")
    return f"<td>{' · '.join(parts) or '–'}</td>"


_AVERAGES = {"question": "per-question", "prompt": "per-prompt"}


def _averages_line(entries: dict[str, dict[str, Any]]) -> str:
    """Which DSG average is the headline (the mean, CI and Δ columns), and that both are shown."""
    heads = {e.get("average") for e in entries.values() if e.get("averages")}
    if not heads:
        return ""
    head = _AVERAGES.get(next(iter(heads)), "?")
    return (
        f"<p><small>headline: the {head} average (mean, CI and Δ columns); both averages are "
        "in the columns “per-question avg” (mean over all questions of all prompts, as "
        "SELMA's DSG evaluation.py) and “per-prompt avg” (mean of per-prompt scores)"
        "</small></p>"
    )


def _protocol_line(scorer: dict[str, Any]) -> str:
    if not scorer.get("protocol"):
        return ""
    return f"<p><small>protocol: {html.escape(scorer['protocol'])}</small></p>"


def _dsg_notes(scorer: dict[str, Any], entries: dict[str, dict[str, Any]] | None = None) -> str:
    """The DSG protocol line, which average is the headline and, when some prompts got the
    holistic fallback, a warning."""
    out = [_protocol_line(scorer), _averages_line(entries or {})]
    fallback = scorer.get("holistic_fallback_prompts") or []
    if fallback:
        shown = ", ".join(html.escape(str(p)) for p in fallback[:20])
        more = f" and {len(fallback) - 20} more" if len(fallback) > 20 else ""
        out.append(
            f"<p class='note'>{len(fallback)} prompt(s) got no parseable LLM-written questions "
            "and were scored with one holistic question (“Does the image show …?”) instead "
            f"(per variant: column “questions”): {shown}{more}.</p>"
        )
    return "".join(out)


def _metric_section(
    metric: str, entries: dict[str, dict[str, Any]], scorer: dict[str, Any] | None = None
) -> str:
    scorer = scorer or {}
    label = scorer.get("label") or LABELS.get(metric, metric)
    cats = sorted({c for e in entries.values() for c in e.get("by_category", {})})
    counts = any("questions" in e for e in entries.values())
    averages = any("averages" in e for e in entries.values())
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cats)
    head += "<th>per-question avg</th><th>per-prompt avg</th>" if averages else ""
    head += "<th>questions (prompts scored)</th>" if counts else ""
    rows = []
    for v, e in entries.items():
        vs = e.get("vs_base")
        delta = (
            f"{_ci(vs)} <small>win {vs['win_rate']:.0%}</small>"
            if vs and math.isfinite(vs["win_rate"])
            else "–"
        )
        by = e.get("by_category", {})
        cells = "".join(f"<td>{_ci(by[c]) if c in by else '–'}</td>" for c in cats)
        if averages:
            avg = e.get("averages") or {}
            cells += "".join(
                f"<td>{_ci(avg[k]) if k in avg else '–'}</td>" for k in ("question", "prompt")
            )
        cells += _question_counts(e.get("questions")) if counts else ""
        rows.append(
            f"<tr><th>{html.escape(v)}</th><td>{_ci(e)}</td><td>{e['n']}</td>"
            f"<td>{delta}</td>{cells}</tr>"
        )
    return (
        f"<h2>{html.escape(label)}</h2>"
        + (_dsg_notes(scorer, entries) if metric == "dsg" else _protocol_line(scorer))
        + "<table><tr><th>variant</th><th>mean [95% CI]</th><th>prompts</th>"
        f"<th>Δ vs base [95% CI], paired</th>{head}</tr>{''.join(rows)}</table>"
        f"<p>{_img(bar_chart(label, entries), label + ' chart')}</p>"
    )


def _question_section(
    accuracy: dict[str, dict[str, dict[str, float]]],
    label: str = LABELS["dsg"],
    zeroing: bool = True,
) -> str:
    """VQA answers per question category (DSG: before dependency zeroing; TIFA: element type)."""
    cats = sorted({c for v in accuracy.values() for c in v})
    if not cats:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cats)
    rows = "".join(
        f"<tr><th>{html.escape(v)}</th>"
        + "".join(
            f"<td>{by[c]['accuracy']:.0%} <small>of {by[c]['n']}</small></td>"
            if c in by
            else "<td>–</td>"
            for c in cats
        )
        + "</tr>"
        for v, by in accuracy.items()
    )
    what = "correct share, before dependency zeroing" if zeroing else "correct share"
    return (
        f"<h3>{html.escape(label)} answers by question category ({what})</h3>"
        f"<table><tr><th>variant</th>{head}</tr>{rows}</table>"
    )


def _benchmark_notes(benchmark: dict[str, Any] | None) -> str:
    """Why the faithfulness numbers are (or are not) comparable with the paper's."""
    notes = (benchmark or {}).get("notes") or []
    if not notes:
        return ""
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"<div class='note'><b>Comparability with the paper</b><ul>{items}</ul></div>"


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:left}.note{background:#fff3cd;padding:.8em;border:1px solid #e0c060}
small{color:#666}img{max-width:100%}.warn{color:#a15c00}"""


def render_html(doc: dict[str, Any], grid_rows: list[tuple[str, dict[str, bytes]]]) -> str:
    """The report for ``doc`` (the metrics.json content) with image grids of ``grid_rows``."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>selma_ray eval</title>",
        f"<style>{_STYLE}</style></head><body><h1>selma_ray evaluation</h1>",
        f"<p>run: <code>{html.escape(doc['run_dir'])}</code> · {doc['prompts']['count']} "
        f"held-out prompts from <code>{html.escape(doc['prompts']['source'])}</code> · "
        f"{doc['seeds_per_prompt']} seed(s) per prompt, the same seeds for every variant · "
        f"{doc['steps']} steps</p>",
    ]
    if doc.get("note"):
        parts.append(f"<p class='note'>{html.escape(doc['note'])}</p>")
    parts.append(_benchmark_notes(doc.get("benchmark")))
    models = [("base model", doc["models"]["base"]), ("questions", doc["models"]["questions"])]
    for s in doc["scorers"].values():
        ids = ", ".join(f"{k}={v}" for k, v in s["model_ids"].items())
        state = "ok" if s["status"] == "ok" else f"skipped: {s['reason']}"
        models.append((f"{s['label']}", f"{ids} ({state})"))
    parts.append("<h2>Models</h2><table>")
    parts += [
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in models
    ]
    parts.append("</table>")
    for metric, entries in doc["metrics"].items():
        parts.append(_metric_section(metric, entries, doc["scorers"].get(metric)))
    dsg_label = doc["scorers"].get("dsg", {}).get("label") or LABELS["dsg"]
    parts.append(_question_section(doc.get("dsg_questions") or {}, dsg_label))
    parts.append(_question_section(doc.get("tifa_questions") or {}, LABELS["tifa"], False))
    if grid_rows:
        parts.append("<h2>Same prompt, same seed, every variant</h2>")
        parts.append(f"<p>{_img(image_grid(grid_rows, doc['variants']), 'image grid')}</p>")
    dropped = doc["prompts"].get("dropped_overlap", [])
    if dropped:
        parts.append(
            f"<p>{len(dropped)} eval prompt(s) dropped because they are training prompts.</p>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
