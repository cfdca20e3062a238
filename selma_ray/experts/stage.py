"""Stage 3, experts: one LoRA expert per skill, all skills trained in parallel.

Each skill is one Ray Tune trial; the trial is a function that runs its own ``TorchTrainer``
(the documented Train V2 pattern for parallel trainers). Resources per expert and how many
run at once come from config. Each skill's images are split into train and validation rows;
every checkpoint reports the validation denoising loss, and the exported checkpoint is the
best by that loss or the last one. A finished expert is exported to ``experts/<skill>/``
(diffusers LoRA with metadata, a kohya-format copy, TensorBoard logs) with its own manifest,
so a re-run trains only unfinished skills, each resuming from its latest checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from selma_ray.config import SelmaConfig
from selma_ray.core import layout
from selma_ray.core.lineage import Lineage
from selma_ray.core.lora_io import WEIGHT_NAME
from selma_ray.core.rundir import RunDir, check_name
from selma_ray.experts import feed
from selma_ray.experts.recipe import read_attempts

log = logging.getLogger(__name__)
STAGE = layout.EXPERTS
KOHYA_SUFFIX = "_kohya.safetensors"
FAULT_DRILL_ENV = "SELMA_FAULT_DRILL"


def fault_drill() -> dict[str, int]:
    """Fault injection for tests, never a config key: ``SELMA_FAULT_DRILL=skill:step,...``
    makes one Train worker of that skill's expert raise once at that step."""
    spec = os.environ.get(FAULT_DRILL_ENV, "").strip()
    drill = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        skill, _, step = item.partition(":")
        if not step.isdigit():
            raise ValueError(f"{FAULT_DRILL_ENV}={spec!r}: use skill:step[,skill:step]")
        drill[skill] = int(step)
    return drill


def select_checkpoint(
    candidates: list[tuple[Any, dict]], latest: tuple[Any, dict], select: str
) -> tuple[Any, dict]:
    """The exported (checkpoint, metrics) among the kept ``candidates``: the lowest
    ``val_loss`` (the later step on ties) for ``best``, else ``latest``."""
    if select == "last":
        return latest
    scored = [(c, m) for c, m in candidates if m.get("val_loss") is not None]
    if not scored:
        raise RuntimeError("experts.select=best but no checkpoint reported a validation loss")
    return min(scored, key=lambda cm: (cm[1]["val_loss"], -cm[1].get("step", 0)))


def work_dir(skill: str, fp: str) -> str:
    """Per (skill, fingerprint) scratch on the run's storage: attempts, TensorBoard logs,
    samples, latent cache."""
    return f"ray_results/expert-work/{check_name(skill)}-{fp}"


def prepare_data(job: dict[str, Any], skill: str) -> dict[str, Any]:
    """One skill's training and validation sets as lazy Ray Datasets streamed from the run's
    storage (``selma_ray.experts.feed``). The driver receives the held-out keys and prompts,
    a row count and one hash per block, never the images; with ``cache_latents`` the latents
    are encoded once here, storage to storage."""
    from selma_ray.experts.data import native_resolution

    loop, run = job["loop"], RunDir.from_spec(job["run"])
    work = work_dir(skill, job["fingerprints"][skill])
    rows = feed.read_rows(run, job["images"][skill], job["members"][skill])
    count, data_hash = feed.scan(rows)
    if not count:
        raise RuntimeError(f"experts: no images for skill {skill!r} in the images stage's output")
    held_out, prompts = feed.split_validation(
        rows, count, loop["seed"], skill, loop["validation_fraction"], loop["validation_count"]
    )
    size = loop["resolution"] or native_resolution(loop["base"])
    workers = job["resources"]["workers_per_expert"]
    mode = feed.feed_mode(loop, count - len(held_out), workers, size)
    log.info(
        "experts: [%s] %d training and %d validation images (feed: %s)",
        skill,
        count - len(held_out),
        len(held_out),
        mode,
    )
    cache = (run, f"{work}/latents") if loop["cache_latents"] else None
    # The two executions above leave reference cycles that keep their read tasks (a few KiB
    # per image shard, owned by the driver) in the object store until Python's cyclic GC
    # runs, which a driver allocating little may not do for the whole stage: with many
    # skills they piled up (bench/data_scale_bench.py).
    gc.collect()
    return {
        "datasets": feed.training_datasets(rows, held_out, loop, cache),
        "data_hash": data_hash,
        "sample_prompts": prompts[: loop["sample_images"]],
        "feed_mode": mode,
    }


