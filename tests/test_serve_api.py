"""The HTTP layer's own logic: API key checks, run-directory resolution, and how a lost or
missing diffusion replica reaches the client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi import HTTPException
from ray.exceptions import ActorDiedError, ActorUnavailableError

from selma_ray.config import ServeSection
from selma_ray.serving.app import (
    GenerationRequest,
    authorized,
    forward,
    model_list,
    requested_adapter,
    run_ref,
)


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
        {"prompt": "x", "quality": "best"},
        {"prompt": "x", "style": "bold"},
    ):
        with pytest.raises(ValidationError):
            GenerationRequest(**bad)


def test_model_selects_the_adapter_like_adapter_and_a_disagreement_is_a_400():
    def chosen(**body):
        return requested_adapter(GenerationRequest(prompt="x", **body))

    assert chosen() == "merged"
    assert chosen(model="counting") == chosen(adapter="counting") == "counting"
    assert chosen(model="counting", adapter="counting") == "counting"
    assert chosen(quality="hd", style="vivid", user="u-1") == "merged"  # OpenAI's extras
    for body, says in (
        ({"model": "counting", "adapter": "merged"}, "disagree"),
        ({"model": "counting", "adapter": {"counting": 1.0}}, "disagree"),
        ({"response_format": "url"}, "only 'b64_json'"),
    ):
        with pytest.raises(HTTPException) as err:
            chosen(**body)
        assert err.value.status_code == 400 and says in err.value.detail


def test_the_model_list_has_openais_shape():
    adapters = [
        {"name": "merged", "kind": "merged", "skill": None},
        {"name": "base", "kind": "base", "skill": None},
        {"name": "counting", "kind": "expert", "skill": "counting"},
    ]
    listed = model_list(adapters, created=1700000000)
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["base", "counting", "merged"]
    assert all(m["object"] == "model" and m["created"] == 1700000000 for m in listed["data"])


def test_playground_page_is_self_contained_and_uses_the_api():
    from selma_ray.serving.app import PLAYGROUND

    assert PLAYGROUND.startswith("<!doctype html>")
    assert "/v1/adapters" in PLAYGROUND and "/v1/images/generations" in PLAYGROUND
    assert "<script src" not in PLAYGROUND  # no build step, no external assets


class FakeResponse:
    """Stands in for a DeploymentResponse: resolves to ``outcome``, raises it, or (None)
    never resolves, like a request waiting for a replica that is not there yet."""

    def __init__(self, outcome=None):
        self.outcome = outcome
        self.cancelled = False

    def __await__(self):
        if self.outcome is None:
            yield from asyncio.sleep(3600).__await__()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self):
        self.cancelled = True


LIMITS = ServeSection(request_timeout_s=0.2, retry_after_s=7)


@pytest.mark.parametrize("error", [ActorDiedError(), ActorUnavailableError("gone", None)])
def test_a_replica_lost_mid_request_is_a_503_with_retry_after(error):
    with pytest.raises(HTTPException) as e:
        asyncio.run(forward(FakeResponse(error), LIMITS))
    assert e.value.status_code == 503
    assert e.value.headers == {"Retry-After": "7"}
    assert "lost" in e.value.detail


def test_no_replica_within_the_timeout_is_a_503_and_the_call_is_cancelled():
    response = FakeResponse(None)
    with pytest.raises(HTTPException) as e:
        asyncio.run(forward(response, LIMITS))
    assert e.value.status_code == 503
    assert e.value.headers == {"Retry-After": "7"}
    assert "within 0.2 s" in e.value.detail
    assert response.cancelled


def test_answers_and_other_errors_pass_through_unchanged():
    assert asyncio.run(forward(FakeResponse(["png"]), LIMITS)) == ["png"]
    with pytest.raises(KeyError):  # unknown adapter: the caller turns it into a 404
        asyncio.run(forward(FakeResponse(KeyError("nope")), LIMITS))
