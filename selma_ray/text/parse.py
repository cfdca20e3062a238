"""Parsing LLM answers into candidate prompts (used by the prompts stage and by the eval
stage's held-out prompt generation)."""

from __future__ import annotations

import re

_ITEM = re.compile(r"^\s*(?:\(?\d+\s*[.):]|[-*\u2022])\s*(.+?)\s*$")


def _items(text: str) -> list[tuple[str, int]]:
    """(item, index of its line among the non-empty lines) of every item in ``text``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    matches = [_ITEM.match(line) for line in lines]
    if any(matches):
        raw = [(m.group(1), i) for i, m in enumerate(matches) if m]
    else:
        raw = [(line, i) for i, line in enumerate(lines) if not line.endswith(":")]
    items = []
    for item, i in raw:
        item = re.sub(r"\s*\(\d+\s+words?\)\s*$", "", item.strip())
        item = item.strip("\"'\u201c\u201d").strip()
        if item:
            items.append((item, i))
    return items


def parse_candidates(text: str) -> list[str]:
    """Pull list items out of an LLM answer: numbered or bulleted lines, quotes stripped.

    Small models sometimes answer with plain lines instead of a list; when no line is
    numbered or bulleted, every line that reads like a sentence is taken instead.
    """
    return [item for item, _ in _items(text)]


def split_cut_item(text: str, cut_off: bool) -> tuple[list[str], list[str]]:
    """(whole items, cut items) of an answer; ``cut_off``: the token limit ended it
    (``finish_reason == "length"``).

    A cut-off answer's last line stopped mid-way unless the text ends with a line break; an
    item on that line is cut (at most one). Nothing is cut from an answer that ended itself.
    """
    items = _items(text)
    last_line = len([line for line in text.splitlines() if line.strip()]) - 1
    ended_line = text.rstrip(" \t").endswith(("\n", "\r"))
    if cut_off and items and items[-1][1] == last_line and not ended_line:
        return [item for item, _ in items[:-1]], [items[-1][0]]
    return [item for item, _ in items], []
