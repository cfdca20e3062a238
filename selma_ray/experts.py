"""Stage 3, experts: one LoRA expert per skill, all skills trained in parallel.

Each skill is one Ray Tune trial; the trial is a function that runs its own ``TorchTrainer``
(the documented Train V2 pattern for parallel trainers). Resources per expert and how many
run at once come from config. A finished expert is exported to ``experts/<skill>/`` in the
diffusers LoRA format with its own manifest, so a re-run trains only unfinished skills.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from selma_ray import images as images_stage
from selma_ray.config import SelmaConfig
from selma_ray.lora_io import WEIGHT_NAME
from selma_ray.rundir import RunDir, replace_dir, safe_child

log = logging.getLogger(__name__)
STAGE = "experts"


def fingerprint(cfg: SelmaConfig, skill: str) -> str:
    return cfg.fingerprint(
        "experts",
        extra={
            "base": cfg.models.base,
            "images": images_stage.fingerprint(cfg),
            "skill": skill,
            "seed": cfg.run.seed,
        },
    )


def skill_dataset(images_dir: str, skill: str):
    """This skill's image-text pairs as a Ray Dataset."""
    import pyarrow.dataset as pads
    import ray

    table = pads.dataset(images_dir, format="parquet").to_table(
        columns=["prompt", "image", "skill"], filter=pads.field("skill") == skill
    )
    if table.num_rows == 0:
        raise RuntimeError(f"experts: no images for skill {skill!r} in {images_dir}")
    return ray.data.from_arrow(table)


def _train_one(trial_config: dict[str, Any], job: dict[str, Any]) -> None:
    """Tune trial: train one skill's expert with a TorchTrainer, then export it."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from selma_ray.logs import setup_logging
    from selma_ray.training import train_expert

    setup_logging()
    skill = trial_config["skill"]
    log.info("experts: [%s] training starts", skill)
    res = job["resources"]
    resources = {"CPU": res["cpus_per_worker"]}
    if res["use_gpu"]:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_expert,
        train_loop_config={**job["loop"], "skill": skill},
        scaling_config=ScalingConfig(
            num_workers=res["workers_per_expert"],
            use_gpu=res["use_gpu"],
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            # One storage folder per (skill, fingerprint): a re-run of the same expert resumes
            # from its latest checkpoint; a changed config or data set starts afresh.
            name=f"expert-{skill}-{job['fingerprints'][skill]}",
            storage_path=job["storage_path"],
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=job["max_failures"]),
            callbacks=[TuneReportCallback()],
        ),
        datasets={"train": skill_dataset(job["images_dir"], skill)},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"expert {skill}: training finished without a checkpoint")
    export_expert(Path(job["run_dir"]), skill, result, job["fingerprints"][skill])


def export_expert(run_root: Path, skill: str, result, fingerprint: str) -> None:
    """Copy the final adapter of a training run to ``experts/<skill>/`` with a manifest."""
    run = RunDir(run_root)
    out = safe_child(run.path(STAGE), skill)
    with result.checkpoint.as_directory() as ckpt:
        tmp = out.with_name(f".{skill}.export")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copy2(Path(ckpt) / WEIGHT_NAME, tmp / WEIGHT_NAME)
        replace_dir(tmp, out)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float | str)}
    run.write_manifest(
        fingerprint, STAGE, skill, skill=skill, metrics=metrics, adapter=str(out / WEIGHT_NAME)
    )
    log.info("experts: [%s] exported to %s (%s)", skill, out, metrics)


def run_experts(cfg: SelmaConfig, run: RunDir) -> dict[str, Any]:
    """Train every unfinished skill expert in parallel; returns the stage summary."""
    from ray import tune

    skills = cfg.prompts.skills
    fps = {s: fingerprint(cfg, s) for s in skills}
    todo = [s for s in skills if not run.is_done(fps[s], STAGE, s)]
    for s in skills:
        if s not in todo:
            log.info("experts: [%s] finished earlier with the same config, skipping", s)
    if todo:
        ec, res = cfg.experts, cfg.resources.experts
        job = {
            "run_dir": str(run.root),
            "images_dir": str(run.path(images_stage.STAGE, "data")),
            "storage_path": str(run.path("ray_results")),
            "fingerprints": fps,
            "max_failures": 2,
            "resources": res.model_dump(),
            "loop": {**ec.model_dump(), "base": cfg.models.base, "seed": cfg.run.seed},
        }
        log.info(
            "experts: training %d experts (%d at once): %s",
            len(todo),
            res.max_concurrent,
            ", ".join(todo),
        )
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_train_one, job=job), {"cpu": 0.01}),
            param_space={"skill": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(max_concurrent_trials=res.max_concurrent),
            run_config=tune.RunConfig(
                name="experts", storage_path=str(run.path("ray_results")), verbose=1
            ),
        )
        results = tuner.fit()
        failed = [r for r in results if r.error]
        if failed:
            raise RuntimeError(
                f"experts: {len(failed)} expert(s) failed: "
                + "; ".join(str(r.error) for r in failed)
            )
    summary = {s: (run.read_manifest(STAGE, s) or {}).get("metrics", {}) for s in skills}
    return {"experts": summary, "trained": todo, "skipped": not todo}
