"""ROUGE-L F-measure, as used by SELMA's (self-instruct style) diversity filter."""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case alphanumeric tokens, like rouge-score's default tokenizer (no stemming)."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 between two token lists (0 when either is empty)."""
    if not a or not b:
        return 0.0
    lcs = lcs_length(a, b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


class RougeFilter:
    """Keeps a candidate only if its ROUGE-L F against every kept text is <= ``threshold``."""

    def __init__(self, threshold: float, kept: list[str] | None = None):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"ROUGE-L threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self._kept: list[list[str]] = [tokenize(t) for t in kept or []]

    def max_score(self, text: str) -> float:
        tokens = tokenize(text)
        return max((rouge_l(tokens, k) for k in self._kept), default=0.0)

    def offer(self, text: str) -> bool:
        """Keep ``text`` if it is diverse enough; returns whether it was kept."""
        tokens = tokenize(text)
        if not tokens:
            return False
        if any(rouge_l(tokens, k) > self.threshold for k in self._kept):
            return False
        self._kept.append(tokens)
        return True
