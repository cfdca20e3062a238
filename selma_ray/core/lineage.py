"""Lineage by what was actually made.

A stage's fingerprint hashes the config it depends on, the content of the files that config
names, and the **output digests** its upstream stages recorded. Each manifest records what its
stage wrote: every output file with its SHA-256, a digest over them, and per-unit digests (one
per skill where the outputs split by skill). A stage counts as done only while its fingerprint
matches *and* every file its manifest lists is still there with the same content; so deleting
or editing an output redoes that stage, and downstream exactly what changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def digest(obj: Any) -> str:
    """A short, stable digest of JSON-able data."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def content_digest(path: str | Path) -> str | None:
    """Digest of a file's content, or of every file under a folder (by relative path);
    ``None`` when it does not exist."""
    path = Path(path).expanduser()
    if path.is_file():
        return file_sha256(path)[:16]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return digest({str(p.relative_to(path)): file_sha256(p) for p in files})
    return None


def outputs(
    root: Path, files: Iterable[Path], units: dict[str, str] | None = None
) -> dict[str, Any]:
    """The ``outputs`` record of a manifest: each file (relative to the run root) with its
    SHA-256, their digest, and optional per-unit digests."""
    listed = {str(Path(f).relative_to(root)): file_sha256(Path(f)) for f in sorted(files)}
    return {"files": listed, "digest": digest(listed), "units": dict(units or {})}


def verify(root: Path, manifest: dict[str, Any]) -> bool:
    """Every file the manifest lists is still there with the recorded content."""
    listed = (manifest.get("outputs") or {}).get("files", {})
    for rel, sha in listed.items():
        path = root / rel
        if not path.is_file() or file_sha256(path) != sha:
            return False
    return True


def output_digest(manifest: dict[str, Any] | None, unit: str | None = None) -> str | None:
    """What a downstream stage depends on: the unit's digest where the upstream recorded one,
    else the digest of all its outputs."""
    if manifest is None:
        return None
    out = manifest.get("outputs") or {}
    if unit is not None and unit in out.get("units", {}):
        return out["units"][unit]
    return out.get("digest")


@dataclass(frozen=True)
class Lineage:
    """What the pipeline hands a stage: its fingerprint (or one per unit) and the upstream
    output digests it was computed from."""

    fingerprint: str
    units: dict[str, str] = field(default_factory=dict)
    upstream: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)  # recorded in manifests, for --plan
