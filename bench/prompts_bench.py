"""P1 / P1b: prompt-generation throughput, measured side by side in one run.

- P1: the prompts stage's real path, ``PersistentEngines`` (a ``VLLMGenerator`` engine actor
  started once for the stage, fed by a Ray Data pass of ``EngineClient`` actors in batches
  of ``prompts.batch_size``), vs raw in-process ``vllm.LLM`` (the same ``VLLMGenerator``
  class, given all requests in one ``generate`` call), on the same model, engine arguments,
  requests and per-request seeds. Goal >= 0.9x.
- P1b: raw ``vllm.LLM`` vs transformers ``generate`` in its best configuration on this
  machine: dtype (float32 or bfloat16) and batch size chosen by a quick sweep (printed) on
  the first ``--sweep-requests`` requests with all torch threads, then the best of those
  also tried on one thread (vLLM's CPU worker binds one core here and reserves the other).
  Goal: vLLM >= 3x.

All three arms run in one process tree: the raw engine is built first (before Ray starts),
then Ray and the stage's engine, then the transformers model; all stay loaded while the arms
run in order and in reverse order (stage, raw, transformers, transformers, raw, stage) after
a warm-up of each on the first batch of requests (the warm-up of the stage starts its
engine). Both vLLM engines get ``--kv-fraction`` as ``gpu_memory_utilization`` (instead of
the preset's 0.3; on CPU it is the share of memory for the worker, weights and KV cache
together: 0.15 leaves room for every request at once), so two fit beside each other and
beside other work; each logs its KV cache size and thread binding.
Figures are generated tokens per second of a whole pass over the requests (a stage round:
the Ray Data pass included), tokens counted with the model's tokenizer on the returned text,
the same way for every arm. Start-up (engine or model load plus the warm-up batch) is
printed separately.

    python bench/prompts_bench.py [--requests 192] [--max-tokens 48] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable
from typing import Any

from _common import abba, by_order, finish, header, progress, ratio_line

from selma_ray.config import load_config
from selma_ray.core.skills import get_skills
from selma_ray.models import resolve
from selma_ray.models.llm import VLLMGenerator
from selma_ray.models.llm_data import backend_udf
from selma_ray.prompts.stage import build_requests
from selma_ray.text.filters import SkillPool


def make_requests(cfg: Any, n: int) -> list[dict]:
    pools = {s.name: SkillPool(s, cfg.prompts) for s in get_skills(cfg.prompts.skills)}
    requests: list[dict] = []
    round_idx = 0
    while len(requests) < n:
        requests += build_requests(cfg, pools, round_idx)
        round_idx += 1
    return requests[:n]


def count_tokens(tokenizer: Any, texts: list[str]) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts)


def columns(requests: list[dict]) -> dict[str, list]:
    return {
        "instruction": [r["instruction"] for r in requests],
        "seed": [r["seed"] for r in requests],
    }


class TimedVLLMGenerator(VLLMGenerator):
    """The stage's engine class, also writing each row's share of its batch's ``generate``
    time (``engine_s``), so a pass's time splits into engine time and the rest."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        start = time.perf_counter()
        out = super().__call__(batch)
        n = len(out["generated_text"])
        out["engine_s"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        return out


class HFGenerator:
    """transformers ``generate`` with the stage's sampling settings, in batches."""

    def __init__(self, cfg: Any, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve(cfg.models.llm)
        self.cfg = cfg
        self.tok = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()

    def __call__(self, requests: list[dict], batch_size: int) -> list[str]:
        import torch

        pc, tok = self.cfg.prompts, self.tok
        texts: list[str] = []
        for i in range(0, len(requests), batch_size):
            chunk = [
                tok.apply_chat_template(
                    [{"role": "user", "content": r["instruction"]}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
                for r in requests[i : i + batch_size]
            ]
            enc = tok(chunk, return_tensors="pt", padding=True)
            torch.manual_seed(i)
            with torch.no_grad():
                out = self.model.generate(
                    **enc,
                    do_sample=True,
                    temperature=pc.temperature,
                    top_p=pc.top_p,
                    max_new_tokens=pc.max_tokens,
                    pad_token_id=tok.pad_token_id or tok.eos_token_id,
                )
            texts += tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        return texts


def sweep_transformers(
    cfg: Any, requests: list[dict], batches: list[int], tokenizer: Any
) -> tuple[HFGenerator, int, list[str]]:
    """The fastest (dtype, batch size) by generated tokens/s on ``requests`` with this
    process's torch threads, then the same with one thread; leaves the faster thread count
    set and returns its model (the other is dropped). Each model is warmed up first."""
    import torch

    lines: list[str] = []
    rates: dict[tuple[str, int], float] = {}
    models = {}

    def measure(gen: HFGenerator, bs: int) -> float:
        start = time.perf_counter()
        texts = gen(requests, bs)
        return count_tokens(tokenizer, texts) / (time.perf_counter() - start)

    threads = torch.get_num_threads()
    for dtype in ("float32", "bfloat16"):
        models[dtype] = gen = HFGenerator(cfg, dtype)
        gen(requests[:2], 2)  # warm-up
        for bs in batches:
            rates[dtype, bs] = measure(gen, bs)
            lines.append(
                f"  transformers sweep: {dtype:<8} batch {bs:>3}, {threads} threads: "
                f"{rates[dtype, bs]:7.1f} tok/s"
            )
            progress(lines[-1].strip())
    (dtype, bs), best = max(rates.items(), key=lambda item: item[1])
    kept = models.pop(dtype)
    models.clear()
    gc.collect()
    if threads > 1:
        torch.set_num_threads(1)
        one = measure(kept, bs)
        lines.append(f"  transformers sweep: {dtype:<8} batch {bs:>3}, 1 thread: {one:7.1f} tok/s")
        progress(lines[-1].strip())
        if one > best:
            best, threads = one, 1
        else:
            torch.set_num_threads(threads)
    lines.append(f"  best: {dtype} batch {bs}, {threads} thread(s) ({best:.1f} tok/s on the sweep)")
    return kept, bs, lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument(
        "--batch-size", type=int, default=None, help="prompts.batch_size (default: the preset's)"
    )
    p.add_argument("--kv-fraction", type=float, default=0.15)
    p.add_argument("--sweep-requests", type=int, default=32)
    p.add_argument("--sweep-batches", default="8,16,32")
    args = p.parse_args()
    # vLLM logs to stdout by default, also from its exit handlers; stdout must end with the
    # RATIO lines, so its log goes to stderr (its engine processes inherit this).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    overrides = [
        f"prompts.max_tokens={args.max_tokens}",
        f"prompts.gpu_memory_utilization={args.kv_fraction}",
    ]
    if args.batch_size:
        overrides.append(f"prompts.batch_size={args.batch_size}")
    cfg = load_config("tiny", overrides)
    import torch

    header(
        "P1",
        f"prompt generation, PersistentEngines stage vs raw vllm.LLM vs transformers "
        f"({cfg.models.llm})",
        {
            "requests": args.requests,
            "max new tokens": args.max_tokens,
            "stage batch": cfg.prompts.batch_size,
            "vLLM dtype": backend_udf(cfg)[1]["engine_kwargs"]["dtype"],
            "kv fraction": args.kv_fraction,
            "engine actor num_cpus": cfg.resources.prompts.num_cpus,
            "sweep": f"{args.sweep_requests} requests x batches {args.sweep_batches}",
        },
        f"transformers {torch.get_num_threads()} then 1 (swept, driver); vLLM CPU binds its "
        f"own (VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')})",
        ("torch", "ray", "vllm", "transformers"),
    )
    import ray
    from transformers import AutoTokenizer

    from selma_ray.models import llm
    from selma_ray.models.llm_data import PersistentEngines

    requests = make_requests(cfg, args.requests)
    warm = requests[: cfg.prompts.batch_size]
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.models.llm))
    tokens: dict[str, list[int]] = {}
    engine_share: dict[str, list[float]] = {}
    startup: dict[str, float] = {}

    def rate(name: str, fn: Callable[[], tuple[list[str], float | None]]) -> float:
        """Generated tokens/s of one pass; notes the share of it spent in vLLM ``generate``."""
        start = time.perf_counter()
        texts, engine_seconds = fn()
        seconds = time.perf_counter() - start
        tokens.setdefault(name, []).append(count_tokens(tokenizer, texts))
        if engine_seconds is not None:
            engine_share.setdefault(name, []).append(engine_seconds / seconds)
        return tokens[name][-1] / seconds

    def stage_pass(batch: list[dict]) -> tuple[list[str], float]:
        rows = engines(cfg, batch)
        return [r["generated_text"] for r in rows], float(sum(r["engine_s"] for r in rows))

    def raw_pass(batch: list[dict]) -> tuple[list[str], float]:
        out = raw(columns(batch))
        return list(out["generated_text"]), float(out["engine_s"].sum())

    def first(name: str, build: Callable[[], Any], call: Callable[[Any], object]) -> Any:
        start = time.perf_counter()
        obj = build()
        call(obj)
        startup[name] = time.perf_counter() - start
        return obj

    _, kwargs = backend_udf(cfg)
    raw = first("raw vllm.LLM", lambda: TimedVLLMGenerator(**kwargs), lambda g: g(columns(warm)))
    # The engine actor's vLLM log (its thread binding, KV cache size) comes to this console.
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        with PersistentEngines(cfg) as engines:
            # The stage starts its engines from models.llm.VLLMGenerator: the timed one here.
            llm.VLLMGenerator = TimedVLLMGenerator
            try:
                first("stage", lambda: engines, lambda e: e(cfg, warm))
            finally:
                llm.VLLMGenerator = VLLMGenerator
            sweep = requests[: args.sweep_requests]
            start = time.perf_counter()
            hf, hf_batch, sweep_lines = sweep_transformers(
                cfg, sweep, [int(b) for b in args.sweep_batches.split(",")], tokenizer
            )
            startup["transformers"] = time.perf_counter() - start
            hf_name = f"transformers {hf.model.dtype} b{hf_batch} t{torch.get_num_threads()}"
            hf_name = hf_name.replace("torch.", "")
            arms = {
                "stage": lambda: rate("stage", lambda: stage_pass(requests)),
                "raw vllm.LLM": lambda: rate("raw vllm.LLM", lambda: raw_pass(requests)),
                hf_name: lambda: rate(hf_name, lambda: (hf(requests, hf_batch), None)),
            }
            result = abba(
                arms,
                unit="tok/s",
                warmup={
                    "stage": lambda: engines(cfg, warm),
                    "raw vllm.LLM": lambda: raw(columns(warm)),
                    hf_name: lambda: hf(warm, hf_batch),
                },
                log=progress,
            )
    finally:
        ray.shutdown()
    print(
        f"every arm, every run: {args.requests} chat requests (same instructions and seeds), "
        f"max {args.max_tokens} new tokens; stage in Ray Data batches of "
        f"{cfg.prompts.batch_size}, raw vLLM in one generate call, {hf_name} in batches of "
        f"{hf_batch}"
    )
    print("\n".join(sweep_lines))
    print("generated tokens/s of a whole pass:")
    print("\n".join(result.lines(".1f")))
    for name in result.order:
        share = engine_share.get(name)
        inside = (
            f"; share of the pass inside vLLM generate {[f'{x:.0%}' for x in share]}"
            if share
            else ""
        )
        print(f"  {name}: tokens generated per run {tokens[name]}{inside}")
    print(
        "start-up + warm-up batch (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in startup.items())
        + " (transformers: the whole sweep, both dtypes)"
    )
    p1 = result.ratio(lambda m: m["stage"] / m["raw vllm.LLM"])
    p1b = result.ratio(lambda m: m["raw vllm.LLM"] / m[hf_name])
    print(f"  stage vs raw vllm.LLM: {by_order(p1)}")
    print(f"  raw vllm.LLM vs {hf_name}: {by_order(p1b)}")
    finish(
        [
            ratio_line(
                "P1b",
                f"raw vllm.LLM vs best transformers generate ({hf_name}) (tokens/s)",
                p1b[2],
                ">=",
                3,
            ),
            ratio_line(
                "P1",
                "PersistentEngines prompts stage vs raw vllm.LLM (generated tokens/s)",
                p1[2],
                ">=",
                0.9,
            ),
        ]
    )


if __name__ == "__main__":
    main()
