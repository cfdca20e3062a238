"""P5 (engine side): adapter switching, reload-per-request and batching on the tiny model.

Measured on ``DiffusionService`` (what each Serve replica runs), without HTTP, in one run,
with the same requests and seeds for each variant:

- p50 latency when every request switches adapter vs one fixed adapter;
- switching (all adapters loaded once, ``set_adapters``) vs a reload-per-request baseline
  (``load_lora_weights`` + ``set_adapters`` + ``delete_adapters`` per request);
- throughput of 8 concurrent requests as one batched forward pass vs one by one.

    python bench/serve_bench.py [--requests 40] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from selma_ray.testing import make_run


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rank", type=int, default=32)
    args = p.parse_args()

    from selma_ray.lora_io import WEIGHT_NAME
    from selma_ray.serving import DiffusionService

    skills = ["dense_detail", "counting", "user_prompts", "commonsense_defying", "everyday_scenes"]
    root = Path(tempfile.mkdtemp()) / "run"
    make_run(root, skills, args.rank)
    svc = DiffusionService(root)
    names = [*skills, "merged"]
    seeds = list(range(args.requests))

    def one(name: str, seed: int) -> None:
        svc.generate_many(((name, 1.0),), ["two red apples"], [seed], args.steps, 7.5, 32, 32)

    one("merged", 0)  # warm-up
    fixed = [timed(lambda s=s: one("merged", s)) for s in seeds]
    switching = [timed(lambda s=s: one(names[s % len(names)], s)) for s in seeds]

    def reload_one(name: str, seed: int) -> None:
        svc.pipe.load_lora_weights(
            str(root / "experts" / name if name != "merged" else root / "merged"),
            weight_name=WEIGHT_NAME,
            adapter_name="per_request",
        )
        svc.generate_many(
            (("per_request", 1.0),), ["two red apples"], [seed], args.steps, 7.5, 32, 32
        )
        svc.pipe.delete_adapters(["per_request"])

    reload = [timed(lambda s=s: reload_one(names[s % len(names)], s)) for s in seeds]

    batch = 8
    groups = [seeds[i : i + batch] for i in range(0, len(seeds), batch)]
    alone = sum(timed(lambda g=g: [one("merged", s) for s in g]) for g in groups)
    together = sum(
        timed(
            lambda g=g: svc.generate_many(
                (("merged", 1.0),), ["two red apples"] * len(g), g, args.steps, 7.5, 32, 32
            )
        )
        for g in groups
    )

    p50 = {
        k: statistics.median(v) * 1000
        for k, v in {"fixed": fixed, "switching": switching, "reload": reload}.items()
    }
    print(
        f"\n{args.requests} requests, {args.steps} steps, 32px tiny-sd, 6 adapters of rank "
        f"{args.rank}, CPU"
    )
    for k, v in p50.items():
        print(f"  p50 latency {k:<10} {v:8.1f} ms")
    print(
        f"  {len(seeds)} requests one by one: {alone:6.2f} s; batched by {batch}: {together:6.2f} s"
    )
    print(f"P5 p50 switching vs fixed adapter: {p50['switching'] / p50['fixed']:.2f}x")
    print(f"P5 switching vs reload-per-request: {p50['reload'] / p50['switching']:.2f}x faster")
    print(f"P5 throughput batched vs one by one (8 concurrent): {alone / together:.2f}x")


if __name__ == "__main__":
    main()
