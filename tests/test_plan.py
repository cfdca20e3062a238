"""The stage plan of each preset, built from config alone (nothing is loaded or run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from selma_ray.config import load_config
from selma_ray.eval.scorers import unavailable
from selma_ray.plan import build_plan, diffusion_model_info, format_plan

ROOT = Path(__file__).resolve().parent.parent
PAPER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
BENCHMARKS = [  # the samples shipped in the official files' layouts
    "eval.dsg_file=builtin:dsg-1k-anns.sample.csv",
    "eval.tifa_file=builtin:tifa_v1.0_question_answers.sample.json",
]


@pytest.mark.parametrize(
    ("preset", "pipeline", "resolution"),
    [
        ("sd14", "StableDiffusionPipeline", 512),
        ("sd2", "StableDiffusionPipeline", 768),
        ("sdxl", "StableDiffusionXLPipeline", 1024),
    ],
)
def test_paper_presets_plan_the_paper_settings(preset, pipeline, resolution):
    plan = build_plan(load_config(preset, BENCHMARKS))
    images, experts = plan["stages"]["images"], plan["stages"]["experts"]
    assert images["generator"]["pipeline"] == pipeline
    assert (images["resolution"], images["steps"], images["guidance_scale"]) == (
        resolution,
        50,
        7.5,
    )
    assert images["images"] == 5 * 1000  # five skills, 1K prompts each, one image per prompt
    assert experts["train_resolution"] == resolution and not experts["resize"]
    assert (experts["rank"], experts["alpha"]) == (128, 128.0)
    assert experts["target_modules"] == PAPER_TARGETS
    assert (experts["learning_rate"], experts["lr_scheduler"]) == (3e-4, "constant")
    assert (experts["batch_size"], experts["max_steps"]) == (64, 5000)
    assert experts["mixed_precision"] == "fp16" and experts["peak_gpus"] == 5
    assert plan["stages"]["prompts"]["llm"] == "meta-llama/Llama-3.1-8B-Instruct"
    scorers = plan["stages"]["eval"]["scorers"]
    assert scorers["clip"] == "openai/clip-vit-large-patch14"
    assert scorers["pick"].startswith("yuvalkirstain/PickScore_v1")
    assert scorers["dsg"].startswith("DSG-1K builtin:dsg-1k-anns.sample.csv")
    for name in ("image_reward", "hps"):  # optional packages, absent from the CPU setup
        assert scorers[name].endswith("(not installed here: skipped)") == bool(unavailable(name))
    assert plan["warnings"] == []  # the paper's protocol: nothing to warn about


def test_paper_presets_without_benchmark_files_warn_the_numbers_are_not_comparable():
    plan = build_plan(load_config("sd2"))
    assert [w for w in plan["warnings"] if "NOT comparable" in w], plan["warnings"]
    assert plan["stages"]["eval"]["prompts"] == "generated"


def test_weak_to_strong_plans_sd2_data_resized_for_sdxl_experts():
    plan = build_plan(load_config("weak_to_strong"))
    images, experts = plan["stages"]["images"], plan["stages"]["experts"]
    assert images["generator"]["model"] == "stabilityai/stable-diffusion-2"
    assert images["generator"]["family"] == "sd2" and images["resolution"] == 768
    assert experts["base"]["family"] == "sdxl"
    assert (experts["data_resolution"], experts["train_resolution"]) == (768, 1024)
    assert experts["resize"] is True
    assert any("768px images to 1024px" in w for w in plan["warnings"])
    assert any("weak-to-strong" in w for w in plan["warnings"])


def test_tiny_plan_is_cpu_only_and_counts_real_data_skills_out_of_rendering(tmp_path):
    cfg = load_config("tiny", [f"images.real_data={{counting: [{tmp_path}]}}"])
    plan = build_plan(cfg)
    images = plan["stages"]["images"]
    assert images["generator"]["source"] == "built-in" and images["resolution"] == 32
    assert "counting" not in images["rendered_skills"]
    assert images["real_data_skills"] == ["counting"]
    assert images["images"] == cfg.prompts.per_skill * (len(cfg.prompts.skills) - 1)
    assert plan["stages"]["experts"]["peak_gpus"] == 0
    assert "CPU" in plan["stages"]["serve"]["replicas"]
    json.dumps(plan)  # plain data, ready for a UI or a log
    assert "tiny-sd (sd1, StableDiffusionPipeline, native 32px, built-in)" in format_plan(plan)


def test_local_model_folders_are_read_from_their_configs(tmp_path):
    model = tmp_path / "my-sdxl"
    (model / "unet").mkdir(parents=True)
    (model / "vae").mkdir()
    index = {"_class_name": "StableDiffusionXLPipeline"}
    (model / "model_index.json").write_text(json.dumps(index))
    (model / "unet" / "config.json").write_text(json.dumps({"sample_size": 128}))
    (model / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [1, 2, 3, 4]}))
    info = diffusion_model_info(str(model))
    assert (info.family, info.native_resolution, info.source) == ("sdxl", 1024, "local folder")
    unknown = diffusion_model_info("someone/some-model")
    assert unknown.family == "unknown" and unknown.native_resolution is None
    tiny = diffusion_model_info("tiny-sdxl")
    assert (tiny.family, tiny.pipeline, tiny.native_resolution, tiny.source) == (
        "sdxl",
        "StableDiffusionXLPipeline",
        32,
        "built-in",
    )


def test_job_prints_the_plan_without_starting_ray():
    done = subprocess.run(
        [sys.executable, "jobs/full_pipeline.py", "--config", "weak_to_strong", "--plan"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "train_resolution: 1024" in done.stdout
    assert "training resizes 768px images to 1024px" in done.stdout
    assert "Started a local Ray instance" not in done.stdout + done.stderr


def test_shipped_presets_name_nothing_missing():
    from selma_ray.config import list_presets
    from selma_ray.plan import config_problems

    for name in list_presets():
        assert config_problems(load_config(name)) == [], name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.prompts_file=/nonexistent.csv", "eval.prompts_file: eval prompts/questions file"),
        ("eval.prompts_file=builtin:nope.csv", "no built-in benchmark 'nope.csv'"),
        ("images.real_data={counting: [/no/such.tar]}", "real_data.counting: '/no/such.tar'"),
        ("images.real_data={countin: [.]}", "'countin' is not one of prompts.skills"),
        ("models.base=/nonexistent/path", "models.base: the folder '/nonexistent/path'"),
        ("models.generator=not a model", "neither a built-in model, a hub id"),
    ],
)
def test_paths_and_names_the_config_refers_to_are_checked_before_any_work(override, message):
    from selma_ray.plan import config_problems

    problems = config_problems(load_config("tiny", [override]))
    assert len(problems) == 1 and message in problems[0], problems
    assert config_problems(load_config("tiny", ["models.base=org/model-v1.5"])) == []


def test_the_job_and_its_plan_stop_on_a_missing_file():
    for extra in ([], ["--plan"]):
        done = subprocess.run(
            [sys.executable, "jobs/full_pipeline.py", "eval.prompts_file=/nonexistent.csv", *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2 and "error: eval.prompts_file" in done.stderr, done.stderr
        assert "Started a local Ray instance" not in done.stdout + done.stderr


def test_plan_warns_when_the_run_dir_holds_a_run_made_with_another_config(tmp_path):
    from selma_ray.pipeline import config_drift, drift_warning

    run_dir = f"run.dir={tmp_path / 'runs' / 'tiny'}"
    assert config_drift(load_config("tiny", [run_dir])) == []  # no run there yet
    earlier = load_config("tiny", [run_dir])
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "config.yaml").write_text(earlier.to_yaml())
    assert drift_warning(load_config("tiny", [run_dir])) is None  # the same config
    other = load_config("tiny", [run_dir, "prompts.per_skill=3", "experts.rank=2"])
    assert config_drift(other) == ["experts.rank", "prompts.per_skill"]
    done = subprocess.run(
        [sys.executable, "jobs/full_pipeline.py", "--plan", run_dir, "prompts.per_skill=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "holds a run made with a different config (it differs in prompts.per_skill)" in (
        done.stdout
    )
    assert "give this one its own run.dir=" in done.stdout
