"""Benchmark P3: expert training steps/s inside a Ray Train worker vs the same loop in a plain
torch process, on the tiny model, in one run.

Both arms run ``selma_ray.training.ExpertTrainer.train_step`` for ``--steps`` steps with the
tiny preset's loop settings, one torch thread each (what Ray gives a 1-CPU worker):
- plain: the bench process itself, batches preprocessed once and held in memory;
- Ray Train: ``TorchTrainer(train_expert)`` with one worker (1 CPU) fed by a Ray Data shard,
  timed by the worker (``steps_per_second`` in its last report: the loop only, after the
  model is loaded, with the checkpoint reports every ``--checkpoint-every`` steps).
The plain arm runs before and after the Ray arm. Two ratios are printed: by mean steps/s
(plain: mean of both runs) and by median step time (plain: the faster run), which resists other
load on a shared machine. Goal >= 0.9x.

    python bench/training_bench.py [--steps 200] [--checkpoint-every 100] [--images 64]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path


def synthetic_table(skills: list[str], per_skill: int, size=(40, 56)):
    """Image-stage rows (prompt, PNG bytes, skill) with random pixels of a non-native size."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = {"prompt": [], "image": [], "skill": []}
    for skill in skills:
        for i in range(per_skill):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
            rows["prompt"].append(f"{i + 1} {skill.replace('_', ' ')} on a table")
            rows["image"].append(buf.getvalue())
            rows["skill"].append(skill)
    return pa.table(rows)


def write_images(root: Path, skills: list[str], per_skill: int) -> None:
    import pyarrow.parquet as pq

    (root / "images" / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(synthetic_table(skills, per_skill), root / "images" / "data" / "part-0.parquet")


def loop_config(steps: int, checkpoint_every: int) -> dict:
    from selma_ray.config import load_config

    cfg = load_config("tiny", [f"experts.max_steps={steps}"])
    return {
        **cfg.experts.model_dump(),
        "base": cfg.models.base,
        "seed": 0,
        "skill": "bench",
        "checkpoint_every": checkpoint_every,
    }


def plain_steps_per_second(loop: dict, table) -> float:
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


def ray_steps_per_second(loop: dict, table, storage: Path) -> float:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from selma_ray.experts import data as train_data
    from selma_ray.experts.recipe import train_expert

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        datasets = train_data.training_datasets(table, table.slice(0, 0), loop, None, 1.0)
        result = TorchTrainer(
            train_expert,
            train_loop_config=loop,
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="training-bench", storage_path=str(storage)),
            datasets=datasets,
        ).fit()
        return float(result.metrics["steps_per_second"]), result.metrics["median_step_seconds"]
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--images", type=int, default=64, help="rows per epoch")
    args = parser.parse_args()
    loop = {**loop_config(args.steps, args.checkpoint_every), "select": "last"}
    table = synthetic_table(["bench"], args.images).select(["prompt", "image"])
    before = plain_steps_per_second(loop, table)
    with tempfile.TemporaryDirectory() as tmp:
        in_ray = ray_steps_per_second(loop, table, Path(tmp))
    after = plain_steps_per_second(loop, table)
    mean_plain = (before[0] + after[0]) / 2
    median_plain = min(before[1], after[1])
    print(
        f"plain torch loop: {before[0]:.2f} / {after[0]:.2f} steps/s (before / after), "
        f"median step {before[1] * 1e3:.0f} / {after[1] * 1e3:.0f} ms, {args.steps} steps"
    )
    print(f"Ray Train worker: {in_ray[0]:.2f} steps/s, median step {in_ray[1] * 1e3:.0f} ms")
    print(
        f"P3 Ray Train worker vs plain torch process: {in_ray[0] / mean_plain:.2f}x by "
        f"mean steps/s, {median_plain / in_ray[1]:.2f}x by median step time (goal >= 0.9x)"
    )


if __name__ == "__main__":
    main()
