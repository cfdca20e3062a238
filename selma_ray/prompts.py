"""Stage 1, skill prompts: an instruct LLM writes image descriptions per skill.

Generation runs in rounds (self-instruct style). Each request shows the LLM k examples
sampled from the skill's seeds plus the prompts accepted so far; all requests of a round go
through one Ray Data pass to the LLM (vLLM engines that stay loaded across rounds, or an
OpenAI-compatible endpoint). Candidates are parsed, then filtered in order: normalisation,
exact and near-duplicate removal, the word limit, junk rejection, optional semantic
near-duplicates, and the ROUGE-L filter. Every verdict is counted and written out; accepted
prompts are persisted after every round, so a killed job resumes at the next round.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Callable
from typing import Any

from selma_ray.config import SelmaConfig
from selma_ray.prompt_filters import SkillPool, prompt_stats
from selma_ray.rundir import RunDir, atomic_write_json, atomic_write_text
from selma_ray.seeds import stable_seed
from selma_ray.skills import Skill, get_skills

log = logging.getLogger(__name__)
STAGE = "prompts"
Generate = Callable[[SelmaConfig, list[dict[str, Any]]], list[dict[str, Any]]]

_ITEM = re.compile(r"^\s*(?:\(?\d+\s*[.):]|[-*\u2022])\s*(.+?)\s*$")


def parse_candidates(text: str) -> list[str]:
    """Pull list items out of an LLM answer: numbered or bulleted lines, quotes stripped.

    Small models sometimes answer with plain lines instead of a list; when no line is
    numbered or bulleted, every line that reads like a sentence is taken instead.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    matches = [_ITEM.match(line) for line in lines]
    if any(matches):
        raw = [m.group(1) for m in matches if m]
    else:
        raw = [line for line in lines if not line.endswith(":")]
    items = []
    for item in raw:
        item = re.sub(r"\s*\(\d+\s+words?\)\s*$", "", item.strip())
        item = item.strip("\"'\u201c\u201d").strip()
        if item:
            items.append(item)
    return items


def requests_needed(pool: SkillPool, per_skill: int, new_per_request: int, cap: int) -> int:
    """Requests to ask this round: enough for the remaining prompts at the observed rate."""
    remaining = per_skill - len(pool.accepted)
    if remaining <= 0:
        return 0
    rate = pool.acceptance_rate() if pool.stats["candidates"] else 0.5
    return min(cap, max(1, math.ceil(remaining / (new_per_request * max(rate, 0.1)))))


def build_requests(
    cfg: SelmaConfig, pools: dict[str, SkillPool], round_idx: int
) -> list[dict[str, Any]]:
    pc = cfg.prompts
    requests = []
    for name, pool in pools.items():
        n = requests_needed(pool, pc.per_skill, pc.new_per_request, pc.requests_per_round)
        for r in range(n):
            seed = stable_seed(cfg.run.seed, name, round_idx, r)
            candidates = pool.examples_pool()
            k = min(pc.in_context_examples, len(candidates))
            examples = random.Random(seed).sample(candidates, k)
            requests.append(
                {
                    "skill": name,
                    "round": round_idx,
                    "instruction": pool.skill.instruction(
                        [t for _, t in examples], pc.new_per_request
                    ),
                    "examples": json.dumps([i for i, _ in examples]),
                    "seed": seed,
                }
            )
    return requests


