"""Benchmark LATENT: training-input preparation time, ``experts.cache_latents`` on vs off.

Input preparation is everything a training step needs before the UNet: Ray Data
decoding (shorter-side resize + crop of non-native 48x80 PNGs), the worker's flip and
tokenization, then the VAE encoder and the text encoder. With the cache, a step only reads
the cached latent mean/std (both orientations) and text embeddings and samples the latents;
the one-time cache build is timed and printed separately.

Every arm is built by ``feed.training_datasets`` and consumed the way ``train_expert`` feeds
a worker (``feed.Feed`` in the mode ``experts.feed=auto`` picks: these small shards are read
once into the worker, then reshuffled and augmented every epoch) for exactly ``--epochs`` x
``--images`` / batch size steps, so each arm prepares the same rows in the same steps. Rows
are counted and printed. Arms, on a local Ray cluster, the encoders on one torch thread in
this process, in ABC-CBA order after a one-epoch warm-up of each:
- off, random flips (decoded uint8 pixels, flipped per row per epoch; encoders every step),
- off, no flips (the same without flips),
- on (cache with flips: the worker picks plain or flipped latents per row per epoch).

Goal (chosen here, none was set): cache on vs off (random flips, the same augmentation)
>= 1.0x, i.e. the cache must never make the per-step input preparation slower.

    python bench/latent_cache_bench.py [--images 128] [--epochs 3]

Its last line of output (the headline ratio, from ``_common.ratio_line``)::

    RATIO LATENT cache on vs off, random flips (input-prep speed-up): <x>x (goal >= 1)
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from typing import Any

from _common import abba, by_order, finish, header, progress, ratio_line
from training_bench import loop_config, synthetic_table

from selma_ray.core.rundir import RunDir

SIZE = (48, 80)
BATCH = 16


def consume(trainer: Any, ds: Any, loop: dict[str, Any], batches: int) -> tuple[float, int]:
    """Seconds and rows for ``batches`` batches of ``ds``, fed the way ``train_expert`` feeds a
    worker (``feed.Feed``, in the mode ``auto`` picks), each turned into latents and text
    conditioning (no UNet)."""
    import torch

    from selma_ray.experts import feed

    mode = feed.feed_mode(loop, ds.count(), 1, 32)
    rows = 0
    start = time.perf_counter()
    batches_fed = feed.Feed(ds, loop, rank=0, mode=mode)
    for batch in itertools.islice(iter(batches_fed), batches):
        with torch.no_grad():
            trainer.conditioning(batch, trainer.latents(batch).shape[-1] * 2)
        rows += len(batch["prompt"])
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="rows per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    if args.images % BATCH:
        parser.error(f"--images must be a multiple of the batch size {BATCH}")
    steps = args.epochs * args.images // BATCH
    header(
        "LATENT",
        "training-input preparation, experts.cache_latents on vs off (tiny-sd, Ray Data)",
        {
            "images": f"{args.images} ({SIZE[0]}x{SIZE[1]} PNG -> 32 px)",
            "epochs": args.epochs,
            "batch": BATCH,
            "steps per arm": steps,
            "dtype": "float32",
        },
        "1 (encoders in the driver), Ray decode tasks num_cpus=0.1",
        ("torch", "ray", "diffusers", "transformers"),
    )
    import ray
    import torch

    from selma_ray.experts import feed
    from selma_ray.experts.recipe import ExpertTrainer

    torch.set_num_threads(1)
    loop = {
        **loop_config(steps, steps),
        "batch_size": BATCH,
        "gradient_accumulation": 1,
        "random_flip": False,
    }
    flip = {**loop, "random_flip": True}
    cached = {**flip, "cache_latents": True}
    table = synthetic_table(["bench"], args.images, size=SIZE).drop(["skill"])
    trainer = ExpertTrainer(loop)
    rows: dict[str, list[int]] = {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source = ray.data.from_arrow(table)
            datasets = {
                "off, random flips": (flip, feed.training_datasets(source, [], flip)),
                "off, no flips": (loop, feed.training_datasets(source, [], loop)),
            }
            start = time.perf_counter()
            on = feed.training_datasets(source, [], cached, (RunDir(tmp), "latents"))
            on["train"].count()  # the cache is written by the first read
            build = time.perf_counter() - start
            datasets["on"] = (cached, on)

            def arm(name: str) -> float:
                cfg, ds = datasets[name]
                seconds, n = consume(trainer, ds["train"], cfg, steps)
                rows.setdefault(name, []).append(n)
                return seconds

            one_epoch = args.images // BATCH
            result = abba(
                {name: (lambda name=name: arm(name)) for name in datasets},
                warmup={
                    name: (lambda cfg=cfg, ds=ds: consume(trainer, ds["train"], cfg, one_epoch))
                    for name, (cfg, ds) in datasets.items()
                },
                log=progress,
            )
    finally:
        ray.shutdown()
    expected = steps * BATCH
    for name, counts in rows.items():
        if counts != [expected, expected]:
            raise RuntimeError(f"{name}: prepared {counts} rows per run, expected {expected}")
    print(
        f"every arm, every run: {steps} steps x batch {BATCH} = {expected} rows "
        f"({args.epochs} epochs of {args.images} images); seconds per arm run (whole run):"
    )
    print("\n".join(result.lines(".2f")))
    for name in result.order:
        print(
            f"  cache_latents {name}: {result.mean(name) / args.epochs:.2f} s/epoch, "
            f"rows per run {rows[name]}"
        )
    print(f"  one-time cache build (with flips, {args.images} rows): {build:.2f} s")
    flips = result.ratio(lambda m: m["off, random flips"] / m["on"])
    fixed = result.ratio(lambda m: m["off, no flips"] / m["on"])
    print(f"  on vs off (random flips) by order: {by_order(flips)}")
    print(f"  on vs off (no flips) by order: {by_order(fixed)}")
    finish(
        [
            ratio_line(
                "LATENT", "cache on vs off, no flips (input-prep speed-up)", fixed[2], ">=", 1
            ),
            ratio_line(
                "LATENT", "cache on vs off, random flips (input-prep speed-up)", flips[2], ">=", 1
            ),
        ]
    )


if __name__ == "__main__":
    main()
