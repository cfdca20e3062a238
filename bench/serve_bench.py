"""P5: adapter switching, reload-per-request and batching on the tiny model, engine and HTTP.

For each adapter rank (``--ranks``; tiny adapters load in milliseconds, so a large rank shows
the realistic regime for the reload baseline), with a synthetic run of 5 random experts and
their merge, the same requests and seeds for every variant, in one run:

engine (``DiffusionService``, what each Serve replica runs, no HTTP):
- p50 latency when every request switches adapter vs one fixed adapter;
- switching (all adapters loaded once, ``set_adapters``) vs a reload-per-request baseline
  (``load_lora_weights`` + ``set_adapters`` + ``delete_adapters`` per request);
- throughput of 8 requests as one batched forward pass vs one by one.

http (the real Serve app from serve/config.yaml on loopback, a private local Ray cluster):
- p50 latency of sequential requests that switch adapter vs a fixed adapter;
- switching over HTTP vs the engine-side reload-per-request baseline (reloading per request
  is not something the app can do; the baseline stays engine-side);
- throughput at concurrency 8 with micro-batching (max_batch_size 8) vs without
  (max_batch_size 1, set through user_config: same replica, no restart), for requests that
  all use one adapter and for requests that cycle through all of them. One diffusion replica
  (config.yaml's autoscaling would add a second one under load and blur the comparison).

Goals: switching/fixed <= 1.05x; switching >= 20x faster than reloading; batched >= 1.5x.

With ``--sd15``, the adapter change alone is also timed at real size (rank-128 adapters of
the SD v1.5 UNet shape), where loading an adapter costs what it costs in production.

    python bench/serve_bench.py [--mode both|engine|http|sd15] [--ranks 4,128] [--sd15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from selma_ray.testing import LocalServe, make_run, serve_app_config

SKILLS = ["dense_detail", "counting", "user_prompts", "commonsense_defying", "everyday_scenes"]
NAMES = [*SKILLS, "merged"]
PROMPT = "two red apples"
SIZE = 32
CONCURRENCY = 8


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def p50_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def blocks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def engine(root: Path, requests: int, steps: int) -> dict[str, float]:
    """p50 latencies (ms) fixed/switching/reload and 8-request batch times (s), in process."""
    import torch

    from selma_ray.core.lora_io import WEIGHT_NAME
    from selma_ray.diffusion.engine import DiffusionService

    # One intra-op thread, as Ray gives a Serve replica with num_cpus: 1 (OMP_NUM_THREADS=1);
    # on a busy 2-core machine, spinning OpenMP threads otherwise make timings erratic.
    torch.set_num_threads(1)
    svc = DiffusionService(root)
    seeds = list(range(requests))

    def one(name: str, seed: int) -> None:
        svc.generate_many(((name, 1.0),), [PROMPT], [seed], steps, 7.5, SIZE, SIZE)

    def reload_one(name: str, seed: int | None) -> None:
        """The baseline: load the adapter for this request, use it, drop it."""
        folder = root / "experts" / name if name != "merged" else root / "merged"
        svc.pipe.load_lora_weights(str(folder), weight_name=WEIGHT_NAME, adapter_name="per_req")
        if seed is None:  # the adapter change alone, without generating
            svc.pipe.set_adapters(["per_req"])
        else:
            svc.generate_many((("per_req", 1.0),), [PROMPT], [seed], steps, 7.5, SIZE, SIZE)
        svc.pipe.delete_adapters(["per_req"])

    one("merged", 0)  # warm-up
    # Variants alternate in blocks of 6 requests, so a change in machine load hits all alike.
    fixed, switching, reload = [], [], []
    for block in blocks(seeds, len(NAMES)):
        fixed += [timed(lambda s=s: one("merged", s)) for s in block]
        switching += [timed(lambda s=s: one(NAMES[s % len(NAMES)], s)) for s in block]
        reload += [timed(lambda s=s: reload_one(NAMES[s % len(NAMES)], s)) for s in block]
    # The adapter change alone (what differs between the two; generation is the same work):
    # set_adapters among loaded adapters vs load_lora_weights + set_adapters + delete_adapters.
    change_switch = [timed(lambda s=s: svc._activate(((NAMES[s % 6], 1.0),))) for s in seeds]
    change_reload = [timed(lambda s=s: reload_one(NAMES[s % 6], None)) for s in seeds]
    alone = together = 0.0
    for g in blocks(seeds, CONCURRENCY):
        alone += timed(lambda g=g: [one("merged", s) for s in g])
        together += timed(
            lambda g=g: svc.generate_many(
                (("merged", 1.0),), [PROMPT] * len(g), g, steps, 7.5, SIZE, SIZE
            )
        )
    return {
        "fixed": p50_ms(fixed),
        "switching": p50_ms(switching),
        "reload": p50_ms(reload),
        "change_switch": p50_ms(change_switch),
        "change_reload": p50_ms(change_reload),
        "alone_s": alone,
        "together_s": together,
    }


def sd15_adapter_change(rank: int, count: int, repeats: int) -> dict[str, float]:
    """The adapter change alone at real size: an SD v1.5-shaped UNet (uninitialised memory,
    no download) with ``count`` random rank-``rank`` LoRAs on its 128 attention projections.
    Switching (``set_adapters`` among loaded ones) vs reloading (``load_lora_adapter`` from
    safetensors + ``set_adapters`` + ``delete_adapters``), p50 in ms."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from selma_ray.core.lora_io import WEIGHT_NAME, save_adapter
    from selma_ray.testing import sd15_shaped_unet

    torch.set_num_threads(1)
    unet = sd15_shaped_unet().to_empty(device="cpu")
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    unet.add_adapter(config, adapter_name="shape")
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(unet, adapter_name="shape").items()}
    unet.delete_adapters("shape")
    tmp = Path(tempfile.mkdtemp())
    gen = torch.Generator().manual_seed(0)
    folders = []
    for i in range(count):
        state = {k: torch.randn(shape, generator=gen) * 0.01 for k, shape in shapes.items()}
        save_adapter(tmp / f"a{i}", state, config.to_dict())
        folders.append(tmp / f"a{i}")

    def load(i: int, name: str) -> None:
        unet.load_lora_adapter(
            str(folders[i % count]), weight_name=WEIGHT_NAME, prefix="unet", adapter_name=name
        )

    for i in range(count):
        load(i, f"a{i}")

    def reload(i: int) -> None:
        load(i, "per_req")
        unet.set_adapters(["per_req"])
        unet.delete_adapters("per_req")

    switch = [timed(lambda i=i: unet.set_adapters([f"a{i % count}"])) for i in range(repeats)]
    reloads = [timed(lambda i=i: reload(i)) for i in range(repeats)]
    params = sum(v.numel() for v in state.values())
    return {"switch": p50_ms(switch), "reload": p50_ms(reloads), "params": params}


