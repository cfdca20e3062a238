"""End to end on the tiny preset: a local Ray head, the job via `ray job submit`, then Serve.

This is the slowest test (a few minutes on 2 cores): real vLLM on CPU writes the prompts, a
tiny diffusers pipeline renders and learns, Ray Train trains five experts, Serve answers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SKILLS = ["dense_detail", "counting", "user_prompts", "commonsense_defying", "everyday_scenes"]
STAGES = ["prompts", "images", "experts", "merge", "eval"]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A Ray head of this test's own: its own temp dir and free ports, so it runs beside any
    cluster already up (``make run`` leaves one), and is stopped by process group, never by
    ``ray stop`` (which would stop every Ray cluster on the machine)."""
    # A short temp dir: Ray's unix sockets live under it (108-byte path limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="selma-e2e-", dir="/tmp"))
    ports = {
        "port": free_port(),
        "dashboard-port": free_port(),
        "node-manager-port": free_port(),
        "object-manager-port": free_port(),
        "ray-client-server-port": free_port(),
        "dashboard-agent-listen-port": free_port(),
        "dashboard-agent-grpc-port": free_port(),
        "runtime-env-agent-port": free_port(),
        "metrics-export-port": free_port(),
    }
    # --block keeps `ray start` in the foreground as the parent of the head's processes;
    # SIGTERM to it shuts the node down, and its process group holds what is left.
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--min-worker-port=0",  # random worker ports: no clash with another cluster's
            "--max-worker-port=0",
            "--include-dashboard=true",
            "--disable-usage-stats",
            *(f"--{name}={port}" for name, port in ports.items()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ray_env(),
        start_new_session=True,
    )
    gcs = f"127.0.0.1:{ports['port']}"
    try:
        wait_for_head(proc, gcs, f"http://127.0.0.1:{ports['dashboard-port']}")
        yield {
            "gcs": gcs,
            "dashboard": f"http://127.0.0.1:{ports['dashboard-port']}",
            "serve_port": free_port(),
            "run_dir": temp_dir / "run",
        }
    finally:
        stop_process_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_env() -> dict[str, str]:
    # With the virtualenv first on PATH, the head (and so each job's `python`) uses it,
    # as it would after `source .venv/bin/activate`. RAY_ADDRESS from the caller's shell
    # must not point our commands at another cluster.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


def wait_for_head(proc: subprocess.Popen, gcs: str, dashboard: str, timeout: float = 180) -> None:
    """Until the GCS answers ``ray status`` and the dashboard (the jobs API) answers HTTP."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`ray start --head` exited with {proc.returncode}:\n{proc.stdout.read()}")
        status = subprocess.run(
            [str(BIN / "ray"), "status", f"--address={gcs}"],
            capture_output=True,
            text=True,
            env={**ray_env(), "RAY_AUTH_MODE": "token"},
            timeout=60,
        )
        if status.returncode == 0:
            try:
                if requests.get(f"{dashboard}/api/version", timeout=10).status_code < 500:
                    return
            except requests.ConnectionError:
                pass  # the dashboard starts a little after the GCS
        time.sleep(2)
    pytest.fail(f"the test's Ray head at {gcs} did not come up within {timeout:.0f} s")


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM lets the head shut its processes down; SIGKILL to the group ends stragglers
    (the head's own temp dir is removed after, so nothing it leaves behind survives)."""
    pgid = os.getpgid(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def submit(head: dict) -> str:
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head["dashboard"],
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "jobs/full_pipeline.py",
        "--config",
        "tiny",
        f"run.dir={head['run_dir']}",
        f"serve.port={head['serve_port']}",
    ]
    # `ray start --head` enables token auth by default (Ray 2.60) and stores the token in
    # ~/.ray/auth_token; the jobs client reads it only when told to.
    env = {**ray_env(), "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "token"}
    for _ in range(30):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env)
        out = done.stdout + done.stderr
        # The dashboard's job agent comes up a little after `ray start` returns (later under
        # load); until then submissions are refused and nothing has run, so try again.
        if "No available agent" not in out:
            break
        time.sleep(5)
    assert done.returncode == 0 and "succeeded" in out, out[-5000:]
    return out


@pytest.fixture(scope="module")
def first_run(head) -> str:
    return submit(head)


