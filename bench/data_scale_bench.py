"""Benchmark DATA-SCALE: the experts' data path at paper shape, memory as the data grows.

A paper-shaped image table is synthesized once on local disk (5 skills x N PNG images at
512 px, smooth random content, kept in ``$SELMA_CACHE/bench/data_scale``). Each arm runs only
the expert data path, in a subprocess with its own local Ray cluster (2 CPUs):
- the driver's part of the experts stage for all five skills (``prepare_data``: the
  held-out split, the data hash, the lazy datasets);
- per skill, one Ray task (its own worker process, ``max_calls=1``, as Ray Train gives each
  expert its own worker actors) doing a Train worker's part: the validation set-up
  (``validation_batches``, VAE-encoded in mini-batches) and ``--steps`` training steps of a
  tiny-sd LoRA at ``--resolution`` px from the feed (``experts.feed=stream``).

It prints the peak driver RSS (``ru_maxrss`` of the arm's process) and the peak object-store
use (sampled every 0.02 s), for N = ``--small`` and N = ``--large``, run in the order small,
large, large, small after a warm-up. Then, at N = ``--small`` for one skill, training steps/s
with the streamed feed vs the feed held in the worker (``feed=memory``, the materialized
feed), over two epochs each, in ABBA order after a warm-up.

    python bench/data_scale_bench.py [--small 200] [--large 800] [--steps 4]

Goals: driver RSS N=large vs N=small <= 1.15; object-store peak <= 1.5; streamed vs held
steps/s >= 0.9. The last line::

    RATIO DATA-SCALE driver RSS N=800 vs N=200: <x>x (goal <= 1.15)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _common import abba, finish, header, progress, ratio_line

SKILLS = ["dense_detail", "counting", "user_prompts", "commonsense_defying", "everyday_scenes"]
SIZE = 512


def data_dir(n: int) -> Path:
    from selma_ray.core.layout import IMAGE_ROWS_PER_FILE
    from selma_ray.models import cache_dir

    return cache_dir() / "bench" / "data_scale" / f"{SIZE}px-{n}-by{IMAGE_ROWS_PER_FILE}"


def synthesize(n: int) -> Path:
    """5 skills x ``n`` smooth random 512 px PNGs as a committed images-stage output (shards
    of the stage's schema and size, as the images stage writes them), written once."""
    import numpy as np
    from PIL import Image

    from selma_ray.images.real_data import write_shards
    from selma_ray.testing import commit_images, png_bytes

    root = data_dir(n)
    if (root / "images" / "manifest.json").is_file():
        return root
    rng = np.random.default_rng(n)

    def rows(skill: str):
        for i in range(n):
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            yield {
                "prompt_id": f"{skill}-{i:06d}",
                "skill": skill,
                "prompt": f"picture {i} of {skill.replace('_', ' ')}",
                "image_index": 0,
                "seed": i,
                "image": png_bytes(Image.fromarray(small).resize((SIZE, SIZE), Image.BICUBIC)),
                "width": SIZE,
                "height": SIZE,
                "generator": "bench",
            }

    for skill in SKILLS:
        write_shards(rows(skill), root / "images" / "data", skill)
        progress(f"synthesized {n} images of {skill}")
    commit_images(root)
    return root


def loop_config(resolution: int, feed: str, steps: int) -> dict[str, Any]:
    from selma_ray.config import load_config

    cfg = load_config(
        "tiny",
        [
            f"experts.feed={feed}",
            f"experts.resolution={resolution}",
            f"experts.max_steps={steps}",
        ],
    )
    return {**cfg.experts.model_dump(), "base": cfg.models.base, "seed": 0}


class StorePeak:
    """Peak object-store bytes in use on the local node, sampled in a thread, overall and per
    ``phase`` (set by the caller: which part of the data path was running)."""

    def __init__(self) -> None:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        # This cluster's address: another Ray instance on the machine must not be asked.
        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self._reply = lambda: get_memory_info_reply(state)
        self.peak, self.samples = 0, 0
        self.phase, self.phases = "start", {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                used = self._reply().store_stats.object_store_bytes_used
                self.peak, self.samples = max(self.peak, int(used)), self.samples + 1
                self.phases[self.phase] = max(self.phases.get(self.phase, 0), int(used))
                time.sleep(0.02)
        except BaseException as e:  # raised again on exit: a dead sampler is no zero peak
            self._error = e

    def __enter__(self) -> StorePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise RuntimeError("object-store sampling failed") from self._error
        if not self.samples:
            raise RuntimeError("object-store sampling took no sample")


def worker_part(train, validation, config: dict[str, Any], steps: int) -> float:
    """A Train worker's part of one expert: validation set-up, then ``steps`` steps from the
    feed; returns the training steps/s."""
    import torch

    from selma_ray.experts.feed import Feed, validation_batches
    from selma_ray.experts.recipe import ExpertTrainer

    torch.set_num_threads(1)
    trainer = ExpertTrainer(config)
    if validation is not None:
        trainer.set_validation(validation_batches(validation, config))
    batches = Feed(train, config, rank=0, mode=config["feed_mode"]).start()
    try:
        start = time.perf_counter()
        while trainer.step < steps:
            trainer.train_step([next(batches)])
        return steps / (time.perf_counter() - start)
    finally:
        # Stops the prefetch thread and the feed's execution: this task's worker process
        # lives on, and a feed left reading would hold its blocks into the next skill's part.
        batches.close()


def run_arm(n: int, steps: int, resolution: int) -> dict[str, Any]:
    """The data path for all skills at N = ``n`` (this process is the driver)."""
    import ray

    from selma_ray.core import layout
    from selma_ray.core.rundir import RunDir
    from selma_ray.experts import feed as training_feed
    from selma_ray.experts.stage import prepare_data

    run = RunDir(synthesize(n))
    loop = loop_config(resolution, "stream", steps)
    job = {
        "run": run.spec,
        "images": training_feed.skill_files(run, layout.images_files(run), SKILLS),
        "fingerprints": dict.fromkeys(SKILLS, "bench"),
        "members": {skill: [skill] for skill in SKILLS},  # one expert per skill
        "resources": {"workers_per_expert": 1},
        "loop": loop,
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # A process per skill, as Ray Train gives each expert its own worker actors: what a
        # worker's Ray Data executions own in the store goes with it, not into the next skill.
        remote = ray.remote(num_cpus=1, max_calls=1)(worker_part)
        with StorePeak() as store:
            for skill in SKILLS:
                store.phase = "driver"  # the held-out split, the data hash, lazy datasets
                prep = prepare_data(job, skill)
                store.phase = "worker"  # validation set-up, then training from the feed
                config = {**loop, "skill": skill, "feed_mode": prep["feed_mode"]}
                data = prep["datasets"]
                ray.get(remote.remote(data["train"], data.get("validation"), config, steps))
    finally:
        ray.shutdown()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rss": rss, "store": store.peak, "store_phases": store.phases}


def speed_arm(n: int, feed: str, steps: int, resolution: int) -> float:
    """Training steps/s of one skill's worker with the given feed (Ray already running)."""
    import ray

    from selma_ray.core import layout
    from selma_ray.core.rundir import RunDir
    from selma_ray.experts import feed as training_feed

    run = RunDir(synthesize(n))
    loop = {**loop_config(resolution, feed, steps), "skill": SKILLS[0], "feed_mode": feed}
    files = training_feed.skill_files(run, layout.images_files(run), SKILLS[:1])[SKILLS[0]]
    rows = training_feed.read_rows(run, files, SKILLS[:1])
    count, _ = training_feed.scan(rows)
    held_out, _ = training_feed.split_validation(rows, count, 0, SKILLS[0], 0.1, None)
    train = training_feed.training_datasets(rows, held_out, loop)["train"]
    return ray.get(ray.remote(num_cpus=1)(worker_part).remote(train, None, loop, steps))


def subprocess_arm(n: int, steps: int, resolution: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--arm", str(n), "--steps", str(steps)]
    cmd += ["--resolution", str(resolution)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=800)
    parser.add_argument("--steps", type=int, default=4, help="training steps per expert")
    parser.add_argument("--resolution", type=int, default=64, help="training px (tiny UNet)")
    parser.add_argument("--arm", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.steps, args.resolution)))
        return
    header(
        "DATA-SCALE",
        "expert data path (driver prepare_data + worker feed, stream) at N vs 4N images/skill",
        {
            "skills": len(SKILLS),
            "N": f"{args.small} and {args.large}",
            "image": f"{SIZE}px PNG",
            "train px": args.resolution,
            "feed buffer": "experts.feed_buffer_rows (default)",
            "steps per expert": args.steps,
        },
        "1 per worker; 2 Ray CPUs",
        ("torch", "ray", "diffusers"),
    )
    for n in (args.small, args.large):
        synthesize(n)
    mem: dict[int, list[dict[str, Any]]] = {args.small: [], args.large: []}
    subprocess_arm(args.small, 1, args.resolution)  # warm-up (caches, compiled kernels)
    progress("warm-up done")
    for n in (args.small, args.large, args.large, args.small):
        mem[n].append(subprocess_arm(n, args.steps, args.resolution))
        progress(f"N={n}: {mem[n][-1]}")
    for n, runs in mem.items():
        print(
            f"  N={n}: driver peak RSS {[round(r['rss'] / 2**20) for r in runs]} MiB, "
            f"object store peak {[round(r['store'] / 2**20, 1) for r in runs]} MiB"
        )
        for phase in ("driver", "worker"):
            peaks = [round(r["store_phases"].get(phase, 0) / 2**20, 1) for r in runs]
            print(f"    object store peak while the {phase} part ran: {peaks} MiB")

    def mean(n: int, key: str) -> float:
        return sum(r[key] for r in mem[n]) / len(mem[n])

    rss = mean(args.large, "rss") / mean(args.small, "rss")
    store = mean(args.large, "store") / max(1.0, mean(args.small, "store"))

    import ray

    epoch_steps = 2 * (args.small - round(0.1 * args.small)) // 4  # two epochs, batches of 4
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = abba(
            {
                "stream": lambda: speed_arm(args.small, "stream", epoch_steps, args.resolution),
                "memory": lambda: speed_arm(args.small, "memory", epoch_steps, args.resolution),
            },
            unit="steps/s",
            warmup={
                "stream": lambda: speed_arm(args.small, "stream", 4, args.resolution),
                "memory": lambda: speed_arm(args.small, "memory", 4, args.resolution),
            },
            log=progress,
        )
    finally:
        ray.shutdown()
    print(f"  steps/s over {epoch_steps} steps (two epochs) at N={args.small}:")
    print("\n".join(result.lines(".2f")))
    speed = result.mean("stream") / result.mean("memory")
    finish(
        [
            ratio_line(
                "DATA-SCALE", f"streamed vs held feed steps/s N={args.small}", speed, ">=", 0.9
            ),
            ratio_line(
                "DATA-SCALE",
                f"object store peak N={args.large} vs N={args.small}",
                store,
                "<=",
                1.5,
            ),
            ratio_line(
                "DATA-SCALE", f"driver RSS N={args.large} vs N={args.small}", rss, "<=", 1.15
            ),
        ]
    )


if __name__ == "__main__":
    main()
