"""Filter benchmark ROUGE: ROUGE-L filtering of 1000 candidates against 1000 accepted prompts.

Compares selma_ray's filter (rapidfuzz LCS in C++, vectorised with cdist) with a naive
pure-Python LCS filter of the same rule, side by side in one run. Both arms filter the same
``--candidates`` candidates against the same ``--accepted`` prompts (every candidate is
checked against the accepted ones and the candidates kept before it), in ABBA order after a
warm-up of both on a small slice; their verdicts must agree.

Goal (chosen here, none was set): ours >= 10x faster than the naive loop. The filter runs
once per round per skill over every candidate, so an order of magnitude is what makes it
negligible next to generation at paper scale (thousands of prompts per skill).

    python bench/rouge_bench.py [--accepted 1000] [--candidates 1000]

Its last line of output (the headline ratio, from ``_common.ratio_line``)::

    RATIO ROUGE selma_ray filter vs naive pure-Python LCS (speed-up): <x>x (goal >= 10)
"""

from __future__ import annotations

import argparse
import random
import time

from _common import abba, finish, header, progress, ratio_line, show

from selma_ray.text.rouge import RougeFilter, tokenize

WORDS = (
    "a an the two three red blue green small large wooden metal cat dog bird cup plate "
    "table chair lamp kite boat apple bread street park beach window garden kitchen "
    "under over beside near on in with riding holding sitting standing"
).split()
THRESHOLD = 0.8


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


def ours_filter(kept: list[str], candidates: list[str], threshold: float) -> list[bool]:
    return [keep for keep, _ in RougeFilter(threshold, kept).filter(candidates)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accepted", type=int, default=1000)
    p.add_argument("--candidates", type=int, default=1000)
    args = p.parse_args()
    header(
        "ROUGE",
        "ROUGE-L filter, selma_ray (rapidfuzz cdist) vs naive pure-Python LCS",
        {"accepted": args.accepted, "candidates": args.candidates, "threshold": THRESHOLD},
        "n/a (single-threaded Python and rapidfuzz workers=1)",
        ("rapidfuzz",),
    )
    rng = random.Random(0)
    accepted = [sentence(rng) for _ in range(args.accepted)]
    candidates = [sentence(rng) for _ in range(args.candidates)]
    verdicts: dict[str, list[bool]] = {}

    def arm(name: str, fn) -> float:
        start = time.perf_counter()
        verdicts[name] = fn(accepted, candidates, THRESHOLD)
        return time.perf_counter() - start

    small = accepted[:50], candidates[:20]
    result = abba(
        {
            "ours": lambda: arm("ours", ours_filter),
            "naive": lambda: arm("naive", naive_filter),
        },
        warmup={
            "ours": lambda: ours_filter(*small, THRESHOLD),
            "naive": lambda: naive_filter(*small, THRESHOLD),
        },
        log=progress,
    )
    if verdicts["ours"] != verdicts["naive"]:
        raise RuntimeError("the two filters disagree on some verdicts")
    print(
        f"ROUGE-L filter, both arms: {args.candidates} candidates vs {args.accepted} accepted "
        f"(threshold {THRESHOLD}); kept {sum(verdicts['ours'])}; verdicts agree: True"
    )
    speedup = show(
        result, ".3f", lambda m: m["naive"] / m["ours"], "naive time / our time by order", ".1f"
    )
    finish(
        [
            ratio_line(
                "ROUGE",
                "selma_ray filter vs naive pure-Python LCS (speed-up)",
                speedup[2],
                ">=",
                10,
            )
        ]
    )


if __name__ == "__main__":
    main()
