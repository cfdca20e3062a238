"""The run directory: where every stage reads its inputs and writes its outputs.

Each finished stage (or finished unit inside a stage, such as one skill's expert) writes a
``manifest.json`` last. The manifest records a fingerprint of what the output was made from
and what was written (``selma_ray.core.lineage``); a re-run skips work whose fingerprint still
matches and whose listed outputs are still intact.
Every file is written to a temporary name and renamed into place, so a killed job never
leaves a half-written file that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing an older one."""
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / final.name)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)


def safe_child(root: Path, name: str) -> Path:
    """``root / name`` for a user-supplied name, refusing anything that escapes ``root``."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"invalid name {name!r}: use letters, digits, '-', '_' or '.'")
    path = (root / name).resolve()
    if path.parent != root.resolve():
        raise ValueError(f"invalid name {name!r}: it leaves {root}")
    return path


class RunDir:
    """A local run directory (cloud URIs would plug in here, behind the same methods)."""

    def __init__(self, root: str | os.PathLike[str]):
        text = str(root)
        if "://" in text:
            raise ValueError(
                f"run.dir={text!r}: cloud URIs are not supported yet; use a local or shared path"
            )
        self.root = Path(text).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def read_manifest(self, *parts: str) -> dict[str, Any] | None:
        path = self.path(*parts, MANIFEST)
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_done(self, fingerprint: str, *parts: str) -> bool:
        """The manifest matches ``fingerprint`` and every output it lists is intact."""
        from selma_ray.core.lineage import verify

        manifest = self.read_manifest(*parts)
        if manifest is None or manifest.get("fingerprint") != fingerprint:
            return False
        return verify(self.root, manifest)

    def write_manifest(self, fingerprint: str, *parts: str, **info: Any) -> dict[str, Any]:
        manifest = {"fingerprint": fingerprint, "completed_at": time.time(), **info}
        atomic_write_json(self.path(*parts, MANIFEST), manifest)
        return manifest
