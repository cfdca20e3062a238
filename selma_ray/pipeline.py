"""Runs the SELMA stages in order on a Ray cluster and (optionally) deploys Serve."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import yaml

from selma_ray.config import SelmaConfig
from selma_ray.evaluate import run_eval
from selma_ray.experts import run_experts
from selma_ray.images import run_images
from selma_ray.merge import run_merge
from selma_ray.prompts import run_prompts
from selma_ray.rundir import RunDir, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

STAGES: list[tuple[str, Callable[[SelmaConfig, RunDir], dict[str, Any]]]] = [
    ("prompts", run_prompts),
    ("images", run_images),
    ("experts", run_experts),
    ("merge", run_merge),
    ("eval", run_eval),
]


def deploy_serve(cfg: SelmaConfig, run: RunDir) -> str:
    """Deploy the images API for this run; returns its base URL."""
    from ray import serve

    from serve.app import build_app

    serve_config = {
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
        "applications": [
            {
                "name": cfg.serve.app_name,
                "route_prefix": "/",
                "import_path": "serve.app:build_app",
                "args": {"run_dir": str(run.root)},
            }
        ],
    }
    atomic_write_text(run.path("serve.yaml"), yaml.safe_dump(serve_config, sort_keys=False))
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(
        build_app({"run_dir": str(run.root)}),
        name=cfg.serve.app_name,
        route_prefix="/",
        blocking=False,
    )
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def run_pipeline(cfg: SelmaConfig, deploy: bool | None = None) -> dict[str, Any]:
    """Run every stage (skipping finished ones); returns the run summary."""
    run = RunDir(cfg.run.dir)
    atomic_write_text(run.path("config.yaml"), cfg.to_yaml())
    summary: dict[str, Any] = {"run_dir": str(run.root), "stages": {}}
    for name, stage in STAGES:
        log.info("=== stage %s ===", name)
        start = time.perf_counter()
        result = stage(cfg, run)
        seconds = time.perf_counter() - start
        summary["stages"][name] = {
            "seconds": round(seconds, 1),
            "skipped": bool(result.get("skipped")),
            "result": result,
        }
        log.info(
            "=== stage %s %s in %.1fs ===",
            name,
            "skipped" if result.get("skipped") else "done",
            seconds,
        )
    if cfg.serve.deploy if deploy is None else deploy:
        start = time.perf_counter()
        summary["endpoint"] = deploy_serve(cfg, run)
        summary["stages"]["serve"] = {
            "seconds": round(time.perf_counter() - start, 1),
            "skipped": False,
            "result": {"url": summary["endpoint"]},
        }
    atomic_write_json(run.path("summary.json"), summary)
    return summary