def _train_one(
    trial_config: dict[str, Any], job: dict[str, Any], data: dict[str, dict[str, Any]]
) -> None:
    """Tune trial: train one skill's expert with a TorchTrainer, then export it."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from selma_ray.core.logs import setup_logging
    from selma_ray.experts.recipe import train_expert

    setup_logging()
    skill, loop, prep = trial_config["skill"], job["loop"], data[trial_config["skill"]]
    fp, run = job["fingerprints"][skill], RunDir.from_spec(job["run"])
    work = work_dir(skill, fp)
    log.info("experts: [%s] training starts", skill)
    res = job["resources"]
    resources = {"CPU": res["cpus_per_worker"], **res["custom"]}
    if res["use_gpu"]:
        resources["GPU"] = 1
    best = loop["select"] == "best"
    trainer = TorchTrainer(
        train_expert,
        train_loop_config={
            **loop,
            "skill": skill,
            "fail_at_step": job["fault_drill"].get(skill),
            "work": {"run": run.spec, "prefix": work},
            "sample_prompts": prep["sample_prompts"],
            "feed_mode": prep["feed_mode"],
        },
        scaling_config=ScalingConfig(
            num_workers=res["workers_per_expert"],
            use_gpu=res["use_gpu"],
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            # One storage folder per (skill, fingerprint): a re-run of the same expert resumes
            # from its latest checkpoint; a changed config or data set starts afresh.
            name=f"expert-{skill}-{fp}",
            storage_path=run.key("ray_results"),
            storage_filesystem=run.fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=loop["keep_checkpoints"],
                checkpoint_score_attribute="val_loss" if best else None,
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=loop["max_failures"]),
            callbacks=[TuneReportCallback()],
        ),
        datasets=prep["datasets"],
        dataset_config=feed.data_config(loop),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"expert {skill}: training finished without a checkpoint")
    final = dict(result.metrics or {})
    chosen, chosen_metrics = select_checkpoint(
        list(result.best_checkpoints or []), (result.checkpoint, final), loop["select"]
    )
    info = {
        "skill": skill,
        "skills": job["members"][skill],  # the skills whose images it learned from
        "base_model": loop["base"],
        "rank": loop["rank"],
        "alpha": loop["alpha"],
        "steps": final.get("step"),
        "data_hash": prep["data_hash"],
        "select": loop["select"],
        "selected_step": chosen_metrics.get("step"),
        "selected_val_loss": chosen_metrics.get("val_loss"),
    }
    vals = [m["val_loss"] for _, m in result.best_checkpoints or [] if "val_loss" in m]
    metrics = {
        "step": final.get("step"),
        "final_loss": final.get("loss"),
        "loss": final.get("loss"),
        "best_val_loss": min(vals) if vals else None,
        "selected_step": chosen_metrics.get("step"),
        "resumed_from": final.get("resumed_from", 0),
        "steps_per_second": final.get("steps_per_second"),
        "skipped_steps": final.get("skipped_steps", 0),  # non-finite losses or gradients
        "feed": prep["feed_mode"],
    }
    export_expert(run, skill, chosen, fp, info, metrics, work, job.get("lineage", {}).get(skill))


def _metadata(info: dict[str, Any]) -> dict[str, str]:
    return {f"selma.{k}": json.dumps(v) for k, v in info.items()}


def write_kohya(weights: dict[str, Any], out: Path, alpha: float, meta: dict[str, str]) -> None:
    """The adapter in kohya-ss naming (``lora_unet_..._lora_down.weight``/``lora_up``/``alpha``)
    for AUTOMATIC1111, ComfyUI and other kohya-compatible tools."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    kohya = convert_state_dict_to_kohya(dict(weights))
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(float(alpha))
    rank = next(v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight"))
    meta = {**meta, "ss_network_module": "networks.lora", "ss_network_dim": str(rank)}
    meta["ss_network_alpha"] = str(alpha)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(out), metadata=meta)


