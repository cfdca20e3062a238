"""Benchmark: N tiny experts trained in parallel under Ray Tune vs one after another.

Both arms run the real experts stage (``selma_ray.experts.run_experts``: one Tune trial per
skill, each a TorchTrainer with one 0.25-CPU worker, validation and exports included) on the
same synthetic image set in fresh run directories, on one local Ray cluster of ``--cpus``
CPUs started once for both and warmed up by one data preparation. The only difference is
``resources.experts.max_concurrent``: N (all at once) vs 1 (queued). Wall time is the whole
stage call.

    python bench/experts_parallel_bench.py [--experts 5] [--steps 20] [--cpus 2]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from training_bench import loop_config, synthetic_table, write_images


def run_stage(root: Path, skills: list[str], steps: int, concurrent: int) -> float:
    from selma_ray.config import PAPER_SKILLS, load_config
    from selma_ray.core.rundir import RunDir
    from selma_ray.experts.stage import run_experts

    assert set(skills) <= set(PAPER_SKILLS)
    write_images(root, skills, per_skill=8)
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
    result = run_experts(cfg, RunDir(root))
    seconds = time.perf_counter() - start
    if sorted(result["trained"]) != sorted(skills):
        raise RuntimeError(f"expected every expert trained, got {result['trained']}")
    return seconds


def warm_up() -> None:
    """Run the data preparation once, so neither arm pays for cold Ray workers' imports."""
    from selma_ray.experts import data as train_data

    table = synthetic_table(["warm"], 2).select(["prompt", "image"])
    train_data.training_datasets(table, table.slice(0, 0), loop_config(1, 1), None, 0.25)


def main() -> None:
    import ray

    from selma_ray.config import PAPER_SKILLS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    skills = PAPER_SKILLS[: args.experts]
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        warm_up()
        with tempfile.TemporaryDirectory() as tmp:
            sequential = run_stage(Path(tmp) / "sequential", skills, args.steps, 1)
            parallel = run_stage(Path(tmp) / "parallel", skills, args.steps, len(skills))
    finally:
        ray.shutdown()
    n = len(skills)
    print(f"{n} experts one after another (max_concurrent=1): {sequential:.1f} s wall")
    print(f"{n} experts in parallel (max_concurrent={n}): {parallel:.1f} s wall")
    print(f"parallel vs sequential on {args.cpus} CPUs: {sequential / parallel:.2f}x faster")


if __name__ == "__main__":
    main()
