"""Benchmark P2: images/s of the Ray Data image stage vs a plain diffusers loop.

Both sides render the same prompts with the same per-image seeds and batch size on the tiny
pipeline and PNG-encode every image; both times include importing diffusers and loading the
pipeline. The Ray side is the whole ``run_images`` stage (actor pool start, rendering, the
atomic Parquet write and the contact sheets) on a local Ray with 2 CPUs, started before
either side runs (``ray.init`` is not timed). Its single actor gets ``--actor-cpus`` CPUs
(default 1, leaving one for the Parquet write task), and Ray gives it that many torch threads;
the plain loop runs with the same number of torch threads, so both sides have the same
compute. The ratio is Ray images/s over plain images/s (above 1 = faster).

    python bench/images_bench.py [--prompts 64] [--steps 10] [--resolution 32] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SKILLS = ["counting", "dense_detail"]


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


def plain_loop(cfg, rows: list[dict], threads: int) -> float:
    """Seconds for a plain diffusers loop over ``rows`` (import, load, render, PNG-encode)."""
    start = time.perf_counter()
    import torch
    from diffusers import AutoPipelineForText2Image

    from selma_ray.diffusion.common import png_bytes, torch_device_and_dtype
    from selma_ray.models import resolve

    ic = cfg.images

    torch.set_num_threads(threads)
    device, dtype = torch_device_and_dtype(0, ic.dtype)
    pipe = AutoPipelineForText2Image.from_pretrained(resolve(cfg.models.generator), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
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
    elapsed = time.perf_counter() - start
    if len(pngs) != len(rows):
        raise RuntimeError(f"plain loop made {len(pngs)} images for {len(rows)} rows")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--actor-cpus", type=int, default=1, choices=[1, 2])
    args = parser.parse_args()
    os.environ.setdefault("SELMA_CACHE", "/tmp/selma_cache")

    import ray

    from selma_ray.config import load_config
    from selma_ray.core.logs import setup_logging
    from selma_ray.core.rundir import RunDir
    from selma_ray.images.stage import image_rows, run_images
    from selma_ray.prompts import stage as prompts_stage

    setup_logging()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        cfg = load_config(
            "tiny",
            [
                f"run.dir={root}",
                f"prompts.skills={SKILLS}",
                f"prompts.per_skill={args.prompts}",
                f"images.steps={args.steps}",
                f"images.resolution={args.resolution}",
                f"images.batch_size={args.batch_size}",
                f"resources.images.num_cpus={args.actor_cpus}",
            ],
        )
        write_prompts(root, args.prompts)
        run = RunDir(root)
        rows = image_rows(cfg, prompts_stage.load_prompts(run, SKILLS))

        # Ray's own daemons run during both measurements, so both sides share the machine
        # with the same background load.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            plain_s = plain_loop(cfg, rows, args.actor_cpus)
            start = time.perf_counter()
            summary = run_images(cfg, run)
            ray_s = time.perf_counter() - start
        finally:
            ray.shutdown()
    if summary["total"] != len(rows):
        raise RuntimeError(f"Ray stage wrote {summary['total']} images for {len(rows)} rows")
    n = len(rows)
    print(
        f"{n} images, {args.steps} steps, {args.resolution}px, batch {args.batch_size}, "
        f"{args.actor_cpus} torch thread(s): "
        f"plain loop {plain_s:.1f} s ({n / plain_s:.2f} images/s), "
        f"Ray Data stage {ray_s:.1f} s ({n / ray_s:.2f} images/s)"
    )
    print(f"P2 Ray Data image stage vs plain diffusers loop: {plain_s / ray_s:.2f}x")


if __name__ == "__main__":
    main()
