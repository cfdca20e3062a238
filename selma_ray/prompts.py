"""Stage 1, skill prompts: an instruct LLM on vLLM writes image descriptions per skill.

Generation runs in rounds (self-instruct style). Each request shows the LLM a few examples
sampled from the skill's seeds plus the prompts accepted so far; all requests of a round go
through one Ray Data pass on vLLM actors. Candidates are parsed, cleaned and kept only if
their ROUGE-L F against every kept prompt of the skill is at most the threshold. Accepted
prompts are persisted after every round, so a killed job resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import random
import re
from typing import Any

from selma_ray.config import SelmaConfig
from selma_ray.rouge import RougeFilter
from selma_ray.rundir import RunDir, atomic_write_json, atomic_write_text
from selma_ray.seeds import stable_seed
from selma_ray.skills import Skill, get_skills

log = logging.getLogger(__name__)
STAGE = "prompts"

_ITEM = re.compile(r"^\s*(?:\d+\s*[.):]|[-*\u2022])\s*(.+?)\s*$")
_JUNK = re.compile(
    r"\b(i'm sorry|i cannot|i can't|as an ai|language model|here are|here is|"
    r"image descriptions?|numbered list|new descriptions?)\b"
    r"|^(i'm|i am|sure|certainly|note|let me|of course)\b"  # assistant chatter
    r"|[=<>{}\[\]_#`|\\?]",  # code, markup and questions are not image descriptions
    re.IGNORECASE,
)
# "A cat on a sofa - This is a fun scene": drop the commentary after the description.
_COMMENTARY = re.compile(
    r"(?:\s*:|\s+[-\u2013\u2014])\s+(this|it|that|which|the image)\b.*$", re.IGNORECASE
)


class VLLMGenerator:
    """Ray Data UDF: chat-formats each ``instruction`` and generates with vLLM."""

    REQUIRED = ("instruction", "seed")

    def __init__(self, model: str, engine_kwargs: dict[str, Any], sampling: dict[str, Any]):
        from vllm import LLM

        from selma_ray.logs import setup_logging
        from selma_ray.models import resolve

        setup_logging()
        self.llm = LLM(model=resolve(model), **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.sampling = sampling

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        from vllm import SamplingParams

        missing = [c for c in self.REQUIRED if c not in batch]
        if missing:
            raise ValueError(f"VLLMGenerator needs columns {missing}; got {sorted(batch)}")
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": str(t)}], tokenize=False, add_generation_prompt=True
            )
            for t in batch["instruction"]
        ]
        params = [SamplingParams(**self.sampling, seed=int(s)) for s in batch["seed"]]
        outputs = self.llm.generate(texts, params, use_tqdm=False)
        batch["generated_text"] = np.array([o.outputs[0].text for o in outputs], dtype=object)
        return batch


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


def normalize(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = _COMMENTARY.sub("", text).rstrip(" ;,")
    return text.strip("\"'\u201c\u201d").strip()


class SkillPool:
    """Accepted prompts of one skill, with the filters that guard them and their counts."""

    def __init__(self, skill: Skill, threshold: float, accepted: list[str] | None = None):
        self.skill = skill
        self.accepted: list[str] = list(accepted or [])
        self._seen = {p.lower() for p in (*skill.seeds, *self.accepted)}
        self._rouge = RougeFilter(threshold, [*skill.seeds, *self.accepted])
        self.stats = {"candidates": 0, "duplicate": 0, "too_long": 0, "junk": 0, "rouge": 0}

    def examples_pool(self) -> list[str]:
        return [*self.skill.seeds, *self.accepted]

    def offer(self, raw: str) -> bool:
        self.stats["candidates"] += 1
        text = normalize(raw)
        key = text.lower()
        if key in self._seen:
            self.stats["duplicate"] += 1
            return False
        if not text or len(text.split()) > self.skill.max_words:
            self.stats["too_long"] += 1
            return False
        if len(re.findall(r"[A-Za-z]{2,}", text)) < 3 or _JUNK.search(text):
            self.stats["junk"] += 1
            return False
        if not self._rouge.offer(text):
            self.stats["rouge"] += 1
            return False
        self._seen.add(key)
        self.accepted.append(text)
        return True


def build_requests(
    cfg: SelmaConfig, pools: dict[str, SkillPool], round_idx: int
) -> list[dict[str, Any]]:
    pc = cfg.prompts
    requests = []
    for name, pool in pools.items():
        if len(pool.accepted) >= pc.per_skill:
            continue
        for r in range(pc.requests_per_round):
            seed = stable_seed(cfg.run.seed, name, round_idx, r)
            candidates = pool.examples_pool()
            k = min(pc.in_context_examples, len(candidates))
            examples = random.Random(seed).sample(candidates, k)
            instruction = pool.skill.instruction(examples, pc.new_per_request)
            requests.append({"skill": name, "instruction": instruction, "seed": seed})
    return requests


def generate_round(cfg: SelmaConfig, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One Ray Data pass of vLLM actors over this round's requests."""
    import ray

    pc, res = cfg.prompts, cfg.resources.prompts
    on_gpu = res.num_gpus > 0
    engine_kwargs = {
        "dtype": "auto" if on_gpu else "bfloat16",
        "enforce_eager": not on_gpu,
        "gpu_memory_utilization": pc.gpu_memory_utilization,
        "max_model_len": pc.max_model_len,
        "seed": cfg.run.seed,
    }
    sampling = {"temperature": pc.temperature, "top_p": pc.top_p, "max_tokens": pc.max_tokens}
    ds = ray.data.from_items(requests).map_batches(
        VLLMGenerator,
        fn_constructor_kwargs={
            "model": cfg.models.llm,
            "engine_kwargs": engine_kwargs,
            "sampling": sampling,
        },
        compute=ray.data.ActorPoolStrategy(min_size=res.min_size, max_size=res.max_size),
        batch_size=pc.batch_size,
        num_gpus=res.num_gpus,
        num_cpus=res.num_cpus,
    )
    return ds.take_all()


