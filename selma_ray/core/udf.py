"""The one input check of every Ray Data UDF here: the columns a batch must carry."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def require_columns(owner: str, batch: Mapping[str, Any], columns: Iterable[str]) -> None:
    """Raise a ValueError naming the missing columns (and those present) before any work."""
    missing = [c for c in columns if c not in batch]
    if missing:
        raise ValueError(f"{owner} needs columns {missing}; got {sorted(batch)}")
