"""Lineage by what was actually made.

A stage's fingerprint hashes the config it depends on, the content of the files that config
names, and the **output digests** its upstream stages recorded. Each manifest records what its
stage wrote: every output file with its size and time (and SHA-256 where known), a digest,
and per-unit digests (one per skill where the outputs split by skill). A stage counts as
done only while its fingerprint matches *and* every file its manifest lists is still there
with the same size and modification time; so deleting or editing an output redoes that
stage, and downstream exactly what changed. Checking that costs one metadata call per file,
never a download.
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


def outputs(run: Any, files: Iterable[str], units: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``outputs`` record of a manifest: each file (relative to the run) with its size,
    modification time and, where this process wrote it, SHA-256; their digest; and optional
    per-unit digests. Sizes and times come from one metadata call per file, so recording and
    verifying never download the outputs (which, on object storage, would cost their size)."""
    rels = sorted({str(f) for f in files})
    infos = run.fs.get_file_info([run.key(r) for r in rels]) if rels else []
    listed: dict[str, dict[str, Any]] = {}
    for rel, info in zip(rels, infos, strict=True):
        if info.size is None:
            raise FileNotFoundError(f"output {run.url(rel)} is missing: cannot record it")
        entry: dict[str, Any] = {"size": info.size, "mtime_ns": info.mtime_ns}
        if rel in run.written:
            entry["sha256"] = run.written[rel]
        listed[rel] = entry
    identity = {r: e.get("sha256") or f"{e['size']}:{e['mtime_ns']}" for r, e in listed.items()}
    return {
        "files": listed,
        "digest": digest(units) if units else digest(identity),
        "units": dict(units or {}),
    }


def verify(run: Any, manifest: dict[str, Any]) -> bool:
    """Every file the manifest lists is still there, with the recorded size and time."""
    listed = (manifest.get("outputs") or {}).get("files", {})
    if not listed:
        return True
    rels = sorted(listed)
    for rel, info in zip(rels, run.fs.get_file_info([run.key(r) for r in rels]), strict=True):
        want = listed[rel]
        if not isinstance(want, dict) or info.size != want.get("size"):
            return False
        if want.get("mtime_ns") is not None and info.mtime_ns != want["mtime_ns"]:
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
