"""vLLM tensor parallelism reserves what it uses: one placement group per engine, a GPU bundle
per rank, the engine actor in the first bundle, and its children (vLLM's rank actors) captured
into the group; ``--plan`` counts the same GPUs. The Ray cluster here has logical GPUs, so the
reservation is real; the rank actors are stand-ins for vLLM's (no CUDA here)."""

from __future__ import annotations

import time

import pytest
import ray

from selma_ray.config import load_config
from selma_ray.models import llm_data
from selma_ray.models.llm_data import backend_udf, engine_bundles, engine_options
from selma_ray.plan import build_plan


def tp_config(tp: int, gpus: float = 1, **extra: str):
    return load_config(
        "tiny",
        [
            f"prompts.tensor_parallel_size={tp}",
            f"resources.prompts.num_gpus={gpus}",
            "resources.prompts.num_cpus=2",
            "resources.prompts.custom={a10g: 0.01}",
            *(f"{k}={v}" for k, v in extra.items()),
        ],
    )


def test_tensor_parallel_2_asks_one_gpu_bundle_per_rank():
    cfg = tp_config(2)
    assert engine_bundles(cfg) == [
        {"CPU": 2, "GPU": 1, "a10g": 0.01},  # rank 0 and the engine actor's CPUs
        {"GPU": 1, "a10g": 0.01},
    ]
    _, kwargs = backend_udf(cfg)
    assert kwargs["engine_kwargs"]["distributed_executor_backend"] == "ray"
    assert kwargs["engine_kwargs"]["tensor_parallel_size"] == 2


def test_one_rank_needs_no_group_and_the_plan_counts_what_is_reserved():
    cfg = tp_config(1)
    assert engine_bundles(cfg) is None
    assert "distributed_executor_backend" not in backend_udf(cfg)[1]["engine_kwargs"]
    assert build_plan(tp_config(2))["stages"]["prompts"]["actors"].endswith("2 GPU")
    assert build_plan(cfg)["stages"]["prompts"]["actors"].endswith("1 GPU")


def test_tensor_parallelism_without_gpus_is_refused_with_what_to_set():
    with pytest.raises(ValueError, match="resources.prompts.num_gpus"):
        engine_bundles(tp_config(2, gpus=0))


@ray.remote
class Rank:
    def group(self) -> str | None:
        return ray.get_runtime_context().get_placement_group_id()


@ray.remote
class Engine:
    """Stands in for the vLLM engine actor: starts one GPU actor per rank, as vLLM's Ray
    executor does, and reports where they landed."""

    def start_ranks(self, n: int) -> dict:
        ranks = [Rank.options(num_cpus=0, num_gpus=1).remote() for _ in range(n)]  # as vLLM
        return {
            "engine": ray.get_runtime_context().get_placement_group_id(),
            "ranks": ray.get([r.group.remote() for r in ranks], timeout=60),
            "gpus": ray.get_runtime_context().get_assigned_resources().get("GPU", 0),
        }


def test_the_engine_and_its_ranks_run_inside_the_reserved_group():
    ray.init(num_cpus=2, num_gpus=2, resources={"a10g": 1}, include_dashboard=False)
    try:
        options = engine_options(tp_config(2))
        group = options["scheduling_strategy"].placement_group
        ray.get(group.ready(), timeout=60)
        placed = ray.get(Engine.options(**options).remote().start_ranks.remote(2), timeout=120)
        assert placed["gpus"] == 0  # the engine holds no GPU of its own
        assert placed["ranks"] == [group.id.hex()] * 2 == [placed["engine"]] * 2
        assert ray.available_resources().get("GPU", 0) == 0  # both GPUs are the group's
    finally:
        ray.shutdown()


def test_a_ray_data_pass_with_tensor_parallelism_gives_its_gpus_back(monkeypatch):
    """Each engine actor of a plain Ray Data pass gets a placement group of its own; when
    the pass ends the groups are removed and every GPU is free again."""

    class Echo:  # stands in for the vLLM UDF (defined here: Ray ships it by value)
        def __init__(self, **kwargs):
            pass

        def __call__(self, batch: dict) -> dict:
            return {"text": batch["prompt"]}

    monkeypatch.setattr(llm_data, "backend_udf", lambda cfg: (Echo, {}))
    ray.init(num_cpus=4, num_gpus=2, resources={"a10g": 1}, include_dashboard=False)
    try:
        cfg = tp_config(2, **{"resources.prompts.num_cpus": 1})
        rows = llm_data.generate_with_ray_data(cfg, [{"prompt": f"p{i}"} for i in range(3)])
        assert sorted(r["text"] for r in rows) == ["p0", "p1", "p2"]
        groups = ray.util.placement_group_table()
        assert groups and {g["state"] for g in groups.values()} == {"REMOVED"}
        deadline = time.monotonic() + 60  # the resources view catches up asynchronously
        while ray.available_resources().get("GPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.available_resources().get("GPU", 0) == 2
    finally:
        ray.shutdown()
