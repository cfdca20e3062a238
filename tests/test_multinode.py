"""A real multi-node cluster on one machine (``tests/multinode.py``): a head with no CPUs and
four worker nodes, each in its own mount namespace with a private tmpfs over the run path, so
no two nodes share a disk there.

- Red: a local ``run.dir`` on that path fails in preflight, before any stage, naming the nodes
  that cannot see it.
- Green: ``run.dir=s3://...`` on a local S3-compatible server runs the whole tiny pipeline,
  submitted with ``ray job submit`` as users run it. The image actors run on node_a, the
  expert trainers on node_b or node_c, the Serve replica on node_d. Once an expert has a
  checkpoint in the bucket, the node of a running trainer is killed: Ray Train resumes that
  expert on the surviving trainer node from the checkpoint, and the job completes. Serve
  answers for every adapter, and no node's private tmpfs holds anything of the run.
- Serve node loss: node_d (the image replica's) is killed while clients send requests, and a
  replacement node joins, as an autoscaler would bring one. Every request gets an answer, a
  200 or a 503 with ``Retry-After``; none hangs or loses its connection; the endpoint
  answers again once Serve has replaced the replica on the new node.
"""

from __future__ import annotations

import base64
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from multinode import BIN, MultiNodeCluster, free_port, ray_env, start_cluster

from selma_ray.core.rundir import RunDir
from selma_ray.testing import small_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PRIVATE = Path("/tmp/selma-private-run")  # every worker mounts its own tmpfs here
SKILLS = ["counting", "everyday_scenes"]
TRAINERS = {"node_b", "node_c"}  # either may train; whichever is lost, the other goes on
MAX_STEPS = 30
REQUEST_TIMEOUT_S = 30  # serve.request_timeout_s of the green run
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 30  # a request still unanswered by then has hung


@pytest.fixture(scope="module")
def cluster(s3):  # after s3: the nodes inherit the credentials it puts in the environment
    workers = {"node_a": 1, "node_b": 2, "node_c": 2, "node_d": 1}
    extra = {"node_b": {"trainer": 1}, "node_c": {"trainer": 1}, "node_d": {"server": 1}}
    with start_cluster(workers, PRIVATE, extra) as c:
        yield c


def ray_job(cluster: MultiNodeCluster, *args: str, timeout: float = 1500) -> tuple[int, str]:
    """``ray job <args>`` against the cluster, as users run it; returns (exit code, output)."""
    cmd = [str(BIN / "ray"), "job", args[0], f"--address={cluster.dashboard}", *args[1:]]
    out = subprocess.run(
        cmd, capture_output=True, text=True, env=ray_env(), timeout=timeout, cwd=ROOT
    )
    return out.returncode, out.stdout + out.stderr


def pipeline(*overrides: str) -> list[str]:
    """``ray job submit`` arguments of the pipeline job with these overrides."""
    return ["--working-dir", str(ROOT), "--", "python", "jobs/full_pipeline.py", *overrides]


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
    code, out = ray_job(
        cluster, "submit", *pipeline(f"run.dir={PRIVATE}/red", "serve.deploy=false")
    )
    seconds = time.monotonic() - start
    assert code != 0
    assert f"run.dir={PRIVATE}/red is a local path, and 4 of the cluster's 5 nodes" in out
    for name in ("node_a", "node_b", "node_c", "node_d"):
        assert name in out
    assert "Use object storage (run.dir=s3://bucket/prefix)" in out
    assert "=== stage" not in out  # stopped before any stage
    print(f"preflight failed the job in {seconds:.1f} s (submit to exit)")


def job_status(cluster: MultiNodeCluster, job_id: str) -> str:
    resp = requests.get(
        f"{cluster.dashboard}/api/jobs/{job_id}", headers=cluster.auth_headers(), timeout=30
    )
    resp.raise_for_status()
    return resp.json()["status"]


def alive_actor_nodes(cluster: MultiNodeCluster, class_name: str) -> set[str]:
    return {
        cluster.node_of(a.get("node_id") or "")
        for a in cluster.state("actors")
        if a["class_name"] == class_name and a["state"] == "ALIVE"
    } - {None}


