"""Run the whole SELMA pipeline: skill prompts -> images -> experts -> merge -> Serve.

    python jobs/full_pipeline.py                      # embedded default (tiny preset)
    python jobs/full_pipeline.py --config sd14 run.dir=s3://bucket/runs/sd14 prompts.per_skill=200
    ray job submit --working-dir . -- python jobs/full_pipeline.py --config sdxl

Connects to the Ray cluster given by --address or RAY_ADDRESS (or one started with
`ray start --head` on this machine); otherwise starts a local one.
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from selma_ray.config import DEFAULT_PRESET

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--config",
        "-c",
        default=DEFAULT_PRESET,
        help="preset name (tiny, sd14, sd2, sdxl, weak_to_strong) or a YAML file of your own, "
        "layered on its base: (default: tiny)",
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--address", default=None, help="Ray cluster address (default: auto)")
    serve_group = p.add_mutually_exclusive_group()
    serve_group.add_argument(
        "--serve",
        dest="deploy",
        action="store_true",
        default=None,
        help="deploy the images API at the end (default: serve.deploy)",
    )
    serve_group.add_argument("--no-serve", dest="deploy", action="store_false")
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the stage plan (models, resolutions, resources) and which stages of the run "
        "directory would run and why; runs nothing",
    )
    p.add_argument(
        "--experiment",
        choices=["table1", "table2", "table4", "figure1"],
        default=None,
        help="run every arm of one of the paper's comparisons and write "
        "<run.dir>/experiment/<name>/results.md, results.json and report.html "
        "(with --plan: its arms, what they share, GPU-hours and peak GPUs)",
    )
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def print_summary(summary: dict) -> None:
    stages = summary["stages"]
    print("\n=== selma_ray run summary ===")
    print(f"run directory: {summary['run_dir']}")
    for name, info in stages.items():
        state = "skipped (already done)" if info["skipped"] else "done"
        print(f"  {name:<8} {info['seconds']:>7.1f}s  {state}")
    print(f"  {'total':<8} {sum(i['seconds'] for i in stages.values()):>7.1f}s")
    prompts = stages.get("prompts", {}).get("result", {}).get("stats", {})
    if prompts:
        head = ("skill", "accepted", "cands", "rate", "maxRL", "dist-2", "words")
        print("  {:<22}{:>9}{:>7}{:>7}{:>7}{:>8}{:>7}".format(*head))
    for skill, st in prompts.items():
        rouge = st.get("mean_max_rouge")
        print(
            f"  {skill:<22}{st['accepted']:>9}{st['candidates']:>7}{st['acceptance_rate']:>7.0%}"
            f"{rouge if rouge is not None else float('nan'):>7.2f}{st['distinct_2']:>8.2f}"
            f"{st['mean_words']:>7.1f}"
        )
    images = stages.get("images", {}).get("result", {})
    if images.get("total"):
        print(f"  images: {images['total']} at {images.get('path')}")
    for skill, metrics in stages.get("experts", {}).get("result", {}).get("experts", {}).items():
        val = metrics.get("best_val_loss")
        print(
            f"  expert[{skill}]: step {metrics.get('step')}, "
            f"final train loss {metrics.get('final_loss', metrics.get('loss', 0)):.4f}, "
            f"best val loss {val if val is not None else float('nan'):.4f}, "
            f"exported step {metrics.get('selected_step', metrics.get('step'))}"
        )
    merged = stages.get("merge", {}).get("result", {})
    if merged.get("adapter"):
        print(f"  merged ({merged.get('method')}): {merged['adapter']}")
    print_eval(stages.get("eval", {}).get("result", {}))
    if summary.get("endpoint"):
        url = summary["endpoint"]
        print(f"\nServe is answering at {url}  (adapters: {url}/v1/adapters, docs: {url}/docs)")
        print(
            f"  curl -s {url}/v1/images/generations -H 'Content-Type: application/json' "
            "-H 'Accept: image/png' "
            '-d \'{"prompt": "two red apples on a table", "adapter": "merged"}\' '
            "-o image.png"
        )


def print_eval(result: dict) -> None:
    """The eval headline: each variant's mean per metric, and its paired change vs base."""
    table = result.get("headline") or {}
    if not table:
        return
    from selma_ray.eval.scorers import LABELS

    metrics = list(next(iter(table.values())))
    labels = {**LABELS, **(result.get("labels") or {})}  # e.g. "DSG-style" for LLM questions
    print("  eval (mean, change vs base):")
    print("  {:<22}".format("variant") + "".join(f"{labels.get(m, m):>20}" for m in metrics))
    for variant, row in table.items():
        cells = []
        for m in metrics:
            cell = row.get(m) or {}
            mean, delta = cell.get("mean"), cell.get("delta")
            text = "–" if mean is None else f"{mean:.3g}"
            text += "" if delta is None else f" ({delta:+.2g})"
            cells.append(f"{text:>20}")
        print(f"  {variant:<22}" + "".join(cells))
    for name, reason in (result.get("skipped_scorers") or {}).items():
        print(f"  eval: {name} skipped: {reason}")
    for name, average in (result.get("averages") or {}).items():
        print(f"  eval: {labels.get(name, name)} headline = per-{average} average")
    for note in result.get("comparability") or []:
        print(f"  eval: {note}")
    if result.get("report"):
        print(f"  eval report: {result['report']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from selma_ray.config import ConfigError, config_sources, load_config
    from selma_ray.core.logs import setup_logging

    setup_logging(args.log_level)

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from selma_ray.plan import config_problems

    problems = config_problems(cfg)  # paths and names: before any work, --plan included
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2
    experiment = None
    if args.experiment:
        from selma_ray.experiments import design

        try:
            experiment = design.build(args.experiment, cfg)
        except (ValueError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.plan and experiment is not None:
        print(f"config: {config_sources(args.config, args.overrides)}")
        print(design.format_plan(design.plan(experiment)))
        return 0
    if args.plan:
        from selma_ray.pipeline import drift_warning, format_status, plan_status
        from selma_ray.plan import build_plan, format_plan

        print(f"config: {config_sources(args.config, args.overrides)}")
        print(format_plan(build_plan(cfg)))
        drift = drift_warning(cfg)
        if drift:
            print(f"  ! {drift}")
        print(format_status(plan_status(cfg)))
        return 0

    import os

    from selma_ray.core.storage import StorageError, is_local
    from selma_ray.pipeline import open_run, run_pipeline

    try:  # bad storage fails here, before Ray starts or any GPU time is spent
        open_run(cfg, check=True)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    relative = is_local(cfg.run.dir) and not os.path.isabs(cfg.run.dir)
    if relative and "runtime_resources" in os.getcwd():
        print(
            f"warning: run.dir={cfg.run.dir!r} is relative and this job runs in Ray's copy of "
            "the working dir, so outputs land in a temporary folder; pass an absolute (shared) "
            "path or object storage, e.g. run.dir=s3://my-bucket/runs/tiny",
            file=sys.stderr,
        )

    started_here = connect(args.address)
    if experiment is not None:
        from selma_ray.experiments.results import markdown, run_experiment

        print(markdown(run_experiment(experiment, cfg, run_pipeline)))
        return 0
    try:
        summary = run_pipeline(cfg, deploy=args.deploy)
    except StorageError as e:  # e.g. a local run.dir that some nodes cannot see
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    if started_here and summary.get("endpoint"):
        # Serve lives only as long as the Ray cluster this script started.
        print(
            "\nRay was started by this script, so Serve stops when it exits. Press Ctrl-C to "
            "stop (or start a head first with `ray start --head`, as `make run` does)."
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def connect(address: str | None) -> bool:
    """Join the given (or running) Ray cluster; start a local one if there is none."""
    import ray

    if address:
        ray.init(address=address)
        return False
    try:
        ray.init(address="auto")
        return False
    except ConnectionError:
        ray.init()
        return True


if __name__ == "__main__":
    sys.exit(main())
