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
    build_app,
    forward,
    model_list,
    pass_groups,
    requested_adapter,
    requested_run,
    run_allowlist,
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
    assert "/v1/runs" in PLAYGROUND
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


# ---- the runs a deployment serves (its allowlist) --------------------------------------------


def test_the_run_allowlist_maps_names_to_run_references(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refs = run_allowlist({"a": "runs/a", "b-2.v1": "s3://bucket/runs/b"}, {"region": "x"})
    assert refs["a"]["uri"] == str((tmp_path / "runs" / "a").resolve())
    assert refs["b-2.v1"]["uri"] == "s3://bucket/runs/b"
    assert refs["b-2.v1"]["storage"]["region"] == "x"  # every run shares the app's storage
    assert run_allowlist(None) == {}
    assert not (tmp_path / "runs").exists()  # naming a run reads and creates nothing


@pytest.mark.parametrize(
    ("runs", "says"),
    [
        (["runs/a"], "must be a mapping"),
        ({"../a": "runs/a"}, "run name '../a' is not allowed"),
        ({"a/b": "runs/a"}, "is not allowed"),
        ({"": "runs/a"}, "is not allowed"),
        ({"x" * 65: "runs/a"}, "1-64 letters"),
        ({1: "runs/a"}, "run name 1 is not allowed"),
        ({"a": ""}, "args.runs.a must be a run directory"),
        ({"a": {"uri": "runs/a"}}, "args.runs.a must be a run directory"),
    ],
)
def test_build_app_refuses_a_bad_run_allowlist_before_reading_any_run(runs, says, tmp_path):
    missing = tmp_path / "no-run"  # never read: the allowlist is checked first
    with pytest.raises(ValueError, match="args.runs") as err:
        build_app({"run_dir": str(missing), "runs": runs})
    assert says in str(err.value)


def test_build_app_lists_runs_among_its_args():
    with pytest.raises(ValueError, match="run_dir, runs, storage and limits"):
        build_app({"run_dir": "x", "models": {"a": "runs/a"}})


def test_the_run_comes_from_the_body_or_the_multiplexing_header_and_they_must_agree():
    assert requested_run(None, None) is None  # the default run
    assert requested_run("a", None) == requested_run(None, "a") == requested_run("a", "a") == "a"
    assert requested_run("", "") is None
    with pytest.raises(HTTPException) as err:
        requested_run("a", "b")
    assert err.value.status_code == 400 and "disagree" in err.value.detail


def test_jobs_of_different_runs_never_share_a_forward_pass():
    job = {"steps": 2, "guidance_scale": 7.5, "width": 32, "height": 32, "negative_prompt": None}
    jobs = [
        {**job, "spec": (("counting", 1.0),), "run": None},
        {**job, "spec": (("counting", 1.0),), "run": 7},
        {**job, "spec": (("merged", 1.0),), "run": None},
        {**job, "spec": (("merged", 1.0),), "run": 7},
        {**job, "spec": (("merged", 1.0),), "run": 8},
    ]
    assert pass_groups(jobs, lambda negative: None) == [[0, 2], [1, 3], [4]]
    one_each = [[i] for i in range(len(jobs))]
    assert pass_groups(jobs, lambda negative: None, mix_adapters=False) == one_each