@pytest.fixture(scope="module")
def green(cluster, s3) -> dict[str, Any]:
    """The whole pipeline on S3, submitted without waiting; the node of a running trainer is
    killed once an expert checkpoint is in the bucket."""
    port = free_port()
    job_id = f"selma-green-{int(time.time())}"
    overrides = [
        f"run.dir={s3.uri('multinode')}",
        *s3.overrides(),
        *small_run(SKILLS),
        f"experts.max_steps={MAX_STEPS}",
        "experts.checkpoint_every=3",
        "experts.max_failures=3",
        "eval.enabled=false",  # eval on S3 is covered by test_storage_pipeline.py
        "resources.images.custom={node_a: 0.01}",
        "resources.experts.custom={trainer: 0.01}",
        "resources.experts.cpus_per_worker=0.4",
        "resources.serve.custom={server: 0.01}",
        "resources.serve.ingress_custom={node_a: 0.01}",
        "serve.host=0.0.0.0",
        f"serve.port={port}",
        "serve.proxy_location=HeadOnly",  # one entry point that outlives worker nodes
        f"serve.request_timeout_s={REQUEST_TIMEOUT_S}",
        "serve.retry_after_s=1",
    ]
    start = time.monotonic()
    code, out = ray_job(
        cluster, "submit", f"--submission-id={job_id}", "--no-wait", *pipeline(*overrides)
    )
    assert code == 0, out
    deadline = start + 1200
    # Ray Train resumes from the checkpoints its snapshot in the bucket lists (one written
    # but not yet registered is not one), so wait until every expert has one.
    snapshots: list[str] = []
    while len(snapshots) < len(SKILLS) and time.monotonic() < deadline:
        assert job_status(cluster, job_id) in ("PENDING", "RUNNING"), ray_job(
            cluster, "logs", job_id
        )[1][-6000:]
        keys = s3.keys("multinode/ray_results")
        snapshots = [k for k in keys if k.endswith("/checkpoint_manager_snapshot.json")]
        time.sleep(0.5)
    assert len(snapshots) == len(SKILLS), f"not every expert checkpointed: {snapshots}"
    victims: set[str] = set()
    while not victims and time.monotonic() < deadline:
        victims = alive_actor_nodes(cluster, "RayTrainWorker") & TRAINERS
        time.sleep(0.2)
    assert victims, "no trainer was running on node_b or node_c"
    victim = sorted(victims)[0]
    killed_at = time.time()
    cluster.kill_node(victim)
    while (status := job_status(cluster, job_id)) in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, "the job did not finish after the node loss"
        time.sleep(2)
    out = ray_job(cluster, "logs", job_id)[1]
    assert status == "SUCCEEDED", out[-6000:]
    return {
        "out": out,
        "url": f"http://127.0.0.1:{port}",
        "seconds": time.monotonic() - start,
        "victim": victim,
        "killed_at": killed_at,
    }


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

    def where(prefix: str) -> set[str]:
        return set().union(*(v for k, v in placed.items() if k.startswith(prefix)))

    renderers = set().union(*(v for k, v in placed.items() if "DiffusionRenderer" in k))
    trainers = placed.get("RayTrainWorker", set())
    assert renderers == {"node_a"}, placed
    assert green["victim"] in trainers and trainers <= TRAINERS, placed
    assert where("ServeReplica:selma:Diffusion") == {"node_d"}, placed
    assert where("ServeReplica:selma:Ingress") == {"node_a"}, placed
    print(f"job took {green['seconds']:.0f} s; layout: renderers {renderers}, trainers {trainers}")


