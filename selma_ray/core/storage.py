"""Where a run lives: a local folder or any pyarrow filesystem (``s3://``, ``gs://``, ...).

One place turns ``run.dir`` and ``run.storage`` into a ``pyarrow.fs.FileSystem`` and a path
inside it. For S3 the endpoint comes from ``run.storage.endpoint``, else from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (which boto3 and the AWS CLI follow but pyarrow
does not); credentials always come from the standard AWS chain (environment, profile, instance
role or IRSA), never from the config. ``probe`` writes and deletes one object at start-up so
that a missing bucket, missing credentials, no write permission or an unreachable endpoint
fail before any GPU time, with a message that says what to fix.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageError(RuntimeError):
    """The run's storage cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage (``run.storage`` in the config). No secrets here."""

    endpoint: str | None = None
    region: str | None = None
    anonymous: bool = False

    @classmethod
    def of(cls, value: StorageOptions | dict[str, Any] | Any | None) -> StorageOptions:
        if value is None:
            return cls()
        if isinstance(value, StorageOptions):
            return value
        if isinstance(value, dict):
            return cls(**value)
        return cls(**value.model_dump())  # the config section

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_local(uri: str) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def endpoint_of(options: StorageOptions) -> str | None:
    """The S3 endpoint: the config's, else the one boto3 would use from the environment."""
    if options.endpoint:
        return options.endpoint
    for name in ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


def resolved(options: StorageOptions) -> StorageOptions:
    """``options`` with the endpoint read from the environment filled in, so that remote
    tasks, actors and replicas reach the same endpoint as the driver."""
    return StorageOptions(endpoint_of(options), options.region, options.anonymous)


def _s3(options: StorageOptions):
    from pyarrow.fs import S3FileSystem

    kwargs: dict[str, Any] = {"anonymous": options.anonymous}
    endpoint = endpoint_of(options)
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise StorageError(
                f"storage endpoint {endpoint!r}: use http://host:port or https://host"
            )
        kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        kwargs["scheme"] = parts.scheme
        kwargs["region"] = options.region or os.environ.get("AWS_REGION") or "us-east-1"
    elif options.region:
        kwargs["region"] = options.region
    return S3FileSystem(**kwargs)


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[Any, str]:
    """``(filesystem, path inside it)`` for a run directory URI or local path."""
    import pyarrow.fs as pafs

    options = options or StorageOptions()
    text = str(uri)
    if is_local(text):
        local = Path(text.removeprefix("file://")).expanduser().resolve()
        return pafs.LocalFileSystem(), local.as_posix()
    scheme, _, rest = text.partition("://")
    path = rest.strip("/")
    if not path:
        raise StorageError(f"run.dir={text!r}: name a bucket, e.g. {scheme}://my-bucket/runs/x")
    if scheme in ("s3", "s3a"):
        return _s3(options), path
    try:
        fs, inner = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as e:  # ArrowInvalid is a ValueError
        raise StorageError(f"run.dir={text!r}: pyarrow cannot open it ({e})") from e
    return fs, inner.strip("/")


def _reachable(endpoint: str, timeout: float = 3.0) -> None:
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            pass
    except OSError as e:
        raise StorageError(
            f"storage endpoint {endpoint} is unreachable ({e}). Check run.storage.endpoint "
            "(or AWS_ENDPOINT_URL) and that the service is up and reachable from this node"
        ) from e


CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",  # IRSA on EKS
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",  # ECS / EKS pod identity
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def visible_credentials() -> list[str]:
    """Credential sources this process can see without a request (an instance role cannot
    be seen this way, so an empty list only makes missing credentials likely)."""
    found = [name for name in CREDENTIAL_ENV if os.environ.get(name)]
    files = [
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
        os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"),
    ]
    return found + [f for f in files if Path(f).expanduser().is_file()]


HOW_TO_CREDENTIALS = (
    "give the nodes an instance profile or IRSA role, or set AWS_ACCESS_KEY_ID/"
    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in their environment; never in the config"
)


def explain(uri: str, error: BaseException, action: str, anonymous: bool = False) -> StorageError:
    """A storage failure as a message that says what to fix."""
    text = str(error)
    low = text.lower().replace("_", "")
    bucket = uri.partition("://")[2].split("/", 1)[0]
    if "nosuchbucket" in low or "bucket does not exist" in low:
        why = f"the bucket {bucket!r} does not exist: create it or fix run.dir"
    elif any(
        k in low
        for k in (
            "invalidaccesskeyid",
            "signaturedoesnotmatch",
            "unable to locate credentials",
            "missing authentication",
            "invalidtoken",
            "expiredtoken",
            "credentials",
        )
    ):
        why = f"no valid credentials: {HOW_TO_CREDENTIALS}"
    elif "accessdenied" in low or "access denied" in low:
        why = (
            f"access denied while trying to {action}: the credentials need s3:PutObject, "
            f"s3:GetObject, s3:DeleteObject and s3:ListBucket on {bucket!r}"
        )
    elif not anonymous and not is_local(uri) and not visible_credentials():
        why = f"no credentials found ({text.strip() or 'the request failed'}): {HOW_TO_CREDENTIALS}"
    elif "curl" in low or "connect" in low or "resolve host" in low or "timed out" in low:
        why = "the endpoint is unreachable: check run.storage.endpoint or AWS_ENDPOINT_URL"
    else:
        why = text
    return StorageError(f"run.dir={uri}: cannot {action}: {why}")


def probe(fs: Any, path: str, uri: str, options: StorageOptions) -> None:
    """Write one object under the run and delete it again: proves the run can be written,
    before any work starts."""
    endpoint = endpoint_of(options)
    if endpoint and not is_local(uri):
        _reachable(endpoint)
    key = f"{path}/.selma-probe-{uuid.uuid4().hex}"
    try:
        if is_local(uri):
            fs.create_dir(path, recursive=True)
        with fs.open_output_stream(key) as f:
            f.write(b"selma_ray write probe\n")
    except Exception as e:  # pyarrow raises OSError subclasses with the service's message
        raise explain(uri, e, "write a probe object", options.anonymous) from e
    try:
        fs.delete_file(key)
    except Exception as e:
        raise explain(uri, e, "delete the probe object", options.anonymous) from e
