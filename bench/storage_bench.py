"""Benchmark STORAGE: the whole tiny pipeline with its run directory on local disk vs on S3.

Both arms run the five stages (``pipeline.ORDER``: prompts, images, experts, merge, eval)
through ``pipeline.run_stage``, each run in a fresh run directory: a new local temp folder, or
a new ``s3://selma/bench-<n>`` prefix on a local S3-compatible server (moto's
``ThreadedMotoServer``, real HTTP on loopback, ``selma_ray.testing.LocalS3``). Same config,
same seeds; only ``run.dir`` differs. One local Ray cluster (``--cpus`` CPUs) and one S3
server serve the whole bench. The timed figure of an arm is the wall time of the five stage
calls (``open_run``'s storage probe and the ``config.yaml`` that ``run_pipeline`` writes
first are outside). Order: a warm-up run of each arm (untimed, at a smaller size: the first
``--warmup-skills`` skills; it starts Ray's workers and fills the OS's file cache with the
models), then local, s3, s3, local.

The prompts come from ``selma_ray.testing.SeededLLM`` (a scripted stand-in) in both arms, not
from a vLLM engine: the bench measures storage, and the engine's start-up (about 40 s, the
same in both arms) would only dilute the ratio toward 1. For the same reason the eval stage
runs without LLM-written questions (``eval.questions=none``).

Every byte the S3 arm moves, from the driver and from every Ray worker (they all reach S3
through ``run.storage.endpoint``), goes through a counting TCP proxy (``_s3proxy.py``) in
front of the server; the bench prints the bytes uploaded and downloaded per stage (HTTP
headers included) from the last S3 run, the spread of those bytes over the two timed S3 runs
(Ray Tune syncs its experiment state on a timer and its result files hold timings, so the
experts stage's bytes vary by a few percent), and checks that the local arm moved none.

Goal (from the issue): the pipeline on S3 at most 1.3x the wall time of the pipeline on local
disk. A loopback server has no network latency or bandwidth limit, so this bounds what the
project's own storage code adds (copies through temp folders, probes, manifests, digests), not
what a remote bucket would cost.

    python bench/storage_bench.py [--skills 2] [--per-skill 4] [--cpus 2] [--warmup-skills 1]

Its last line of output (the headline ratio, from ``_common.ratio_line``)::

    RATIO storage s3 vs local: <x>x (goal <= 1.3)
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import abba, finish, header, progress, ratio_line, show
from _s3proxy import CountingProxy

SKILLS = ["counting", "everyday_scenes", "dense_detail", "user_prompts", "commonsense_defying"]
IMAGE_STEPS = 2
EXPERT_STEPS = 4
EVAL_PROMPTS = 4


def overrides(skills: list[str], per_skill: int) -> list[str]:
    """The config both arms share (those of tests/test_storage_pipeline.py)."""
    return [
        f"prompts.skills=[{', '.join(skills)}]",
        f"prompts.per_skill={per_skill}",
        "prompts.requests_per_round=2",
        f"images.steps={IMAGE_STEPS}",
        f"experts.max_steps={EXPERT_STEPS}",
        f"experts.checkpoint_every={EXPERT_STEPS // 2}",
        "eval.questions=none",
        f"eval.max_prompts={EVAL_PROMPTS}",
    ]


class Arms:
    """Runs the pipeline in fresh run directories and keeps per-stage walls and bytes."""

    def __init__(self, s3, proxy: CountingProxy, scratch: Path):
        self.s3 = s3
        self.proxy = proxy
        self.scratch = scratch
        self.runs = itertools.count()
        self.walls: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
        self.moved: dict[str, list[dict[str, tuple[int, int, int]]]] = {"local": [], "s3": []}
        self.s3_prefixes: list[str] = []

    def run(self, arm: str, shared: list[str], record: bool = True) -> float:
        """Seconds of the five stages of one pipeline run in a fresh ``arm`` run directory."""
        from selma_ray.config import load_config
        from selma_ray.pipeline import ORDER, open_run, run_stage
        from selma_ray.testing import SeededLLM

        n = next(self.runs)
        if arm == "s3":
            run_dir = self.s3.uri(f"bench-{n}")
            self.s3_prefixes.append(f"bench-{n}")
        else:
            run_dir = str(self.scratch / f"run-{n}")
        storage = [f"run.storage.endpoint={self.proxy.endpoint}", "run.storage.region=us-east-1"]
        cfg = load_config("tiny", [f"run.dir={run_dir}", *storage, *shared])
        run = open_run(cfg, check=True)
        run.write_text(cfg.to_yaml(), "config.yaml")  # as run_pipeline does; eval reads it
        walls: dict[str, float] = {}
        moved: dict[str, tuple[int, int, int]] = {}
        for name in ORDER:
            kwargs = {"generate": SeededLLM()} if name == "prompts" else {}
            (up0, down0), conns0 = self.proxy.snapshot(), self.proxy.connections
            start = time.perf_counter()
            result = run_stage(name, cfg, run, **kwargs)
            walls[name] = time.perf_counter() - start
            (up1, down1), conns1 = self.proxy.snapshot(), self.proxy.connections
            moved[name] = (up1 - up0, down1 - down0, conns1 - conns0)
            if result.get("skipped"):
                raise RuntimeError(f"{arm} run {n}: stage {name} skipped in a fresh run dir")
            progress(f"{arm} run {n}: {name} {walls[name]:.1f} s")
        if record:
            self.walls[arm].append(walls)
            self.moved[arm].append(moved)
        if arm == "local":
            shutil.rmtree(run_dir, ignore_errors=True)
        return sum(walls.values())

    def mean_wall(self, arm: str, stage: str) -> float:
        return sum(w[stage] for w in self.walls[arm]) / len(self.walls[arm])


def stored_bytes(s3, prefix: str) -> tuple[int, int]:
    """(objects, bytes) under ``prefix`` in the bucket, read past the proxy."""
    from pyarrow.fs import FileSelector, FileType

    sel = FileSelector(f"{s3.bucket}/{prefix}", recursive=True, allow_not_found=True)
    files = [i for i in s3.filesystem().get_file_info(sel) if i.type == FileType.File]
    return len(files), sum(i.size for i in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skills", type=int, default=2, choices=range(1, len(SKILLS) + 1))
    parser.add_argument("--per-skill", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--warmup-skills", type=int, default=1, choices=range(1, len(SKILLS) + 1))
    args = parser.parse_args()
    skills = SKILLS[: args.skills]

    import torch

    header(
        "STORAGE",
        "tiny pipeline, run dir on local disk vs on a local S3 server (moto over HTTP)",
        {
            "skills": ",".join(skills),
            "per_skill": args.per_skill,
            "image steps": IMAGE_STEPS,
            "expert steps": EXPERT_STEPS,
            "eval prompts": EVAL_PROMPTS,
            "prompts": "SeededLLM (no LLM engine)",
            "Ray CPUs": args.cpus,
            "warm-up": f"{args.warmup_skills} skill(s) per arm",
        },
        torch.get_num_threads(),
        ("torch", "ray", "diffusers", "pyarrow"),
    )
    import ray

    from selma_ray.core.logs import setup_logging
    from selma_ray.pipeline import ORDER
    from selma_ray.testing import LocalS3

    logging.basicConfig(level=logging.WARNING)
    setup_logging("WARNING")
    s3 = LocalS3().start()  # before Ray starts: its workers inherit the credentials
    proxy = CountingProxy("127.0.0.1", s3.port).start()
    scratch = Path(tempfile.mkdtemp(prefix="storage-bench-"))
    arms = Arms(s3, proxy, scratch)
    shared = overrides(skills, args.per_skill)
    small = overrides(skills[: args.warmup_skills], args.per_skill)
    # Ray Tune's tables and Ray's own warnings print to stdout (from this process and from
    # the Ray processes it starts, which inherit fd 1): send them to stderr while Ray runs.
    sys.stdout.flush()
    stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            result = abba(
                {"local": lambda: arms.run("local", shared), "s3": lambda: arms.run("s3", shared)},
                warmup={
                    "local": lambda: arms.run("local", small, record=False),
                    "s3": lambda: arms.run("s3", small, record=False),
                },
                log=progress,
            )
        finally:
            ray.shutdown()
        objects, stored = stored_bytes(s3, arms.s3_prefixes[-1])
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
        proxy.stop()
        s3.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    print(
        f"both arms, every run: the 5 stages of the tiny pipeline in a fresh run dir, "
        f"{len(skills)} skills x {args.per_skill} prompts; local = a temp folder, s3 = "
        "s3://selma/bench-<n> on moto behind a byte-counting proxy; wall of the 5 stages:"
    )
    ratios = show(result, ".1f", lambda m: m["s3"] / m["local"], "s3 vs local (time) by order")

    last = arms.moved["s3"][-1]
    spread = {}  # (largest - smallest) / largest of uploaded + downloaded, over the S3 runs
    for name in ORDER:
        moved = [m[name][0] + m[name][1] for m in arms.moved["s3"]]
        spread[name] = (max(moved) - min(moved)) / max(max(moved), 1)
    head = (
        f"{'stage':<8} {'local s':>8} {'s3 s':>8} {'s3/local':>9} "
        f"{'uploaded KiB':>13} {'downloaded KiB':>15} {'connections':>12}"
    )
    print("per stage: walls are means of the 2 timed runs of each arm; bytes of the last S3 run")
    print(head)
    print("-" * len(head))
    totals = [0.0, 0.0, 0, 0, 0]
    for name in ORDER:
        local, remote = arms.mean_wall("local", name), arms.mean_wall("s3", name)
        up, down, conns = last[name]
        for i, v in enumerate((local, remote, up, down, conns)):
            totals[i] += v
        print(
            f"{name:<8} {local:>8.1f} {remote:>8.1f} {remote / local:>8.2f}x "
            f"{up / 1024:>13.1f} {down / 1024:>15.1f} {conns:>12}"
        )
    print("-" * len(head))
    local, remote, up, down, conns = totals
    print(
        f"{'total':<8} {local:>8.1f} {remote:>8.1f} {remote / local:>8.2f}x "
        f"{up / 1024:>13.1f} {down / 1024:>15.1f} {conns:>12}"
    )
    print(f"stored under the last S3 run's prefix: {objects} objects, {stored / 1024:.1f} KiB")
    print(
        "bytes moved (uploaded + downloaded), spread over the timed S3 runs: "
        + ", ".join(f"{name} {spread[name]:.2%}" for name in ORDER)
    )
    local_bytes = sum(u + d for m in arms.moved["local"] for u, d, _ in m.values())
    print(f"bytes through the S3 proxy during the local runs: {local_bytes}")
    finish([ratio_line("storage", "s3 vs local", ratios[2], "<=", 1.3)])


if __name__ == "__main__":
    main()