def test_losing_a_trainers_node_resumes_its_expert_from_a_checkpoint(s3, green):
    run = RunDir(s3.uri("multinode"), s3.storage)
    resumed = {}
    for skill in SKILLS:
        assert run.read_manifest("experts", skill)["metrics"]["step"] == MAX_STEPS
        work = next(p for p in run.listdir("ray_results", "expert-work") if p.startswith(skill))
        attempts = [
            run.read_json("ray_results", "expert-work", work, "attempts", name)
            for name in run.listdir("ray_results", "expert-work", work, "attempts")
        ]
        after = [a for a in attempts if a["time"] > green["killed_at"]]
        if after:
            resumed[skill] = min(after, key=lambda a: a["time"])
    assert resumed, f"no expert started again after {green['victim']} was lost"
    for skill, first in resumed.items():
        assert first["start_step"] > 0, f"{skill} restarted from step 0, not a checkpoint"
        print(
            f"node loss: {green['victim']} killed; {skill} resumed at step "
            f"{first['start_step']} {first['time'] - green['killed_at']:.1f} s later"
        )


def generate(url: str, adapter: str, timeout: float = 120) -> requests.Response:
    return requests.post(
        f"{url}/v1/images/generations",
        json={"prompt": "two red apples", "adapter": adapter, "seed": 1, "size": "32x32"},
        timeout=timeout,
    )


def test_serve_on_its_own_node_answers_for_every_adapter(green):
    listed = requests.get(f"{green['url']}/v1/adapters", timeout=60).json()
    names = {a["name"] for a in listed["adapters"]}
    assert names == {"base", "merged", "merged-paper", *SKILLS}
    for name in sorted(names):
        resp = generate(green["url"], name)
        assert resp.status_code == 200, (name, resp.text)
        assert base64.b64decode(resp.json()["data"][0]["b64_json"]).startswith(b"\x89PNG")


def test_the_run_is_in_the_bucket_and_no_node_kept_a_local_copy(cluster, s3, green):
    keys = s3.keys("multinode")
    for skill in SKILLS:
        assert f"multinode/experts/{skill}/manifest.json" in keys
    assert "multinode/merged/manifest.json" in keys and "multinode/summary.json" in keys
    # The lost node's tmpfs went with its mount namespace; every surviving node's is empty.
    for name in {"node_a", "node_b", "node_c", "node_d"} - {green["victim"]}:
        assert private_files(cluster, name) == [], name


def test_losing_the_serve_replicas_node_fails_requests_only_with_503s_then_recovers(cluster, green):
    """Runs last: it takes node_d, the replica's node, away. A request that fails gets a 503
    with Retry-After (none hangs, none gets another error), and the endpoint answers again
    from a replica on the replacement node. Clients honour Retry-After, as a client should.
    (Whether any request fails depends on timing: one the router holds until the new replica
    is up gets a 200.)"""
    assert alive_actor_nodes(cluster, "ServeReplica:selma:Diffusion") == {"node_d"}
    results: list[tuple[float, float, int | str, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                resp = generate(green["url"], "merged", timeout=CLIENT_TIMEOUT_S)
                retry = resp.headers.get("Retry-After")
                results.append((sent, time.monotonic(), resp.status_code, retry))
                if retry:
                    time.sleep(float(retry))
            except requests.RequestException as e:  # a hang (timeout) or a dropped connection
                results.append((sent, time.monotonic(), type(e).__name__, None))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(3)  # requests in flight when the node goes
    killed = cluster.kill_node("node_d")
    cluster.add_node("node_e", 1, {"server": 1})  # the autoscaler's replacement
    deadline = killed + 240
    recovered = None
    while recovered is None and time.monotonic() < deadline:
        answered = [r for r in list(results) if r[0] > killed and r[2] == 200]
        recovered = min((r[1] for r in answered), default=None)
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(CLIENT_TIMEOUT_S + 10)
    assert recovered is not None, f"no answer within 240 s of losing node_d: {results[-5:]}"
    failures = [r for r in results if r[2] != 200]
    assert [r for r in results if r[0] > killed], "no request was sent after node_d was lost"
    for sent, done, status, retry in failures:
        assert status == 503 and retry, (status, retry, done - sent)
    assert max(done - sent for sent, done, *_ in results) < CLIENT_TIMEOUT_S
    assert "node_e" in alive_actor_nodes(cluster, "ServeReplica:selma:Diffusion")
    print(
        f"serve node loss: endpoint answered again {recovered - killed:.1f} s after node_d "
        f"was lost; {len(results)} requests, {len(failures)} got 503 + Retry-After, 0 hung"
    )
