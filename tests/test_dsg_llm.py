"""DSG question writing with the real LLM backend (vLLM on CPU, SmolLM2) on Ray Data."""

from __future__ import annotations

import pytest

from selma_ray.config import load_config
from selma_ray.eval.dsg import EvalPrompt, fallback_questions, generate_questions

pytestmark = pytest.mark.slow


def test_llm_writes_dependency_consistent_questions_for_each_prompt():
    import ray

    cfg = load_config("tiny", ["eval.max_questions=6", "prompts.max_tokens=64"])
    prompts = [
        EvalPrompt("a", "two red apples on a wooden table"),
        EvalPrompt("b", "a penguin sunbathing on a hot desert dune"),
    ]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = generate_questions(cfg, prompts)
    finally:
        ray.shutdown()
    assert set(out) == {"a", "b"}
    for p in prompts:
        qs = out[p.id]
        # either LLM-written questions or, marked as such, the one holistic fallback question
        if qs != fallback_questions(p.prompt):
            assert {q.source for q in qs} == {"llm"}, qs
        assert 1 <= len(qs) <= 6
        ids = [q.id for q in qs]
        assert len(set(ids)) == len(ids)
        for i, q in enumerate(qs):
            assert q.question.endswith("?") and q.choices == ("yes", "no")
            assert set(q.parents) <= set(ids[:i])  # parents are earlier questions
