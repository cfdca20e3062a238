"""Filter benchmark: ROUGE-L filtering of 1000 candidates against 1000 accepted prompts.

Compares selma_ray's filter (rapidfuzz LCS in C++, vectorised with cdist) with a naive
pure-Python LCS, side by side in one run. The naive filter is timed on the first
``--naive-sample`` candidates and scaled to 1000 (it is linear in the candidates).

    python bench/rouge_bench.py
"""

from __future__ import annotations

import argparse
import random
import time

from selma_ray.text.rouge import RougeFilter, tokenize

WORDS = (
    "a an the two three red blue green small large wooden metal cat dog bird cup plate "
    "table chair lamp kite boat apple bread street park beach window garden kitchen "
    "under over beside near on in with riding holding sitting standing"
).split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(6, 22)))


def naive_lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def naive_filter(kept: list[str], candidates: list[str], threshold: float) -> list[bool]:
    kept_tok = [tokenize(t) for t in kept]
    verdicts = []
    for text in candidates:
        tok = tokenize(text)
        ok = all(2 * naive_lcs(tok, k) / (len(tok) + len(k)) <= threshold for k in kept_tok)
        if ok:
            kept_tok.append(tok)
        verdicts.append(ok)
    return verdicts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--naive-sample", type=int, default=100)
    args = p.parse_args()
    rng = random.Random(0)
    accepted = [sentence(rng) for _ in range(args.n)]
    candidates = [sentence(rng) for _ in range(args.n)]

    start = time.perf_counter()
    ours = RougeFilter(0.8, accepted).filter(candidates)
    t_ours = time.perf_counter() - start

    sample = candidates[: args.naive_sample]
    start = time.perf_counter()
    naive = naive_filter(accepted, sample, 0.8)
    t_naive = (time.perf_counter() - start) * args.n / len(sample)

    agree = all(o[0] == n for o, n in zip(ours, naive, strict=False))
    print(f"ROUGE-L filter, {args.n} candidates vs {args.n} accepted (threshold 0.8)")
    print(f"  selma_ray (rapidfuzz cdist): {t_ours:8.3f} s   kept {sum(k for k, _ in ours)}")
    print(f"  naive pure-Python LCS:       {t_naive:8.3f} s   (timed on {len(sample)}, scaled)")
    print(f"  verdicts agree on the sample: {agree}")
    print(f"selma_ray filter vs naive pure-Python LCS: {t_naive / t_ours:.1f}x faster")


if __name__ == "__main__":
    main()