def generate(head: dict, adapter, seed: int = 3, **extra) -> requests.Response:
    url = f"http://127.0.0.1:{head['serve_port']}/v1/images/generations"
    body = {"prompt": "two red apples on a wooden table", "adapter": adapter, "seed": seed, **extra}
    return requests.post(url, json=body, headers={"Accept": "image/png"}, timeout=120)


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def post_json(head: dict, body) -> requests.Response:
    url = f"http://127.0.0.1:{head['serve_port']}/v1/images/generations"
    return requests.post(url, json=body, timeout=120)


def test_job_runs_every_stage_and_reports_time_per_stage(first_run):
    for stage in [*STAGES, "serve"]:
        assert f"  {stage}" in first_run
    assert "Serve is answering at http://127.0.0.1:" in first_run
    assert "eval (mean, change vs base):" in first_run


def test_run_directory_has_artifacts_of_every_stage(head, first_run):
    run = head["run_dir"]
    assert (run / "config.yaml").is_file()
    for skill in SKILLS:
        assert (run / "prompts" / f"{skill}.jsonl").read_text().strip()
        assert (run / "experts" / skill / "pytorch_lora_weights.safetensors").is_file()
    assert list((run / "images" / "data").glob("*.parquet"))
    merged = json.loads((run / "merged" / "manifest.json").read_text())
    assert merged["method"] == "paper" and sorted(merged["weights"]) == sorted(SKILLS)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"base", "merged", *SKILLS} <= set(metrics["variants"])
    assert {"clip", "pick", "dsg"} <= set(metrics["metrics"])
    report = (run / "eval" / "report.html").read_text()
    assert "data:image/png;base64," in report and "randomly initialised" in report


def test_every_adapter_choice_returns_a_decodable_png(head, first_run):
    from PIL import Image

    listed = requests.get(f"http://127.0.0.1:{head['serve_port']}/v1/adapters", timeout=30)
    names = {a["name"] for a in listed.json()["adapters"]}
    assert names == {"base", "merged", "merged-paper", *SKILLS}
    for name in sorted(names):
        resp = generate(head, name)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(resp.content))
        assert image.size == (32, 32)


def test_adapters_change_the_image_for_the_same_prompt_and_seed(head, first_run):
    images = {name: generate(head, name).content for name in ["base", "merged", "counting"]}
    assert images["base"] != images["merged"]
    assert images["merged"] != images["counting"]
    assert generate(head, "merged").content == images["merged"]  # same seed, same image


def test_unknown_adapter_gets_4xx_naming_the_valid_ones(head, first_run):
    resp = generate(head, "no-such-expert")
    assert 400 <= resp.status_code < 500
    assert "merged" in resp.text and "counting" in resp.text


def test_adapters_load_into_a_plain_diffusers_pipeline(head, first_run):
    import torch
    from diffusers import StableDiffusionPipeline

    from selma_ray.models import resolve

    pipe = StableDiffusionPipeline.from_pretrained(resolve("tiny-sd"))
    pipe.load_lora_weights(str(head["run_dir"] / "merged"), adapter_name="merged")
    pipe.load_lora_weights(str(head["run_dir"] / "experts" / "counting"), adapter_name="counting")
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np"}
    pipe.set_adapters(["merged"])
    a = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.set_adapters(["counting"])
    b = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, 32, 32, 3) and not (a == b).all()


