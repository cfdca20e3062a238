"""Helpers shared by tests and benchmarks: synthetic run directories and a loopback Serve app.

``make_run`` writes a finished-looking run directory (config, experts with random LoRA
weights, the paper merge, manifests) for the tiny base model, so the serving layer can be
exercised without running the earlier stages. ``LocalServe`` starts a private local Ray
cluster with Serve on a free loopback port and deploys ``serve/config.yaml``'s application
declaratively, the way ``serve deploy`` does, so a redeploy that changes only ``user_config``
reconfigures the running replicas instead of replacing them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import socket
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)
SERVE_CONFIG = Path(__file__).resolve().parent.parent / "serve" / "config.yaml"


def make_run(
    root: str | Path,
    skills: list[str],
    rank: int = 4,
    overrides: list[str] | None = None,
    scale: float = 0.2,
) -> Path:
    """A tiny-preset run directory with one random rank-``rank`` expert per skill and the
    paper merge of them, each with a manifest, as the serving layer expects."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from selma_ray.config import load_config
    from selma_ray.core.lora_io import save_adapter
    from selma_ray.core.rundir import RunDir
    from selma_ray.merge.files import merge_adapters
    from selma_ray.models import TINY_SD, resolve

    root = Path(root)
    cfg = load_config(
        "tiny", [f"run.dir={root}", f"prompts.skills=[{', '.join(skills)}]", *(overrides or [])]
    )
    run = RunDir(root)
    run.write_text(cfg.to_yaml(), "config.yaml")
    unet = UNet2DConditionModel.from_pretrained(resolve(TINY_SD), subfolder="unet")
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    unet.add_adapter(config)
    shapes = get_peft_model_state_dict(unet)
    for i, skill in enumerate(skills):
        gen = torch.Generator().manual_seed(i)
        state = {k: torch.randn(v.shape, generator=gen) * scale for k, v in shapes.items()}
        save_adapter(run.path("experts", skill), state, config.to_dict())
        run.write_manifest("synthetic", "experts", skill)
    merge_adapters({s: str(run.path("experts", s)) for s in skills}, None, str(run.path("merged")))
    run.write_manifest("synthetic", "merged")
    return root


