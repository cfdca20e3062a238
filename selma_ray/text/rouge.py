"""ROUGE-L F-measure for SELMA's (self-instruct style) diversity filter.

Tokens follow rouge-score's default tokenizer without stemming (lower-case alphanumeric runs),
and ROUGE-L F1 = 2·LCS / (len(a) + len(b)). The LCS runs in rapidfuzz's C++ (``LCSseq`` on
token lists), vectorised over many pairs with ``process.cdist``, so a 1000×1000 check takes
well under a second.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from rapidfuzz.distance import LCSseq
from rapidfuzz.process import cdist

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case alphanumeric tokens, like rouge-score's default tokenizer (no stemming)."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    return int(LCSseq.similarity(a, b)) if a and b else 0


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 between two token lists (0 when either is empty)."""
    if not a or not b:
        return 0.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


def rouge_l_matrix(queries: list[list[str]], refs: list[list[str]]) -> np.ndarray:
    """ROUGE-L F1 of every query against every reference, shape (len(queries), len(refs))."""
    if not queries or not refs:
        return np.zeros((len(queries), len(refs)), dtype=np.float64)
    lcs = cdist(queries, refs, scorer=LCSseq.similarity, dtype=np.int32, workers=1)
    q_len = np.array([len(q) for q in queries], dtype=np.float64)[:, None]
    r_len = np.array([len(r) for r in refs], dtype=np.float64)[None, :]
    total = q_len + r_len
    return np.divide(2.0 * lcs, total, out=np.zeros_like(total), where=total > 0)


class RougeFilter:
    """Keeps a text only if its ROUGE-L F against every kept text is <= ``threshold``."""

    def __init__(self, threshold: float, kept: list[str] | None = None):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"ROUGE-L threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self._kept: list[list[str]] = [t for t in (tokenize(x) for x in kept or []) if t]

    def __len__(self) -> int:
        return len(self._kept)

    def filter(self, texts: list[str], limit: int | None = None) -> list[tuple[bool, float]]:
        """Offer ``texts`` in order; returns (kept, max ROUGE-L vs. what was kept before) each.

        Every text is compared with the kept set and with the texts kept earlier in this call;
        at most ``limit`` are kept (later ones get ``(False, score)``).
        """
        tokens = [tokenize(t) for t in texts]
        against_kept = rouge_l_matrix(tokens, self._kept)
        best = against_kept.max(axis=1) if self._kept else np.zeros(len(tokens))
        verdicts: list[tuple[bool, float]] = []
        new: list[list[str]] = []
        for tok, score in zip(tokens, best, strict=True):
            score = max([float(score), *(rouge_l(tok, other) for other in new)])
            room = limit is None or len(new) < limit
            keep = bool(tok) and score <= self.threshold and room
            if keep:
                new.append(tok)
            verdicts.append((keep, score))
        self._kept.extend(new)
        return verdicts

    def offer(self, text: str) -> bool:
        """Keep one ``text`` if it is diverse enough; returns whether it was kept."""
        return self.filter([text])[0][0]

    def max_score(self, text: str) -> float:
        tokens = tokenize(text)
        if not tokens or not self._kept:
            return 0.0
        return float(rouge_l_matrix([tokens], self._kept).max())