def backend_udf(cfg: SelmaConfig) -> tuple[type, dict[str, Any]]:
    """The Ray Data UDF class of the configured LLM backend and its constructor kwargs."""
    from selma_ray.llm import OpenAIGenerator, VLLMGenerator

    pc = cfg.prompts
    sampling = {"temperature": pc.temperature, "top_p": pc.top_p, "max_tokens": pc.max_tokens}
    if pc.backend == "openai":
        oa = pc.openai
        return OpenAIGenerator, {
            "base_url": oa.base_url,
            "model": oa.model or cfg.models.llm,
            "api_key_env": oa.api_key_env,
            "sampling": sampling,
            "max_retries": oa.max_retries,
            "backoff_seconds": oa.backoff_seconds,
            "timeout_seconds": oa.timeout_seconds,
            "concurrency": oa.concurrency,
        }
    on_gpu = cfg.resources.prompts.num_gpus > 0
    engine_kwargs = {
        "dtype": pc.dtype if on_gpu or pc.dtype != "auto" else "bfloat16",
        "enforce_eager": not on_gpu,
        "gpu_memory_utilization": pc.gpu_memory_utilization,
        "max_model_len": pc.max_model_len,
        "tensor_parallel_size": pc.tensor_parallel_size,
        "seed": cfg.run.seed,
    }
    if not on_gpu:
        # vLLM's CPU runner cannot rewind a per-request seeded generator when chunked prefill
        # splits a prompt ("CPU Generator does not use offset"); prefill whole prompts instead.
        engine_kwargs["enable_chunked_prefill"] = False
    return VLLMGenerator, {
        "model": cfg.models.llm,
        "engine_kwargs": engine_kwargs,
        "sampling": sampling,
    }


def generate_with_ray_data(
    cfg: SelmaConfig,
    requests: list[dict[str, Any]],
    sampling: dict[str, Any] | None = None,
    model: str | None = None,
) -> list[dict[str, Any]]:
    """One Ray Data pass of LLM actors over ``requests`` (engines load per call); ``sampling``
    and ``model`` replace the prompts stage's own."""
    import ray

    res = cfg.resources.prompts
    udf, kwargs = backend_udf(cfg)
    if sampling is not None:
        kwargs["sampling"] = sampling
    if model:
        kwargs["model"] = model
    ds = ray.data.from_items(requests).map_batches(
        udf,
        fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(min_size=res.min_size, max_size=res.max_size),
        batch_size=cfg.prompts.batch_size,
        num_gpus=res.num_gpus if cfg.prompts.backend == "vllm" else 0,
        num_cpus=res.num_cpus,
    )
    return ds.take_all()


