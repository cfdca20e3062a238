"""Running an experiment's data runs, and its results table beside the paper's figures."""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Callable
from typing import Any

from selma_ray.config import SelmaConfig
from selma_ray.core.rundir import RunDir
from selma_ray.eval import LABELS
from selma_ray.experiments.design import (
    GENERATED,
    PAPER_COLUMNS,
    Experiment,
    paper_numbers,
    paper_row,
)

log = logging.getLogger(__name__)
FOLDER = "experiment"


def run_experiment(
    exp: Experiment,
    cfg: SelmaConfig,
    run_pipeline: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """Run every data run of ``exp`` through ``run_pipeline`` (stages already done in a run
    directory are skipped by lineage), then write the results beside the run ``cfg`` names."""
    summaries = {}
    for source, data_cfg in exp.runs.items():
        log.info("=== experiment %s: data run %r in %s ===", exp.name, source, data_cfg.run.dir)
        summaries[source] = run_pipeline(data_cfg, deploy=False)
    from selma_ray.pipeline import open_run

    metrics = {
        source: json.loads(open_run(c).read_text("eval", "metrics.json"))
        for source, c in exp.runs.items()
    }
    doc = results(exp, metrics)
    doc["stages"] = {
        source: {name: not info["skipped"] for name, info in s["stages"].items()}
        for source, s in summaries.items()
    }
    write(open_run(cfg), exp, doc)
    return doc


def results(exp: Experiment, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One row per arm: mean and 95% CI per scorer (from its data run's eval), and the paper's
    figure for the same setting where the paper reports one."""
    table = paper_numbers()["tables"][exp.name]
    rows = []
    scored: list[str] = []
    for arm in exp.arms:
        doc = metrics[arm.data if arm.adapter != "base" else _base_run(exp)]
        ours = {}
        for scorer, by_variant in (doc.get("metrics") or {}).items():
            entry = by_variant.get(arm.adapter)
            if entry is not None:
                ours[scorer] = {"mean": entry["mean"], "ci": entry["ci"]}
                scored += [scorer] if scorer not in scored else []
        rows.append(
            {
                "arm": arm.name,
                "adapter": arm.adapter,
                "data": arm.data,
                "ours": ours,
                "paper": paper_row(exp.name, arm.paper),
            }
        )
    columns = [c for c in PAPER_COLUMNS if c in scored] + [
        c for c in scored if c not in PAPER_COLUMNS
    ]
    columns += [c for c in PAPER_COLUMNS if c not in columns and any(r["paper"] for r in rows)]
    return {
        "experiment": exp.name,
        "title": exp.title,
        "columns": columns,
        "rows": rows,
        "paper": {
            "source": paper_numbers()["source"],
            "checked": table.get("checked", False),
            "note": table.get("note", ""),
        },
        "notes": exp.notes,
    }


def _base_run(exp: Experiment) -> str:
    return GENERATED if GENERATED in exp.runs else next(iter(exp.runs))


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None or not math.isfinite(entry["mean"]):
        return "–"
    lo, hi = entry["ci"]
    return f"{entry['mean']:.3g} [{lo:.3g}, {hi:.3g}]"


def _paper_cell(row: dict[str, Any] | None, column: str) -> str:
    value = (row or {}).get(column)
    return "–" if value is None else f"{value:g}"


def markdown(doc: dict[str, Any]) -> str:
    """``results.md``: ours (mean [95% CI]) and the paper's figure, per column."""
    cols = doc["columns"]
    head = ["arm", "data"] + [f"{LABELS.get(c, c)} (ours)" for c in cols]
    paper_cols = [c for c in cols if c in PAPER_COLUMNS]  # the paper reports no others
    head += [f"{LABELS.get(c, c)} (paper)" for c in paper_cols]
    lines = [f"# {doc['title']}", "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    for row in doc["rows"]:
        cells = [row["arm"], row["data"]] + [_cell(row["ours"].get(c)) for c in cols]
        cells += [_paper_cell(row["paper"], c) for c in paper_cols]
        lines.append("| " + " | ".join(cells) + " |")
    paper = doc["paper"]
    lines += [
        "",
        f"Ours: mean over prompts and seeds, [95% bootstrap CI]. Paper: {paper['source']}; "
        "DSG and TIFA in %, as published. "
        + (
            "Checked against the paper."
            if paper["checked"]
            else "Not yet checked against the paper's own tables."
        ),
    ]
    if paper["note"]:
        lines.append(f"Paper figures: {paper['note']}")
    lines += [f"Note: {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def report_html(doc: dict[str, Any]) -> str:
    """``report.html``: the results table and one bar chart per metric (ours, 95% CI)."""
    from selma_ray.eval.report import _img, bar_chart

    cols = doc["columns"]
    head = "".join(f"<th>{html.escape(LABELS.get(c, c))} (ours / paper)</th>" for c in cols)
    body = []
    for row in doc["rows"]:
        cells = "".join(
            f"<td>{html.escape(_cell(row['ours'].get(c)))} / "
            f"{html.escape(_paper_cell(row['paper'], c))}</td>"
            for c in cols
        )
        body.append(f"<tr><td>{html.escape(row['arm'])}</td><td>{row['data']}</td>{cells}</tr>")
    charts = []
    for c in cols:
        entries = {r["arm"]: r["ours"][c] for r in doc["rows"] if c in r["ours"]}
        if entries:
            charts.append(_img(bar_chart(LABELS.get(c, c), entries), f"{c} by arm"))
    return (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(doc['title'])}</title>"
        f"<h1>{html.escape(doc['title'])}</h1>"
        f"<table border=1 cellpadding=4><tr><th>arm</th><th>data</th>{head}</tr>"
        + "".join(body)
        + "</table>"
        + f"<p>{html.escape(markdown(doc).splitlines()[-1])}</p>"
        + "".join(f"<div>{c}</div>" for c in charts)
    )


def write(run: RunDir, exp: Experiment, doc: dict[str, Any]) -> None:
    """results.json, results.md and report.html under ``experiment/<name>/``."""
    run.write_text(json.dumps(doc, indent=2, default=str) + "\n", FOLDER, exp.name, "results.json")
    run.write_text(markdown(doc), FOLDER, exp.name, "results.md")
    run.write_text(report_html(doc), FOLDER, exp.name, "report.html")
    log.info("experiment %s: results in %s", exp.name, run.url(FOLDER, exp.name, "results.md"))
