"""The experts stage on a small Parquet data set under Ray Tune + Train: a driver re-run
skips finished experts and resumes unfinished ones, a worker failure is retried from the last
checkpoint (fault drill), the best-by-validation checkpoint is exported, and both exports load
elsewhere (diffusers ``load_lora_weights``; kohya key names)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from selma_ray.config import load_config  # noqa: E402
from selma_ray.core.rundir import RunDir  # noqa: E402
from selma_ray.experts import stage as experts_stage  # noqa: E402
from selma_ray.experts.stage import FAULT_DRILL_ENV  # noqa: E402
from selma_ray.pipeline import lineage, run_stage  # noqa: E402

pytestmark = pytest.mark.slow
SKILLS = ["counting", "everyday_scenes"]


def write_images(root: Path, skills: list[str], per_skill: int = 5) -> None:
    """A tiny image-stage output: random non-square PNGs (another size than the model's)."""
    rng = np.random.default_rng(0)
    rows = {"prompt": [], "image": [], "skill": []}
    for skill in skills:
        for i in range(per_skill):
            buf = io.BytesIO()
            pixels = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buf, format="PNG")
            rows["prompt"].append(f"{i + 1} {skill.replace('_', ' ')} on a table")
            rows["image"].append(buf.getvalue())
            rows["skill"].append(skill)
    (root / "images" / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), root / "images" / "data" / "part-0.parquet")


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
            *overrides,
        ],
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spinning threads crawl on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_cluster):
    """Run 1: everyday_scenes dies at step 3 with no retries left (driver-level failure);
    run 2 (same fingerprint): counting is skipped, everyday_scenes resumes from its step-2
    checkpoint, dies once more at step 5 and FailureConfig retries it from step 4."""
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
    assert run.read_manifest("experts", "counting") == first["counting"]  # untouched
    resumed = run.read_manifest("experts", "everyday_scenes")
    # attempts: fresh start, driver re-run from the step-2 checkpoint, worker retry from 4.
    assert resumed["attempts"] == [0, 2, 4]
    assert resumed["metrics"]["step"] == 6 and resumed["metrics"]["resumed_from"] == 4
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


def test_two_workers_per_expert_train_with_ddp(tmp_path, ray_cluster):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from selma_ray.experts import data as train_data
    from selma_ray.experts.recipe import train_expert

    write_images(tmp_path, ["counting"], per_skill=6)
    rows = experts_stage.skill_table(str(tmp_path / "images" / "data"), "counting")
    train, val = train_data.split_rows(rows, 0, "counting", 0.0, 2)
    loop = {
        **load_config("tiny", []).experts.model_dump(),
        **{"base": "tiny-sd", "seed": 0, "skill": "counting"},
        **{"max_steps": 3, "checkpoint_every": 3, "batch_size": 2},
    }
    result = TorchTrainer(
        train_expert,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="ddp", storage_path=str(tmp_path / "ray_results")),
        datasets=train_data.training_datasets(train, val, loop, None, 0.25),
    ).fit()
    assert result.error is None and result.metrics["step"] == 3
    assert result.metrics["workers"] == 2  # the UNet was wrapped in DDP (prepare_model)
    assert result.metrics["val_loss"] > 0 and result.checkpoint is not None


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
