"""Prompt generation as the paper and the issue ask: cut-off answers, the counting rule, the
answer budget, the OpenAI SDK backend (chat and completions), de-duplication within one
answer, and the CFG the eval stage renders with."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from selma_ray.config import ConfigError, load_config
from selma_ray.core.rundir import RunDir
from selma_ray.core.skills import SKILLS
from selma_ray.models.llm import OpenAIGenerator
from selma_ray.models.llm_data import answer_token_budget, backend_udf, request_max_tokens
from selma_ray.pipeline import run_stage
from selma_ray.prompts.stage import STAGE, build_requests
from selma_ray.testing import QuietJSONHandler, http_server
from selma_ray.text.filters import SkillPool
from selma_ray.text.numbers import stated_counts
from selma_ray.text.parse import split_cut_item

OBJECTS = ["kite", "lamp", "boat", "chair", "mug", "bench", "drum", "scarf", "vase", "clock"]
PLACES = ["on a table", "by a window", "in a garden", "under a tree", "near a river"]


def listed_answer(seed: int) -> str:
    """Three numbered descriptions of 30 space-separated pieces, different for every seed;
    the second states four of something (and its row number: no two are alike)."""
    a, b, c = (OBJECTS[(seed * 3 + k) % 10] for k in range(3))
    place = PLACES[seed % 5]
    return (
        f"1. Two {a}s and one {b} {place} at dusk.\n"
        f"2. Four {b}s lined up {place} in row {seed}.\n"
        f"3. Three {c}s {place} beside a sleeping cat."
    )


# ---------------------------------------------------------------- the counting rule


@pytest.mark.parametrize(
    ("text", "counts"),
    [
        ("Two red apples next to three yellow bananas.", [2, 3]),
        ("4 cups and 1 teapot", [4, 1]),
        ("1,000 paper lanterns", [1000]),
        ("twenty-one candles on a cake", [21]),
        ("five hundred balloons", [500]),
        ("one hundred and twenty-five birds", [125]),
        ("Two thousand three hundred stars", [2300]),
        ("a dozen eggs in a bowl", [12]),
        ("half a dozen roses", [6]),
        ("two dozen cupcakes", [24]),
        ("dozens of pigeons and hundreds of lanterns", [24, 200]),
        ("a pair of socks and a couple of hats", [2, 2]),
        ("3-4 apples", [3, 4]),
        ("One of the three cats", [1, 3]),
        # numbers that count no objects
        ("a three-legged stool beside a 10-year-old boy", []),
        ("a 3D render of a 1950s diner in 4K", []),
        ("a clock at 5 o'clock, a bus at 2:30 pm", []),
        ("a $5 bill on a route 66 sign", []),
        ("a diner in 1999, seen 57 times", []),
        ("several cups, many plates, a few forks, the third chair", []),
    ],
)
def test_stated_counts_reads_digits_and_number_words(text, counts):
    assert stated_counts(text) == counts


def _settings(*overrides: str):
    return load_config("tiny", [*overrides]).prompts


def test_counting_prompts_stating_more_than_three_are_rejected_as_count_rule():
    pool = SkillPool(SKILLS["counting"], _settings())
    records = pool.offer_many(
        [
            "Four cats asleep on a red sofa.",
            "Two dogs and three bones on a rug.",
            "A dozen eggs in a blue ceramic bowl.",
            "Exactly 7 pencils in a glass jar.",
        ]
    )
    assert [r["verdict"] for r in records] == ["count_rule", "accepted", "count_rule", "count_rule"]
    assert pool.stats["count_rule"] == 3 and pool.stats["candidates"] == 4
    # the limit is per skill and configurable; other skills have none by default
    wider = SkillPool(SKILLS["counting"], _settings("prompts.max_count={counting: 5}"))
    assert wider.offer("Four cats asleep on a red sofa.")
    scenes = SkillPool(SKILLS["everyday_scenes"], _settings())
    assert scenes.offer("Seven children eating pizza at a long table.")


def test_max_count_names_known_skills_and_non_negative_limits():
    with pytest.raises(ConfigError, match="max_count names unknown skills"):
        load_config("tiny", ["prompts.max_count={countng: 3}"])
    with pytest.raises(ConfigError, match="max_count values must be >= 0"):
        load_config("tiny", ["prompts.max_count={counting: -1}"])


# ---------------------------------------------------------------- cut-off answers


def test_only_an_item_on_the_cut_last_line_is_cut():
    text = "Sure:\n1. A red kite over a beach.\n2. Two mugs on a"
    assert split_cut_item(text, cut_off=True) == (["A red kite over a beach."], ["Two mugs on a"])
    # the same answer, ended by the model itself: every item is whole
    assert split_cut_item(text, cut_off=False) == (
        ["A red kite over a beach.", "Two mugs on a"],
        [],
    )
    # cut right after a line break: the last item was finished
    assert split_cut_item("1. A red kite.\n2. Two mugs on a shelf.\n", True)[1] == []
    # cut in chatter after the list: no item is cut
    assert split_cut_item("1. A red kite.\nI hope these", True) == (["A red kite."], [])


class RecordingLLM:
    """Stands in for the Ray Data pass: the same answer for every request, with a chosen
    finish_reason; keeps the requests it got."""

    def __init__(self, text: str, finish_reason: str):
        self.text, self.finish_reason = text, finish_reason
        self.requests: list[dict] = []

    def __call__(self, cfg, requests):
        self.requests += requests
        answer = {"generated_text": self.text, "error": "", "finish_reason": self.finish_reason}
        return [{**r, **answer} for r in requests]


CUT = "1. One green kettle on a stove.\n2. Two striped umbrellas leaning on a"


def _stage(tmp_path, llm, *overrides):
    cfg = load_config(
        "tiny",
        [f"run.dir={tmp_path}", "prompts.skills=[counting]", "prompts.max_rounds=1", *overrides],
    )
    summary = run_stage(STAGE, cfg, RunDir(tmp_path), generate=llm)
    rows = (tmp_path / STAGE / "counting.candidates.jsonl").read_text().splitlines()
    return summary["stats"]["counting"], [json.loads(r) for r in rows]


def test_an_item_cut_off_by_max_tokens_is_dropped_and_counted_as_truncated(tmp_path):
    stats, history = _stage(tmp_path, RecordingLLM(CUT, "length"))
    cut = [h for h in history if h["verdict"] == "truncated"]
    assert stats["truncated"] == len(cut) >= 1  # one per answer
    assert {h["prompt"] for h in cut} == {"Two striped umbrellas leaning on a"}
    accepted = (tmp_path / STAGE / "counting.jsonl").read_text()
    assert "umbrellas" not in accepted and "kettle" in accepted
    # the same text from an answer the model ended itself is a whole item, and is kept
    stats, history = _stage(tmp_path / "stopped", RecordingLLM(CUT, "stop"))
    assert stats["truncated"] == 0
    assert "umbrellas" in (tmp_path / "stopped" / STAGE / "counting.jsonl").read_text()


def test_requests_ask_for_a_budget_sized_per_skill_unless_max_tokens_is_set():
    cfg = load_config("tiny", ["prompts.max_tokens=null", "prompts.new_per_request=5"])
    pools = {s.name: SkillPool(s, cfg.prompts) for s in map(SKILLS.get, cfg.prompts.skills)}
    asked = {r["skill"]: r["max_tokens"] for r in build_requests(cfg, pools, 0)}
    assert asked["counting"] == answer_token_budget(5, 30)
    assert asked["dense_detail"] == answer_token_budget(5, 50) > asked["counting"]
    # enough for every item at the word limit, plus the numbering
    assert answer_token_budget(5, 30) >= 5 * (30 * 1.3 + 4)
    assert answer_token_budget(10, 30) > answer_token_budget(5, 30)
    # a set value wins, for every skill and for the backend's own default
    capped = load_config("tiny", ["prompts.max_tokens=200"])
    assert request_max_tokens(capped.prompts, 50) == 200
    assert backend_udf(capped)[1]["sampling"]["max_tokens"] == 200
    assert backend_udf(cfg)[1]["sampling"]["max_tokens"] == answer_token_budget(5, 50)


# ---------------------------------------------------------------- semantic dedup


def test_semantic_filter_compares_candidates_of_the_same_answer():
    answer = [
        "Two red apples next to a blue cup on the kitchen table.",
        "A pair of crimson apples beside one blue mug on a kitchen table.",  # a paraphrase
        "Three children flying kites over a windy beach.",
    ]
    plain = SkillPool(SKILLS["counting"], _settings("prompts.rouge_threshold=0.8"))
    assert [r["verdict"] for r in plain.offer_many(answer)] == ["accepted"] * 3  # ROUGE lets it by
    pool = SkillPool(
        SKILLS["counting"],
        _settings("prompts.semantic_threshold=0.8", "prompts.rouge_threshold=0.8"),
    )
    assert [r["verdict"] for r in pool.offer_many(answer)] == ["accepted", "semantic", "accepted"]
    assert pool.stats["semantic"] == 1


# ---------------------------------------------------------------- the OpenAI SDK backend


@dataclass
class FakeServer:
    """What a fake OpenAI-compatible server saw and will do: 429s planned per text (each
    with Retry-After), and every request's path, body, headers and arrival time."""

    url: str = ""
    throttle: dict[str, int] = field(default_factory=dict)
    seen: list[dict] = field(default_factory=list)