def sd15_shaped_unet() -> Any:
    """An SD v1.5-shaped UNet with no weights allocated (for benchmarks at real size)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=768,
            layers_per_block=2,
            attention_head_dim=8,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_app_config(
    run_dir: str | Path,
    limits: dict[str, Any] | None = None,
    user_config: dict[str, Any] | None = None,
    ingress_env: dict[str, str] | None = None,
    replicas: int | None = None,
    storage: dict[str, Any] | None = None,
    runs: dict[str, str | Path] | None = None,
) -> dict:
    """``serve/config.yaml``'s application, pointed at ``run_dir`` with ``limits`` replacing
    its limits; ``user_config`` goes on both deployments (a hot reload), ``ingress_env`` into
    the ingress replicas' environment (e.g. an API key); ``replicas`` pins the number of
    diffusion replicas instead of autoscaling; ``runs`` is the app's allowlist of more runs
    (``{name: run_dir}``) that requests may pick by name."""
    spec = yaml.safe_load(SERVE_CONFIG.read_text())
    app = copy.deepcopy(spec["applications"][0])
    app["args"] = {**app.get("args", {}), "run_dir": str(run_dir)}
    if storage is not None:
        app["args"]["storage"] = dict(storage)
    if runs is not None:
        app["args"]["runs"] = {name: str(where) for name, where in runs.items()}
    if limits is not None:
        app["args"]["limits"] = dict(limits)
    by_name = {d["name"]: d for d in app.setdefault("deployments", [])}
    if user_config is not None:
        for name in ("Diffusion", "Ingress"):
            by_name.setdefault(name, {"name": name})["user_config"] = dict(user_config)
    if replicas is not None:
        options = by_name.setdefault("Diffusion", {"name": "Diffusion"})
        options.pop("autoscaling_config", None)
        options["num_replicas"] = replicas
    if ingress_env:
        options = by_name.setdefault("Ingress", {"name": "Ingress"})
        options.setdefault("ray_actor_options", {})["runtime_env"] = {"env_vars": ingress_env}
    app["deployments"] = list(by_name.values())
    return {"applications": [app]}


class LocalServe:
    """A private local Ray cluster with Serve on 127.0.0.1:<free port>; ``deploy`` applies an
    application config as ``serve deploy`` would. Use as a context manager."""

    def __init__(self, num_cpus: int = 2):
        self.num_cpus = num_cpus
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalServe:
        import ray
        from ray import serve

        ray.init(
            address="local",
            num_cpus=self.num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        return self

    def deploy(self, config: dict[str, Any], timeout_s: float = 180.0) -> None:
        """Apply a multi-application config (``ServeDeploySchema``) and wait until running."""
        from ray.serve._private.api import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(config)
        client = _get_global_client()
        client.deploy_apps(schema)
        names = {a.name for a in schema.applications}
        deadline = time.monotonic() + timeout_s
        while True:
            from ray import serve

            status = serve.status().applications
            states = {n: status[n].status for n in names if n in status}
            if len(states) == len(names) and set(states.values()) == {"RUNNING"}:
                return
            failed = {n: status[n].message for n, s in states.items() if s == "DEPLOY_FAILED"}
            if failed:
                raise RuntimeError(f"Serve deploy failed: {failed}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Serve apps not running after {timeout_s}s: {states}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "selma-test",
    "AWS_SECRET_ACCESS_KEY": "selma-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def small_run(skills: list[str]) -> list[str]:
    """Config overrides for the smallest whole run that still trains and merges: four prompts
    per skill, two denoising steps, four training steps with a checkpoint every two."""
    return [
        f"prompts.skills=[{', '.join(skills)}]",
        "prompts.per_skill=4",
        "prompts.requests_per_round=2",
        "images.steps=2",
        "experts.max_steps=4",
        "experts.checkpoint_every=2",
    ]


class LocalS3:
    """An S3-compatible server on loopback (moto's ``ThreadedMotoServer``, real HTTP), for
    tests and benches: the project's own S3 client code talks to it like to AWS.

    ``start`` puts test credentials into this process's environment (Ray workers started
    afterwards inherit them) and creates ``bucket``; ``uri(name)`` is a run URI in it and
    ``storage`` the ``run.storage`` settings that reach it."""

    def __init__(self, bucket: str = "selma"):
        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: Any = None

    @property
    def storage(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "region": "us-east-1", "anonymous": False}

    def overrides(self) -> list[str]:
        return [f"run.storage.endpoint={self.endpoint}", "run.storage.region=us-east-1"]

    def uri(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    def filesystem(self, **kwargs: Any) -> Any:
        from pyarrow.fs import S3FileSystem

        return S3FileSystem(
            endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1", **kwargs
        )

    def start(self) -> LocalS3:
        import os

        from moto.server import ThreadedMotoServer

        for k, v in TEST_CREDENTIALS.items():
            os.environ.setdefault(k, v)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.make_bucket(self.bucket)
        return self

    def make_bucket(self, name: str) -> None:
        self.filesystem(allow_bucket_creation=True).create_dir(name)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object under ``bucket/prefix``, relative to the bucket."""
        from pyarrow.fs import FileSelector, FileType

        sel = FileSelector(f"{self.bucket}/{prefix}".rstrip("/"), recursive=True)
        sel.allow_not_found = True
        infos = self.filesystem().get_file_info(sel)
        return sorted(
            i.path.removeprefix(f"{self.bucket}/") for i in infos if i.type == FileType.File
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


NOUNS = "apple kite lamp boat chair mug bench drum scarf vase clock bucket ladder teapot".split()
PLACES = "table window garden river shelf kitchen station harbour attic porch".split()
COLOURS = "red green blue yellow white black orange purple".split()


class SeededLLM:
    """A scripted stand-in for the prompts stage's LLM, for tests of our own logic: answers
    depend only on each request's seed; it records which skills it was asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, cfg, requests):
        self.asked += [r["skill"] for r in requests]
        out = []
        for r in requests:
            lines = []
            for i in range(4):
                k = r["seed"] // 7 + i * 31
                noun, other = NOUNS[k % 14], NOUNS[(k // 14 + i) % 14]
                lines.append(
                    f"{i + 1}. A {COLOURS[k % 8]} {noun} near the {PLACES[(k // 3) % 10]}, "
                    f"beside {i + 2} {other}s"
                )
            out.append({**r, "generated_text": "\n".join(lines), "error": ""})
        return out


def synthetic_images(skills: list[str], per_skill: int, size: tuple[int, int] = (40, 56)) -> Any:
    """Images-stage rows (``prompt_id``, ``image_index``, ``prompt``, PNG ``image``,
    ``skill``) with seeded random pixels of a non-native size (height, width)."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    rng = np.random.default_rng(0)
    rows: dict[str, list] = {k: [] for k in ("prompt_id", "image_index", "prompt", "image")}
    rows["skill"] = []
    for skill in skills:
        for i in range(per_skill):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
            rows["prompt_id"].append(f"{skill}-{i:06d}")
            rows["image_index"].append(0)
            rows["prompt"].append(f"{i + 1} {skill.replace('_', ' ')} on a table")
            rows["image"].append(buf.getvalue())
            rows["skill"].append(skill)
    return pa.table(rows)


def write_images(root: str | Path, skills: list[str], per_skill: int = 5) -> Any:
    """A committed images-stage output of ``synthetic_images`` (one shard) for the experts
    stage to train from; returns the run directory."""
    import pyarrow.parquet as pq

    data = Path(root) / "images" / "data"
    data.mkdir(parents=True, exist_ok=True)
    pq.write_table(synthetic_images(skills, per_skill), data / "part-0.parquet")
    return commit_images(root)


def commit_images(root: str | Path, stage: str = "images") -> Any:
    """Commit hand-written ``<stage>/data/*.parquet`` shards as the images stage does (a
    manifest listing them), so that downstream stages, which read only committed shards,
    see them. Returns the run directory."""
    from selma_ray.core.rundir import RunDir

    run = RunDir(root)
    shards = run.files(stage, "data", suffix=".parquet")
    run.write_manifest("test", stage, outputs=run.outputs(shards))
    return run


def random_images(n: int, seed: int = 0, size: int = 32) -> list[Any]:
    """``n`` PIL images of seeded random pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def png_bytes(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class QuietJSONHandler(BaseHTTPRequestHandler):
    """A test server's request handler: ``send_json`` answers, and nothing is logged."""

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def http_server(handler: type, state: Any) -> Any:
    """Serve ``handler`` (a ``BaseHTTPRequestHandler`` subclass reading ``self.state``) on a
    free loopback port in a thread; yields ``state`` with ``state.url`` set to its ``/v1``
    base URL (nothing is shared between servers)."""
    import threading
    from http.server import ThreadingHTTPServer

    bound = type(f"{handler.__name__}Bound", (handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), bound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
