"""Benchmark P4: merge 5 rank-128 LoRAs of the SD v1.5 UNet shape on CPU, for each method.

The layer shapes come from ``UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280),
cross_attention_dim=768, layers_per_block=2, attention_head_dim=8)`` built under
``accelerate.init_empty_weights()`` (no weights, no download); the LoRA tensors are random.

Each method runs in a fresh child process, so the peak RSS it reports (``ru_maxrss``) is its
own. Time is the merge itself (``merge_math.merge`` + ``to_state``, i.e. up to a state dict
ready to save), best of ``--repeat`` after one untimed warm-up merge in the same child; the
child's CPU seconds in that same merge are printed beside it (CPU well above wall x threads
means threads waiting on each other, as under load). The load average is printed before and
after the runs. The
children run in the method order and then in the reverse order (ABBA for two methods); time
is reported per order and as the mean of both, peak RSS as the larger of both. Memory is
reported as peak RSS and as (peak RSS - RSS before the inputs existed) / input size, which
counts the inputs themselves (so 1.0 is the floor). The baseline, measured in the same run,
is the naive per-key Python loop of the paper rule (``sum(w * s[key] for ...)`` per key).

Goals: the paper merge under 10 s (printed as the ratio of its time to 10 s, goal < 1);
every method under 1 s (the slowest method's mean time / 1 s, printed just before the
headline); peak RSS under 3x the inputs (worst method). For svd it also prints, untimed, the
relative Frobenius error of its dW on one module per shape against a float64 SVD of the
whole exact sum truncated to the same rank, and against the exact sum. Every method merges
the same inputs.

    python bench/merge_bench.py [--adapters 5] [--rank 128] [--methods paper,cat,...]

Its last line of output (the headline ratio, from ``_common.ratio_line``)::

    RATIO P4 paper merge of <n> rank-<r> adapters, time / 10 s: <x>x (goal < 1)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import by_order, finish, header, progress, ratio_line

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
NAIVE = "naive-paper"


def sd15_shapes() -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every attention projection of the SD v1.5 UNet."""
    from selma_ray.testing import sd15_shaped_unet

    unet = sd15_shaped_unet()
    return {
        name: (module.in_features, module.out_features)
        for name, module in unet.named_modules()
        if any(name == t or name.endswith("." + t) for t in TARGETS)
    }


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def svd_errors(adapters: list, weights: list[float], shapes: dict) -> dict[str, float]:
    """svd's error on one module of each distinct shape (untimed): its dW_k against a float64
    SVD of the whole exact sum truncated to the same rank (the cost of the float32 factored
    solve), and against the exact sum itself (the truncation, inherent to the method)."""
    import torch

    from selma_ray.lora.methods import delta_weight, merge

    picked = {tuple(shape): name for name, shape in shapes.items()}.values()
    merged = merge([{n: a[n] for n in picked} for a in adapters], weights, "svd", seed=0)
    vs_full, vs_sum = 0.0, 0.0
    for name in picked:
        exact = sum(
            w * delta_weight(a[name]).double() for w, a in zip(weights, adapters, strict=True)
        )
        rank = merged[name].rank
        u, s, vh = torch.linalg.svd(exact, full_matrices=False)
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        got = delta_weight(merged[name]).double()
        vs_full = max(vs_full, ((got - best).norm() / best.norm()).item())
        vs_sum = max(vs_sum, ((got - exact).norm() / exact.norm()).item())
    return {"svd_vs_full_svd": vs_full, "svd_vs_exact_sum": vs_sum, "svd_modules": len(picked)}


def randomized_svd(adapters: list, weights: list[float], shapes: dict, rank: int) -> dict:
    """The randomized alternative to svd's exact solve, on the same inputs: torch's own
    ``svd_lowrank`` (q = rank + 16, two power iterations) of each module's dense exact sum.
    Timed over every module (best of two), and its residual ||dW - dW_k||_F against the
    exact truncation's on one module per shape (the truncation's own residual is the floor
    of any rank-``rank`` result, so 0% here would be exact)."""
    import torch

    from selma_ray.lora.methods import cat_module

    def exact_sum(name: str) -> torch.Tensor:
        cat = cat_module([a[name] for a in adapters], weights)
        return cat.B @ cat.A

    def approx(dw: torch.Tensor) -> torch.Tensor:
        u, s, v = torch.svd_lowrank(dw, q=min(rank + 16, *dw.shape), niter=2)
        return (u[:, :rank] * s[:rank]) @ v[:, :rank].T

    times = []
    for _ in range(2):
        torch.manual_seed(0)
        start = time.perf_counter()
        for name in shapes:
            approx(exact_sum(name))
        times.append(time.perf_counter() - start)
    excess = 0.0
    for name in {tuple(shape): name for name, shape in shapes.items()}.values():
        dw = exact_sum(name).double()
        floor = torch.linalg.svdvals(dw)[rank:].norm()
        got = (dw - approx(dw.float()).double()).norm()
        excess = max(excess, (got / floor - 1).item())
    return {"randomized_seconds": min(times), "randomized_excess": excess}


