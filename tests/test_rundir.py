"""Atomic writes, manifests, folder replacement and path safety of the run directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from selma_ray.core import rundir as rundir
from selma_ray.core.rundir import (
    KILL_ENV,
    MANIFEST,
    KilledBeforeCommit,
    RunDir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    current_umask,
    replace_dir,
    safe_child,
)
from selma_ray.core.storage import StorageError


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_text_creates_parents_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "deep" / "er" / "out.txt"
    atomic_write_text(target, "hello")
    assert target.read_text() == "hello"
    assert _entries(target.parent) == ["out.txt"]


def test_atomic_write_replaces_existing_content(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old content that is longer")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert _entries(tmp_path) == ["out.bin"]


def test_atomic_write_json_round_trips(tmp_path):
    target = tmp_path / "data.json"
    atomic_write_json(target, {"b": [1, 2], "a": {"x": 1.5}, "p": Path("/x")})
    assert json.loads(target.read_text()) == {"a": {"x": 1.5}, "b": [1, 2], "p": "/x"}
    assert _entries(tmp_path) == ["data.json"]


def test_crash_during_rename_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(rundir.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _entries(tmp_path) == ["out.txt"]


def test_interrupt_during_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _entries(tmp_path) == ["out.txt"]


def test_crash_on_first_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.os, "replace", lambda s, d: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "new.txt", "data")
    monkeypatch.undo()
    assert _entries(tmp_path) == []


# ---------------------------------------------------------------- manifests


def test_is_done_only_for_matching_fingerprint(tmp_path):
    run = RunDir(tmp_path / "run")
    assert not run.is_done("abc", "prompts")
    manifest = run.write_manifest("abc", "prompts", total=3)
    assert manifest["fingerprint"] == "abc" and manifest["total"] == 3
    assert run.is_done("abc", "prompts")
    assert not run.is_done("abd", "prompts")
    assert not run.is_done("abc", "images")


def test_manifest_is_written_under_the_given_parts(tmp_path):
    run = RunDir(tmp_path)
    run.write_manifest("fp", "experts", "counting", steps=5)
    path = tmp_path / "experts" / "counting" / MANIFEST
    data = json.loads(path.read_text())
    assert data["fingerprint"] == "fp" and data["steps"] == 5 and "completed_at" in data
    assert run.read_manifest("experts", "counting") == data
    assert run.is_done("fp", "experts", "counting")


def test_corrupt_manifest_counts_as_not_done(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / MANIFEST).write_text('{"fingerprint": "abc"')  # truncated
    assert run.read_manifest("prompts") is None
    assert not run.is_done("abc", "prompts")


def test_rewriting_manifest_with_new_fingerprint_invalidates_old(tmp_path):
    run = RunDir(tmp_path)
    run.write_manifest("one", "merged")
    run.write_manifest("two", "merged")
    assert run.is_done("two", "merged")
    assert not run.is_done("one", "merged")


# ---------------------------------------------------------------- replace_dir


def test_replace_dir_moves_folder_into_new_place(tmp_path):
    tmp = tmp_path / ".staging"
    tmp.mkdir()
    (tmp / "f.txt").write_text("new")
    final = tmp_path / "sub" / "out"
    replace_dir(tmp, final)
    assert (final / "f.txt").read_text() == "new"
    assert not tmp.exists()


def test_replace_dir_replaces_existing_folder_and_cleans_up(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = tmp_path / ".staging"
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    replace_dir(tmp, final)
    assert _entries(final) == ["new.txt"]
    assert (final / "new.txt").read_text() == "new"
    assert _entries(tmp_path) == ["out"]  # neither staging nor the old copy is left


# ---------------------------------------------------------------- safe_child


@pytest.mark.parametrize("name", ["../x", "a/b", "", "..", ".", "a\\b", "x\x00y", "/etc"])
def test_safe_child_rejects_names_that_escape_or_are_empty(tmp_path, name):
    with pytest.raises(ValueError, match="invalid name"):
        safe_child(tmp_path, name)


@pytest.mark.parametrize("name", ["counting", "dense_detail", "v1.2", "a-b"])
def test_safe_child_accepts_plain_names(tmp_path, name):
    assert safe_child(tmp_path, name) == tmp_path.resolve() / name


# ---------------------------------------------------------------- RunDir


def test_rundir_resolves_local_paths_and_creates_folders_only_on_write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = RunDir("runs/x")
    assert run.root == (tmp_path / "runs" / "x").resolve() and run.local
    assert not run.root.exists()  # naming a run directory creates nothing
    assert run.path("a", "b.txt") == run.root / "a" / "b.txt"
    assert os.path.isabs(run.path())
    run.write_text("hi", "a", "b.txt")
    assert (run.root / "a" / "b.txt").read_text() == "hi"


def test_object_storage_runs_have_no_local_paths():
    run = RunDir("s3://bucket/run", {"endpoint": "http://127.0.0.1:9"})
    assert not run.local and run.uri == "s3://bucket/run" and run.key("a") == "bucket/run/a"
    with pytest.raises(StorageError, match="object storage"):
        run.path("a")


def test_a_killed_commit_leaves_the_outputs_without_a_manifest(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.write_text("out", "merged", "f.txt")
    monkeypatch.setenv(KILL_ENV, "merged")
    with pytest.raises(KilledBeforeCommit):
        run.write_manifest("fp", "merged", outputs=run.outputs(["merged/f.txt"]))
    assert run.read_manifest("merged") is None and not run.is_done("fp", "merged")


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_and_committed_folders_get_the_mode_the_umask_allows(tmp_path, mask):
    import tempfile

    old = os.umask(mask)
    try:
        assert current_umask() == mask
        atomic_write_text(tmp_path / "out.json", "{}")
        folder = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as every staging folder is
        replace_dir(folder, tmp_path / "committed")
        RunDir(tmp_path / "run").write_manifest("fp", "stage")
    finally:
        os.umask(old)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "committed").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "run" / "stage" / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~mask
