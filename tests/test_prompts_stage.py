"""The prompts stage: rounds, resume, custom skills and both LLM backends."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from selma_ray.config import load_config
from selma_ray.core.rundir import RunDir
from selma_ray.models.llm import OpenAIGenerator
from selma_ray.pipeline import run_stage
from selma_ray.prompts.stage import STAGE
from selma_ray.testing import QuietJSONHandler, http_server

OBJECTS = [
    "apple",
    "kite",
    "lamp",
    "boat",
    "chair",
    "mug",
    "bench",
    "drum",
    "scarf",
    "vase",
    "clock",
    "bucket",
    "ladder",
    "teapot",
    "guitar",
    "basket",
    "candle",
    "pillow",
]
PLACES = [
    "on a table",
    "by a window",
    "in a garden",
    "under a tree",
    "near a river",
    "on a shelf",
    "in a kitchen",
    "at a station",
]


def fake_answer(seed: int, n: int = 5) -> str:
    """A numbered list of varied descriptions, different for every request seed."""
    lines = []
    for i in range(n):
        k = seed * 7 + i * 13
        obj, other, place = OBJECTS[k % 18], OBJECTS[(k // 18 + 5) % 18], PLACES[k % 8]
        lines.append(f"{i + 1}. Two {obj}s beside one {other} {place}, seen {k % 97} times.")
    return "Here are new descriptions:\n" + "\n".join(lines)


class FakeLLM:
    """Stands in for the Ray Data pass; can fail once at a chosen round (a simulated kill)."""

    def __init__(self, fail_at_round: int | None = None):
        self.fail_at_round = fail_at_round
        self.rounds: list[int] = []

    def __call__(self, cfg, requests):
        round_idx = requests[0]["round"]
        self.rounds.append(round_idx)
        if round_idx == self.fail_at_round:
            self.fail_at_round = None
            raise KeyboardInterrupt("killed")
        return [{**r, "generated_text": fake_answer(r["seed"]), "error": ""} for r in requests]


def tiny(tmp_path, *overrides):
    return load_config(
        "tiny", [f"run.dir={tmp_path}", "prompts.skills=[counting, everyday_scenes]", *overrides]
    )


def test_stage_grows_every_skill_to_its_target_and_records_verdicts(tmp_path):
    cfg = tiny(tmp_path, "prompts.per_skill=12")
    summary = run_stage("prompts", cfg, RunDir(tmp_path), generate=FakeLLM())
    for skill in ("counting", "everyday_scenes"):
        rows = _rows(tmp_path, f"{skill}.jsonl")
        assert len(rows) == 12 and len({r["prompt"] for r in rows}) == 12
        assert all(r["max_rouge"] <= 0.8 and r["examples"] for r in rows)
        history = _rows(tmp_path, f"{skill}.candidates.jsonl")
        assert {h["verdict"] for h in history} <= {
            "accepted",
            "duplicate",
            "too_long",
            "junk",
            "rouge",
            "surplus",
        }
        stats = summary["stats"][skill]
        assert stats["accepted"] == 12 and stats["candidates"] == len(history)
        assert 0 < stats["acceptance_rate"] <= 1 and 0 < stats["distinct_2"] <= 1


def _rows(root, name):
    return [json.loads(line) for line in (root / STAGE / name).read_text().splitlines() if line]


def test_resume_after_a_kill_between_rounds_keeps_earlier_rounds(tmp_path):
    cfg = tiny(
        tmp_path, "prompts.per_skill=30", "prompts.requests_per_round=2", "prompts.max_rounds=30"
    )
    run = RunDir(tmp_path)
    killed = FakeLLM(fail_at_round=1)
    with pytest.raises(KeyboardInterrupt):
        run_stage("prompts", cfg, run, generate=killed)
    after_kill = _rows(tmp_path, "counting.jsonl")
    assert killed.rounds == [0, 1] and 0 < len(after_kill) < 30
    assert run.read_manifest(STAGE) is None  # not finished
    resumed = FakeLLM()
    run_stage("prompts", cfg, run, generate=resumed)
    assert resumed.rounds[0] == 1  # round 0 is not asked again
    final = _rows(tmp_path, "counting.jsonl")
    assert final[: len(after_kill)] == after_kill and len(final) == 30
    # Same config, uninterrupted: the same prompts (sampling is seeded).
    fresh = tmp_path / "fresh"
    run_stage(
        "prompts",
        tiny(
            fresh, "prompts.per_skill=30", "prompts.requests_per_round=2", "prompts.max_rounds=30"
        ),
        RunDir(fresh),
        generate=FakeLLM(),
    )
    assert _rows(fresh, "counting.jsonl") == final


def test_finished_stage_is_skipped(tmp_path):
    cfg = tiny(tmp_path)
    run_stage("prompts", cfg, RunDir(tmp_path), generate=FakeLLM())
    llm = FakeLLM()
    assert run_stage("prompts", cfg, RunDir(tmp_path), generate=llm)["skipped"] and llm.rounds == []


def test_custom_skill_from_yaml_is_generated(tmp_path):
    skill_file = tmp_path / "skills.yaml"
    skill_file.write_text(
        "skills:\n"
        "  - name: texture\n"
        "    description: images where the material of objects matters.\n"
        "    max_words: 20\n"
        "    seeds: [A wooden spoon in a glass jar., A wool scarf on a metal hook.,"
        " A paper lamp over a stone floor.]\n"
    )
    cfg = load_config(
        "tiny",
        [
            f"run.dir={tmp_path}/run",
            "prompts.skills=[texture]",
            f"prompts.skill_files=[{skill_file}]",
        ],
    )
    run_stage("prompts", cfg, RunDir(tmp_path / "run"), generate=FakeLLM())
    assert len(_rows(tmp_path / "run", "texture.jsonl")) == cfg.prompts.per_skill


def test_unknown_skill_is_rejected_at_config_time():
    from selma_ray.config import ConfigError

    with pytest.raises(ConfigError, match="unknown skills .*texture"):
        load_config("tiny", ["prompts.skills=[texture]"])


# ------------------------------------------------------------ OpenAI-compatible backend


@dataclass
class FakeAPI:
    """One fake endpoint's state, fresh for every test: planned failures per instruction
    (counted down as they are served) and the Authorization header of every request."""

    url: str = ""
    failures: dict[str, int] = field(default_factory=dict)
    seen_auth: list[str] = field(default_factory=list)


class _FakeAPI(QuietJSONHandler):
    state: FakeAPI  # set on a per-server subclass by the fake_api fixture

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.state.seen_auth.append(self.headers.get("Authorization", ""))
        text = body["messages"][0]["content"]
        left = self.state.failures.get(text, 0)
        if left:
            self.state.failures[text] = left - 1
            self.send_response(503 if left % 2 else 429)
            self.send_header("retry-after-ms", "10")  # the SDK waits as told: a quick test
            self.end_headers()
            return
        if text == "always-400":
            self.send_response(400)
            self.end_headers()
            return
        payload = {"choices": [{"message": {"content": fake_answer(body["seed"], 2)}}]}
        self.send_json(200, payload)


@pytest.fixture
def fake_api():
    """A fake OpenAI-compatible endpoint with its own state (nothing shared between tests)."""
    with http_server(_FakeAPI, FakeAPI()) as state:
        yield state


def test_openai_backend_retries_and_reports_errors_in_rows(fake_api, monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test-secret")
    fake_api.failures["flaky"] = 3
    gen = OpenAIGenerator(
        fake_api.url,
        "m",
        "TEST_LLM_KEY",
        {"temperature": 0.7, "max_tokens": 32},
        max_retries=3,
        concurrency=2,
    )
    out = gen({"instruction": ["flaky", "always-400", "fine"], "seed": [1, 2, 3]})
    assert out["error"].tolist() == ["", "HTTP 400", ""]
    assert out["generated_text"][0].count("\n") == 2 and out["generated_text"][1] == ""
    assert fake_api.failures["flaky"] == 0  # three failures, then success on the 4th try
    # 4 tries of "flaky", 1 of "always-400" (not retried), 1 of "fine": all with the key
    assert fake_api.seen_auth == ["Bearer sk-test-secret"] * 6


def test_openai_backend_gives_up_after_max_retries(fake_api, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    fake_api.failures["down"] = 10
    gen = OpenAIGenerator(fake_api.url, "m", "NO_SUCH_KEY_VAR", {}, max_retries=2)
    out = gen({"instruction": ["down"], "seed": [1]})
    assert out["error"].tolist() == ["HTTP 429"] and fake_api.failures["down"] == 7
    assert fake_api.seen_auth == ["Bearer EMPTY"] * 3  # no key set: the placeholder, 3 tries


def test_unreachable_endpoint_is_an_error_row_not_a_crash():
    gen = OpenAIGenerator("http://127.0.0.1:9/v1", "m", "X", {}, max_retries=1, timeout_seconds=2)
    out = gen({"instruction": ["hi"], "seed": [0]})
    assert out["error"][0] == "APIConnectionError"


# ------------------------------------------------------------ real vLLM on CPU (SmolLM2)


@pytest.fixture(scope="module")
def vllm_engine():
    from selma_ray.models.llm import VLLMGenerator
    from selma_ray.models.llm_data import backend_udf

    cls, kwargs = backend_udf(load_config("tiny"))
    assert cls is VLLMGenerator
    return VLLMGenerator(**kwargs)  # one engine shared by the tests below


@pytest.mark.slow
def test_vllm_generator_answers_each_request(vllm_engine):
    out = vllm_engine({"instruction": ["List 2 colors.", "Name a fruit."], "seed": [1, 2]})
    assert len(out["generated_text"]) == 2 and all(t.strip() for t in out["generated_text"])
    # Per-request seeds make a repeated request repeat itself. Asked one at a time: vLLM is
    # not batch-invariant on CPU, and under load it may schedule a repeated batch's requests
    # into different steps, so only a request on its own is expected to match exactly.
    alone = [vllm_engine({"instruction": ["Name a fruit."], "seed": [2]}) for _ in range(2)]
    assert alone[0]["generated_text"].tolist() == alone[1]["generated_text"].tolist()


@pytest.mark.slow
def test_vllm_generator_reports_finish_reason_and_each_rows_max_tokens(vllm_engine):
    batch = {"instruction": ["Describe a busy kitchen in detail."] * 2, "seed": [3, 3]}
    out = vllm_engine({**batch, "max_tokens": [4, 200]})
    assert out["finish_reason"][0] == "length" and out["finish_reason"][1] in ("stop", "length")
    assert len(out["generated_text"][0].split()) <= 4  # 4 tokens make at most 4 words
    assert len(out["generated_text"][1]) > len(out["generated_text"][0])


@pytest.mark.slow
def test_stage_on_smollm2_accepts_real_prompts(tmp_path, vllm_engine):
    cfg = tiny(tmp_path, "prompts.per_skill=3")
    summary = run_stage(
        "prompts",
        cfg,
        RunDir(tmp_path),
        generate=lambda c, reqs: _as_rows(vllm_engine({k: [r[k] for r in reqs] for k in reqs[0]})),
    )
    for skill in ("counting", "everyday_scenes"):
        assert summary["stats"][skill]["accepted"] >= 1
        assert all(len(r["prompt"].split()) >= 3 for r in _rows(tmp_path, f"{skill}.jsonl"))


def _as_rows(batch):
    keys = list(batch)
    return [dict(zip(keys, values, strict=True)) for values in zip(*batch.values(), strict=True)]


@pytest.mark.slow
def test_ray_data_rounds_reuse_one_persistent_vllm_engine(tmp_path):
    import ray

    from selma_ray.models.llm_data import PersistentEngines

    cfg = tiny(tmp_path, "prompts.batch_size=2")
    requests = [
        {"skill": "counting", "instruction": text, "seed": seed, "examples": "[]"}
        for seed, text in enumerate(["List 2 colors.", "Name a fruit.", "Name a tree."])
    ]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with PersistentEngines(cfg) as engines:
            first = engines(cfg, requests)
            engine = engines.engines[0]
            second = engines(cfg, requests[:2])
            assert engines.starts == 1 and engines.engines == [engine]
        assert sorted(r["seed"] for r in first) == [0, 1, 2] and len(second) == 2
        assert all(r["generated_text"].strip() and not r["error"] for r in first + second)
        with pytest.raises(ray.exceptions.RayActorError):  # killed when the stage ends
            ray.get(engine.generate.remote({"instruction": ["x"], "seed": [0]}), timeout=60)
    finally:
        ray.shutdown()
