"""P5: adapter switching, reload-per-request and batching on the tiny model, engine and HTTP.

For each adapter rank (``--ranks``; tiny adapters load in milliseconds, so a large rank shows
the realistic regime for the reload baseline), with a synthetic run of 5 random experts and
their merge, in one run. Every arm of a comparison serves the same requests (prompt, seeds,
steps, size); ``--requests`` per arm, split over the two passes of an ABBA order (arms in
order, then reversed) after an untimed warm-up of every arm.

engine (``DiffusionService``, what each Serve replica runs, no HTTP; one torch thread):
- p50 latency of four arms:
  * fused: a separate pipeline with ``merged`` fused into its weights (diffusers
    ``fuse_lora`` then ``unload_lora_weights``): no LoRA layers, nothing set per request,
    the truly fixed adapter;
  * same adapter: the service with every request on ``merged`` (``set_adapters`` still runs,
    and the unfused LoRA layers still compute);
  * switching: every request on the next of the 6 adapters;
  * reload: ``load_lora_weights`` + ``set_adapters`` + ``delete_adapters`` per request;
- the adapter change alone (``set_adapters`` vs load + set + delete, no generation);
- throughput of the requests in batches of 8 (one forward pass each) vs one by one.

http (the real Serve app from serve/config.yaml on loopback, a private local Ray cluster):
- p50 latency of sequential requests that switch adapter vs requests on one adapter (the app
  keeps adapters unfused; it has no fused mode, so the fused arm is engine-side only);
- switching over HTTP vs the engine-side reload-per-request baseline;
- throughput at concurrency 8 with micro-batching (max_batch_size 8) vs without
  (max_batch_size 1, set through user_config: same replica, no restart), for requests that
  all use one adapter and for requests that cycle through all of them. One diffusion replica.

Goals: switching p50 vs fused-fixed p50 <= 1.05x (the headline: engine, the first of
``--ranks``, default 4 = the tiny preset's expert rank; at rank 128 the LoRA is wider than the
tiny UNet's 32/64-channel projections, so unfused LoRA compute dominates there); switching
>= 20x faster than reloading; batched >= 1.5x the throughput of unbatched.

mixed (``--mode mixed``, engine level: on 2 cores the HTTP arms would time Ray's and
uvicorn's overhead as much as the forward passes): the six adapters cycling, requests
arriving 8 at a time as one replica's ``@serve.batch`` receives them, split into forward
passes by the app's own ``pass_groups`` and rendered by ``generate_mixed``: throughput of
mixed batches (one pass per 8) vs grouped by adapter (one pass per spec, the old grouping);
p50 latency of mixed batches vs the fused ``merged`` pipeline at the same concurrency; and
the gathered-bmm route vs PEFT's ``adapter_names`` mixed-batch route (why the engine uses
the former). Goals: mixed >= 1.5x grouped throughput, mixed p50 <= 1.3x fused.

With ``--sd15``, the adapter change alone is also timed at real size (rank-128 adapters of
the SD v1.5 UNet shape), where loading an adapter costs what it costs in production.

    python bench/serve_bench.py [--mode both|engine|http|sd15|mixed] [--ranks 4,128] [--sd15]

Its last line of output (the headline ratio, from ``_common.ratio_line``)::

    RATIO P5 engine r<rank> p50 switching vs fused fixed adapter: <x>x (goal <= 1.05)

or, with ``--mode mixed`` (for the first of ``--ranks``)::

    RATIO P5-mixed p50 mixed vs fused adapter: <x>x (goal <= 1.3)
    RATIO P5-mixed mixed vs grouped batching throughput: <x>x (goal >= 1.5)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import Comparison, abba, by_order, finish, header, progress, ratio_line, show

from selma_ray.testing import LocalServe, make_run, serve_app_config

SKILLS = ["dense_detail", "counting", "user_prompts", "commonsense_defying", "everyday_scenes"]
NAMES = [*SKILLS, "merged"]
PROMPT = "two red apples"
SIZE = 32
CONCURRENCY = 8
GUIDANCE = 7.5


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def p50_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def blocks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def two_passes(requests: int) -> list[list[int]]:
    """Seeds of the first and of the second pass (the same for every arm)."""
    half = max(1, requests // 2)
    return [list(range(half)), list(range(half, 2 * half))]


def per_pass(fn: Callable[[list[int]], float], seeds: list[list[int]]) -> Callable[[], float]:
    """An arm that runs ``fn`` on the first pass's seeds, then on the second pass's."""
    passes: Iterator[list[int]] = iter(seeds)
    return lambda: fn(next(passes))


def fused_pipeline(root: Path) -> Any:
    """The run's base pipeline with ``merged`` fused into the weights and the LoRA layers
    unloaded, so nothing is switched or added per request."""
    from diffusers import AutoPipelineForText2Image

    from selma_ray.core.lora_io import WEIGHT_NAME
    from selma_ray.diffusion.engine import load_run_config
    from selma_ray.models import resolve

    pipe = AutoPipelineForText2Image.from_pretrained(resolve(load_run_config(root).models.base))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(root / "merged"), weight_name=WEIGHT_NAME, adapter_name="merged")
    pipe.fuse_lora(adapter_names=["merged"], lora_scale=1.0)
    pipe.unload_lora_weights()
    leftover = [n for n, _ in pipe.unet.named_modules() if "lora" in n.lower()]
    if leftover:
        raise RuntimeError(f"LoRA layers left after fuse + unload: {leftover[:3]}")
    return pipe


def engine(root: Path, requests: int, steps: int) -> dict[str, Any]:
    """ABBA comparisons in process: p50 latencies (ms) of fused / same adapter / switching /
    reload, the adapter change alone (ms), and throughput batched vs one by one (s)."""
    import numpy as np
    import torch

    from selma_ray.core.lora_io import WEIGHT_NAME
    from selma_ray.diffusion.common import png_bytes
    from selma_ray.diffusion.engine import AdapterInfo, DiffusionService

    # One intra-op thread, as Ray gives a Serve replica with num_cpus: 1 (OMP_NUM_THREADS=1);
    # on a busy 2-core machine, spinning OpenMP threads otherwise make timings erratic.
    torch.set_num_threads(1)
    svc = DiffusionService(root)
    fused = fused_pipeline(root)

    def one(name: str, seed: int) -> None:
        svc.generate_many(((name, 1.0),), [PROMPT], [seed], steps, GUIDANCE, SIZE, SIZE)

    def fused_images(seeds: list[int]) -> Any:
        return fused(
            prompt=[PROMPT] * len(seeds),
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            height=SIZE,
            width=SIZE,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
        ).images

    def fused_one(seed: int) -> None:
        [png_bytes(img) for img in fused_images([seed])]

    def reload_one(name: str, seed: int | None) -> None:
        """The baseline: load the adapter for this request, use it, drop it."""
        folder = root / "experts" / name if name != "merged" else root / "merged"
        svc.pipe.load_lora_weights(str(folder), weight_name=WEIGHT_NAME, adapter_name="per_req")
        if seed is None:  # the adapter change alone, without generating
            svc.pipe.set_adapters(["per_req"])
        else:  # the service's own request path, with the adapter known for this request only
            svc.adapters["per_req"] = AdapterInfo("per_req", "expert", name, None, str(folder))
            try:
                svc.generate_many(
                    (("per_req", 1.0),), [PROMPT], [seed], steps, GUIDANCE, SIZE, SIZE
                )
            finally:
                del svc.adapters["per_req"]
        svc.pipe.delete_adapters(["per_req"])

    # The fused pipeline must render what the unfused merged adapter renders.
    svc._activate((("merged", 1.0),))
    unfused = svc.pipe(
        prompt=[PROMPT],
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        height=SIZE,
        width=SIZE,
        generator=[torch.Generator("cpu").manual_seed(0)],
        output_type="np",
    ).images
    fused_diff = float(np.abs(fused_images([0]) - unfused).max())

    def latency(fn: Callable[[int], None]) -> Callable[[list[int]], float]:
        return lambda seeds: p50_ms([timed(lambda s=s: fn(s)) for s in seeds])

    seeds = two_passes(requests)
    warm = [0, 1, 2]
    request_arms = {
        "fused": latency(fused_one),
        "same adapter": latency(lambda s: one("merged", s)),
        "switching": latency(lambda s: one(NAMES[s % len(NAMES)], s)),
        "reload": latency(lambda s: reload_one(NAMES[s % len(NAMES)], s)),
    }
    progress("engine: p50 latency per request")
    latencies = abba(
        {k: per_pass(fn, seeds) for k, fn in request_arms.items()},
        unit="ms",
        warmup={k: (lambda fn=fn: fn(warm)) for k, fn in request_arms.items()},
        log=progress,
    )
    # The adapter change alone (what differs between switching and reloading).
    change_arms = {
        "set_adapters": latency(lambda s: svc._activate(((NAMES[s % len(NAMES)], 1.0),))),
        "load+set+delete": latency(lambda s: reload_one(NAMES[s % len(NAMES)], None)),
    }
    progress("engine: adapter change alone")
    change = abba(
        {k: per_pass(fn, seeds) for k, fn in change_arms.items()},
        unit="ms",
        warmup={k: (lambda fn=fn: fn(warm)) for k, fn in change_arms.items()},
        log=progress,
    )

    def one_by_one(seeds: list[int]) -> float:
        return timed(lambda: [one("merged", s) for s in seeds])

    def batched(seeds: list[int]) -> float:
        return sum(
            timed(
                lambda g=g: svc.generate_many(
                    (("merged", 1.0),), [PROMPT] * len(g), g, steps, GUIDANCE, SIZE, SIZE
                )
            )
            for g in blocks(seeds, CONCURRENCY)
        )

    progress("engine: throughput")
    throughput = abba(
        {"one by one": per_pass(one_by_one, seeds), "batched": per_pass(batched, seeds)},
        warmup={
            "one by one": lambda: one_by_one(list(range(CONCURRENCY))),
            "batched": lambda: batched(list(range(CONCURRENCY))),
        },
        log=progress,
    )
    return {
        "latency": latencies,
        "change": change,
        "throughput": throughput,
        "fused_diff": fused_diff,
        "per_pass": len(seeds[0]),
    }


def peft_mixed_route(pipe: Any, names: list[str]) -> Any:
    """PEFT's own mixed-batch inference, for comparison with ``per_sample_adapters``: every
    LoRA layer gets ``adapter_names`` (one internal name per sample, ``__base__`` for base;
    repeated for the guidance halves) from a forward pre-hook, as diffusers' UNet does not
    pass it down. One adapter per sample; no weighted mixes."""
    from selma_ray.diffusion.mixed import lora_layers

    layers = lora_layers(pipe)

    def pre(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        blocks = args[0].shape[0] // len(names)
        return args, {**kwargs, "adapter_names": names * blocks}

    @contextlib.contextmanager
    def route() -> Iterator[None]:
        pipe.enable_lora()
        for layer in layers.values():  # PEFT reads layer.scaling, where set_adapters wrote
            for name in layer.scaling:
                layer.set_scale(name, 1.0)
        handles = [
            layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in layers.values()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    return route()


def mixed_engine(
    root: Path, requests: int, steps: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, Any]:
    """Six adapters cycling, requests arriving CONCURRENCY at a time (what one Serve replica's
    ``@serve.batch`` gets at concurrency 8), run through ``pass_groups`` and
    ``generate_mixed`` as ``Diffusion._batched`` runs them. Arms, each on the same blocks:

    - mixed: one forward pass per block (``pass_groups`` with ``mix_adapters``);
    - grouped: one pass per adapter spec (``mix_adapters=False``, the old grouping);
    - peft: one pass per block through PEFT's ``adapter_names`` route instead of the
      gathered bmm (the route comparison);
    - fused: the fused ``merged`` pipeline, one pass per block (every request on one
      adapter with nothing unfused: the latency floor).

    Throughput is a block's requests over the median block's time; a request's latency runs
    from its block's start to the end of the pass that renders it (p50 over the arm's pass).
    ``clock`` is wall time by default; ``time.process_time`` (``--clock cpu``) counts only
    this process's CPU seconds, a steadier figure on a machine other jobs keep busy (the
    replica's one torch thread is the only one computing here).
    Engine level, not HTTP: on 2 cores the HTTP arms would time Ray's and uvicorn's overhead
    as much as the forward passes."""
    import numpy as np
    import torch

    from selma_ray.diffusion.engine import DiffusionService
    from selma_ray.serving.app import pass_groups

    torch.set_num_threads(1)
    svc = DiffusionService(root)
    fused = fused_pipeline(root)

    def job(seed: int) -> dict[str, Any]:
        return {
            "spec": ((NAMES[seed % len(NAMES)], 1.0),),
            "prompt": PROMPT,
            "seed": seed,
            "steps": steps,
            "guidance_scale": GUIDANCE,
            "width": SIZE,
            "height": SIZE,
            "negative_prompt": None,
        }

    def render(jobs: list[dict[str, Any]]) -> list[bytes]:
        return svc.generate_mixed(
            [j["spec"] for j in jobs],
            [j["prompt"] for j in jobs],
            [j["seed"] for j in jobs],
            steps,
            GUIDANCE,
            SIZE,
            SIZE,
        )

    def peft_render(jobs: list[dict[str, Any]]) -> Any:
        names = [svc._internal[j["spec"][0][0]] for j in jobs]
        with svc._lock, peft_mixed_route(svc.pipe, names):
            return svc.pipe(**call(jobs)).images

    def fused_render(jobs: list[dict[str, Any]]) -> Any:
        return fused(**call(jobs)).images

    def call(jobs: list[dict[str, Any]]) -> dict[str, Any]:
        """The pipeline arguments of one pass over ``jobs`` (as the engine passes them)."""
        return {
            "prompt": [j["prompt"] for j in jobs],
            "num_inference_steps": steps,
            "guidance_scale": GUIDANCE,
            "height": SIZE,
            "width": SIZE,
            "generator": [torch.Generator("cpu").manual_seed(j["seed"]) for j in jobs],
            "output_type": "np",
        }

    latencies: dict[str, list[float]] = {}

    def arm(name: str, passes: Callable[[list[dict[str, Any]]], list[list[int]]], fn: Any):
        def run(seeds: list[int]) -> float:
            """Requests/s of the median block (robust to a busy neighbour's spikes); each
            request's latency noted for the p50."""
            done: list[float] = []
            per_block: list[float] = []
            for block in blocks(seeds, CONCURRENCY):
                jobs = [job(s) for s in block]
                start = clock()
                for members in passes(jobs):
                    fn([jobs[i] for i in members])
                    done += [clock() - start] * len(members)
                per_block.append(clock() - start)
            latencies.setdefault(name, []).append(p50_ms(done))
            return CONCURRENCY / statistics.median(per_block)

        return run

    def one_pass(jobs: list[dict[str, Any]]) -> list[list[int]]:
        return [list(range(len(jobs)))]

    negative = svc.negative_prompt_group
    arms = {
        "mixed": arm("mixed", lambda jobs: pass_groups(jobs, negative), render),
        "grouped": arm("grouped", lambda jobs: pass_groups(jobs, negative, False), render),
        "peft": arm("peft", one_pass, peft_render),
        "fused": arm("fused", one_pass, fused_render),
    }
    # Same images: the mixed pass vs each request alone, and PEFT's route vs the mixed pass.
    check = [job(s) for s in range(CONCURRENCY)]
    mixed_px = np.stack([png_pixels(png) for png in render(check)])
    alone_px = np.stack([png_pixels(render([j])[0]) for j in check])
    peft_px = np.round(np.clip(peft_render(check), 0, 1) * 255)
    # The single-spec path's own batch vs alone: how far batching alone moves this model.
    uniform = [{**j, "spec": check[0]["spec"]} for j in check]
    uniform_px = np.stack([png_pixels(png) for png in render(uniform)])
    uniform_alone = np.stack([png_pixels(render([j])[0]) for j in uniform])
    count = max(CONCURRENCY, requests // 2 // CONCURRENCY * CONCURRENCY)
    seeds = [list(range(count)), list(range(count, 2 * count))]
    progress("mixed batches: throughput and latency at concurrency 8")
    result = abba(
        {k: per_pass(fn, seeds) for k, fn in arms.items()},
        unit="req/s",
        warmup={k: (lambda fn=fn: fn(list(range(CONCURRENCY)))) for k, fn in arms.items()},
        log=progress,
    )
    p50 = Comparison(result.order, "ms")
    for i, arms_in_pass in enumerate((result.order, tuple(reversed(result.order)))):
        p50.passes.append({a: latencies[a][1 + i] for a in arms_in_pass})  # [0]: warm-up
    return {
        "throughput": result,
        "p50": p50,
        "vs_alone": float(np.abs(mixed_px - alone_px).max()),
        "peft_vs_mixed": float(np.abs(peft_px - mixed_px).max()),
        "uniform_vs_alone": float(np.abs(uniform_px - uniform_alone).max()),
        "per_pass": count,
    }


def png_pixels(png: bytes) -> Any:
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.float64)


def sd15_adapter_change(rank: int, count: int, repeats: int) -> tuple[Comparison, int]:
    """The adapter change alone at real size: an SD v1.5-shaped UNet (uninitialised memory,
    no download) with ``count`` random rank-``rank`` LoRAs on its 128 attention projections.
    Switching (``set_adapters`` among loaded ones) vs reloading (``load_lora_adapter`` from
    safetensors + ``set_adapters`` + ``delete_adapters``), p50 in ms per pass of ABBA."""
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

    def switch(i: int) -> None:
        unet.set_adapters([f"a{i % count}"])

    def latency(fn: Callable[[int], None]) -> Callable[[list[int]], float]:
        return lambda items: p50_ms([timed(lambda i=i: fn(i)) for i in items])

    seeds = two_passes(repeats)
    arms = {"set_adapters": latency(switch), "load+set+delete": latency(reload)}
    result = abba(
        {k: per_pass(fn, seeds) for k, fn in arms.items()},
        unit="ms",
        warmup={k: (lambda fn=fn: fn([0, 1])) for k, fn in arms.items()},
        log=progress,
    )
    return result, sum(v.numel() for v in state.values())


def http(srv: LocalServe, root: Path, requests: int, steps: int) -> dict[str, Any]:
    """The same measurements against the live Serve app over loopback."""
    import requests as rq

    limits = {"max_batch_size": CONCURRENCY, "batch_wait_timeout_s": 0.02, "max_n": 1}
    srv.deploy(serve_app_config(root, limits=limits, replicas=1))
    session = rq.Session()
    url = f"{srv.url}/v1/images/generations"
    headers = {"Accept": "image/png"}

    def post(name: str, seed: int, sess: Any = session) -> None:
        body = {"prompt": PROMPT, "adapter": name, "seed": seed, "num_inference_steps": steps}
        resp = sess.post(url, json=body, headers=headers, timeout=300)
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {resp.text[:300]}")

    def latency(fn: Callable[[int], None]) -> Callable[[list[int]], float]:
        return lambda seeds: p50_ms([timed(lambda s=s: fn(s)) for s in seeds])

    seeds = two_passes(requests)
    arms = {
        "same adapter": latency(lambda s: post("merged", s)),
        "switching": latency(lambda s: post(NAMES[s % len(NAMES)], s)),
    }
    progress("http: p50 latency per request")
    latencies = abba(
        {k: per_pass(fn, seeds) for k, fn in arms.items()},
        unit="ms",
        warmup={k: (lambda fn=fn: fn([0, 1, 2])) for k, fn in arms.items()},
        log=progress,
    )

    sessions = [rq.Session() for _ in range(CONCURRENCY)]
    current = {"batch": CONCURRENCY}

    def set_batch(batch: int) -> None:
        """Only the batch size changes: user_config -> reconfigure, the replica stays."""
        if current["batch"] == batch:
            return
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
        current["batch"] = batch
        post("merged", 0)

    def load(batch: int, adapters: list[str], count: int) -> float:
        """Requests/s of ``count`` requests from CONCURRENCY clients, one connection each."""
        set_batch(batch)
        jobs = [(adapters[i % len(adapters)], 1000 + i) for i in range(count)]

        def client(k: int) -> None:
            for name, seed in jobs[k::CONCURRENCY]:
                post(name, seed, sessions[k])

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            return count / timed(lambda: list(pool.map(client, range(CONCURRENCY))))

    count = max(CONCURRENCY, requests // 2)
    load_arms = {
        f"b{b} {kind}": (lambda b=b, a=a: load(b, a, count))
        for b in (CONCURRENCY, 1)
        for kind, a in (("one", ["merged"]), ("mixed", NAMES))
    }
    progress("http: throughput at concurrency 8")
    throughput = abba(
        load_arms,
        unit="req/s",
        warmup={
            f"b{b} {kind}": (lambda b=b, a=a: load(b, a, CONCURRENCY))
            for b in (CONCURRENCY, 1)
            for kind, a in (("one", ["merged"]), ("mixed", NAMES))
        },
        log=progress,
    )
    return {"latency": latencies, "throughput": throughput, "per_pass": len(seeds[0]), "n": count}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=["both", "engine", "http", "sd15", "mixed"], default="both")
    p.add_argument("--requests", type=int, default=36, help="requests per arm (two passes)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ranks", default="4,128", help="adapter ranks to measure, comma-separated")
    p.add_argument(
        "--sd15",
        action="store_true",
        help="also time the adapter change alone with rank-128 SD v1.5-shaped adapters "
        "(needs about 5 GB of RAM)",
    )
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="--mode mixed only: time wall-clock seconds, or this process's CPU seconds "
        "(steadier on a busy machine)",
    )
    args = p.parse_args()
    if args.clock == "cpu" and args.mode != "mixed":
        p.error("--clock cpu measures this process only: use it with --mode mixed")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.mode == "sd15":  # only the real-size adapter change
        args.sd15, ranks = True, []
    header(
        "P5",
        f"serving: adapter switching vs fused/reload, batching (mode {args.mode})",
        {
            "requests per arm": args.requests,
            "steps": args.steps,
            "size": f"{SIZE}px tiny-sd",
            "adapters": f"{len(NAMES)} (5 experts + merged)",
            "ranks": ",".join(map(str, ranks)) or "-",
            "sd15": args.sd15,
            "clock": args.clock,
            "dtype": "float32",
        },
        "1 (engine, as a 1-CPU Serve replica)",
        ("torch", "ray", "diffusers", "peft"),
    )

    tmp = Path(tempfile.mkdtemp())
    runs = {r: make_run(tmp / f"rank{r}", SKILLS, rank=r) for r in ranks}
    results: dict[tuple[str, int], dict[str, Any]] = {}
    if args.mode in ("both", "engine"):
        for r in ranks:
            progress(f"engine, rank {r}")
            results["engine", r] = engine(runs[r], args.requests, args.steps)
    if args.mode == "mixed":
        for r in ranks:
            progress(f"mixed batches, rank {r}")
            results["mixed", r] = mixed_engine(runs[r], args.requests, args.steps, clock)
    if args.mode in ("both", "http"):
        with LocalServe(num_cpus=2) as srv:
            for r in ranks:
                progress(f"http, rank {r}")
                results["http", r] = http(srv, runs[r], args.requests, args.steps)

    lines: list[str] = []
    headline: list[str] = []
    if args.sd15:
        sd, params = sd15_adapter_change(rank=128, count=len(NAMES), repeats=12)
        print(
            f"engine, SD v1.5-shaped UNet, {len(NAMES)} adapters of rank 128 "
            f"({params / 1e6:.1f}M parameters each), adapter change alone, p50 per pass "
            "(6 changes per arm per pass):"
        )
        ratio = show(
            sd,
            ".1f",
            lambda m: m["load+set+delete"] / m["set_adapters"],
            "switching vs reloading, speed-up",
            ".1f",
        )
        lines.append(
            ratio_line("P5", "sd15 r128 adapter change, switching vs reloading", ratio[2], ">=", 20)
        )
    for r in ranks:
        eng = results.get(("engine", r))
        if eng:
            lat, change, tput = eng["latency"], eng["change"], eng["throughput"]
            print(
                f"engine, rank {r}: p50 latency (ms), {eng['per_pass']} requests per arm per pass "
                f"(fused vs unfused merged output max |diff| {eng['fused_diff']:.2e}):"
            )
            print("\n".join(lat.lines(".1f")))
            vs_fused = lat.ratio(lambda m: m["switching"] / m["fused"])
            vs_same = lat.ratio(lambda m: m["switching"] / m["same adapter"])
            vs_reload = lat.ratio(lambda m: m["reload"] / m["switching"])
            print(f"  switching / fused p50: {by_order(vs_fused)}")
            print(
                f"  switching / same adapter (set_adapters each request) p50: {by_order(vs_same)}"
            )
            print(f"  reload / switching p50: {by_order(vs_reload)}")
            print(f"engine, rank {r}: adapter change alone, p50 (ms):")
            vs_change = show(
                change,
                ".2f",
                lambda m: m["load+set+delete"] / m["set_adapters"],
                "reload / switch",
                ".1f",
            )
            print(
                f"engine, rank {r}: {eng['per_pass']} requests on merged per pass, seconds, "
                f"batches of {CONCURRENCY} vs one by one:"
            )
            vs_batch = show(
                tput,
                ".2f",
                lambda m: m["one by one"] / m["batched"],
                "batched vs one by one throughput",
            )
            lines += [
                ratio_line(
                    "P5",
                    f"engine r{r} p50 switching vs same adapter unfused (set_adapters each)",
                    vs_same[2],
                    "<=",
                    1.05,
                ),
                ratio_line(
                    "P5", f"engine r{r} switching vs reload per request", vs_reload[2], ">=", 20
                ),
                ratio_line(
                    "P5",
                    f"engine r{r} adapter change alone, switching vs reloading",
                    vs_change[2],
                    ">=",
                    20,
                ),
                ratio_line(
                    "P5",
                    f"engine r{r} throughput batched by {CONCURRENCY} vs one by one",
                    vs_batch[2],
                    ">=",
                    1.5,
                ),
            ]
            fused_line = ratio_line(
                "P5", f"engine r{r} p50 switching vs fused fixed adapter", vs_fused[2], "<=", 1.05
            )
            (headline if r == ranks[0] else lines).append(fused_line)
        web = results.get(("http", r))
        if web:
            lat, tput = web["latency"], web["throughput"]
            print(
                f"http (Serve on loopback), rank {r}: p50 latency (ms), {web['per_pass']} "
                "sequential requests per arm per pass:"
            )
            vs_same = show(
                lat,
                ".1f",
                lambda m: m["switching"] / m["same adapter"],
                "switching / same adapter p50",
            )
            print(
                f"http, rank {r}: throughput at concurrency {CONCURRENCY} (req/s, "
                f"{web['n']} requests per arm per pass; b{CONCURRENCY} = max_batch_size "
                f"{CONCURRENCY}, b1 = max_batch_size 1):"
            )
            print("\n".join(tput.lines(".1f")))
            lines.append(
                ratio_line(
                    "P5",
                    f"http r{r} p50 switching vs same adapter (set_adapters each)",
                    vs_same[2],
                    "<=",
                    1.05,
                )
            )
            if eng:
                reload_ms = eng["latency"].mean("reload")
                ratio = reload_ms / lat.mean("switching")
                print(f"  engine reload p50 / http switching p50 (means): {ratio:.2f}x")
                lines.append(
                    ratio_line(
                        "P5",
                        f"http r{r} switching vs engine-side reload per request",
                        ratio,
                        ">=",
                        20,
                    )
                )
            for kind in ("one", "mixed"):
                batch = tput.ratio(lambda m, k=kind: m[f"b{CONCURRENCY} {k}"] / m[f"b1 {k}"])
                print(f"  batched vs max_batch_size=1, {kind} adapter(s): {by_order(batch)}")
                lines.append(
                    ratio_line(
                        "P5",
                        f"http r{r} throughput batched vs max_batch_size=1 at concurrency "
                        f"{CONCURRENCY}, {kind} adapter(s)",
                        batch[2],
                        ">=",
                        1.5,
                    )
                )
    for r in ranks:
        mix = results.get(("mixed", r))
        if not mix:
            continue
        tput, p50 = mix["throughput"], mix["p50"]
        print(
            f"engine, rank {r}: {len(NAMES)} adapters cycling, blocks of {CONCURRENCY} requests, "
            f"{mix['per_pass']} requests per arm per pass; mixed vs each request alone max "
            f"|diff| {mix['vs_alone']:.0f}/255 (one adapter's batch vs alone: "
            f"{mix['uniform_vs_alone']:.0f}/255), PEFT route vs mixed "
            f"{mix['peft_vs_mixed']:.0f}/255"
        )
        print(f"throughput (req/s, {args.clock} clock):")
        vs_grouped = show(
            tput, ".2f", lambda m: m["mixed"] / m["grouped"], "mixed / grouped throughput"
        )
        vs_peft = tput.ratio(lambda m: m["mixed"] / m["peft"])
        print(f"  gathered bmm / PEFT adapter_names throughput: {by_order(vs_peft)}")
        print(f"p50 latency per request (ms, {args.clock} clock):")
        vs_fused = show(p50, ".1f", lambda m: m["mixed"] / m["fused"], "mixed / fused p50")
        grouped_p50 = p50.ratio(lambda m: m["grouped"] / m["fused"])
        print(f"  grouped / fused p50: {by_order(grouped_p50)}")
        lines.append(
            ratio_line(
                "P5-mixed",
                f"r{r} gathered bmm vs PEFT adapter_names route throughput",
                vs_peft[2],
                ">=",
                1.0,
            )
        )
        rank = "" if r == ranks[0] else f"r{r} "  # the first rank's lines carry no prefix
        tail = [
            ratio_line("P5-mixed", f"{rank}p50 mixed vs fused adapter", vs_fused[2], "<=", 1.3),
            ratio_line(
                "P5-mixed",
                f"{rank}mixed vs grouped batching throughput",
                vs_grouped[2],
                ">=",
                1.5,
            ),
        ]
        if r == ranks[0]:
            headline += tail
        else:
            lines += tail
    finish(lines + headline)


if __name__ == "__main__":
    main()
