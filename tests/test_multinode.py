"""A real multi-node cluster on one machine (``tests/multinode.py``): a head with no CPUs and
three worker nodes, each in its own mount namespace with a private tmpfs over the run path, so
no two nodes share a disk there.

- Red: a local ``run.dir`` on that path fails in preflight, before any stage, naming the nodes
  that cannot see it.
- Green: ``run.dir=s3://...`` on a local S3-compatible server runs the whole tiny pipeline,
  submitted with ``ray job submit`` as users run it, with the image actors, the expert trainers
  and the Serve replica pinned to three different nodes; Serve answers for every adapter, and
  no node's private tmpfs holds anything of the run at the end.
"""

from __future__ import annotations

import base64
import subprocess
import time
from pathlib import Path

import pytest
import requests
from multinode import BIN, MultiNodeCluster, free_port, ray_env, start_cluster

from selma_ray.testing import small_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PRIVATE = Path("/tmp/selma-private-run")  # every worker mounts its own tmpfs here
SKILLS = ["counting", "everyday_scenes"]


@pytest.fixture(scope="module")
def cluster(s3):  # after s3: the nodes inherit the credentials it puts in the environment
    with start_cluster({"node_a": 1, "node_b": 1, "node_c": 1}, PRIVATE, {}) as c:
        yield c


def submit(cluster: MultiNodeCluster, *args: str, timeout: float = 1500) -> tuple[int, str]:
    """``ray job submit`` of the pipeline job, as users run it; returns (exit code, output)."""
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        f"--address={cluster.dashboard}",
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "jobs/full_pipeline.py",
        *args,
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, env=ray_env(), timeout=timeout, cwd=ROOT
    )
    return out.returncode, out.stdout + out.stderr


def private_files(cluster: MultiNodeCluster, name: str) -> list[str]:
    """Every file under the node's private tmpfs, seen from inside its mount namespace."""
    pid = cluster.nodes[name].proc.pid
    out = subprocess.run(
        ["nsenter", "--target", str(pid), "--mount", "find", str(PRIVATE), "-type", "f"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_a_node_local_run_dir_fails_in_preflight_naming_the_nodes(cluster):
    start = time.monotonic()
    code, out = submit(cluster, f"run.dir={PRIVATE}/red", "serve.deploy=false")
    seconds = time.monotonic() - start
    assert code != 0
    assert f"run.dir={PRIVATE}/red is a local path, and 3 of the cluster's 4 nodes" in out
    for name in ("node_a", "node_b", "node_c"):
        assert name in out
    assert "Use object storage (run.dir=s3://bucket/prefix)" in out
    assert "=== stage" not in out  # stopped before any stage
    print(f"preflight failed the job in {seconds:.1f} s (submit to exit)")


@pytest.fixture(scope="module")
def green(cluster, s3):
    port = free_port()
    overrides = [
        f"run.dir={s3.uri('multinode')}",
        *s3.overrides(),
        *small_run(SKILLS),
        "eval.enabled=false",  # eval on S3 is covered by test_storage_pipeline.py
        "resources.images.custom={node_a: 0.01}",
        "resources.experts.custom={node_b: 0.01}",
        "resources.serve.custom={node_c: 0.01}",
        "serve.host=0.0.0.0",
        f"serve.port={port}",
    ]
    start = time.monotonic()
    code, out = submit(cluster, *overrides, "--serve")
    assert code == 0, out[-6000:]
    return {"out": out, "url": f"http://127.0.0.1:{port}", "seconds": time.monotonic() - start}


def actors_by_class(cluster: MultiNodeCluster) -> dict[str, set[str]]:
    """Node names each actor class ran on (dead actors included), from Ray's state API."""
    placed: dict[str, set[str]] = {}
    for actor in cluster.state("actors"):
        node = cluster.node_of(actor.get("node_id") or "")
        if node:
            placed.setdefault(actor["class_name"], set()).add(node)
    return placed


def test_stages_run_on_the_nodes_they_are_placed_on(cluster, green):
    placed = actors_by_class(cluster)
    renderers = set().union(*(v for k, v in placed.items() if "DiffusionRenderer" in k))
    trainers = placed.get("RayTrainWorker", set())
    replicas = set().union(*(v for k, v in placed.items() if k.startswith("ServeReplica:")))
    assert renderers == {"node_a"}, placed
    assert trainers == {"node_b"}, placed
    assert "node_c" in replicas, placed
    print(f"layout: renderers {renderers}, trainers {trainers}, serve replicas {replicas}")


def test_serve_on_a_third_node_answers_for_every_adapter(green):
    listed = requests.get(f"{green['url']}/v1/adapters", timeout=60).json()
    names = {a["name"] for a in listed["adapters"]}
    assert names == {"base", "merged", "merged-paper", *SKILLS}
    for name in sorted(names):
        resp = requests.post(
            f"{green['url']}/v1/images/generations",
            json={"prompt": "two red apples", "adapter": name, "seed": 1, "size": "32x32"},
            timeout=120,
        )
        assert resp.status_code == 200, (name, resp.text)
        assert base64.b64decode(resp.json()["data"][0]["b64_json"]).startswith(b"\x89PNG")


def test_the_run_is_in_the_bucket_and_no_node_kept_a_local_copy(cluster, s3, green):
    keys = s3.keys("multinode")
    for skill in SKILLS:
        assert f"multinode/experts/{skill}/manifest.json" in keys
    assert "multinode/merged/manifest.json" in keys and "multinode/summary.json" in keys
    for name in ("node_a", "node_b", "node_c"):
        assert private_files(cluster, name) == [], name
