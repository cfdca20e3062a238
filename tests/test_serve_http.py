"""The real Serve app over HTTP on loopback, in-process: a private local Ray cluster, Serve on
a free port, ``serve/config.yaml``'s application deployed declaratively (as ``serve deploy``
does) on a synthetic tiny run with random adapters.

One module-scoped deployment serves every test here: adapters and mixes, batching, bad inputs,
the API key, a schemathesis run against ``/openapi.json``, the playground in headless
Chromium, and last a hot reload to another run.
"""

from __future__ import annotations

import base64
import io
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from browser import run_and_wait, wait_for

from selma_ray.testing import LocalServe, make_run, serve_app_config

pytestmark = pytest.mark.slow

SKILLS = ["counting", "everyday_scenes"]
# Small limits keep every request (and every fuzzed one) cheap on 2 cores.
LIMITS = {"default_steps": 2, "max_steps": 3, "max_size": 48, "max_n": 2, "max_prompt_chars": 200}
API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_http")
    return {
        "a": make_run(root / "a", SKILLS, rank=4, scale=0.5),
        "b": make_run(root / "b", [*SKILLS, "dense_detail"], rank=4, scale=0.5),
    }


@pytest.fixture(scope="module")
def live(runs):
    try:
        import ray

        if ray.is_initialized():
            pytest.fail("Ray is already initialised in this process")
    except ImportError:
        pytest.fail("ray is not installed")
    with LocalServe(num_cpus=2) as srv:
        srv.deploy(serve_app_config(runs["a"], limits=LIMITS, replicas=1))
        yield srv


def gen(live, adapter="merged", seed=3, png=True, headers=None, **extra) -> requests.Response:
    body = {"prompt": "two red apples on a table", "adapter": adapter, "seed": seed, **extra}
    headers = {**({"Accept": "image/png"} if png else {}), **(headers or {})}
    return requests.post(
        f"{live.url}/v1/images/generations", json=body, headers=headers, timeout=120
    )


def adapters(live, **kwargs) -> dict:
    resp = requests.get(f"{live.url}/v1/adapters", timeout=60, **kwargs)
    assert resp.status_code == 200, resp.text
    return resp.json()


def pixels(png: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def test_health_docs_and_adapter_list(live, runs):
    assert requests.get(f"{live.url}/healthz", timeout=30).json() == {"status": "ok"}
    assert requests.get(f"{live.url}/docs", timeout=30).status_code == 200
    spec = requests.get(f"{live.url}/openapi.json", timeout=30).json()
    assert "/v1/images/generations" in spec["paths"]
    body = adapters(live)
    assert body["run"] == str(runs["a"])
    kinds = {a["name"]: a["kind"] for a in body["adapters"]}
    assert kinds == {
        "base": "base",
        "merged": "merged",
        "counting": "expert",
        "everyday_scenes": "expert",
    }
    assert {a["rank"] for a in body["adapters"] if a["kind"] == "expert"} == {4}
    assert body["replica"]["pid"] > 0 and body["replica"]["reloads"] == 0


def test_every_adapter_kind_and_a_mix_give_different_images(live):
    specs = [
        "base",
        "merged",
        "counting",
        "everyday_scenes",
        {"counting": 0.5, "everyday_scenes": 0.5},
    ]
    images = []
    for spec in specs:
        resp = gen(live, spec)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == "image/png"
        images.append(resp.content)
    assert len(set(images)) == len(specs)
    assert gen(live, "counting").content == images[2]  # same seed and adapter: same image


def test_b64_json_with_n_images_and_the_default_size(live):
    resp = gen(live, {"counting": 1.0}, seed=7, png=False, n=2)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [d["seed"] for d in body["data"]] == [7, 8]
    first, second = (base64.b64decode(d["b64_json"]) for d in body["data"])
    assert first != second and pixels(first).shape[:2] == (32, 32)
    resized = gen(live, "merged", size="48x16")
    assert resized.status_code == 200 and pixels(resized.content).shape[:2] == (16, 48)


def forward_passes(live) -> Counter:
    """How many forward passes of each size (images) the replica has run so far."""
    sizes = adapters(live)["replica"]["batching"]["images_per_forward_pass"]
    return Counter({int(k): v for k, v in sizes.items()})


def test_concurrent_same_adapter_requests_share_a_forward_pass(live):
    before = forward_passes(live)
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: gen(live, "counting", seed=40 + i).status_code, range(8)))
    assert codes == [200] * 8
    ran = forward_passes(live) - before
    assert sum(size * n for size, n in ran.items()) == 8  # every image, once
    assert max(ran) > 1, f"8 concurrent requests ran one by one: passes {dict(ran)}"


