"""Benchmark P3: expert training steps/s inside a Ray Train worker vs the same loop in a plain
torch process, on the tiny model, in one run.

Both arms run ``selma_ray.experts.recipe.ExpertTrainer.train_step`` for ``--steps`` steps of the
same batch size with the tiny preset's loop settings, one torch thread each (what Ray gives a
1-CPU worker), and save a checkpoint every ``--checkpoint-every`` steps:
- plain: the bench process itself, batches preprocessed once and held in memory;
- Ray Train: ``TorchTrainer(train_expert)`` with one worker (1 CPU) fed by a Ray Data shard
  (``--feed``, default ``stream``: re-read through the shuffle buffer every epoch),
  timed by the worker (``steps_per_second`` in its last report: the loop only, after the
  model is loaded, with the checkpoint reports).
Both arms time only the step loop (model loading and Ray start-up are outside the timing).
One local Ray cluster (2 CPUs) runs for the whole bench, so both arms share the machine with
the same Ray daemons. Order: a short warm-up of both arms (``--warmup-steps``), then plain,
Ray, Ray, plain. Two ratios: by mean steps/s (the headline) and by median step time, which
resists bursts of other load on a shared machine. Goal >= 0.9x.

    python bench/training_bench.py [--steps 200] [--checkpoint-every 100] [--images 64]

Its last line of output (the headline ratio, from ``_common.ratio_line``)::

    RATIO P3 Ray Train worker vs plain torch (steps/s): <x>x (goal >= 0.9)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import abba, by_order, finish, header, paired, progress, ratio_line


def synthetic_table(skills: list[str], per_skill: int, size=(40, 56)):
    """Image-stage rows (keys, prompt, PNG bytes, skill) with random pixels of a non-native
    size."""
    from selma_ray.testing import synthetic_images

    return synthetic_images(skills, per_skill, size)


def write_images(root: Path, skills: list[str], per_skill: int) -> None:
    """An images-stage output (one committed shard) for the experts stage to train from."""
    from selma_ray import testing

    testing.write_images(root, skills, per_skill)


def loop_config(steps: int, checkpoint_every: int, feed: str = "stream") -> dict:
    from selma_ray.config import load_config

    cfg = load_config("tiny", [f"experts.max_steps={steps}", f"experts.feed={feed}"])
    return {
        **cfg.experts.model_dump(),
        "base": cfg.models.base,
        "seed": 0,
        "skill": "bench",
        "checkpoint_every": checkpoint_every,
    }


def plain_steps_per_second(loop: dict, table) -> tuple[float, float]:
    """(steps/s, median step seconds) of the plain loop over ``loop["max_steps"]`` steps."""
    import torch

    from selma_ray.experts import data as train_data
    from selma_ray.experts.recipe import ExpertTrainer

    torch.set_num_threads(1)
    bs = loop["batch_size"]
    rows = {"prompt": table.column("prompt").to_pylist(), "image": table.column("image")}
    batches = [
        train_data.preprocess_batch(
            {k: v[i : i + bs] for k, v in rows.items()}, loop["base"], 32, "center", False
        )
        for i in range(0, table.num_rows, bs)
    ]
    trainer = ExpertTrainer(loop)
    start = last = time.perf_counter()
    step_seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        while trainer.step < loop["max_steps"]:
            trainer.train_step([batches[trainer.step % len(batches)]])
            now = time.perf_counter()
            step_seconds.append(now - last)
            last = now
            if trainer.step % loop["checkpoint_every"] == 0:
                trainer.save(Path(tmp) / f"ckpt-{trainer.step}")
    return loop["max_steps"] / (time.perf_counter() - start), statistics.median(step_seconds)


DATA_WAIT: list[float] = []  # each Ray run's share of loop time spent waiting for batches


def ray_steps_per_second(loop: dict, table, storage: Path) -> tuple[float, float]:
    """(steps/s, median step seconds) reported by a one-worker TorchTrainer (Ray running)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from selma_ray.experts import feed
    from selma_ray.experts.recipe import train_expert

    datasets = feed.training_datasets(ray.data.from_arrow(table), [], loop)
    mode = feed.feed_mode(loop, table.num_rows, 1, 32)  # experts.feed (--feed)
    result = TorchTrainer(
        train_expert,
        train_loop_config={**loop, "feed_mode": mode},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"training-bench-{time.time_ns()}", storage_path=str(storage)),
        datasets=datasets,
        dataset_config=feed.data_config(loop),  # as the experts stage
    ).fit()
    DATA_WAIT.append(result.metrics["data_wait_fraction"])
    return float(result.metrics["steps_per_second"]), result.metrics["median_step_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--images", type=int, default=64, help="rows per epoch")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument(
        "--feed", choices=["stream", "memory", "auto"], default="stream", help="experts.feed"
    )
    args = parser.parse_args()
    header(
        "P3",
        "expert training steps/s, Ray Train worker vs plain torch loop (tiny-sd LoRA)",
        {
            "steps": args.steps,
            "checkpoint every": args.checkpoint_every,
            "images": args.images,
            "resolution": 32,
            "warm-up steps": args.warmup_steps,
            "Ray feed": args.feed,
        },
        "1 per arm (Ray worker with 1 CPU)",
        ("torch", "ray", "diffusers", "peft"),
    )
    import ray

    loop = {**loop_config(args.steps, args.checkpoint_every, args.feed), "select": "last"}
    warm = {**loop_config(args.warmup_steps, args.warmup_steps, args.feed), "select": "last"}
    print(
        f"both arms: {args.steps} steps x batch {loop['batch_size']} "
        f"(gradient accumulation {loop['gradient_accumulation']}), dtype "
        f"{loop['mixed_precision']} mixed precision, a checkpoint every {args.checkpoint_every}"
    )
    table = synthetic_table(["bench"], args.images).drop(["skill"])
    medians: dict[str, list[float]] = {"plain": [], "ray": []}

    def arm(name: str, fn, storage: Path) -> float:
        steps_per_s, median = fn(loop, table) if name == "plain" else fn(loop, table, storage)
        medians[name].append(median)
        return steps_per_s

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            storage = Path(tmp)
            result = abba(
                {
                    "plain": lambda: arm("plain", plain_steps_per_second, storage),
                    "ray": lambda: arm("ray", ray_steps_per_second, storage),
                },
                unit="steps/s",
                warmup={
                    "plain": lambda: plain_steps_per_second(warm, table),
                    "ray": lambda: ray_steps_per_second(warm, table, storage),
                },
                log=progress,
            )
    finally:
        ray.shutdown()
    print("\n".join(result.lines(".2f")))
    print(
        "  median step (ms), in run order: "
        f"plain {[round(s * 1e3) for s in medians['plain']]}, "
        f"ray {[round(s * 1e3) for s in medians['ray']]}"
    )
    print(
        f"  Ray worker's wait for batches, share of loop time: {[round(w, 3) for w in DATA_WAIT]}"
    )
    by_rate = result.ratio(lambda m: m["ray"] / m["plain"])
    by_median = paired(medians, "plain", "ray")
    print(f"  Ray vs plain by steps/s: {by_order(by_rate)}")
    print(f"  Ray vs plain by median step time: {by_order(by_median)}")
    finish(
        [
            ratio_line(
                "P3",
                "Ray Train worker vs plain torch (by median step time)",
                by_median[2],
                ">=",
                0.9,
            ),
            ratio_line("P3", "Ray Train worker vs plain torch (steps/s)", by_rate[2], ">=", 0.9),
        ]
    )


if __name__ == "__main__":
    main()
