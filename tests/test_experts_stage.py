"""The experts stage on a small Parquet data set under Ray Tune + Train: a driver re-run
skips finished experts and resumes unfinished ones, a worker failure is retried from the last
checkpoint (fault drill), the best-by-validation checkpoint is exported, both exports load
elsewhere (diffusers ``load_lora_weights``; kohya key names), and two DDP workers train on
disjoint rows and keep identical LoRAs (UNet and text encoder) that follow the mean gradient."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch

from selma_ray.config import load_config
from selma_ray.core import layout
from selma_ray.core.rundir import RunDir
from selma_ray.experts import stage as experts_stage
from selma_ray.experts.recipe import read_attempt_records
from selma_ray.experts.stage import FAULT_DRILL_ENV
from selma_ray.pipeline import lineage, run_stage
from selma_ray.testing import write_images

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
# Five experts at once on the 2-CPU cluster, as the tiny preset trains them.
SKILLS = ["counting", "everyday_scenes", "dense_detail", "user_prompts", "commonsense_defying"]


def stage_config(root: Path, *overrides: str):
    return load_config(
        "tiny",
        [
            f"run.dir={root}",
            f"prompts.skills=[{', '.join(SKILLS)}]",
            "experts.max_steps=6",
            "experts.checkpoint_every=2",
            "experts.validation_count=2",
            "experts.learning_rate=1e-2",
            "experts.feed=stream",  # read from storage every epoch: the demanding feed
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_cluster):
    """Run 1: five experts train at once, streaming their rows; everyday_scenes dies at step
    3 with no retries left (driver-level failure); run 2 (same fingerprint): the others are
    skipped, everyday_scenes resumes from its step-2 checkpoint, dies once more at step 5 and
    FailureConfig retries it from step 4."""
    root = tmp_path_factory.mktemp("experts") / "run"
    write_images(root, SKILLS)
    run = RunDir(root)
    first = stage_config(root, "experts.max_failures=0")
    os.environ[FAULT_DRILL_ENV] = "everyday_scenes:3"
    try:
        with pytest.raises(RuntimeError, match="1 expert"):
            run_stage("experts", first, run)
        after_first = {s: run.read_manifest("experts", s) for s in SKILLS}
        second = stage_config(root, "experts.max_failures=1")
        assert lineage("experts", first, run).units == lineage("experts", second, run).units
        os.environ[FAULT_DRILL_ENV] = "everyday_scenes:5"
        result = run_stage("experts", second, run)
    finally:
        os.environ.pop(FAULT_DRILL_ENV, None)
    return {"run": run, "cfg": second, "after_first": after_first, "result": result}


def test_rerun_skips_finished_experts_and_resumes_unfinished_ones(trained):
    run, first = trained["run"], trained["after_first"]
    assert first["everyday_scenes"] is None  # it failed: no export, no manifest
    assert first["counting"]["metrics"]["step"] == 6 and first["counting"]["attempts"] == [0]
    assert trained["result"]["trained"] == ["everyday_scenes"]
    for skill in set(SKILLS) - {"everyday_scenes"}:
        assert run.read_manifest("experts", skill) == first[skill]  # untouched
    resumed = run.read_manifest("experts", "everyday_scenes")
    # attempts: fresh start, driver re-run from the step-2 checkpoint, worker retry from 4.
    assert resumed["attempts"] == [0, 2, 4]
    # ...and each resumed attempt's data feed started where the checkpoint's had stopped:
    # 3 training rows, batches of 4, one batch a step, so one batch an epoch.
    fp = lineage("experts", trained["cfg"], run).units["everyday_scenes"]
    records = read_attempt_records(run, experts_stage.work_dir("everyday_scenes", fp))
    assert [r["data_position"] for r in records] == [[0, 0], [1, 1], [3, 1]]
    assert resumed["metrics"]["step"] == 6 and resumed["metrics"]["resumed_from"] == 4
    assert resumed["metrics"]["skipped_steps"] == 0  # every step was finite
    assert (run.path("experts", "everyday_scenes", "logs")).is_dir()


def test_export_is_the_best_validated_checkpoint_with_metadata(trained):
    from safetensors import safe_open

    for skill in SKILLS:
        manifest = trained["run"].read_manifest("experts", skill)
        export, metrics = manifest["export"], manifest["metrics"]
        assert export["select"] == "best"
        assert export["selected_val_loss"] == pytest.approx(metrics["best_val_loss"])
        assert export["selected_step"] in (2, 4, 6)
        with safe_open(manifest["adapter"], framework="pt") as f:
            meta = f.metadata()
        assert json.loads(meta["selma.skill"]) == skill
        assert json.loads(meta["selma.base_model"]) == "tiny-sd"
        assert json.loads(meta["selma.rank"]) == 4 and json.loads(meta["selma.steps"]) == 6
        assert len(json.loads(meta["selma.data_hash"])) == 16
        assert json.loads(meta["selma.selected_step"]) == export["selected_step"]
        assert "lora_adapter_metadata" in meta  # diffusers' own LoRA config is kept


def test_diffusers_export_loads_into_a_plain_pipeline_and_changes_the_output(trained):
    from diffusers import StableDiffusionPipeline

    from selma_ray.models import resolve

    pipe = StableDiffusionPipeline.from_pretrained(resolve("tiny-sd"))
    pipe.set_progress_bar_config(disable=True)

    def render():
        gen = torch.Generator().manual_seed(0)
        return pipe("3 apples", num_inference_steps=2, generator=gen, output_type="np").images

    base = render()
    pipe.load_lora_weights(str(trained["run"].path("experts", "counting")), adapter_name="c")
    assert np.abs(render() - base).max() > 1e-4


def test_kohya_export_has_kohya_key_names(trained):
    from safetensors import safe_open

    path = trained["run"].path("experts", "counting", "counting_kohya.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        alphas = [f.get_tensor(k).item() for k in keys if k.endswith(".alpha")]
        meta = f.metadata()
    downs = [k for k in keys if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith("lora_unet_") for k in keys)
    for down in downs:
        module = down.removesuffix(".lora_down.weight")
        assert f"{module}.lora_up.weight" in keys and f"{module}.alpha" in keys
    assert any("_attn1_to_q" in k for k in downs)
    assert alphas and all(a == 4.0 for a in alphas)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"


def lora_params(trainer) -> dict[str, torch.nn.Parameter]:
    """The trained LoRA parameters, UNet and text encoder, by prefixed name."""
    return {
        f"{prefix}.{name}": p
        for prefix, module in (("unet", trainer.unet), ("text_encoder", trainer.text_encoder))
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in lora_params(trainer).items()}


def recording_train_loop(config: dict[str, Any]) -> None:
    """``train_expert``, recording per rank into ``config["record_dir"]``: the LoRA weights
    before the first and after the last step, and each step's micro-batches and RNG state
    (enough to replay the step outside Ray)."""
    import ray.train

    from selma_ray.experts import recipe as training

    record: dict[str, Any] = {"steps": []}

    class Recording(training.ExpertTrainer):
        def train_step(self, micro_batches):
            if not record["steps"]:
                record["init"] = lora_weights(self)
            record["steps"].append({"rng": torch.get_rng_state(), "batches": micro_batches})
            out = super().train_step(micro_batches)
            record["final"] = lora_weights(self)
            return out

    training.ExpertTrainer = Recording  # train_expert looks the class up when it runs
    training.train_expert(config)
    rank = ray.train.get_context().get_world_rank()
    torch.save(record, Path(config["record_dir"]) / f"rank-{rank}.pt")


def replay(loop, init, ranks_steps) -> dict[str, torch.Tensor]:
    """Outside Ray: from ``init``, each step averages the gradients of the given ranks'
    recorded micro-batches (same RNG states), then takes one optimizer step."""
    from selma_ray.experts.recipe import ExpertTrainer

    t = ExpertTrainer(loop)
    for name, p in lora_params(t).items():
        p.data.copy_(init[name])
    for steps in zip(*ranks_steps, strict=True):
        grads = []
        for step in steps:
            torch.set_rng_state(step["rng"])
            t.accumulate(step["batches"])
            grads.append([p.grad.clone() for p in t.params])
        for i, p in enumerate(t.params):
            p.grad = sum(g[i] / len(steps) for g in grads)
        t.apply_gradients()
    return lora_weights(t)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in keys)


def test_two_ddp_workers_train_disjoint_rows_into_one_lora_of_the_mean_gradient(
    tmp_path, ray_cluster
):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from selma_ray.experts import feed

    write_images(tmp_path, ["counting"], per_skill=6)
    run = RunDir(tmp_path)
    rows = feed.read_rows(run, layout.images_files(run), ["counting"])
    held_out, _ = feed.split_validation(rows, 6, 0, "counting", 0.0, 2)
    loop = {
        **load_config("tiny", []).experts.model_dump(),
        **{"base": "tiny-sd", "seed": 0, "skill": "counting", "learning_rate": 1e-2},
        # two micro-batches of one image per step: DDP's no_sync path and the text encoder's
        # once-per-step gradient average are both exercised
        **{"max_steps": 3, "checkpoint_every": 3, "batch_size": 1, "gradient_accumulation": 2},
        "train_text_encoder": True,
    }
    (tmp_path / "ranks").mkdir()
    # The workers cannot import this test module: ship its functions by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        result = TorchTrainer(
            recording_train_loop,
            train_loop_config={**loop, "record_dir": str(tmp_path / "ranks")},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name="ddp", storage_path=str(tmp_path / "ray_results")),
            datasets=feed.training_datasets(rows, held_out, loop),
            dataset_config=feed.data_config(loop),  # as the experts stage
        ).fit()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert result.error is None and result.metrics["step"] == 3
    assert result.metrics["workers"] == 2 and result.checkpoint is not None
    ranks = [torch.load(tmp_path / "ranks" / f"rank-{r}.pt", weights_only=False) for r in (0, 1)]

    # The two ranks trained on different images: disjoint halves of the training rows.
    seen = [
        {str(p) for step in rec["steps"] for b in step["batches"] for p in b["prompt"]}
        for rec in ranks
    ]
    assert seen[0] and seen[1] and not seen[0] & seen[1], seen
    train = feed.training_datasets(rows, held_out, loop)["train"].take_all()
    assert seen[0] | seen[1] == {r["prompt"] for r in train} and len(train) == 4
    assert [len(rec["steps"]) for rec in ranks] == [3, 3]

    for part in ("unet.", "text_encoder."):
        # Same start (DDP broadcasts rank 0's weights; the text encoder's too) ...
        start = max_diff(ranks[0]["init"], ranks[1]["init"], part)
        assert start == 0.0, f"{part} LoRA starts differ across ranks by {start}"
        # ... and, gradients averaged every step, the same weights at the end.
        end = max_diff(ranks[0]["final"], ranks[1]["final"], part)
        assert end == 0.0, f"{part} LoRA weights differ across ranks by {end} after training"
    # What each step did, replayed outside Ray from the recorded batches and RNG states:
    # the mean of both ranks' gradients, not rank 0's alone.
    both = replay(loop, ranks[0]["init"], [ranks[0]["steps"], ranks[1]["steps"]])
    alone = replay(loop, ranks[0]["init"], [ranks[0]["steps"]])
    for part in ("unet.", "text_encoder."):
        off = max_diff(ranks[0]["final"], both, part)
        assert off < 1e-5, f"{part} DDP result is {off} from the mean-gradient replay"
        own = max_diff(ranks[0]["final"], alone, part)
        assert own > 1e-3, f"{part} DDP result is only {own} from rank 0 training alone"


def test_training_curves_are_tensorboard_event_files(trained):
    import struct

    from tensorboardX.proto import event_pb2

    steps: dict[str, list[int]] = {}
    for path in trained["run"].path("experts", "counting", "logs").glob("events.out.tfevents.*"):
        data, i = path.read_bytes(), 0
        while i < len(data):  # TFRecord: length, crc, event, crc
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 16 + n
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    assert sorted(steps["train/loss"]) == [1, 2, 3, 4, 5, 6]
    assert sorted(steps["val/loss"]) == [2, 4, 6]
    assert {"train/lr", "train/grad_norm"} <= set(steps)


def test_five_experts_streaming_their_data_on_two_cpus_all_finish(trained):
    """Five fractional trainers on a 2-CPU cluster, each streaming its rows from storage every
    epoch (run 1 of ``trained``): the feed's small read and decode tasks still get CPUs, so
    none deadlocks; the one the fault drill stopped had got to its step-2 checkpoint."""
    first = trained["after_first"]
    for skill in set(SKILLS) - {"everyday_scenes"}:
        assert first[skill]["metrics"]["step"] == 6, skill
        assert first[skill]["metrics"]["feed"] == "stream", skill
    assert trained["run"].read_manifest("experts", "everyday_scenes")["attempts"][1] == 2