def test_b64_json_response_with_several_images_and_a_mix(head, first_run):
    import base64

    resp = post_json(
        head, {"prompt": "a kite", "n": 2, "seed": 5, "adapter": {"counting": 0.5, "merged": 0.5}}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [d["seed"] for d in body["data"]] == [5, 6]
    assert body["adapter"] == {"counting": 0.5, "merged": 0.5}
    pngs = [base64.b64decode(d["b64_json"]) for d in body["data"]]
    assert pngs[0] != pngs[1] and all(p.startswith(b"\x89PNG") for p in pngs)
    mix = generate(head, {"counting": 0.5, "merged": 0.5}, seed=5, prompt="a kite").content
    # Alone vs in a batch of two: batched kernels may round the last bit differently.
    assert np.abs(pixels(mix) - pixels(pngs[0])).max() <= 1
    assert mix not in {
        generate(head, a, seed=5, prompt="a kite").content for a in ("counting", "merged")
    }


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"prompt": "x", "n": 99}, 422, "n must be in 1.."),
        ({"prompt": "x", "num_inference_steps": 100000}, 422, "num_inference_steps"),
        ({"prompt": "x", "size": "33x32"}, 422, "multiple of 8"),
        ({"prompt": "x", "size": "4096x4096"}, 422, "multiple of 8 in"),
        ({"prompt": "x" * 5000}, 422, "limit"),
        ({"prompt": "x", "adapter": {"base": 1}}, 422, "cannot be mixed"),
        ({"prompt": "x", "adapter": {"nope": 1}}, 404, "valid"),
        ({"prompt": "x", "adapter": "../../etc/passwd"}, 404, "valid"),
        ({"prompt": ""}, 422, "prompt"),
        ({"prompt": "x", "unknown_field": 1}, 422, "unknown_field"),
        ({"prompt": "x", "seed": -1}, 422, "seed"),
        ("not json", 422, "JSON"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_what_is_allowed(head, first_run, body, status, says):
    url = f"http://127.0.0.1:{head['serve_port']}/v1/images/generations"
    if isinstance(body, str):
        resp = requests.post(
            url, data=body, headers={"Content-Type": "application/json"}, timeout=60
        )
    else:
        resp = requests.post(url, json=body, timeout=60)
    assert resp.status_code == status, resp.text
    assert says in resp.text


def test_concurrent_requests_are_batched_and_match_requests_alone(head, first_run):
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def passes() -> Counter:
        url = f"http://127.0.0.1:{head['serve_port']}/v1/adapters"
        sizes = requests.get(url, timeout=30).json()["replica"]["batching"]
        return Counter({int(k): v for k, v in sizes["images_per_forward_pass"].items()})

    jobs = [("merged", 11), ("counting", 12), ("merged", 13), ("base", 14)] * 2
    before = passes()
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda j: generate(head, j[0], seed=j[1]).content, jobs))
    ran = passes() - before
    assert sum(size * n for size, n in ran.items()) == len(jobs)
    assert max(ran) > 1, f"no two requests shared a forward pass: {dict(ran)}"
    for (adapter, seed), png in zip(jobs, together, strict=True):
        alone = generate(head, adapter, seed=seed).content
        a, b = (np.asarray(Image.open(io.BytesIO(x)), dtype=np.int16) for x in (png, alone))
        assert np.abs(a - b).max() <= 1  # batched kernels may round the last bit differently


def test_playground_page_is_served(head, first_run):
    resp = requests.get(f"http://127.0.0.1:{head['serve_port']}/", timeout=30)
    assert resp.status_code == 200 and "text/html" in resp.headers["content-type"]
    assert "selma_ray playground" in resp.text


def test_bounded_load_of_200_requests_at_concurrency_16_loses_nothing(head, first_run):
    from concurrent.futures import ThreadPoolExecutor

    names = ["base", "merged", "merged-paper", *SKILLS]

    def one(i: int) -> tuple[int, int]:
        resp = generate(head, names[i % len(names)], seed=1000 + i, num_inference_steps=2)
        return resp.status_code, len(resp.content)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    assert len(results) == 200
    assert [code for code, _ in results if code != 200] == []
    assert all(size > 100 for _, size in results)


def test_second_run_repeats_no_stage(head, first_run):
    manifests = sorted(head["run_dir"].rglob("manifest.json"))
    before = {p: p.stat().st_mtime_ns for p in manifests}
    out = submit(head)
    for stage in STAGES:
        assert any(
            line.strip().startswith(stage) and "skipped (already done)" in line
            for line in out.splitlines()
        ), f"stage {stage} was repeated:\n{out[-3000:]}"
    assert {p: p.stat().st_mtime_ns for p in manifests} == before


def test_serve_deploy_of_the_runs_serve_yaml_answers(head, first_run):
    """The README's local route ends with `serve deploy <run>/serve.yaml`: the config the job
    wrote deploys with the CLI (token auth on, as `ray start --head` left it), over the app
    the job started, and answers for the run's adapters."""
    serve_yaml = head["run_dir"] / "serve.yaml"
    done = subprocess.run(
        [str(BIN / "serve"), "deploy", "--address", head["dashboard"], str(serve_yaml)],
        env={**ray_env(), "RAY_AUTH_MODE": "token"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    deadline, resp = time.monotonic() + 300, None
    while time.monotonic() < deadline:
        status = subprocess.run(
            [str(BIN / "serve"), "status", "--address", head["dashboard"]],
            env={**ray_env(), "RAY_AUTH_MODE": "token"},
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        if "RUNNING" in status and "DEPLOYING" not in status:
            resp = generate(head, "merged")
            if resp.status_code == 200:
                break
        time.sleep(2)
    assert resp is not None and resp.status_code == 200, status
    assert resp.headers["content-type"] == "image/png"
