"""Parsing LLM answers into candidate prompts (used by the prompts stage and by the eval
stage's held-out prompt generation)."""

from __future__ import annotations

import re

_ITEM = re.compile(r"^\s*(?:\(?\d+\s*[.):]|[-*\u2022])\s*(.+?)\s*$")


def parse_candidates(text: str) -> list[str]:
    """Pull list items out of an LLM answer: numbered or bulleted lines, quotes stripped.

    Small models sometimes answer with plain lines instead of a list; when no line is
    numbered or bulleted, every line that reads like a sentence is taken instead.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    matches = [_ITEM.match(line) for line in lines]
    if any(matches):
        raw = [m.group(1) for m in matches if m]
    else:
        raw = [line for line in lines if not line.endswith(":")]
    items = []
    for item in raw:
        item = re.sub(r"\s*\(\d+\s+words?\)\s*$", "", item.strip())
        item = item.strip("\"'\u201c\u201d").strip()
        if item:
            items.append(item)
    return items