def test_concurrent_requests_are_batched_and_match_requests_alone(live):
    jobs = [("merged", 11), ("counting", 12), ("merged", 13), ("base", 14)] * 2
    before = forward_passes(live)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda j: gen(live, j[0], seed=j[1]), jobs))
    assert [r.status_code for r in together] == [200] * len(jobs)
    ran = forward_passes(live) - before
    assert sum(size * n for size, n in ran.items()) == len(jobs)
    assert max(ran) > 1, f"no two requests shared a forward pass: {dict(ran)}"
    for (adapter, seed), resp in zip(jobs, together, strict=True):
        alone = gen(live, adapter, seed=seed).content
        assert abs(pixels(resp.content) - pixels(alone)).max() <= 1


def test_concurrent_requests_for_different_adapters_share_a_forward_pass(live):
    mix = {"counting": 0.5, "everyday_scenes": 0.5}
    jobs = [("base", 21), ("merged", 22), ("counting", 23), ("everyday_scenes", 24), (mix, 25)]
    jobs += [("counting", 26), (mix, 27), ("merged", 28)]

    def specs_per_pass() -> Counter:
        sizes = adapters(live)["replica"]["batching"]["adapter_specs_per_forward_pass"]
        return Counter({int(k): v for k, v in sizes.items()})

    assert adapters(live)["replica"]["batching"]["mixed_adapters"] is True
    before = specs_per_pass()
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda j: gen(live, j[0], seed=j[1]), jobs))
    assert [r.status_code for r in together] == [200] * len(jobs)
    ran = specs_per_pass() - before
    assert max(ran) > 1, f"no forward pass carried two adapters: specs per pass {dict(ran)}"
    for (adapter, seed), resp in zip(jobs, together, strict=True):
        alone = gen(live, adapter, seed=seed).content
        assert abs(pixels(resp.content) - pixels(alone)).max() <= 1, adapter


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"prompt": "x", "n": 3}, 422, "n must be in 1..2"),
        ({"prompt": "x", "num_inference_steps": 4}, 422, "1..3"),
        ({"prompt": "x", "size": "33x32"}, 422, "multiple of 8 in 8..48"),
        ({"prompt": "x", "size": "64x64"}, 422, "multiple of 8 in 8..48"),
        ({"prompt": "x" * 201}, 422, "limit is 200"),
        ({"prompt": "x", "adapter": {"base": 1}}, 422, "cannot be mixed"),
        ({"prompt": "x", "adapter": {"counting": -1}}, 422, "weights"),
        ({"prompt": "x", "adapter": {}}, 422, "non-empty"),
        ({"prompt": "x", "adapter": "../../etc/passwd"}, 404, "counting"),
        ({"prompt": "x", "adapter": {"nope": 1}}, 404, "valid"),
        ({"prompt": "x", "seed": 2**31 - 1, "n": 2}, 422, "seed + n - 1"),
        ({"prompt": ""}, 422, "prompt"),
        ({"prompt": "x", "unknown_field": 1}, 422, "unknown_field"),
        ({"prompt": "x", "response_format": "url"}, 400, "only 'b64_json'"),
        ({"prompt": "x", "model": "counting", "adapter": "merged"}, 400, "disagree"),
        ({"prompt": "x", "model": "selma"}, 404, "counting"),
        ({"prompt": "x", "quality": "ultra"}, 422, "hd"),
        (
            {"prompt": "x", "adapter": {"merge": "ties", "experts": ["counting", "merged"]}},
            422,
            "only experts",
        ),
        ({"prompt": "x", "adapter": {"merge": "mean", "experts": ["a", "b"]}}, 422, "dare_ties"),
        (
            {"prompt": "x", "adapter": {"merge": "ties", "experts": ["a", "b"], "density": 2}},
            422,
            "density",
        ),
        (
            {"prompt": "x", "adapter": {"merge": "ties", "experts": ["counting", "no"]}},
            404,
            "everyday_scenes",
        ),
        ([1, 2], 422, "dict"),
        ("not json", 422, "JSON"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_what_is_allowed(live, body, status, says):
    url = f"{live.url}/v1/images/generations"
    if isinstance(body, str):
        resp = requests.post(url, data=body, headers={"Content-Type": "application/json"})
    else:
        resp = requests.post(url, json=body, timeout=60)
    assert resp.status_code == status, resp.text
    assert says in resp.text


def test_a_merge_on_demand_is_made_once_by_the_replica_then_reused(live):
    spec = {"merge": "ties", "experts": ["counting", "everyday_scenes"], "density": 0.5}
    before = adapters(live)["replica"]["merges"]
    first = gen(live, spec, png=False)
    assert first.status_code == 200, first.text
    ((name, echoed),) = first.json()["adapter"].items()
    assert name.startswith("merge-ties-") and echoed["experts"] == spec["experts"]
    again = gen(live, spec, png=False)
    assert again.json()["data"] == first.json()["data"]
    after = adapters(live)["replica"]["merges"]
    assert after["computed"] == before["computed"] + 1
    assert after["reused"] == before["reused"] + 1
    assert name in [m["name"] for m in after["cached"]]
    assert gen(live, spec).content not in (gen(live, "merged").content, gen(live, "base").content)


def test_the_openai_sdk_picks_adapters_by_model_and_lists_them(live):
    """The real ``openai`` client, as a new user would call it: ``model=`` selects the
    adapter (the same image as ``adapter=``), ``quality``, ``style`` and ``user`` are taken,
    and ``models.list()`` names every adapter."""
    import openai

    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {"base", "merged", "counting", "everyday_scenes"}
    assert all(m.object == "model" and m.owned_by == "selma_ray" for m in listed.values())
    images = {}
    for name in sorted(listed):
        out = client.images.generate(
            model=name,
            prompt="two red apples on a table",
            quality="standard",
            style="natural",
            user="someone",
            extra_body={"seed": 3},
        )
        assert abs(out.created - time.time()) < 600
        images[name] = base64.b64decode(out.data[0].b64_json)
        assert images[name] == gen(live, name, seed=3).content  # model= is adapter=
    assert len(set(images.values())) == len(images)
    agreed = client.images.generate(
        model="counting", prompt="two red apples on a table", extra_body={"adapter": "counting"}
    )
    assert agreed.data[0].b64_json
    with pytest.raises(openai.BadRequestError, match="disagree"):
        client.images.generate(
            model="counting", prompt="x", extra_body={"adapter": "everyday_scenes"}
        )
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(model="merged", prompt="x", response_format="url")
    with pytest.raises(openai.NotFoundError, match="valid"):
        client.images.generate(model="dall-e-3", prompt="x")
    with pytest.raises(openai.UnprocessableEntityError, match="colour"):
        client.images.generate(model="merged", prompt="x", extra_body={"colour": "red"})


def test_png_accept_with_several_images_is_refused(live):
    resp = gen(live, n=2)
    assert resp.status_code == 422 and "n=1" in resp.text


def test_diffusion_refuses_adapters_it_does_not_hold_with_a_key_error(live):
    """What the ingress turns into a 404 when a hot reload removed an adapter in between."""
    from ray import serve

    handle = serve.get_deployment_handle("Diffusion", app_name="selma")
    job = {
        "spec": (("gone", 1.0),),
        "prompt": "x",
        "n": 1,
        "seed": 0,
        "steps": 1,
        "guidance_scale": 1.0,
        "width": 32,
        "height": 32,
        "negative_prompt": None,
    }
    with pytest.raises(KeyError) as err:
        handle.generate.remote(job).result(timeout_s=60)
    assert "gone" in str(getattr(err.value, "cause", err.value))


def test_schemathesis_finds_no_server_error(live):
    """Fuzz every operation of /openapi.json with valid and invalid inputs: no 5xx, invalid
    data is rejected, and responses match the documented status codes, types and schemas."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    server_errors: list[str] = []
    codes: dict[int, int] = {}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @settings(
            max_examples=60,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=schema.as_strategy(generation_mode=mode))
        def fuzz(case):
            resp = case.call(base_url=live.url, timeout=120)
            codes[resp.status_code] = codes.get(resp.status_code, 0) + 1
            where = f"{case.method} {case.path} {case.body!r}"[:300]
            if resp.status_code >= 500:
                server_errors.append(f"{where} -> {resp.status_code} {resp.text[:300]}")
            case.validate_response(resp, checks=checks)  # raises, with a curl to reproduce

        fuzz()
    print("schemathesis status codes:", dict(sorted(codes.items())))
    assert server_errors == []
    assert sum(codes.values()) >= 60
    assert codes.get(200, 0) > 0  # some fuzzed requests really generated images


def test_api_key_is_enforced_when_set(live, runs):
    """Redeploy the ingress with $SELMA_API_KEY in its environment, then without it again."""
    before = adapters(live)["replica"]
    live.deploy(
        serve_app_config(
            runs["a"], limits=LIMITS, replicas=1, ingress_env={"SELMA_API_KEY": API_KEY}
        )
    )
    try:
        assert requests.get(f"{live.url}/v1/adapters", timeout=60).status_code == 401
        assert gen(live).status_code == 401
        assert gen(live, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = gen(live, headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200 and ok.content.startswith(b"\x89PNG")
        assert gen(live, headers={"X-API-Key": API_KEY}).status_code == 200
        assert requests.get(f"{live.url}/healthz", timeout=30).status_code == 200
        auth = {"headers": {"Authorization": f"Bearer {API_KEY}"}}
        assert adapters(live, **auth)["replica"]["pid"] == before["pid"]  # only the ingress
    finally:
        live.deploy(serve_app_config(runs["a"], limits=LIMITS, replicas=1))
    assert requests.get(f"{live.url}/v1/adapters", timeout=60).status_code == 200


# ---- the playground in headless Chromium ----------------------------------------------------


def test_playground_lists_adapters_and_generates_in_a_browser(live, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{live.url}/")
    assert browser.title == "selma_ray playground"
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-adapters"))
    select = Select(browser.find_element(By.ID, "adapter"))
    values = [o.get_attribute("value") for o in select.options]
    assert set(values) == {"base", "merged", "counting", "everyday_scenes", "mix"}
    assert select.first_selected_option.get_attribute("value") == "merged"
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("2")
    select.select_by_value("counting")
    assert [i["alt"] for i in run_and_wait(browser, "generate", 1)] == ["counting"]

    select.select_by_value("everyday_scenes")
    images = run_and_wait(browser, "compare", 3)
    assert [i["alt"] for i in images] == ["base", "merged", "everyday_scenes"]


def test_playground_shows_the_servers_message_on_a_bad_request(live, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{live.url}/")
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-adapters"))
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("99")
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "out").get_attribute("data-state") == "done")
    assert "num_inference_steps must be in 1..3" in browser.find_element(By.ID, "status").text


# ---- last: hot reload to another run --------------------------------------------------------


def test_hot_reload_swaps_adapters_without_restarting_the_replica(live, runs):
    before = adapters(live)
    assert "dense_detail" not in {a["name"] for a in before["adapters"]}
    merged_before = gen(live, "merged").content

    live.deploy(
        serve_app_config(
            runs["a"], limits=LIMITS, replicas=1, user_config={"run_dir": str(runs["b"])}
        )
    )
    deadline = time.monotonic() + 120
    while (after := adapters(live))["run"] != str(runs["b"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    names = {a["name"] for a in after["adapters"]}
    assert after["run"] == str(runs["b"]) and names == {"base", "merged", "dense_detail", *SKILLS}
    assert after["replica"]["pid"] == before["replica"]["pid"]
    assert after["replica"]["replica_id"] == before["replica"]["replica_id"]
    assert after["replica"]["reloads"] == 1

    detail = gen(live, "dense_detail")
    assert detail.status_code == 200, detail.text
    assert detail.content != gen(live, "counting").content
    assert gen(live, "merged").content != merged_before  # the merge of three experts now


def test_a_failed_hot_reload_keeps_serving_the_old_run_and_says_why(live, runs, tmp_path):
    """Runs after the successful reload above: now pointed at a run that cannot be read."""
    before = adapters(live)
    missing = tmp_path / "not-a-run"
    live.deploy(
        serve_app_config(
            runs["a"], limits=LIMITS, replicas=1, user_config={"run_dir": str(missing)}
        )
    )
    deadline = time.monotonic() + 120
    while not (after := adapters(live))["replica"]["reload_error"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "config.yaml not found" in after["replica"]["reload_error"]
    assert after["run"] == before["run"] == str(runs["b"])
    assert after["adapters"] == before["adapters"]
    assert after["replica"]["replica_id"] == before["replica"]["replica_id"]
    assert gen(live, "dense_detail").status_code == 200  # still the old run's adapters