class PersistentEngines:
    """A ``Generate`` for a whole stage: vLLM engines start on the first round and stay up.

    ``resources.prompts.max_size`` engine actors (each with the stage's GPUs and CPUs) load
    the model once; every round is still one Ray Data pass, through light ``EngineClient``
    actors that forward batches to the engines. Use as a context manager: the engines are
    killed on exit. The OpenAI backend has no engine to keep and runs plain passes.
    """

    CLIENT_CPUS = 0.05

    def __init__(self, cfg: SelmaConfig):
        self.cfg = cfg
        self.engines: list[Any] = []
        self.starts = 0

    def _start(self) -> None:
        import ray

        from selma_ray.llm import VLLMGenerator

        res = self.cfg.resources.prompts
        _, kwargs = backend_udf(self.cfg)
        actor = ray.remote(VLLMGenerator).options(num_gpus=res.num_gpus, num_cpus=res.num_cpus)
        self.engines = [actor.remote(**kwargs) for _ in range(res.max_size)]
        self.starts += 1
        log.info("prompts: started %d %s engine(s) for the stage", res.max_size, "vLLM")

    def __call__(self, cfg: SelmaConfig, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import ray

        from selma_ray.llm import EngineClient

        if cfg.prompts.backend != "vllm":
            return generate_with_ray_data(cfg, requests)
        if not self.engines:
            self._start()
        ds = ray.data.from_items(requests).map_batches(
            EngineClient,
            fn_constructor_kwargs={"engines": self.engines},
            compute=ray.data.ActorPoolStrategy(size=len(self.engines)),
            batch_size=cfg.prompts.batch_size,
            num_cpus=self.CLIENT_CPUS,
        )
        return ds.take_all()

    def __enter__(self) -> PersistentEngines:
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        for engine in self.engines:
            ray.kill(engine)
        self.engines = []


def fingerprint(cfg: SelmaConfig) -> str:
    return cfg.fingerprint("prompts", extra={"llm": cfg.models.llm, "seed": cfg.run.seed})


def _skills(cfg: SelmaConfig) -> list[Skill]:
    return get_skills(cfg.prompts.skills, cfg.prompts.all_custom_skills())


def _read_jsonl(path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _write_jsonl(path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _restore(run: RunDir, fp: str, cfg: SelmaConfig) -> tuple[dict[str, SkillPool], int]:
    """Pools rebuilt from the last finished round of an interrupted run (or fresh ones)."""
    progress = run.read_manifest(STAGE, "progress") or {}
    resume = progress.get("fingerprint") == fp
    pools = {}
    for skill in _skills(cfg):
        rows = _read_jsonl(run.path(STAGE, f"{skill.name}.jsonl")) if resume else []
        history = _read_jsonl(run.path(STAGE, f"{skill.name}.candidates.jsonl")) if resume else []
        pools[skill.name] = SkillPool(skill, cfg.prompts, accepted=rows, history=history)
    return pools, (progress.get("rounds_done", 0) if resume else 0)


def _persist(run: RunDir, fp: str, pools: dict[str, SkillPool], rounds_done: int) -> None:
    for name, pool in pools.items():
        _write_jsonl(run.path(STAGE, f"{name}.jsonl"), pool.accepted)
        _write_jsonl(run.path(STAGE, f"{name}.candidates.jsonl"), pool.history)
    run.write_manifest(fp, STAGE, "progress", rounds_done=rounds_done)


def load_prompts(run: RunDir, skills: list[str]) -> list[dict[str, Any]]:
    """All accepted prompts of a finished prompts stage, in skill order."""
    return [row for name in skills for row in _read_jsonl(run.path(STAGE, f"{name}.jsonl"))]


def run_prompts(cfg: SelmaConfig, run: RunDir, generate: Generate | None = None) -> dict[str, Any]:
    """Grow each skill's prompt set to ``prompts.per_skill``; returns the stage summary.

    ``generate`` maps a round's requests to rows with ``generated_text``; it defaults to
    Ray Data passes through engines that stay loaded for the whole stage.
    """
    fp = fingerprint(cfg)
    if run.is_done(fp, STAGE):
        log.info("prompts: finished earlier with the same config, skipping")
        return {**(run.read_manifest(STAGE) or {}), "skipped": True}
    if generate is None:
        with PersistentEngines(cfg) as engines:
            return _run_rounds(cfg, run, fp, engines)
    return _run_rounds(cfg, run, fp, generate)


def _run_rounds(cfg: SelmaConfig, run: RunDir, fp: str, generate: Generate) -> dict[str, Any]:
    pc = cfg.prompts
    pools, first_round = _restore(run, fp, cfg)
    if first_round:
        log.info(
            "prompts: resuming after round %d with %s",
            first_round,
            {n: len(p.accepted) for n, p in pools.items()},
        )
    for round_idx in range(first_round, pc.max_rounds):
        requests = build_requests(cfg, pools, round_idx)
        if not requests:
            break
        log.info("prompts: round %d, %d requests", round_idx + 1, len(requests))
        order = {r["seed"]: i for i, r in enumerate(requests)}
        answers = sorted(generate(cfg, requests), key=lambda r: order[r["seed"]])
        for row in answers:
            pool = pools[row["skill"]]
            if row.get("error"):
                pool.stats["llm_errors"] += 1
                continue
            examples = json.loads(row["examples"])
            pool.offer_many(parse_candidates(row["generated_text"]), round_idx, examples)
        _persist(run, fp, pools, round_idx + 1)
        for name, pool in pools.items():
            log.info(
                "prompts: [%s] %d/%d accepted (%.0f%% of candidates)",
                name,
                len(pool.accepted),
                pc.per_skill,
                100 * pool.acceptance_rate(),
            )
    if any(not p.accepted for p in pools.values()):
        empty = [n for n, p in pools.items() if not p.accepted]
        raise RuntimeError(
            f"prompts: no prompt accepted for {empty} after {pc.max_rounds} rounds; raise "
            "prompts.max_rounds or prompts.requests_per_round, or check the LLM"
        )
    short = {n: len(p.accepted) for n, p in pools.items() if len(p.accepted) < pc.per_skill}
    if short:
        log.warning("prompts: below target after %d rounds: %s", pc.max_rounds, short)
    stats = {n: prompt_stats(p) for n, p in pools.items()}
    atomic_write_json(run.path(STAGE, "stats.json"), stats)
    total = sum(len(p.accepted) for p in pools.values())
    return run.write_manifest(fp, STAGE, stats=stats, total=total)
