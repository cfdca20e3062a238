"""Benchmark XPAR: N tiny experts trained in parallel under Ray Tune vs one after another.

Both arms run the real experts stage (``selma_ray.experts.stage.run_experts``: one Tune trial per
skill, each a TorchTrainer with one 0.25-CPU worker, validation and exports included) on the
same synthetic image set (8 images per skill) with the same steps, each run in a fresh run
directory, on one local Ray cluster of ``--cpus`` CPUs started once for the whole bench. The
only difference is ``resources.experts.max_concurrent``: N (all at once) vs 1 (queued). The
timed work is the stage call alone (writing the input images and the config is outside).
Order: a warm-up of both arms at a small size (``--warmup-experts`` experts, 2 steps), then
sequential, parallel, parallel, sequential.

Goal (chosen here, none was set): parallel >= 1.2x faster than sequential on 2 CPUs. Five
experts of the tiny model are mostly start-up (trial, worker and data set up) with little
compute, which overlaps well; but two cores cap any compute-bound part at 2x, and five
concurrent trials contend for those cores and for memory, so 1.2x is the least that makes
running them together worth it, not a bound.

    python bench/experts_parallel_bench.py [--experts 5] [--steps 20] [--cpus 2]

Its last line of output (the headline ratio, from ``_common.ratio_line``)::

    RATIO XPAR <n> experts in parallel vs one after another on <c> CPUs (speed-up): <x>x (goal ...)
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time
from pathlib import Path

from _common import abba, finish, header, progress, ratio_line, show
from training_bench import write_images

PER_SKILL = 8


def run_stage(root: Path, skills: list[str], steps: int, concurrent: int) -> float:
    """Seconds of one experts stage call over ``skills`` in a fresh run directory."""
    from selma_ray.config import PAPER_SKILLS, load_config
    from selma_ray.core.rundir import RunDir
    from selma_ray.pipeline import run_stage as run_pipeline_stage

    assert set(skills) <= set(PAPER_SKILLS)
    write_images(root, skills, per_skill=PER_SKILL)
    cfg = load_config(
        "tiny",
        [
            f"run.dir={root}",
            f"prompts.skills=[{', '.join(skills)}]",
            f"experts.max_steps={steps}",
            f"experts.checkpoint_every={max(1, steps // 2)}",
            f"resources.experts.max_concurrent={concurrent}",
        ],
    )
    start = time.perf_counter()
    result = run_pipeline_stage("experts", cfg, RunDir(root))
    seconds = time.perf_counter() - start
    if sorted(result["trained"]) != sorted(skills):
        raise RuntimeError(f"expected every expert trained, got {result['trained']}")
    return seconds


def main() -> None:
    from selma_ray.config import PAPER_SKILLS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--warmup-experts", type=int, default=2, choices=range(1, 6))
    args = parser.parse_args()
    skills = PAPER_SKILLS[: args.experts]
    n = len(skills)
    header(
        "XPAR",
        "experts stage, max_concurrent=N vs 1 (Ray Tune + Train, tiny-sd LoRA)",
        {
            "experts": n,
            "steps": args.steps,
            "images per skill": PER_SKILL,
            "Ray CPUs": args.cpus,
            "warm-up": f"{args.warmup_experts} experts x 2 steps",
            "dtype": "float32",
        },
        "Ray's per worker (0.25-CPU workers)",
        ("torch", "ray", "diffusers", "peft"),
    )
    import ray

    logging.basicConfig(level=logging.WARNING)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    runs = itertools.count()
    try:
        with tempfile.TemporaryDirectory() as tmp:

            def stage(experts: list[str], steps: int, concurrent: int) -> float:
                return run_stage(Path(tmp) / f"run-{next(runs)}", experts, steps, concurrent)

            warm = skills[: args.warmup_experts]
            result = abba(
                {
                    "sequential": lambda: stage(skills, args.steps, 1),
                    "parallel": lambda: stage(skills, args.steps, n),
                },
                warmup={
                    "sequential": lambda: stage(warm, 2, 1),
                    "parallel": lambda: stage(warm, 2, len(warm)),
                },
                log=progress,
            )
    finally:
        ray.shutdown()
    print(
        f"both arms, every run: {n} experts x {args.steps} steps, {PER_SKILL} images per skill; "
        f"sequential = max_concurrent 1, parallel = max_concurrent {n}; stage wall time:"
    )
    speedup = show(
        result,
        ".1f",
        lambda m: m["sequential"] / m["parallel"],
        "parallel vs sequential speed-up by order",
    )
    finish(
        [
            ratio_line(
                "XPAR",
                f"{n} experts in parallel vs one after another on {args.cpus} CPUs (speed-up)",
                speedup[2],
                ">=",
                1.2,
            )
        ]
    )


if __name__ == "__main__":
    main()