def http(srv: LocalServe, root: Path, requests: int, steps: int) -> dict[str, float]:
    """The same measurements against the live Serve app over loopback."""
    import requests as rq

    limits = {"max_batch_size": CONCURRENCY, "batch_wait_timeout_s": 0.02, "max_n": 1}
    srv.deploy(serve_app_config(root, limits=limits, replicas=1))
    session = rq.Session()
    url = f"{srv.url}/v1/images/generations"
    headers = {"Accept": "image/png"}

    def post(name: str, seed: int, sess=session) -> None:
        body = {"prompt": PROMPT, "adapter": name, "seed": seed, "num_inference_steps": steps}
        resp = sess.post(url, json=body, headers=headers, timeout=300)
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {resp.text[:300]}")

    seeds = list(range(requests))
    for s in range(3):
        post("merged", s)  # warm-up: ingress caches, connection, kernels
    fixed, switching = [], []
    for block in blocks(seeds, len(NAMES)):
        fixed += [timed(lambda s=s: post("merged", s)) for s in block]
        switching += [timed(lambda s=s: post(NAMES[s % len(NAMES)], s)) for s in block]

    sessions = [rq.Session() for _ in range(CONCURRENCY)]

    def load(adapters: list[str], count: int) -> float:
        """Seconds for ``count`` requests from CONCURRENCY clients, one connection each."""
        jobs = [(adapters[i % len(adapters)], 1000 + i) for i in range(count)]

        def client(k: int) -> None:
            for name, seed in jobs[k::CONCURRENCY]:
                post(name, seed, sessions[k])

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            return timed(lambda: list(pool.map(client, range(CONCURRENCY))))

    out = {"fixed": p50_ms(fixed), "switching": p50_ms(switching)}
    spent = {(kind, b): 0.0 for kind in ("one", "mixed") for b in (CONCURRENCY, 1)}
    half = max(CONCURRENCY, requests // 2)
    for batch in (CONCURRENCY, 1, 1, CONCURRENCY):  # ABBA against drifting machine load
        # Only the batch size changes: user_config -> reconfigure, the replica stays.
        srv.deploy(
            serve_app_config(
                root,
                limits=limits,
                replicas=1,
                user_config={"limits": {**limits, "max_batch_size": batch}},
            )
        )
        while session.get(f"{srv.url}/v1/adapters").json()["replica"]["max_batch_size"] != batch:
            time.sleep(0.2)
        post("merged", 0)
        spent["one", batch] += load(["merged"], half)
        spent["mixed", batch] += load(NAMES, half)
    for (kind, batch), seconds in spent.items():
        out[f"rps_{kind}_b{batch}"] = 2 * half / seconds
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=["both", "engine", "http", "sd15"], default="both")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ranks", default="4,128", help="adapter ranks to measure, comma-separated")
    p.add_argument(
        "--sd15",
        action="store_true",
        help="also time the adapter change alone with rank-128 SD v1.5-shaped adapters "
        "(needs about 5 GB of RAM)",
    )
    args = p.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]

    tmp = Path(tempfile.mkdtemp())
    if args.mode == "sd15":  # only the real-size adapter change
        args.sd15, ranks = True, []
    runs = {r: make_run(tmp / f"rank{r}", SKILLS, rank=r) for r in ranks}
    head = (
        f"{args.requests} requests, {args.steps} steps, {SIZE}px tiny-sd, 6 adapters, "
        f"same seeds per variant, CPU"
    )
    print(f"\nP5 {head}")
    results: dict[tuple[str, int], dict[str, float]] = {}
    if args.mode in ("both", "engine"):
        for r in ranks:
            results["engine", r] = engine(runs[r], args.requests, args.steps)
    if args.mode in ("both", "http"):
        with LocalServe(num_cpus=2) as srv:
            for r in ranks:
                results["http", r] = http(srv, runs[r], args.requests, args.steps)

    if args.sd15:
        sd = sd15_adapter_change(rank=128, count=len(NAMES), repeats=12)
        print(
            f"engine, SD v1.5-shaped UNet, 6 adapters of rank 128 ({sd['params'] / 1e6:.1f}M "
            "parameters each), adapter change alone:"
        )
        print(f"  p50 set_adapters {sd['switch']:.1f} ms; load+set+delete {sd['reload']:.1f} ms")
        print(
            f"P5 sd15 r128 adapter change alone, switching vs reloading: "
            f"{sd['reload'] / sd['switch']:.1f}x faster"
        )
    for r in ranks:
        eng = results.get(("engine", r))
        if eng:
            print(f"engine, rank {r}:")
            for k in ("fixed", "switching", "reload"):
                print(f"  p50 latency {k:<10} {eng[k]:8.1f} ms")
            print(
                f"  {args.requests} requests one by one: {eng['alone_s']:6.2f} s; "
                f"batched by {CONCURRENCY}: {eng['together_s']:6.2f} s"
            )
            print(
                f"P5 engine r{r} p50 switching vs fixed adapter: "
                f"{eng['switching'] / eng['fixed']:.2f}x"
            )
            print(
                f"P5 engine r{r} switching vs reload-per-request: "
                f"{eng['reload'] / eng['switching']:.2f}x faster"
            )
            print(
                f"  adapter change alone, p50: set_adapters {eng['change_switch']:.2f} ms, "
                f"load+set+delete {eng['change_reload']:.2f} ms"
            )
            print(
                f"P5 engine r{r} adapter change alone, switching vs reloading: "
                f"{eng['change_reload'] / eng['change_switch']:.1f}x faster"
            )
            print(
                f"P5 engine r{r} throughput batched vs one by one ({CONCURRENCY} requests): "
                f"{eng['alone_s'] / eng['together_s']:.2f}x"
            )
        web = results.get(("http", r))
        if web:
            print(f"http (Serve on loopback), rank {r}:")
            for k in ("fixed", "switching"):
                print(f"  p50 latency {k:<10} {web[k]:8.1f} ms")
            for kind in ("one", "mixed"):
                print(
                    f"  throughput at concurrency {CONCURRENCY}, {kind} adapter(s): "
                    f"{web[f'rps_{kind}_b{CONCURRENCY}']:.1f} req/s batched, "
                    f"{web[f'rps_{kind}_b1']:.1f} req/s with max_batch_size=1"
                )
            print(
                f"P5 http r{r} p50 switching vs fixed adapter: "
                f"{web['switching'] / web['fixed']:.2f}x"
            )
            if eng:
                print(
                    f"P5 http r{r} switching vs reload-per-request (engine-side baseline): "
                    f"{eng['reload'] / web['switching']:.2f}x faster"
                )
            for kind in ("one", "mixed"):
                ratio = web[f"rps_{kind}_b{CONCURRENCY}"] / web[f"rps_{kind}_b1"]
                print(
                    f"P5 http r{r} throughput batched vs max_batch_size=1 "
                    f"(concurrency {CONCURRENCY}, {kind} adapter(s)): {ratio:.2f}x"
                )


if __name__ == "__main__":
    main()
