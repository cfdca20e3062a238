"""Benchmark P2: images/s of the Ray Data image stage vs a plain diffusers loop.

Both arms render the same prompts with the same per-image seeds, steps, resolution, dtype
and batch size on the tiny pipeline and PNG-encode every image; the counts are printed.

- plain: this process; the pipeline is built (``from_pretrained``), then the batches are
  rendered and encoded, with as many torch threads as the Ray actor gets;
- Ray: the whole ``run_images`` stage in a fresh run directory (actor pool start, rendering,
  the atomic Parquet write and the contact sheets) on a local Ray with 2 CPUs started once
  for the bench. Its single actor gets ``--actor-cpus`` CPUs (default 1, leaving one for the
  Parquet write task) and Ray gives it that many torch threads. The actor is the stage's
  ``DiffusionRenderer`` with timing added: it reports how long its constructor (imports and
  pipeline build) took.

The work compared is rendering: the headline times the plain loop's render+encode and the
stage's wall time minus its actor's constructor, so neither side pays for building the
model. A second ratio keeps the model build in both (plain: ``from_pretrained`` timed too;
Ray: the whole stage). Order: a one-batch warm-up of both arms, then plain, Ray, Ray, plain.
Ratio = Ray images/s over plain images/s (above 1 = faster). Goal >= 0.9.

    python bench/images_bench.py [--prompts 64] [--steps 10] [--resolution 32] [--batch-size 8]

Its last line of output (the headline ratio, from ``_common.ratio_line``)::

    RATIO P2 Ray Data image stage vs plain diffusers loop (images/s): <x>x (goal >= 0.9)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import abba, by_order, finish, header, paired, progress, ratio_line

from selma_ray.images.stage import DiffusionRenderer

SKILLS = ["counting", "dense_detail"]


class TimedRenderer(DiffusionRenderer):
    """The stage's renderer, also writing its constructor time, its torch threads and each
    row's share of its batch's call time into extra columns."""

    def __init__(self, *args: Any, **kwargs: Any):
        import torch

        start = time.perf_counter()
        super().__init__(*args, **kwargs)
        self.init_seconds = time.perf_counter() - start
        self.threads = torch.get_num_threads()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        start = time.perf_counter()
        out = super().__call__(batch)
        n = len(out["seed"])
        out["bench_call_s"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        out["bench_init_s"] = np.full(n, self.init_seconds)
        out["bench_threads"] = np.full(n, self.threads)
        return out


def write_prompts(root: Path, n: int) -> None:
    for skill in SKILLS:
        lines = [
            json.dumps(
                {"id": f"{skill}-{i:05d}", "skill": skill, "prompt": f"{i + 1} {skill} objects"}
            )
            for i in range(n)
            if i % len(SKILLS) == SKILLS.index(skill)
        ]
        path = root / "prompts" / f"{skill}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines))


def stage_config(root: Path, args: argparse.Namespace, prompts: int) -> Any:
    from selma_ray.config import load_config

    write_prompts(root, prompts)
    return load_config(
        "tiny",
        [
            f"run.dir={root}",
            f"prompts.skills={SKILLS}",
            f"prompts.per_skill={prompts}",
            f"images.steps={args.steps}",
            f"images.resolution={args.resolution}",
            f"images.batch_size={args.batch_size}",
            f"resources.images.num_cpus={args.actor_cpus}",
        ],
    )


def plain_loop(cfg: Any, rows: list[dict], threads: int) -> tuple[float, float]:
    """(seconds to build the pipeline, seconds to render and PNG-encode ``rows``)."""
    import torch
    from diffusers import AutoPipelineForText2Image

    from selma_ray.core.devices import torch_device_and_dtype
    from selma_ray.diffusion.common import png_bytes
    from selma_ray.models import resolve

    ic = cfg.images
    torch.set_num_threads(threads)
    start = time.perf_counter()
    device, dtype = torch_device_and_dtype(0, ic.dtype)
    pipe = AutoPipelineForText2Image.from_pretrained(resolve(cfg.models.generator), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    built = time.perf_counter()
    pngs = []
    for i in range(0, len(rows), ic.batch_size):
        chunk = rows[i : i + ic.batch_size]
        out = pipe(
            prompt=[r["prompt"] for r in chunk],
            num_inference_steps=ic.steps,
            guidance_scale=ic.guidance_scale,
            height=ic.resolution,
            width=ic.resolution,
            generator=[torch.Generator(device).manual_seed(r["seed"]) for r in chunk],
            output_type="np",
        )
        pngs.extend(png_bytes(img) for img in out.images)
    done = time.perf_counter()
    if len(pngs) != len(rows):
        raise RuntimeError(f"plain loop made {len(pngs)} images for {len(rows)} rows")
    return built - start, done - built


def ray_stage(cfg: Any, run: Any) -> tuple[float, dict[str, Any]]:
    """(wall seconds of ``run_images``, the timing columns its actor wrote)."""
    import pyarrow.dataset as pads

    from selma_ray.images import stage as images
    from selma_ray.pipeline import run_stage

    real, images.DiffusionRenderer = images.DiffusionRenderer, TimedRenderer
    try:
        start = time.perf_counter()
        summary = run_stage("images", cfg, run)
        wall = time.perf_counter() - start
    finally:
        images.DiffusionRenderer = real
    table = pads.dataset(summary["path"], format="parquet").to_table(
        columns=["bench_call_s", "bench_init_s", "bench_threads"]
    )
    return wall, {
        "images": summary["total"],
        "init_s": sum(set(table.column("bench_init_s").to_pylist())),
        "call_s": sum(table.column("bench_call_s").to_pylist()),
        "threads": sorted(set(table.column("bench_threads").to_pylist())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--actor-cpus", type=int, default=1, choices=[1, 2])
    args = parser.parse_args()
    os.environ.setdefault("SELMA_CACHE", "/tmp/selma_cache")
    header(
        "P2",
        "image stage, Ray Data run_images vs plain diffusers loop (tiny-sd)",
        {
            "images": args.prompts,
            "steps": args.steps,
            "resolution": args.resolution,
            "batch": args.batch_size,
            "dtype": "float32 (tiny preset images.dtype)",
        },
        f"{args.actor_cpus} per arm (Ray actor num_cpus={args.actor_cpus})",
        ("torch", "ray", "diffusers"),
    )
    import ray

    from selma_ray.core import layout
    from selma_ray.core.logs import setup_logging
    from selma_ray.core.rundir import RunDir
    from selma_ray.images.stage import image_rows

    setup_logging()
    with_build: dict[str, list[float]] = {"plain": [], "ray": []}
    actor: list[dict[str, Any]] = []
    counter = iter(range(1000))

    with tempfile.TemporaryDirectory() as tmp:

        def fresh(prompts: int) -> tuple[Any, Any, list[dict]]:
            root = Path(tmp) / f"run-{next(counter)}"
            cfg = stage_config(root, args, prompts)
            run = RunDir(root)
            return cfg, run, image_rows(cfg, layout.load_prompts(run, SKILLS))

        def plain_arm(prompts: int, record: bool = True) -> float:
            cfg, _, rows = fresh(prompts)
            build_s, render_s = plain_loop(cfg, rows, args.actor_cpus)
            if record:
                with_build["plain"].append(build_s + render_s)
            return render_s

        def ray_arm(prompts: int, record: bool = True) -> float:
            cfg, run, rows = fresh(prompts)
            wall, timing = ray_stage(cfg, run)
            if timing["images"] != len(rows):
                raise RuntimeError(f"Ray stage wrote {timing['images']} images for {len(rows)}")
            if record:
                with_build["ray"].append(wall)
                actor.append(timing)
            return wall - timing["init_s"]

        def arm(fn: Callable[..., float]) -> Callable[[], float]:
            return lambda: fn(args.prompts)

        # Ray's own daemons run during both arms, so both share the machine alike.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            result = abba(
                {"plain": arm(plain_arm), "ray": arm(ray_arm)},
                warmup={
                    "plain": lambda: plain_arm(args.batch_size, record=False),
                    "ray": lambda: ray_arm(args.batch_size, record=False),
                },
                log=progress,
            )
        finally:
            ray.shutdown()
    n = args.prompts
    print(
        f"both arms, every run: {n} images, {args.steps} steps, {args.resolution}px, "
        f"batch {args.batch_size}; Ray actor torch threads {actor[0]['threads']}, "
        f"plain loop {args.actor_cpus}"
    )
    print("seconds without building the model (plain: render+encode; Ray: stage - actor init):")
    print("\n".join(result.lines(".1f")))
    for i, t in enumerate(actor):
        print(
            f"  Ray run {i + 1}: stage wall {with_build['ray'][i]:.1f} s, actor init "
            f"{t['init_s']:.1f} s, actor render+encode calls {t['call_s']:.1f} s"
        )
    print(
        f"  plain runs with the model build: {with_build['plain'][0]:.1f} s, "
        f"{with_build['plain'][1]:.1f} s (first-pass, reverse)"
    )
    rate = result.ratio(lambda m: m["plain"] / m["ray"])
    rate_build = paired(with_build, "plain", "ray")
    mean_build = {k: sum(v) / len(v) for k, v in with_build.items()}
    print(
        f"  images/s: plain {n / result.mean('plain'):.2f}, Ray {n / result.mean('ray'):.2f} "
        f"(model build excluded); plain {n / mean_build['plain']:.2f}, "
        f"Ray {n / mean_build['ray']:.2f} (included)"
    )
    print(f"  Ray vs plain, model build excluded: {by_order(rate)}")
    print(f"  Ray vs plain, model build included: {by_order(rate_build)}")
    finish(
        [
            ratio_line(
                "P2",
                "Ray Data image stage vs plain diffusers loop, model build included (images/s)",
                rate_build[2],
                ">=",
                0.9,
            ),
            ratio_line(
                "P2", "Ray Data image stage vs plain diffusers loop (images/s)", rate[2], ">=", 0.9
            ),
        ]
    )


if __name__ == "__main__":
    main()