class _Handler(QuietJSONHandler):
    state: FakeServer  # set on a per-server subclass by the fixture

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.path.endswith("/chat/completions")
        text = body["messages"][0]["content"] if chat else body["prompt"]
        self.state.seen.append(
            {
                "path": self.path,
                "body": body,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "t": time.monotonic(),
            }
        )
        if self.state.throttle.get(text):
            self.state.throttle[text] -= 1
            return self.send_json(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
        if text == "bad request":
            return self.send_json(400, {"error": {"message": "no"}})
        seed = body.get("seed", 0)
        answer = listed_answer(seed) if text.startswith(("You write", "list")) else f"echo {text}"
        pieces = answer.split(" ")  # a "token" per word: max_tokens cuts the answer
        limit = body.get("max_tokens") or len(pieces)
        out, finish = " ".join(pieces[:limit]), "length" if limit < len(pieces) else "stop"
        choice = {"index": 0, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": out}
        else:
            choice.update(text=out, logprobs=None)
        obj = "chat.completion" if chat else "text_completion"
        self.send_json(200, {"id": "x", "object": obj, "created": 0, "model": body["model"],
                         "choices": [choice]})  # fmt: skip


@pytest.fixture
def server():
    with http_server(_Handler, FakeServer()) as state:
        yield state


@contextmanager
def every_log_line():
    """Every record of selma_ray, the openai SDK, httpx and httpcore, at DEBUG."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    keep = Keep(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("selma_ray", "openai", "httpx", "httpcore")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(keep)
        lg.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(keep)
            lg.setLevel(level)


SECRET = "sk-test-0123456789-secret"


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_openai_sdk_backend_speaks_both_endpoints_and_retries_a_429(server, monkeypatch, api):
    monkeypatch.setenv("SELMA_TEST_KEY", SECRET)
    server.throttle["list things"] = 1
    gen = OpenAIGenerator(
        server.url, "m-1", "SELMA_TEST_KEY", {"temperature": 0.7, "max_tokens": 100}, api=api
    )
    with every_log_line() as lines:
        out = gen(
            {"instruction": ["list things", "list more"], "seed": [1, 2], "max_tokens": [100, 6]}
        )
    assert out["error"].tolist() == ["", ""]
    assert out["generated_text"][0] == listed_answer(1)
    assert out["generated_text"][1] == " ".join(listed_answer(2).split(" ")[:6])
    assert out["finish_reason"].tolist() == ["stop", "length"]

    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    assert {s["path"] for s in server.seen} == {path}
    first = [s for s in server.seen if s["body"].get("seed") == 1]
    assert len(first) == 2  # the 429, then the retry
    # the SDK retried (its retry header), and waited as Retry-After asked, not its own 0.5 s
    assert first[1]["headers"].get("x-stainless-retry-count") == "1"
    assert first[1]["t"] - first[0]["t"] >= 0.9
    for s in server.seen:
        assert s["headers"]["user-agent"].startswith("OpenAI/Python")
        assert s["headers"]["authorization"] == f"Bearer {SECRET}"
        assert s["body"]["model"] == "m-1" and s["body"]["temperature"] == 0.7
    bodies = {s["body"]["seed"]: s["body"] for s in server.seen}
    assert bodies[1]["max_tokens"] == 100 and bodies[2]["max_tokens"] == 6  # each row's own
    if api == "chat":
        assert bodies[2]["messages"] == [{"role": "user", "content": "list more"}]
    else:
        assert bodies[2]["prompt"] == "list more" and "messages" not in bodies[2]
    assert lines and not [line for line in lines if SECRET in line]  # logged, but not the key


def test_openai_sdk_backend_reports_errors_in_rows(server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    gen = OpenAIGenerator(server.url, "m", "NO_SUCH_KEY_VAR", {}, max_retries=3)
    out = gen({"instruction": ["bad request", "hello"], "seed": [1, 2]})
    assert out["error"].tolist() == ["HTTP 400", ""] and out["generated_text"][1] == "echo hello"
    assert len(server.seen) == 2  # a 400 is not retried
    assert {s["headers"]["authorization"] for s in server.seen} == {"Bearer EMPTY"}
    down = OpenAIGenerator("http://127.0.0.1:9/v1", "m", "X", {}, max_retries=0)
    assert down({"instruction": ["hi"], "seed": [0]})["error"].tolist() == ["APIConnectionError"]


# ---------------------------------------------------------------- CFG per stage


def test_eval_guidance_scale_is_a_setting_of_its_own():
    from selma_ray.eval import stage as evaluate

    rows = [{"variant": "base", "prompt_id": "p", "prompt": "two cups", "seed": 1}]

    def cfg(*overrides):
        return load_config("tiny", list(overrides))

    assert evaluate.guidance(cfg("images.guidance_scale=7.5", "eval.guidance_scale=5.0")) == 5.0
    assert evaluate.guidance(cfg("images.guidance_scale=6.0", "eval.guidance_scale=null")) == 6.0
    keys = [
        evaluate.render_key(cfg(f"eval.guidance_scale={e}", f"images.guidance_scale={i}"), rows, {})
        for e, i in ((5.0, 7.5), (5.0, 3.0), (7.5, 7.5))
    ]
    assert keys[0] == keys[1] != keys[2]  # eval renders follow eval's CFG, not the images'


@pytest.mark.parametrize("preset", ["sd14", "sd2", "sdxl", "weak_to_strong"])
def test_paper_presets_use_the_papers_cfg_for_training_and_eval_images(preset):
    from selma_ray.eval import stage as evaluate

    cfg = load_config(preset)
    assert cfg.images.guidance_scale == 7.5 and cfg.eval.guidance_scale == 7.5
    assert evaluate.guidance(cfg) == 7.5


# ---------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_stage_on_the_completions_endpoint_drops_cut_items_and_counts(tmp_path, server, ray_local):
    """The whole prompts stage, Ray Data and the SDK client in a Ray actor included, against
    the fake server: every answer is cut in its third item (25 of its 30 pieces fit in
    max_tokens) and its second states four of something."""
    cfg = load_config(
        "tiny",
        [
            f"run.dir={tmp_path}",
            "prompts.skills=[counting]",
            "prompts.backend=openai",
            "prompts.openai.api=completions",
            f"prompts.openai.base_url={server.url}",
            "prompts.openai.max_retries=0",
            "prompts.max_tokens=25",
            "prompts.per_skill=3",
            "prompts.max_rounds=2",
        ],
    )
    summary = run_stage(STAGE, cfg, RunDir(tmp_path))
    stats = summary["stats"]["counting"]
    answers = len(server.seen)
    assert answers >= 1 and {s["path"] for s in server.seen} == {"/v1/completions"}
    assert all(s["body"]["max_tokens"] == 25 for s in server.seen)
    assert stats["truncated"] == answers and stats["count_rule"] == answers
    accepted = [json.loads(x)["prompt"] for x in (tmp_path / STAGE / "counting.jsonl").open()]
    assert accepted and all(p.startswith("Two ") and p.endswith("at dusk.") for p in accepted)


@pytest.mark.slow
def test_eval_renders_with_eval_guidance_scale(tmp_path, ray_local):
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from selma_ray.eval import stage as evaluate
    from selma_ray.eval.dsg import EvalPrompt
    from selma_ray.testing import make_run

    root = make_run(tmp_path / "run", ["counting"])
    base = [f"run.dir={root}", "prompts.skills=[counting]", "eval.steps=2"]
    cfg = load_config("tiny", [*base, "images.guidance_scale=7.5", "eval.guidance_scale=1.5"])
    assert evaluate.guidance(cfg) == 1.5
    assert evaluate.guidance(load_config("tiny", base)) == 7.5  # null: the images' CFG
    prompts = [EvalPrompt(id="p0", prompt="two red apples on a table", category="counting")]
    rows = evaluate.render_rows(cfg, prompts, ["base"])
    run = RunDir(root)
    shards = evaluate.render(cfg, run, rows, "k")
    rendered = pq.read_table(shards[0], filesystem=run.fs).column("image").to_pylist()[0]

    def pixels(png: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(png)), dtype=np.float64)

    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("variant", "prompt", "seed")}
    direct = {
        g: pixels(evaluate.EvalRenderer(run.spec, 0, 2, g)(dict(batch))["image"][0])
        for g in (1.5, 7.5)
    }
    # the same image as rendered here with CFG 1.5 (up to float noise between processes)
    near, apart = (np.abs(pixels(rendered) - direct[g]).mean() for g in (1.5, 7.5))
    assert apart > 1.0 and near < 0.1 * apart  # (measured: 0.0 and 3.9 of 255)
