"""Stage 1, skill prompts: an instruct LLM writes image descriptions per skill.

Generation runs in rounds (self-instruct style). Each request shows the LLM k examples
sampled from the skill's seeds plus the prompts accepted so far; all requests of a round go
through one Ray Data pass to the LLM (vLLM engines that stay loaded across rounds, or an
OpenAI-compatible endpoint). Each request's ``max_tokens`` is sized from its skill's word
limit unless ``prompts.max_tokens`` is set; an answer that hit it loses its last, cut item
(verdict ``truncated``). Candidates are parsed, then filtered in order: normalisation, exact
and near-duplicate removal, the word limit, junk rejection, the skill's count limit, optional
semantic near-duplicates, and the ROUGE-L filter. Every verdict is counted and written out;
accepted prompts are persisted after every round, so a killed job resumes at the next round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable
from typing import Any

from selma_ray.config import SelmaConfig
from selma_ray.core import layout
from selma_ray.core.lineage import Lineage
from selma_ray.core.rundir import RunDir
from selma_ray.core.seeds import stable_seed
from selma_ray.core.skills import Skill, get_skills
from selma_ray.models.llm_data import PersistentEngines, answer_token_budget, request_max_tokens
from selma_ray.text.filters import SkillPool, prompt_stats
from selma_ray.text.parse import split_cut_item

log = logging.getLogger(__name__)
STAGE = layout.PROMPTS
Generate = Callable[[SelmaConfig, list[dict[str, Any]]], list[dict[str, Any]]]


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
                    "max_tokens": request_max_tokens(pc, pool.skill.max_words),
                }
            )
    return requests


def _skills(cfg: SelmaConfig) -> list[Skill]:
    return get_skills(cfg.prompts.skills, cfg.prompts.all_custom_skills())


def _warn_if_capped(cfg: SelmaConfig) -> None:
    """A set ``prompts.max_tokens`` wins over the sized budget; say where it is the smaller."""
    pc = cfg.prompts
    if pc.max_tokens is None:
        return
    for skill in _skills(cfg):
        need = answer_token_budget(pc.new_per_request, skill.max_words)
        if pc.max_tokens < need:
            log.warning(
                "prompts: max_tokens=%d is below the %d tokens that %d descriptions of up to "
                "%d words need (%s); answers cut off by it lose their last item (counted as "
                "'truncated'). Unset prompts.max_tokens to size it per skill.",
                pc.max_tokens,
                need,
                pc.new_per_request,
                skill.max_words,
                skill.name,
            )


def _write_jsonl(run: RunDir, rel: str, rows: list[dict[str, Any]]) -> None:
    run.write_text("".join(json.dumps(r) + "\n" for r in rows), rel)


def _restore(run: RunDir, lineage: Lineage, cfg: SelmaConfig) -> tuple[dict[str, SkillPool], int]:
    """Pools rebuilt from the last finished round of an interrupted or earlier run.

    A skill keeps its prompts while its own fingerprint (its definition, the LLM, the
    sampling settings) is unchanged and its file is there; otherwise it starts over. An
    edited prompts file is taken as it is: downstream stages then redo that skill."""
    progress = run.read_manifest(STAGE, "progress") or {}
    kept = progress.get("units", {})
    pools, restored = {}, []
    for skill in _skills(cfg):
        accepted_file = layout.prompts_file(skill.name)
        resume = kept.get(skill.name) == lineage.units[skill.name] and run.is_file(accepted_file)
        rows = layout.read_jsonl(run, accepted_file) if resume else []
        history = layout.read_jsonl(run, _candidates(skill.name)) if resume else []
        pools[skill.name] = SkillPool(skill, cfg.prompts, accepted=rows, history=history)
        restored.append(resume)
    # Rounds are shared by all skills: resume after the last one only if every skill did.
    return pools, (progress.get("rounds_done", 0) if all(restored) else 0)


def _persist(run: RunDir, lineage: Lineage, pools: dict[str, SkillPool], rounds_done: int) -> None:
    for name, pool in pools.items():
        _write_jsonl(run, layout.prompts_file(name), pool.accepted)
        _write_jsonl(run, _candidates(name), pool.history)
    run.write_manifest(
        lineage.fingerprint, STAGE, "progress", rounds_done=rounds_done, units=lineage.units
    )


def run_prompts(
    cfg: SelmaConfig, run: RunDir, lineage: Lineage, generate: Generate | None = None
) -> dict[str, Any]:
    """Grow each skill's prompt set to ``prompts.per_skill``; returns the stage summary.

    ``generate`` maps a round's requests to rows with ``generated_text``; it defaults to
    Ray Data passes through engines that stay loaded for the whole stage.
    """
    if run.is_done(lineage.fingerprint, STAGE):
        log.info("prompts: finished earlier with the same inputs, skipping")
        return {**(run.read_manifest(STAGE) or {}), "skipped": True}
    if generate is None:
        with PersistentEngines(cfg) as engines:
            return _run_rounds(cfg, run, lineage, engines)
    return _run_rounds(cfg, run, lineage, generate)


def _run_rounds(
    cfg: SelmaConfig, run: RunDir, lineage: Lineage, generate: Generate
) -> dict[str, Any]:
    pc = cfg.prompts
    _warn_if_capped(cfg)
    pools, first_round = _restore(run, lineage, cfg)
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
            cut_off = row.get("finish_reason") == "length"
            items, cut = split_cut_item(row["generated_text"], cut_off)
            pool.offer_many(items, round_idx, examples, truncated=cut)
        _persist(run, lineage, pools, round_idx + 1)
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
    run.write_json(stats, STAGE, "stats.json")
    total = sum(len(p.accepted) for p in pools.values())
    files = {name: layout.prompts_file(name) for name in pools}
    # By content as it is now (an edited file is taken as it is).
    units = {n: hashlib.sha256(run.read_bytes(f)).hexdigest()[:16] for n, f in files.items()}
    return run.write_manifest(
        lineage.fingerprint,
        STAGE,
        stats=stats,
        total=total,
        lineage=lineage.inputs,
        outputs=run.outputs(files.values(), units),
    )


def _candidates(skill: str) -> str:
    return f"{STAGE}/{skill}.candidates.jsonl"