def _load_progress(run: RunDir, fingerprint: str, names: list[str]) -> dict[str, list[str]]:
    progress = run.read_manifest(STAGE, "progress") or {}
    if progress.get("fingerprint") != fingerprint:
        return {}
    accepted = {}
    for name in names:
        path = run.path(STAGE, f"{name}.jsonl")
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line]
            accepted[name] = [r["prompt"] for r in rows]
    return accepted


def _persist(run: RunDir, fingerprint: str, pools: dict[str, SkillPool], round_idx: int) -> None:
    for name, pool in pools.items():
        lines = [
            json.dumps({"id": f"{name}-{i:05d}", "skill": name, "prompt": p})
            for i, p in enumerate(pool.accepted)
        ]
        atomic_write_text(run.path(STAGE, f"{name}.jsonl"), "".join(f"{x}\n" for x in lines))
    run.write_manifest(fingerprint, STAGE, "progress", rounds_done=round_idx + 1)


def load_prompts(run: RunDir, skills: list[str]) -> list[dict[str, Any]]:
    """All accepted prompts of a finished prompts stage, in skill order."""
    rows = []
    for name in skills:
        path = run.path(STAGE, f"{name}.jsonl")
        rows.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    return rows


def fingerprint(cfg: SelmaConfig) -> str:
    return cfg.fingerprint("prompts", extra={"llm": cfg.models.llm, "seed": cfg.run.seed})


def run_prompts(cfg: SelmaConfig, run: RunDir) -> dict[str, Any]:
    """Grow each skill's prompt set to ``prompts.per_skill``; returns the stage summary."""
    fp = fingerprint(cfg)
    if run.is_done(fp, STAGE):
        log.info("prompts: finished earlier with the same config, skipping")
        return {**(run.read_manifest(STAGE) or {}), "skipped": True}
    pc = cfg.prompts
    skills = get_skills(pc.skills)
    resumed = _load_progress(run, fp, pc.skills)
    pools = {s.name: SkillPool(s, pc.rouge_threshold, resumed.get(s.name)) for s in skills}
    if resumed:
        log.info("prompts: resuming with %s", {k: len(v) for k, v in resumed.items()})
    done_rounds = (
        (run.read_manifest(STAGE, "progress") or {}).get("rounds_done", 0) if resumed else 0
    )
    for round_idx in range(done_rounds, pc.max_rounds):
        requests = build_requests(cfg, pools, round_idx)
        if not requests:
            break
        log.info("prompts: round %d, %d requests", round_idx + 1, len(requests))
        rows = generate_round(cfg, requests)
        order = {r["seed"]: i for i, r in enumerate(requests)}
        for row in sorted(rows, key=lambda r: order[r["seed"]]):
            pool = pools[row["skill"]]
            for candidate in parse_candidates(row["generated_text"]):
                if len(pool.accepted) >= pc.per_skill:
                    break
                pool.offer(candidate)
        _persist(run, fp, pools, round_idx)
        for name, pool in pools.items():
            log.info(
                "prompts: [%s] %d/%d accepted %s",
                name,
                len(pool.accepted),
                pc.per_skill,
                pool.stats,
            )
    short = {n: len(p.accepted) for n, p in pools.items() if len(p.accepted) < pc.per_skill}
    if any(len(p.accepted) == 0 for p in pools.values()):
        raise RuntimeError(
            f"prompts: no prompt accepted for some skills after {pc.max_rounds} rounds: {short}; "
            "raise prompts.max_rounds or prompts.requests_per_round, or check the LLM"
        )
    if short:
        log.warning("prompts: below target after %d rounds: %s", pc.max_rounds, short)
    stats = {n: {"accepted": len(p.accepted), **p.stats} for n, p in pools.items()}
    atomic_write_json(run.path(STAGE, "stats.json"), stats)
    return run.write_manifest(
        fp, STAGE, stats=stats, total=sum(len(p.accepted) for p in pools.values())
    )
