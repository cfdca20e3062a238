"""Losing a worker node mid-training on the multi-node cluster of ``tests/multinode.py``: Ray
Train restarts the expert on a surviving node from its latest checkpoint in object storage, and
the job, submitted with ``ray job submit``, completes.

Not yet part of ``make test`` (its name does not start with ``test_``): it adds about five
minutes, and the suite is at its time budget. Run it on its own::

    .venv/bin/pytest -s tests/multinode_loss_check.py
"""

from __future__ import annotations

import subprocess
import time

import pytest
import requests
from multinode import BIN, MultiNodeCluster, ray_env, start_cluster
from test_multinode import PRIVATE, ROOT, SKILLS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(s3):  # after s3: the nodes inherit the credentials it puts in the environment
    # Trainers may use node_b or node_c: whichever is lost, the other takes its experts.
    trainer = {"node_b": {"trainer": 1}, "node_c": {"trainer": 1}}
    with start_cluster({"node_a": 1, "node_b": 2, "node_c": 2}, PRIVATE, trainer) as c:
        yield c


def job_status(cluster: MultiNodeCluster, job_id: str) -> str:
    resp = requests.get(
        f"{cluster.dashboard}/api/jobs/{job_id}", headers=cluster.auth_headers(), timeout=30
    )
    resp.raise_for_status()
    return resp.json()["status"]


def alive_trainer_nodes(cluster: MultiNodeCluster) -> set[str]:
    resp = requests.get(
        f"{cluster.dashboard}/api/v0/actors",
        params={"limit": 10000, "detail": "true", "filter_keys": "state", "filter_values": "ALIVE"},
        headers=cluster.auth_headers(),
        timeout=60,
    )
    resp.raise_for_status()
    return {
        cluster.node_of(a["node_id"])
        for a in resp.json()["data"]["result"]["result"]
        if a["class_name"] == "RayTrainWorker" and a.get("node_id")
    } - {None}


def test_losing_a_trainers_node_resumes_its_expert_from_a_checkpoint(cluster, s3):
    """Trainers free to use node_b or node_c; once a checkpoint is in the bucket, the node of
    a running trainer is killed; Ray Train restarts the expert on the surviving node from its
    latest checkpoint, and the job completes."""
    from selma_ray.core.rundir import RunDir

    job_id = f"selma-node-loss-{int(time.time())}"
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        f"--address={cluster.dashboard}",
        f"--submission-id={job_id}",
        "--no-wait",
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "jobs/full_pipeline.py",
        f"run.dir={s3.uri('node-loss')}",
        *s3.overrides(),
        f"prompts.skills=[{', '.join(SKILLS)}]",
        "prompts.per_skill=4",
        "prompts.requests_per_round=2",
        "images.steps=2",
        "experts.max_steps=60",
        "experts.checkpoint_every=3",
        "experts.max_failures=3",
        "eval.enabled=false",
        "resources.images.custom={node_a: 0.01}",
        "resources.experts.custom={trainer: 0.01}",
        "resources.experts.cpus_per_worker=0.4",
        "--no-serve",
    ]

    def checkpoints() -> set[str]:
        return {k for k in s3.keys("node-loss/ray_results") if "/checkpoint_" in k}

    earlier = checkpoints()  # the green run's
    subprocess.run(cmd, check=True, capture_output=True, env=ray_env(), cwd=ROOT, timeout=300)
    deadline = time.monotonic() + 900
    checkpoint = None
    while checkpoint is None and time.monotonic() < deadline:
        assert job_status(cluster, job_id) in ("PENDING", "RUNNING")
        checkpoint = next(iter(checkpoints() - earlier), None)
        time.sleep(1)
    assert checkpoint, "no expert checkpoint appeared in the bucket"
    victims = set()
    while not victims and time.monotonic() < deadline:
        victims = alive_trainer_nodes(cluster) & {"node_b", "node_c"}
        time.sleep(0.5)
    assert victims, "no trainer was running on node_b or node_c"
    victim = sorted(victims)[0]
    killed_at = time.time()
    cluster.kill_node(victim)
    while (status := job_status(cluster, job_id)) in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, "the job did not finish after the node loss"
        time.sleep(2)
    assert status == "SUCCEEDED", status

    run = RunDir(s3.uri("node-loss"), s3.storage)
    resumed = {}
    for skill in SKILLS:
        manifest = run.read_manifest("experts", skill)
        assert manifest["metrics"]["step"] == 60
        work = next(p for p in run.listdir("ray_results", "expert-work") if p.startswith(skill))
        attempts = [
            run.read_json("ray_results", "expert-work", work, "attempts", name)
            for name in run.listdir("ray_results", "expert-work", work, "attempts")
        ]
        after = [a for a in attempts if a["time"] > killed_at]
        if after:
            resumed[skill] = after
    assert resumed, f"no expert started again after {victim} was lost"
    for skill, after in resumed.items():
        first = min(after, key=lambda a: a["time"])
        assert first["start_step"] > 0, f"{skill} restarted from step 0, not a checkpoint"
        print(
            f"node loss: {victim} killed; {skill} resumed at step {first['start_step']} "
            f"{first['time'] - killed_at:.1f} s later"
        )
