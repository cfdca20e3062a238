"""The whole tiny pipeline with ``run.dir=s3://...`` on a local S3-compatible server (real HTTP):
every stage's outputs land in the bucket, a re-run skips everything, Serve started from the
run URI serves every adapter, and the local disk holds nothing but caches.

Also the commit protocol: a job killed after a stage's outputs are written but before its
manifest is leaves objects that nothing trusts: Serve does not offer them, and the re-run
redoes the stage.
"""

from __future__ import annotations

import base64
import os
import tempfile
from pathlib import Path

import pytest
import ray
import requests

from selma_ray.config import load_config
from selma_ray.core.rundir import KILL_ENV, KilledBeforeCommit
from selma_ray.diffusion.engine import find_adapters
from selma_ray.pipeline import open_run, run_pipeline, run_stage
from selma_ray.testing import LocalS3, LocalServe, SeededLLM, serve_app_config, small_run

pytestmark = pytest.mark.slow

SKILLS = ["counting", "everyday_scenes"]
LIMITS = {"default_steps": 2, "max_steps": 2, "max_size": 32, "max_n": 1}


def tiny_on(s3: LocalS3, name: str, *overrides: str):
    return load_config(
        "tiny",
        [
            f"run.dir={s3.uri(name)}",
            *s3.overrides(),
            *small_run(SKILLS),
            "eval.questions=none",  # LLM-written questions are covered elsewhere
            "eval.max_prompts=4",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def finished(s3, tmp_path_factory):
    """One run of the whole pipeline on S3, first killed once before committing ``merged``.
    Runs with the working directory and the temp dir in empty folders, to see what lands on
    local disk."""
    work = tmp_path_factory.mktemp("cwd")
    scratch = tmp_path_factory.mktemp("scratch")
    old_cwd, old_tmp = os.getcwd(), tempfile.tempdir
    system_tmp = Path(tempfile.gettempdir())  # where the Ray workers' scratch goes
    before = set(system_tmp.glob("selma-*"))
    os.chdir(work)
    tempfile.tempdir = str(scratch)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = tiny_on(s3, "pipe")
    run = open_run(cfg, check=True)
    try:
        run_stage("prompts", cfg, run, generate=SeededLLM())  # no LLM engine in this test
        os.environ[KILL_ENV] = "merged"
        try:
            with pytest.raises(KilledBeforeCommit):
                run_pipeline(cfg, deploy=False)
        finally:
            del os.environ[KILL_ENV]
        killed = {
            "keys": s3.keys("pipe/merged"),
            "served": set(find_adapters(open_run(cfg))),
        }
        first = run_pipeline(cfg, deploy=False)
        again = run_pipeline(cfg, deploy=False)
    finally:
        ray.shutdown()
        os.chdir(old_cwd)
        tempfile.tempdir = old_tmp
    return {
        "cfg": cfg,
        "killed": killed,
        "first": first,
        "again": again,
        "cwd": work,
        "scratch": scratch,
        "worker_scratch": sorted(set(system_tmp.glob("selma-*")) - before),
    }


def test_every_stage_writes_its_outputs_to_the_bucket(s3, finished):
    keys = s3.keys("pipe")
    for skill in SKILLS:
        assert f"pipe/prompts/{skill}.jsonl" in keys
        assert f"pipe/images/contact_sheets/{skill}.png" in keys
        assert f"pipe/experts/{skill}/pytorch_lora_weights.safetensors" in keys
        assert f"pipe/experts/{skill}/manifest.json" in keys
        assert any(k.startswith(f"pipe/experts/{skill}/logs/events.out.tfevents") for k in keys)
    assert any(k.startswith("pipe/images/data/") and k.endswith(".parquet") for k in keys)
    for key in (
        "pipe/merges/paper/pytorch_lora_weights.safetensors",
        "pipe/merged/pytorch_lora_weights.safetensors",
        "pipe/merged/manifest.json",
        "pipe/eval/metrics.json",
        "pipe/eval/report.html",
        "pipe/summary.json",
        "pipe/config.yaml",
    ):
        assert key in keys, key
    # Ray Train and Tune keep their checkpoints in the bucket too.
    assert any(k.startswith("pipe/ray_results/expert-") and "checkpoint" in k for k in keys)
    assert finished["first"]["run_dir"] == "s3://selma/pipe"


def test_a_rerun_on_s3_skips_every_stage(finished):
    stages = finished["again"]["stages"]
    assert set(stages) == {"prompts", "images", "experts", "merge", "eval"}
    assert all(s["skipped"] for s in stages.values()), stages


def test_a_kill_before_the_manifest_leaves_nothing_that_is_trusted(finished):
    killed = finished["killed"]
    # The merged adapter's file was written, its manifest was not: Serve does not offer it...
    assert "pipe/merged/pytorch_lora_weights.safetensors" in killed["keys"]
    assert "pipe/merged/manifest.json" not in killed["keys"]
    assert "merged" not in killed["served"] and {"base", *SKILLS} <= killed["served"]
    # ...and the next run redid the stage and committed it.
    merge = finished["first"]["stages"]["merge"]
    assert not merge["skipped"]
    assert finished["first"]["stages"]["experts"]["skipped"]  # committed earlier: kept


def test_local_disk_holds_nothing_but_caches(finished):
    assert list(finished["cwd"].iterdir()) == []
    caches = ("ray", "torchinductor_")  # Ray's session files, torch's compile cache
    leftovers = [p.name for p in finished["scratch"].iterdir() if not p.name.startswith(caches)]
    assert leftovers == [], leftovers
    assert finished["worker_scratch"] == []  # exports, merges, logs: all cleaned up


def test_serve_from_the_run_uri_serves_every_adapter(s3, finished):
    from selma_ray.models import cache_dir

    cfg = finished["cfg"]
    offered = find_adapters(open_run(cfg))
    want = {"base", "merged", "merged-paper", *SKILLS}
    assert set(offered) == want
    with LocalServe(num_cpus=2) as srv:
        srv.deploy(serve_app_config(cfg.run.dir, limits=LIMITS, replicas=1, storage=s3.storage))
        listed = requests.get(f"{srv.url}/v1/adapters", timeout=60).json()
        assert listed["run"] == "s3://selma/pipe"
        assert {a["name"] for a in listed["adapters"]} == want
        for name in sorted(want):
            resp = requests.post(
                f"{srv.url}/v1/images/generations",
                json={"prompt": "two red apples", "adapter": name, "seed": 1},
                timeout=120,
            )
            assert resp.status_code == 200, (name, resp.text)
            png = base64.b64decode(resp.json()["data"][0]["b64_json"])
            assert png.startswith(b"\x89PNG")
    # The replica copied each adapter to the node's cache, keyed by its content digest.
    for name, info in offered.items():
        if info.path:
            assert info.sha256, name
            folder = cache_dir() / "adapters" / info.sha256[:32]
            assert (folder / "pytorch_lora_weights.safetensors").is_file(), name
