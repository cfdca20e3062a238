"""The HTTP layer's own logic: API key checks and run-directory resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from selma_ray.serving.app import GenerationRequest, authorized, run_ref


@pytest.mark.parametrize(
    ("key", "path", "headers", "ok"),
    [
        ("", "/v1/adapters", {}, True),  # no key configured: open
        ("s3cret", "/healthz", {}, True),  # health checks stay open
        ("s3cret", "/v1/adapters", {}, False),
        ("s3cret", "/v1/adapters", {"authorization": "Bearer s3cret"}, True),
        ("s3cret", "/v1/adapters", {"authorization": "Bearer wrong"}, False),
        ("s3cret", "/v1/images/generations", {"x-api-key": "s3cret"}, True),
        ("s3cret", "/v1/images/generations", {"authorization": "s3cret"}, True),
    ],
)
def test_api_key_is_enforced_when_set(key, path, headers, ok):
    assert authorized(key, path, headers) is ok


def test_relative_run_dirs_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_ref("runs/tiny")["uri"] == str((tmp_path / "runs" / "tiny").resolve())
    assert run_ref("/data/run")["uri"] == str(Path("/data/run"))
    assert not (tmp_path / "runs").exists()  # naming a run creates nothing


def test_object_storage_runs_keep_their_uri_and_storage_settings():
    ref = run_ref("s3://bucket/runs/x/", {"endpoint": "http://127.0.0.1:9"})
    assert ref["uri"] == "s3://bucket/runs/x"
    assert ref["storage"]["endpoint"] == "http://127.0.0.1:9"


def test_request_schema_rejects_unknown_fields_and_bad_sizes():
    from pydantic import ValidationError

    assert GenerationRequest(prompt="x", adapter={"a": 0.5}).adapter == {"a": 0.5}
    for bad in (
        {"prompt": "x", "sizes": "32x32"},
        {"prompt": "x", "size": "big"},
        {"prompt": "x", "n": 0},
        {"prompt": "x", "response_format": "url"},
    ):
        with pytest.raises(ValidationError):
            GenerationRequest(**bad)


def test_playground_page_is_self_contained_and_uses_the_api():
    from selma_ray.serving.app import PLAYGROUND

    assert PLAYGROUND.startswith("<!doctype html>")
    assert "/v1/adapters" in PLAYGROUND and "/v1/images/generations" in PLAYGROUND
    assert "<script src" not in PLAYGROUND  # no build step, no external assets