def export_expert(
    run: RunDir,
    skill: str,
    checkpoint,
    fp: str,
    info: dict[str, Any],
    metrics: dict[str, Any],
    work: str | None = None,
    lineage: dict[str, Any] | None = None,
) -> None:
    """Write ``experts/<skill>/`` from the selected checkpoint (read from the run's storage):
    its adapter (diffusers format, with metadata), a kohya-format copy, TensorBoard logs and
    samples; then the manifest, last."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    check_name(skill)
    with tempfile.TemporaryDirectory(prefix=f"selma-export-{skill}-") as tmp_dir:
        tmp = Path(tmp_dir)
        with checkpoint.as_directory() as ckpt:
            with safe_open(str(Path(ckpt) / WEIGHT_NAME), framework="pt") as f:
                meta = dict(f.metadata() or {})
                weights = {k: f.get_tensor(k) for k in f.keys()}
        meta.update(_metadata(info))
        save_file(weights, str(tmp / WEIGHT_NAME), metadata=meta)
        write_kohya(weights, tmp / f"{skill}{KOHYA_SUFFIX}", info["alpha"], _metadata(info))
        for sub in ("logs", "samples"):
            if work is not None:
                run.get_dir(tmp / sub, work, sub)
        run.drop_manifest(STAGE, skill)  # un-commit before its files change
        run.put_dir(tmp, STAGE, skill)
    clean = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
    attempts = read_attempts(run, work) if work is not None else []
    adapter = f"{STAGE}/{skill}/{WEIGHT_NAME}"
    run.write_manifest(
        fp,
        STAGE,
        skill,
        skill=skill,
        metrics=clean,
        export=info,
        attempts=attempts,  # start step of each attempt: 0, then checkpoints resumed from
        adapter=run.url(adapter),
        lineage=lineage or {},
        outputs=run.outputs([adapter, f"{STAGE}/{skill}/{skill}{KOHYA_SUFFIX}"]),
    )
    log.info("experts: [%s] exported to %s (%s)", skill, run.url(STAGE, skill), clean)


def run_experts(cfg: SelmaConfig, run: RunDir, lineage: Lineage) -> dict[str, Any]:
    """Train every unfinished skill expert (and joint LoRA, ``experts.joint``) in parallel;
    returns the stage summary."""
    from ray import tune

    members = cfg.expert_units()
    skills = list(members)
    fps = lineage.units
    todo = [s for s in skills if not run.is_done(fps[s], STAGE, s)]
    for s in skills:
        if s not in todo:
            log.info("experts: [%s] finished earlier with the same inputs, skipping", s)
    if todo:
        ec, res = cfg.experts, cfg.resources.experts
        needed = sorted({skill for unit in todo for skill in members[unit]})
        files = feed.skill_files(run, layout.images_files(run), needed)
        job = {
            "run": run.spec,
            # A unit's shards: those of its skills (a joint LoRA's span several skills).
            "images": {u: sorted({f for s in members[u] for f in files[s]}) for u in todo},
            "members": {u: members[u] for u in todo},
            "fingerprints": fps,
            "lineage": lineage.inputs,
            "fault_drill": fault_drill(),
            "resources": res.model_dump(),
            "loop": {
                **ec.model_dump(),
                "base": cfg.models.base,
                "vae": cfg.models.vae,
                "seed": cfg.run.seed,
            },
        }
        log.info(
            "experts: training %d experts (%d at once): %s",
            len(todo),
            res.max_concurrent,
            ", ".join(todo),
        )
        data = {s: prepare_data(job, s) for s in todo}
        trial = tune.with_parameters(_train_one, job=job, data=data)
        tuner = tune.Tuner(
            tune.with_resources(trial, {"cpu": 0.01}),
            param_space={"skill": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(max_concurrent_trials=res.max_concurrent),
            run_config=tune.RunConfig(
                name="experts",
                storage_path=run.key("ray_results"),
                storage_filesystem=run.fs,
                # A trial whose process or Train controller was lost with its node runs
                # again and resumes from the expert's latest checkpoint in storage.
                failure_config=tune.FailureConfig(max_failures=ec.max_failures),
                verbose=1,
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
