"""P1 / P1b: prompt-generation throughput, measured side by side in one run.

- P1: the prompts stage's Ray Data pass (vLLM actor) vs raw in-process ``vllm.LLM``, on the
  same model and the same requests. Goal >= 0.9x.
- P1b: the same requests through transformers ``generate`` (batched). Goal: vLLM >= 3x.

Two figures per engine: generated tokens per second of generation time alone (steady
state), and of wall time including engine start-up (what one round of the stage pays).
Tokens are counted with the model's tokenizer on the returned text, the same way for every
engine.

    python bench/prompts_bench.py [--requests 192] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import gc
import time

from selma_ray.config import load_config
from selma_ray.core.skills import get_skills
from selma_ray.models import resolve
from selma_ray.models.llm import VLLMGenerator
from selma_ray.models.llm_data import backend_udf, generate_with_ray_data
from selma_ray.prompts.stage import build_requests
from selma_ray.text.filters import SkillPool


def make_requests(cfg, n: int) -> list[dict]:
    pools = {s.name: SkillPool(s, cfg.prompts) for s in get_skills(cfg.prompts.skills)}
    requests = []
    round_idx = 0
    while len(requests) < n:
        requests += build_requests(cfg, pools, round_idx)
        round_idx += 1
    return requests[:n]


def count_tokens(tokenizer, texts) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts)


class TimedVLLMGenerator(VLLMGenerator):
    """The stage's UDF, also reporting how long generation took inside the actor."""

    def __call__(self, batch):
        start = time.perf_counter()
        out = super().__call__(batch)
        out["gen_seconds"] = [time.perf_counter() - start] * len(out["generated_text"])
        return out


def bench_raw_vllm(cfg, requests) -> tuple[float, float, list[str]]:
    _, kwargs = backend_udf(cfg)
    start = time.perf_counter()
    gen = VLLMGenerator(**kwargs)
    ready = time.perf_counter()
    out = gen(
        {"instruction": [r["instruction"] for r in requests], "seed": [r["seed"] for r in requests]}
    )
    end = time.perf_counter()
    texts = list(out["generated_text"])
    del gen
    gc.collect()
    return end - start, end - ready, texts


def bench_ray_data(cfg, requests) -> tuple[float, float, list[str]]:
    """The stage's own Ray Data pass, with the timed UDF swapped in."""
    from selma_ray.prompts import stage as prompts

    real = prompts.backend_udf
    prompts.backend_udf = lambda c: (TimedVLLMGenerator, real(c)[1])
    try:
        start = time.perf_counter()
        rows = generate_with_ray_data(cfg, requests)
        wall = time.perf_counter() - start
    finally:
        prompts.backend_udf = real
    gen = sum({r["gen_seconds"] for r in rows})  # one value per batch
    return wall, gen, [r["generated_text"] for r in rows]


def bench_transformers(cfg, requests, batch_size: int) -> tuple[float, float, list[str]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(cfg.models.llm)
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ready = time.perf_counter()
    texts = []
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
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=cfg.prompts.temperature,
                top_p=cfg.prompts.top_p,
                max_new_tokens=cfg.prompts.max_tokens,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
        texts += tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    end = time.perf_counter()
    return end - start, end - ready, texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--hf-batch", type=int, default=16)
    args = p.parse_args()

    import ray
    from transformers import AutoTokenizer

    cfg = load_config(
        "tiny", [f"prompts.max_tokens={args.max_tokens}", f"prompts.batch_size={args.requests}"]
    )
    requests = make_requests(cfg, args.requests)
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.models.llm))

    results = {}
    wall, gen, texts = bench_raw_vllm(cfg, requests)
    results["raw vllm.LLM"] = (wall, gen, count_tokens(tokenizer, texts))
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    wall, gen, texts = bench_ray_data(cfg, requests)
    results["Ray Data stage (vLLM actor)"] = (wall, gen, count_tokens(tokenizer, texts))
    ray.shutdown()
    hf = f"transformers generate (batch {args.hf_batch})"
    wall, gen, texts = bench_transformers(cfg, requests, args.hf_batch)
    results[hf] = (wall, gen, count_tokens(tokenizer, texts))

    print(
        f"\n{args.requests} chat requests, max {args.max_tokens} new tokens, "
        f"{cfg.models.llm}, CPU ({cfg.prompts.batch_size} per batch)"
    )
    print(
        f"  {'engine':<34}{'wall s':>8}{'gen s':>8}{'tokens':>8}{'tok/s gen':>11}{'tok/s wall':>12}"
    )
    gen_rate, wall_rate = {}, {}
    for name, (wall, gen, tokens) in results.items():
        gen_rate[name], wall_rate[name] = tokens / gen, tokens / wall
        print(
            f"  {name:<34}{wall:8.1f}{gen:8.1f}{tokens:8d}{gen_rate[name]:11.1f}"
            f"{wall_rate[name]:12.1f}"
        )
    rd, raw = "Ray Data stage (vLLM actor)", "raw vllm.LLM"
    print(
        f"P1  Ray Data stage vs raw vllm.LLM, generation: {gen_rate[rd] / gen_rate[raw]:.2f}x; "
        f"wall incl. start-up: {wall_rate[rd] / wall_rate[raw]:.2f}x"
    )
    print(
        f"P1b raw vllm.LLM vs transformers generate, generation: "
        f"{gen_rate[raw] / gen_rate[hf]:.2f}x; wall incl. start-up: "
        f"{wall_rate[raw] / wall_rate[hf]:.2f}x"
    )


if __name__ == "__main__":
    main()
