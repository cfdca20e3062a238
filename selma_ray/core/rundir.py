"""The run directory: where every stage reads its inputs and writes its outputs.

A run directory is a local folder or a prefix on any pyarrow filesystem (``s3://bucket/run``,
``gs://...``; ``selma_ray.core.storage``). Every stage, remote task, actor and Serve replica
reaches it only through ``RunDir``, rebuilt on the remote side from ``RunDir.spec``: no node
assumes it shares a disk with another.

**Commit protocol.** Object stores have no atomic rename, so a stage's outputs go first and its
``manifest.json`` goes last: the manifest lists every output (size, modification time and, where
the writer knew it, SHA-256) and is the commit marker. A stage that starts over deletes its old
manifest before touching its outputs, and readers trust only what a manifest lists; a killed
job may leave stray objects behind, never a half-written output that a manifest vouches for.
A single object is written whole or not at all (one PUT, or a multipart upload completed on
close); on a local disk each file is written to a temporary name and renamed into place, and
``put_dir`` renames a whole folder into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from selma_ray.core.lineage import file_sha256, outputs, verify
from selma_ray.core.storage import (
    StorageError,
    StorageOptions,
    filesystem,
    is_local,
    probe,
    resolved,
)

MANIFEST = "manifest.json"
# Test hook, never a config key: ``SELMA_KILL_BEFORE_COMMIT=merged`` makes the commit of
# ``merged/`` fail after its outputs are written and before its manifest is, like a kill there.
KILL_ENV = "SELMA_KILL_BEFORE_COMMIT"


class KilledBeforeCommit(RuntimeError):
    """Raised by the ``SELMA_KILL_BEFORE_COMMIT`` test hook."""


def current_umask() -> int:
    """The process's umask (Linux: read, not set, so other threads never see it change)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_mode(path: Path | str, directory: bool = False) -> None:
    """Gives a temporary file or folder (``mkstemp``: 0600, ``mkdtemp``: 0700) the mode a plain
    ``open`` or ``mkdir`` would have, so that a run directory shared by a team stays readable
    by those the umask lets in."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        shared_mode(tmp)
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


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json_text(data))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing an older one."""
    shared_mode(tmp, directory=True)
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / final.name)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)


