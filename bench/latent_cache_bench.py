"""Benchmark: training-input preparation time per epoch, with ``experts.cache_latents`` on vs off.

Input preparation is everything a training step needs before the UNet: Ray Data
preprocessing (decode, shorter-side resize + crop of non-native 48x80 PNGs, flip, tokenize),
then the VAE encoder and the text encoder. With the cache, an epoch only reads the cached
latent mean/std (both orientations) and text embeddings and samples the latents; the one-time
cache build is printed separately. Arms, in one run on a local Ray cluster, the encoders on
one torch thread in this process:
- off, random flips (the pipeline re-runs every epoch),
- off, no flips (preprocessing materialized once; encoders still run every epoch),
- on (cache with flips).

    python bench/latent_cache_bench.py [--images 128] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from training_bench import loop_config, synthetic_table


def epoch_seconds(trainer, ds, batch_size: int, epochs: int) -> float:
    import torch

    start = time.perf_counter()
    for _ in range(epochs):
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            with torch.no_grad():
                trainer.conditioning(batch, trainer.latents(batch).shape[-1] * 2)
    return (time.perf_counter() - start) / epochs


def main() -> None:
    import ray
    import torch

    from selma_ray.experts import data as train_data
    from selma_ray.experts.recipe import ExpertTrainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loop = {**loop_config(10, 10), "batch_size": 16}
    table = synthetic_table(["bench"], args.images, size=(48, 80)).select(["prompt", "image"])
    empty = table.slice(0, 0)
    trainer = ExpertTrainer(loop)
    bs = loop["batch_size"]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        flip = {**loop, "random_flip": True}
        off_flip = train_data.training_datasets(table, empty, flip, None, 1.0)["train"]
        off_fixed = train_data.training_datasets(table, empty, loop, None, 1.0)["train"]
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            on = train_data.training_datasets(table, empty, flip, Path(tmp), 1.0)["train"]
            build = time.perf_counter() - start
            times = {
                "off, random flips": epoch_seconds(trainer, off_flip, bs, args.epochs),
                "off, no flips": epoch_seconds(trainer, off_fixed, bs, args.epochs),
                "on": epoch_seconds(trainer, on, bs, args.epochs),
            }
    finally:
        ray.shutdown()
    print(f"{args.images} images (48x80 PNG -> 32 px), batch {bs}, mean of {args.epochs} epochs")
    for name, seconds in times.items():
        print(f"  cache_latents {name}: {seconds:.2f} s/epoch")
    print(f"  one-time cache build (with flips): {build:.2f} s")
    on_s = times["on"]
    print(
        f"latent cache on vs off: {times['off, random flips'] / on_s:.2f}x faster per epoch "
        f"(random flips), {times['off, no flips'] / on_s:.2f}x (no flips)"
    )


if __name__ == "__main__":
    main()
