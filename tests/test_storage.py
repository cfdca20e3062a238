"""Run directories on object storage: a real S3 client (pyarrow's) talking HTTP to a local
S3-compatible server (moto's ThreadedMotoServer), never an in-process mock.

Covers where the endpoint comes from, the start-up probe's messages for each way storage can
be unusable, and RunDir's reading, writing and commit protocol on S3.
"""

from __future__ import annotations

import json
import os
import urllib.request

import boto3
import pytest

from selma_ray.config import ConfigError, load_config
from selma_ray.core.rundir import MANIFEST, RunDir
from selma_ray.core.storage import StorageError, StorageOptions, filesystem
from selma_ray.testing import LocalS3, free_port


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def dead_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


# ---------------------------------------------------------------- endpoint


def test_config_endpoint_is_used_and_wins_over_the_environment(s3, clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", dead_endpoint())
    run = RunDir(s3.uri("ep-config"), {"endpoint": s3.endpoint})
    run.write_text("hello", "a.txt")
    assert run.read_text("a.txt") == "hello"
    assert "ep-config/a.txt" in s3.keys()


def test_aws_endpoint_url_is_followed_like_boto3_does(s3, clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    run = RunDir(s3.uri("ep-env"))
    assert run.options.endpoint == s3.endpoint  # resolved once, so remote workers get it
    run.write_text("x", "b.txt")
    assert "ep-env/b.txt" in s3.keys()


def test_the_s3_specific_endpoint_variable_wins_over_the_generic_one(s3, clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", dead_endpoint())
    clean_env.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    RunDir(s3.uri("ep-s3")).check()  # would fail on the dead generic endpoint


def test_endpoint_in_config_must_be_a_url():
    with pytest.raises(ConfigError, match="run.storage.endpoint: .*http://127.0.0.1:9000"):
        load_config("tiny", ["run.storage.endpoint=127.0.0.1:9000"])


def test_local_paths_and_file_uris_stay_local(tmp_path):
    for root in (tmp_path / "a", f"file://{tmp_path}/b"):
        run = RunDir(root)
        assert run.local
        run.write_text("x", "f.txt")
    assert (tmp_path / "a" / "f.txt").read_text() == (tmp_path / "b" / "f.txt").read_text()


def test_a_uri_without_a_bucket_is_refused():
    with pytest.raises(StorageError, match="name a bucket"):
        filesystem("s3://", StorageOptions())


# ---------------------------------------------------------------- start-up errors


def test_unreachable_endpoint_fails_at_start_with_what_to_fix(clean_env):
    run = RunDir("s3://selma/run", {"endpoint": dead_endpoint()})
    with pytest.raises(StorageError, match="unreachable.*run.storage.endpoint"):
        run.check()


def test_missing_bucket_fails_at_start_naming_it(s3, clean_env):
    run = RunDir("s3://no-such-bucket/run", s3.storage)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        run.check()


@pytest.fixture(scope="module")
def reader(s3):
    """A read-only IAM user's access key."""
    iam = boto3.client("iam", endpoint_url=s3.endpoint, region_name="us-east-1")
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}
        ],
    }
    iam.create_user(UserName="reader")
    iam.put_user_policy(
        UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(policy)
    )
    return iam.create_access_key(UserName="reader")["AccessKey"]


@pytest.fixture
def s3_auth(s3, reader, clean_env):
    """The server with IAM checks on (for this test only)."""
    moto_auth(s3, "0")  # every request from now on is checked
    try:
        yield reader
    finally:
        moto_auth(s3, "inf")


def moto_auth(s3: LocalS3, after: str) -> None:
    """Turn moto's IAM checks on after ``after`` more requests (``inf``: off)."""
    req = urllib.request.Request(
        f"{s3.endpoint}/moto-api/reset-auth",
        data=after.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(req).read()


UNKNOWN_KEY = {"AccessKeyId": "AKIAUNKNOWNUNKNOWN00", "SecretAccessKey": "not-a-secret"}


@pytest.mark.parametrize(
    ("who", "message"),
    [
        ("unknown", "no valid credentials: give the nodes an instance profile or IRSA role"),
        ("read-only", "access denied while trying to write a probe object.*s3:PutObject"),
    ],
)
def test_bad_credentials_fail_at_start_saying_what_to_fix(s3, s3_auth, clean_env, who, message):
    key = UNKNOWN_KEY if who == "unknown" else s3_auth
    clean_env.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    with pytest.raises(StorageError, match=message):
        RunDir(s3.uri("auth"), s3.storage).check()


def test_missing_credentials_fail_at_start_saying_how_nodes_get_them(s3, s3_auth, clean_env):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        clean_env.delenv(name, raising=False)
    clean_env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    clean_env.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    clean_env.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no credentials found.*instance profile or IRSA"):
        RunDir(s3.uri("auth"), s3.storage).check()


def test_the_probe_leaves_nothing_behind(s3, clean_env):
    RunDir(s3.uri("probe"), s3.storage).check()
    assert [k for k in s3.keys() if k.startswith("probe/")] == []


# ---------------------------------------------------------------- RunDir on S3


def test_rundir_round_trips_files_folders_and_manifests_on_s3(s3, clean_env, tmp_path):
    run = RunDir(s3.uri("rt"), s3.storage)
    assert not run.local and run.uri == "s3://selma/rt"
    with pytest.raises(FileNotFoundError):
        run.read_bytes("missing.txt")
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "a.bin").write_bytes(b"A" * 10)
    (tmp_path / "out" / "sub" / "b.txt").write_text("b")
    shas = run.put_dir(tmp_path / "out", "stage", "unit")
    assert sorted(shas) == ["stage/unit/a.bin", "stage/unit/sub/b.txt"]
    assert run.files("stage") == ["stage/unit/a.bin", "stage/unit/sub/b.txt"]
    assert run.listdir("stage", "unit") == ["a.bin", "sub"]
    run.write_manifest("fp", "stage", "unit", outputs=run.outputs(sorted(shas)))
    assert run.is_done("fp", "stage", "unit")
    back = run.get_dir(tmp_path / "back", "stage", "unit")
    assert (back / "sub" / "b.txt").read_text() == "b"
    # A changed or deleted output un-does the stage; checking it downloads nothing.
    run.write_bytes(b"B" * 11, "stage", "unit", "a.bin")
    assert not run.is_done("fp", "stage", "unit")
    run.write_manifest("fp", "stage", "unit", outputs=run.outputs(sorted(shas)))
    run.delete("stage", "unit", "sub")
    assert not run.is_done("fp", "stage", "unit")
    assert run.read_manifest("stage", "unit")["fingerprint"] == "fp"
    run.drop_manifest("stage", "unit")
    assert run.read_manifest("stage", "unit") is None
    assert f"rt/stage/unit/{MANIFEST}" not in s3.keys()


def test_spec_rebuilds_the_same_run_elsewhere(s3, clean_env):
    run = RunDir(s3.uri("spec"), s3.storage)
    run.write_text("x", "f.txt")
    again = RunDir.from_spec(json.loads(json.dumps(run.spec)))  # plain data, as Ray ships it
    assert again.read_text("f.txt") == "x" and again.uri == run.uri
    assert "secret" not in json.dumps(run.spec).lower()  # credentials never travel in it
    assert os.environ.get("AWS_SECRET_ACCESS_KEY", "?") not in json.dumps(run.spec)