def check_name(name: str) -> str:
    """A user-supplied name that will become one path component, refused if it could escape."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"invalid name {name!r}: use letters, digits, '-', '_' or '.'")
    return name


def safe_child(root: Path, name: str) -> Path:
    """``root / name`` for a user-supplied name, refusing anything that escapes ``root``."""
    path = (root / check_name(name)).resolve()
    if path.parent != root.resolve():
        raise ValueError(f"invalid name {name!r}: it leaves {root}")
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RunDir:
    """A run directory on a local disk or on object storage, behind the same methods.

    ``parts`` arguments are path components relative to the run (``"experts", "counting"``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        storage: StorageOptions | dict[str, Any] | Any | None = None,
    ):
        text = str(root)
        self.options = resolved(StorageOptions.of(storage))
        self.fs, self.base = filesystem(text, self.options)
        self.local = is_local(text)
        self.uri = self.base if self.local else f"{text.partition('://')[0]}://{self.base}"
        self.written: dict[str, str] = {}  # run-relative path -> SHA-256 of what we wrote

    # ---- identity ---------------------------------------------------------------------------
    @property
    def spec(self) -> dict[str, Any]:
        """Plain data that rebuilds this run directory on any node (``RunDir.from_spec``)."""
        return {"uri": self.uri, "storage": self.options.to_dict()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | str) -> RunDir:
        if isinstance(spec, str):
            return cls(spec)
        return cls(spec["uri"], spec.get("storage"))

    @property
    def root(self) -> Path:
        """The local folder (local run directories only)."""
        if not self.local:
            raise StorageError(f"{self.uri} is on object storage; this step needs a local path")
        return Path(self.base)

    def path(self, *parts: str) -> Path:
        """A local path inside the run (local run directories only)."""
        return self.root.joinpath(*parts)

    def key(self, *parts: str) -> str:
        """The path inside ``self.fs`` (what pyarrow, Ray Data and Ray Train take)."""
        return "/".join([self.base, *(p.strip("/") for p in parts if p)])

    def url(self, *parts: str) -> str:
        """What to show a person: a local path or a full URI."""
        return "/".join([self.uri, *parts])

    def rel(self, key: str) -> str:
        return key[len(self.base) :].lstrip("/")

    def check(self) -> None:
        """Write and delete a probe object: fails early, saying what to fix."""
        probe(self.fs, self.base, self.uri, self.options)

    # ---- reading ----------------------------------------------------------------------------
    def info(self, *parts: str):
        return self.fs.get_file_info(self.key(*parts))

    def exists(self, *parts: str) -> bool:
        from pyarrow.fs import FileType

        return self.info(*parts).type != FileType.NotFound

    def is_file(self, *parts: str) -> bool:
        from pyarrow.fs import FileType

        return self.info(*parts).type == FileType.File

    def listdir(self, *parts: str) -> list[str]:
        """Names directly under ``parts`` (sorted; empty when it does not exist)."""
        from pyarrow.fs import FileSelector

        infos = self.fs.get_file_info(FileSelector(self.key(*parts), allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def files(self, *parts: str, suffix: str = "") -> list[str]:
        """Run-relative paths of every file under ``parts`` (recursive, sorted)."""
        from pyarrow.fs import FileSelector, FileType

        sel = FileSelector(self.key(*parts), recursive=True, allow_not_found=True)
        infos = self.fs.get_file_info(sel)
        return sorted(
            self.rel(i.path)
            for i in infos
            if i.type == FileType.File and i.base_name.endswith(suffix)
        )

    def read_bytes(self, *parts: str) -> bytes:
        """The file's content; FileNotFoundError when it is not there."""
        key = self.key(*parts)
        try:
            with self.fs.open_input_stream(key) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            if not self.exists(*parts):
                raise FileNotFoundError(self.url(*parts)) from e
            raise

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def get_file(self, dest: Path, *parts: str) -> Path:
        """Copy one file to the local path ``dest``."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, self.read_bytes(*parts))
        return dest

    def get_dir(self, dest: Path, *parts: str) -> Path:
        """Copy every file under ``parts`` into the local folder ``dest``."""
        prefix = "/".join(parts)
        for rel in self.files(*parts):
            sub = rel[len(prefix) :].lstrip("/")
            self.get_file(dest / sub, rel)
        return dest

    # ---- writing ----------------------------------------------------------------------------
    def write_bytes(self, data: bytes, *parts: str) -> str:
        """Write a whole file (atomically: temp + rename locally, one object remotely);
        returns its SHA-256."""
        if self.local:
            atomic_write_bytes(self.path(*parts), data)
        else:
            with self.fs.open_output_stream(self.key(*parts)) as f:
                f.write(data)
        sha = _sha256(data)
        self.written["/".join(parts)] = sha
        return sha

    def write_text(self, text: str, *parts: str) -> str:
        return self.write_bytes(text.encode(), *parts)

    def write_json(self, data: Any, *parts: str) -> str:
        return self.write_text(json_text(data), *parts)

    def delete(self, *parts: str) -> None:
        """Remove a file or a folder (and everything under it); nothing if it is not there."""
        from pyarrow.fs import FileType

        info = self.info(*parts)
        if info.type == FileType.File:
            self.fs.delete_file(info.path)
        elif info.type == FileType.Directory:
            self.fs.delete_dir(info.path)

    def put_dir(self, local: Path, *parts: str) -> dict[str, str]:
        """Replace the folder ``parts`` with the files of the local folder ``local``; returns
        each written file (run-relative) with its SHA-256. Locally the new folder is renamed
        into place whole; on object storage the old objects go first, then the new ones."""
        local = Path(local)
        shas: dict[str, str] = {}
        files = sorted(p for p in local.rglob("*") if p.is_file())
        if self.local:
            final = self.path(*parts)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
            try:
                shutil.copytree(local, tmp, dirs_exist_ok=True)
                replace_dir(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            for p in files:
                shas["/".join([*parts, p.relative_to(local).as_posix()])] = file_sha256(p)
        else:
            self.delete(*parts)
            for p in files:
                rel = p.relative_to(local).as_posix()
                shas["/".join([*parts, rel])] = self.write_bytes(p.read_bytes(), *parts, rel)
        self.written.update(shas)
        return shas

    # ---- manifests --------------------------------------------------------------------------
    def read_manifest(self, *parts: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.read_bytes(*parts, MANIFEST))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def is_done(self, fingerprint: str, *parts: str) -> bool:
        """The manifest matches ``fingerprint`` and every output it lists is intact."""
        manifest = self.read_manifest(*parts)
        if manifest is None or manifest.get("fingerprint") != fingerprint:
            return False
        return verify(self, manifest)

    def drop_manifest(self, *parts: str) -> None:
        """Un-commit ``parts`` before rewriting its outputs (the first step of a redo)."""
        self.delete(*parts, MANIFEST)

    def write_manifest(self, fingerprint: str, *parts: str, **info: Any) -> dict[str, Any]:
        if os.environ.get(KILL_ENV) and os.environ[KILL_ENV] == "/".join(parts):
            raise KilledBeforeCommit(f"{KILL_ENV}: killed before committing {self.url(*parts)}")
        manifest = {"fingerprint": fingerprint, "completed_at": time.time(), **info}
        self.write_json(manifest, *parts, MANIFEST)
        return manifest

    def outputs(self, files: Iterable[str], units: dict[str, str] | None = None) -> dict:
        """The ``outputs`` record of a manifest for ``files`` (run-relative paths)."""
        return outputs(self, files, units)
