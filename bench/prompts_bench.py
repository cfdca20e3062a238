"""P1 / P1b: prompt-generation throughput, measured side by side in one run.

- P1: the prompts stage's Ray Data pass (vLLM actor) vs raw in-process ``vllm.LLM``, on the
  same model and the same requests. Goal >= 0.9x.
- P1b: the same requests through transformers ``generate`` (batched). Goal: vLLM >= 3x.

Each figure is generated tokens per second of wall time including engine start-up, which
is what a round of the stage pays. Tokens are counted with the model's tokenizer on the
returned text, the same way for every engine.

    python bench/prompts_bench.py [--requests 64] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import gc
import time

from selma_ray.config import load_config
from selma_ray.llm import VLLMGenerator
from selma_ray.models import resolve
from selma_ray.prompt_filters import SkillPool
from selma_ray.prompts import backend_udf, build_requests, generate_with_ray_data
from selma_ray.skills import get_skills


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


def bench_raw_vllm(cfg, requests) -> tuple[float, list[str]]:
    _, kwargs = backend_udf(cfg)
    start = time.perf_counter()
    gen = VLLMGenerator(**kwargs)
    out = gen(
        {"instruction": [r["instruction"] for r in requests], "seed": [r["seed"] for r in requests]}
    )
    elapsed = time.perf_counter() - start
    texts = list(out["generated_text"])
    del gen
    gc.collect()
    return elapsed, texts


def bench_ray_data(cfg, requests) -> tuple[float, list[str]]:
    start = time.perf_counter()
    rows = generate_with_ray_data(cfg, requests)
    return time.perf_counter() - start, [r["generated_text"] for r in rows]


def bench_transformers(cfg, requests, batch_size: int) -> tuple[float, list[str]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(cfg.models.llm)
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
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
    return time.perf_counter() - start, texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=64)
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
    t, texts = bench_raw_vllm(cfg, requests)
    results["raw vllm.LLM"] = (t, count_tokens(tokenizer, texts))
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    t, texts = bench_ray_data(cfg, requests)
    results["Ray Data stage"] = (t, count_tokens(tokenizer, texts))
    ray.shutdown()
    t, texts = bench_transformers(cfg, requests, args.hf_batch)
    results[f"transformers generate (batch {args.hf_batch})"] = (t, count_tokens(tokenizer, texts))

    print(
        f"\n{args.requests} chat requests, max {args.max_tokens} new tokens, "
        f"{cfg.models.llm}, CPU; wall time includes engine start-up"
    )
    rate = {}
    for name, (secs, tokens) in results.items():
        rate[name] = tokens / secs
        print(f"  {name:<32} {secs:7.1f} s {tokens:6d} tokens {rate[name]:8.1f} tokens/s")
    hf = f"transformers generate (batch {args.hf_batch})"
    print(
        f"P1  Ray Data stage vs raw vllm.LLM: {rate['Ray Data stage'] / rate['raw vllm.LLM']:.2f}x"
    )
    print(f"P1b raw vllm.LLM vs transformers generate: {rate['raw vllm.LLM'] / rate[hf]:.2f}x")


if __name__ == "__main__":
    main()
