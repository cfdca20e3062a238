"""LLM passes on Ray Data: the configured backend (vLLM actors or an OpenAI-compatible
endpoint) over a list of requests. The prompts stage keeps engines loaded across its rounds
(``PersistentEngines``); the eval stage's question and held-out prompt writing use plain passes.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from selma_ray.config import SelmaConfig

log = logging.getLogger(__name__)

# The answer budget of one request for n descriptions of at most w words, used where
# prompts.max_tokens is null: ceil(n * (w * TOKENS_PER_WORD + ITEM_TOKENS) * MARGIN) + PREAMBLE.
# Measured with SmolLM2's tokenizer (a 49k BPE like Llama's): 1.1-1.2 tokens a word for plain
# descriptions, 1.3 over all seeds, up to 2.0 for DiffusionDB-style prompts full of names.
TOKENS_PER_WORD = 1.5  # x MARGIN: 1.9 a word, enough for the worst measured
ITEM_TOKENS = 5  # "\n13. " before each item
MARGIN = 1.25  # descriptions at the word limit, quotes, a trailing "(25 words)"
PREAMBLE = 32  # "Here are 5 new image descriptions:" and similar chatter before the list


def answer_token_budget(n_items: int, max_words: int) -> int:
    """Tokens an answer of ``n_items`` numbered descriptions of up to ``max_words`` needs."""
    per_item = max_words * TOKENS_PER_WORD + ITEM_TOKENS
    return math.ceil(n_items * per_item * MARGIN) + PREAMBLE


def request_max_tokens(pc: Any, max_words: int) -> int:
    """``prompts.max_tokens`` where set (it wins: a deliberate cap on cost and latency, and
    an answer it cuts off only loses its cut item), else the budget for ``new_per_request``
    descriptions of ``max_words`` words."""
    return pc.max_tokens or answer_token_budget(pc.new_per_request, max_words)


def backend_udf(cfg: SelmaConfig) -> tuple[type, dict[str, Any]]:
    """The Ray Data UDF class of the configured LLM backend and its constructor kwargs.

    Its ``max_tokens`` fits the longest-worded configured skill; rows that carry their own
    ``max_tokens`` (the prompts stage's requests) use theirs."""
    from selma_ray.core.skills import get_skills
    from selma_ray.models.llm import OpenAIGenerator, VLLMGenerator

    pc = cfg.prompts
    longest = max(s.max_words for s in get_skills(pc.skills, pc.all_custom_skills()))
    sampling = {
        "temperature": pc.temperature,
        "top_p": pc.top_p,
        "max_tokens": request_max_tokens(pc, longest),
    }
    if pc.backend == "openai":
        oa = pc.openai
        return OpenAIGenerator, {
            "base_url": oa.base_url,
            "model": oa.model or cfg.models.llm,
            "api_key_env": oa.api_key_env,
            "sampling": sampling,
            "api": oa.api,
            "max_retries": oa.max_retries,
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
    if pc.tensor_parallel_size > 1:
        # The ranks are Ray actors vLLM starts inside the engine's placement group.
        engine_kwargs["distributed_executor_backend"] = "ray"
    if not on_gpu:
        # vLLM's CPU runner cannot rewind a per-request seeded generator when chunked prefill
        # splits a prompt ("CPU Generator does not use offset"); prefill whole prompts instead.
        engine_kwargs["enable_chunked_prefill"] = False
    return VLLMGenerator, {
        "model": cfg.models.llm,
        "engine_kwargs": engine_kwargs,
        "sampling": sampling,
    }


def engine_bundles(cfg: SelmaConfig) -> list[dict[str, float]] | None:
    """What one vLLM engine with ``prompts.tensor_parallel_size`` > 1 reserves: a placement
    group of one bundle per rank (``resources.prompts.num_gpus`` GPUs each, and the stage's
    custom resources), the first also holding the engine actor's CPUs. None for one rank,
    where the engine actor reserves its GPUs itself. Both ways, an engine holds
    ``num_gpus x tensor_parallel_size`` GPUs, as ``--plan`` says."""
    res, tp = cfg.resources.prompts, cfg.prompts.tensor_parallel_size
    if tp == 1 or cfg.prompts.backend != "vllm":
        return None
    if res.num_gpus <= 0:
        raise ValueError(
            f"prompts.tensor_parallel_size={tp} splits the LLM over GPUs: set "
            "resources.prompts.num_gpus (GPUs per rank, usually 1)"
        )
    rank = {"GPU": res.num_gpus, **res.custom}
    return [{"CPU": res.num_cpus, **rank}] + [dict(rank) for _ in range(tp - 1)]


def engine_options(cfg: SelmaConfig) -> dict[str, Any]:
    """Ray options of one vLLM engine actor. With tensor parallelism the GPUs are reserved by
    a new STRICT_PACK placement group (every rank on one node), the actor sits in its first
    bundle, and vLLM's rank actors are captured into the group, as ``ray.data.llm`` does."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    res = cfg.resources.prompts
    bundles = engine_bundles(cfg)
    if bundles is None:
        return {"num_gpus": res.num_gpus, "num_cpus": res.num_cpus, "resources": res.custom}
    group = ray.util.placement_group(bundles, strategy="STRICT_PACK")
    return {
        "num_gpus": 0,
        "num_cpus": res.num_cpus,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        ),
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
    pool = ray.data.ActorPoolStrategy(min_size=res.min_size, max_size=res.max_size)
    groups: list[Any] = []  # the engines' placement groups, removed when the pass ends

    def own_group() -> dict[str, Any]:  # called for each engine actor the pool starts
        strategy = engine_options(cfg)["scheduling_strategy"]
        groups.append(strategy.placement_group)
        return {"scheduling_strategy": strategy}

    if cfg.prompts.backend != "vllm":
        placement: dict[str, Any] = {"num_cpus": res.num_cpus, "resources": res.custom}
    elif engine_bundles(cfg) is None:
        placement = engine_options(cfg)
    else:
        placement = {"num_cpus": res.num_cpus, "ray_remote_args_fn": own_group}
    ds = ray.data.from_items(requests).map_batches(
        udf,
        fn_constructor_kwargs=kwargs,
        compute=pool,
        batch_size=cfg.prompts.batch_size,
        **placement,
    )
    try:
        return ds.take_all()
    finally:
        for group in groups:
            ray.util.remove_placement_group(group)


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
        self.groups: list[Any] = []  # the engines' placement groups (tensor parallelism)
        self.starts = 0

    def _start(self) -> None:
        import ray

        from selma_ray.models.llm import VLLMGenerator

        res = self.cfg.resources.prompts
        _, kwargs = backend_udf(self.cfg)
        actor = ray.remote(VLLMGenerator)
        for _ in range(res.max_size):
            options = engine_options(self.cfg)
            if "scheduling_strategy" in options:
                self.groups.append(options["scheduling_strategy"].placement_group)
            self.engines.append(actor.options(**options).remote(**kwargs))
        self.starts += 1
        log.info("prompts: started %d %s engine(s) for the stage", res.max_size, "vLLM")

    def __call__(self, cfg: SelmaConfig, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import ray

        from selma_ray.models.llm import EngineClient

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
        for group in self.groups:
            ray.util.remove_placement_group(group)
        self.engines, self.groups = [], []