def child(method: str, shapes_file: str, n: int, rank: int, repeat: int) -> dict:
    """Build the inputs, merge ``repeat`` times, report time and memory (runs in a child)."""
    import torch

    from selma_ray.lora.methods import LoraModule, default_weights, merge, to_state

    shapes = json.loads(Path(shapes_file).read_text())
    base = rss_mib()
    gen = torch.Generator().manual_seed(0)
    adapters = [
        {
            name: LoraModule(
                torch.randn(rank, fan_in, generator=gen) * 0.01,
                torch.randn(fan_out, rank, generator=gen) * 0.01,
                1.0,
            )
            for name, (fan_in, fan_out) in shapes.items()
        }
        for _ in range(n)
    ]
    input_mib = sum(m.A.nbytes + m.B.nbytes for a in adapters for m in a.values()) / 2**20
    weights = default_weights("paper" if method == NAIVE else method, n)
    times, cpu, out_rank = [], [], rank
    for _ in range(repeat + 1):  # the first merge is an untimed warm-up
        start, cpu_start = time.perf_counter(), time.process_time()
        if method == NAIVE:  # the old per-key loop over flat state dicts
            states = [
                {k: t for name, m in a.items() for k, t in ((f"{name}.A", m.A), (f"{name}.B", m.B))}
                for a in adapters
            ]
            out = {}
            for key in sorted(states[0]):
                acc = sum(
                    w * s[key].to(torch.float32) for w, s in zip(weights, states, strict=True)
                )
                out[key] = acc.to(torch.float32)
        else:
            out, out_rank, _ = to_state(merge(adapters, weights, method, seed=0))
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    errors = {}
    if method == "svd":
        errors = svd_errors(adapters, weights, shapes)
        errors |= randomized_svd(adapters, weights, shapes, out_rank)
    return {
        **errors,
        "method": method,
        "seconds": min(times[1:]),
        "cpu_seconds": cpu[1:][times[1:].index(min(times[1:]))],
        "peak_mib": peak,
        "base_mib": base,
        "input_mib": input_mib,
        "rank": out_rank,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=5)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--methods", default="paper,cat,svd,ties,dare_linear,dare_ties")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.shapes, args.adapters, args.rank, args.repeat)))
        return 0

    import torch

    methods = [NAIVE, *args.methods.split(",")]
    header(
        "P4",
        "LoRA merge of SD v1.5-shaped adapters (merge_math.merge + to_state), one child per run",
        {
            "adapters": args.adapters,
            "rank": args.rank,
            "methods": ",".join(methods),
            "repeat": f"best of {args.repeat} after 1 warm-up",
            "dtype": "float32",
        },
        torch.get_num_threads(),
        ("torch", "diffusers", "peft"),
    )
    shapes = sd15_shapes()
    params = sum((i + o) * args.rank for i, o in shapes.values())
    print(
        f"{args.adapters} adapters x rank {args.rank}, SD v1.5 UNet shape ({len(shapes)} "
        f"attention projections, {params / 1e6:.1f}M LoRA params per adapter), every method "
        "on the same inputs"
    )
    load_before = os.getloadavg()
    passes: list[dict[str, dict]] = [{}, {}]
    with tempfile.TemporaryDirectory() as tmp:
        shapes_file = Path(tmp) / "shapes.json"
        shapes_file.write_text(json.dumps(shapes))
        for i, order in enumerate((methods, methods[::-1])):
            for method in order:
                cmd = [sys.executable, __file__, "--child", method, "--shapes", str(shapes_file)]
                cmd += ["--adapters", str(args.adapters), "--rank", str(args.rank)]
                cmd += ["--repeat", str(args.repeat)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode:
                    print(f"{method}: failed\n{proc.stderr}", file=sys.stderr)
                    return 1
                passes[i][method] = json.loads(proc.stdout.strip().splitlines()[-1])
                progress(f"{method} (pass {i + 1}): {passes[i][method]['seconds']:.3f} s")

    load_after = os.getloadavg()
    print(
        "load average (1/5/15 min) before the runs: "
        + "/".join(f"{x:.2f}" for x in load_before)
        + ", after: "
        + "/".join(f"{x:.2f}" for x in load_after)
        + f" ({os.cpu_count()} CPUs)"
    )
    inputs = passes[0][NAIVE]["input_mib"]
    print(f"inputs: {inputs:.1f} MiB (fp32)")
    head = (
        f"{'method':<12} {'time (s) first/reverse/mean':>29} {'CPU (s) mean':>13} "
        f"{'peak RSS (MiB)':>15} {'RSS/inputs':>11} {'out rank':>9}"
    )
    print(head)
    print("-" * len(head))
    seconds, ratios = {}, {}
    for method in methods:
        runs = [p[method] for p in passes]
        seconds[method] = [r["seconds"] for r in runs]
        seconds[method].append(sum(seconds[method]) / 2)
        worst = max(runs, key=lambda r: r["peak_mib"] - r["base_mib"])
        ratios[method] = (worst["peak_mib"] - worst["base_mib"]) / worst["input_mib"]
        times = "/".join(f"{t:.3f}" for t in seconds[method])
        cpu = sum(r["cpu_seconds"] for r in runs) / len(runs)
        print(
            f"{method:<12} {times:>29} {cpu:>13.3f} {worst['peak_mib']:>15.0f} "
            f"{ratios[method]:>10.2f}x {worst['rank']:>9}"
        )
    print(
        "RSS/inputs = (peak RSS - RSS before the inputs existed) / input size; 1.00x = inputs "
        "(the larger of both runs)"
    )
    if "svd" in seconds:
        run = passes[0]["svd"]
        print(
            f"svd error (relative Frobenius, max over {run['svd_modules']} modules, one per "
            "shape): "
            f"vs a float64 SVD of the whole exact sum truncated to rank {run['rank']}: "
            f"{run['svd_vs_full_svd']:.2e}; vs the exact sum (the truncation itself): "
            f"{run['svd_vs_exact_sum']:.3f}"
        )
        print(
            "svd's randomized alternative (torch.svd_lowrank of each module's dense sum, "
            f"q = rank + 16, 2 power iterations): {run['randomized_seconds']:.3f} s for every "
            f"module (svd: {seconds['svd'][0]:.3f} s in the same pass), residual "
            f"+{100 * run['randomized_excess']:.1f}% over the exact truncation's (max over "
            "shapes)"
        )
    lines = []
    worst = max((m for m in methods if m != NAIVE), key=ratios.get)
    lines.append(
        ratio_line("P4", f"peak RSS over inputs, worst method {worst}", ratios[worst], "<", 3)
    )
    merges = [m for m in methods if m != NAIVE]
    slowest = max(merges, key=lambda m: seconds[m][2])
    print("  merge time / 1 s: " + ", ".join(f"{m} {seconds[m][2]:.2f}x" for m in merges))
    slowest_line = ratio_line(
        "P4", f"slowest merge method ({slowest}) time / 1 s", seconds[slowest][2], "<", 1
    )
    if "paper" in seconds:
        versus = tuple(p / n for p, n in zip(seconds["paper"], seconds[NAIVE], strict=True))
        print(f"  paper merge vs naive per-key python loop, the time: {by_order(versus)}")
        lines.append(
            ratio_line("P4", "paper merge vs naive per-key python loop (time)", versus[2], "<=", 1)
        )
        budget = tuple(t / 10 for t in seconds["paper"])
        print(f"  paper merge time / 10 s: {by_order(budget, '.3f')}")
        lines.append(
            ratio_line(
                "P4",
                f"paper merge of {args.adapters} rank-{args.rank} adapters, time / 10 s",
                budget[2],
                "<",
                1,
            )
        )
    lines.insert(len(lines) - 1 if "paper" in seconds else len(lines), slowest_line)
    finish(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
