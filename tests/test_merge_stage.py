"""The merge stage on a run directory: every method written, ``merged`` chosen by default or
by validation loss, served names, and one run through the Ray actor."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from selma_ray.config import load_config
from selma_ray.core import layout
from selma_ray.core.lora_io import WEIGHT_NAME, save_adapter
from selma_ray.core.rundir import RunDir
from selma_ray.diffusion.engine import find_adapters
from selma_ray.merge import stage as merge_stage
from selma_ray.merge.validate import validation_scores
from selma_ray.models import TINY_SD, TINY_SDXL, resolve
from selma_ray.pipeline import lineage, run_stage
from selma_ray.testing import commit_images

SKILLS = ["counting", "everyday_scenes"]


def make_run(root: Path, *overrides: str, base: str = TINY_SD, skills: list[str] = SKILLS):
    cfg = load_config(
        "tiny",
        [f"run.dir={root}", f"prompts.skills=[{', '.join(skills)}]", f"models.base={base}"]
        + list(overrides),
    )
    run = RunDir(root)
    run.write_text(cfg.to_yaml(), "config.yaml")
    unet = UNet2DConditionModel.from_pretrained(resolve(base), subfolder="unet")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(unet).items()}
    for i, skill in enumerate(skills):
        gen = torch.Generator().manual_seed(i)
        state = {k: torch.randn(s, generator=gen) * 0.3 for k, s in shapes.items()}
        save_adapter(run.path("experts", skill), state, config.to_dict())
        run.write_manifest("fp", "experts", skill)
    rng = torch.Generator().manual_seed(0)
    pngs = []
    for _ in range(4):
        pixels = (torch.rand(32, 32, 3, generator=rng) * 255).to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    table = pa.table(
        {"prompt": [f"{n} red apples" for n in range(4)], "image": pngs, "skill": SKILLS * 2}
    )
    (root / "images" / "data").mkdir(parents=True)
    pq.write_table(table, root / "images" / "data" / "part-0.parquet")
    commit_images(root)
    return cfg, run


def test_default_selection_writes_every_method_and_copies_the_default(tmp_path):
    cfg, run = make_run(tmp_path / "run", "merge.methods=[paper, cat, ties]", "merge.default=cat")
    info = merge_stage.merge_run(merge_stage.merge_job(cfg, run, "fp-test"))
    assert info["method"] == "cat" and info["selected_by"] == "default" and info["scores"] == {}
    assert info["adapter"] == str(run.path("merged", WEIGHT_NAME))
    assert sorted(info["merges"]) == ["cat", "paper", "ties"]
    merged_bytes = run.path("merged", WEIGHT_NAME).read_bytes()
    assert merged_bytes == run.path("merges", "cat", WEIGHT_NAME).read_bytes()
    for method in ("paper", "cat", "ties"):
        manifest = run.read_manifest("merges", method)
        assert manifest["method"] == method
        assert manifest["fingerprint"] == "fp-test"
        assert set(manifest["inputs"]) == set(SKILLS) and len(manifest["inputs"]["counting"]) == 64
        assert "score" not in manifest
    assert run.read_manifest("merges", "ties")["options"] == {"density": 0.5}
    assert run.read_manifest("merges", "ties")["weights"] == {s: 1.0 for s in SKILLS}
    assert run.read_manifest("merges", "paper")["weights"] == {s: 0.5 for s in SKILLS}


def test_validation_selection_picks_the_lowest_score_and_records_scores(tmp_path, monkeypatch):
    cfg, run = make_run(
        tmp_path / "run", "merge.methods=[paper, cat, ties]", "merge.select=validation"
    )
    fake = {"base": 1.0, "paper": 0.5, "cat": 0.2, "ties": 0.9}
    seen = {}

    def scorer(base, images_dir, adapters, samples, seed, device):
        seen.update(base=base, images=images_dir, adapters=adapters, samples=samples)
        return dict(fake)

    monkeypatch.setattr(merge_stage, "validation_scores", scorer)
    info = merge_stage.merge_run(merge_stage.merge_job(cfg, run, "fp-test"))
    assert info["method"] == "cat" and info["selected_by"] == "validation"
    assert info["scores"] == fake
    assert seen["base"] == "tiny-sd" and seen["samples"] == cfg.merge.val_samples
    assert seen["images"][1] == layout.images_files(run)
    assert set(seen["adapters"]) == {"paper", "cat", "ties"}
    assert run.read_manifest("merges", "ties")["score"] == 0.9
    merged_bytes = run.path("merged", WEIGHT_NAME).read_bytes()
    assert merged_bytes == run.path("merges", "cat", WEIGHT_NAME).read_bytes()

    run.write_manifest("fp", "merged", **info)
    found = find_adapters(run)
    assert {"merged", "merged-paper", "merged-cat", "merged-ties"} <= set(found)
    assert found["merged-cat"].kind == "merged" and found["merged-cat"].rank == 8


def test_real_validation_scores_on_tiny_sd_pick_the_lowest_and_are_deterministic(tmp_path):
    cfg, run = make_run(
        tmp_path / "run",
        "merge.methods=[paper, cat]",
        "merge.select=validation",
        "merge.val_samples=3",
    )
    info = merge_stage.merge_run(merge_stage.merge_job(cfg, run, "fp-test"))
    scores = info["scores"]
    assert set(scores) == {"base", "paper", "cat"}
    assert all(math.isfinite(v) and v > 0 for v in scores.values())
    assert scores["paper"] != scores["base"] and scores["cat"] != scores["paper"]
    assert info["method"] == min(["paper", "cat"], key=scores.get)
    adapters = {m: str(run.path("merges", m)) for m in ("paper", "cat")}
    again = validation_scores(
        TINY_SD, (run, layout.images_files(run)), adapters, 3, cfg.merge.seed, "cpu"
    )
    assert again == scores


@pytest.mark.parametrize("base", [TINY_SD, TINY_SDXL])
def test_merge_validation_scores_with_the_experts_own_validation_objective(tmp_path, base):
    """For the base model, merge validation's loss equals an expert trainer's validation loss
    on the same images (a fresh LoRA adds nothing), SD and SDXL alike: one shared objective."""
    from selma_ray.experts.data import preprocess_batch
    from selma_ray.experts.recipe import ExpertTrainer

    cfg, run = make_run(tmp_path / "run", "merge.methods=[paper, cat]", base=base)
    adapters = {m: str(run.path("merges", m)) for m in ("paper", "cat")}
    merge_stage.merge_run(merge_stage.merge_job(cfg, run, "fp-test"))
    scores = validation_scores(base, (run, layout.images_files(run)), adapters, 4, 7, "cpu")
    assert all(math.isfinite(v) and v > 0 for v in scores.values())
    assert len(set(scores.values())) == 3  # each merge changes the loss

    table = pq.read_table(run.path("images", "data", "part-0.parquet"))
    order = torch.randperm(4, generator=torch.Generator().manual_seed(7)).tolist()
    rows = {k: [table.column(k)[i].as_py() for i in order] for k in ("prompt", "image")}
    loop = {**cfg.experts.model_dump(), "base": base, "seed": 7, "lora_init": "gaussian"}
    trainer = ExpertTrainer(loop)
    trainer.set_validation([preprocess_batch(rows, base, 32, "center", False)])
    assert trainer.validation_loss() == pytest.approx(scores["base"], rel=1e-5)


def test_cuda_without_gpu_resources_is_refused_before_starting_an_actor(tmp_path):
    cfg, run = make_run(tmp_path / "run", "merge.device=cuda")
    with pytest.raises(ValueError, match="resources.merge.num_gpus"):
        run_stage("merge", cfg, run)


def test_run_merge_in_a_ray_actor_then_skips_and_drops_stale_methods(tmp_path):
    import ray

    cfg, run = make_run(tmp_path / "run", "merge.methods=[paper, svd]", "merge.svd_rank=2")
    stale = run.path("merges", "dare_ties")
    stale.mkdir(parents=True)
    (stale / "manifest.json").write_text(json.dumps({"fingerprint": "old"}))
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        first = run_stage("merge", cfg, run)
        again = run_stage("merge", cfg, run)
    finally:
        ray.shutdown()
    assert first["method"] == "paper" and first["adapter"] == str(run.path("merged", WEIGHT_NAME))
    assert run.read_manifest("merged")["fingerprint"] == lineage("merge", cfg, run).fingerprint
    assert run.read_manifest("merges", "svd")["r"] == 2
    assert not stale.exists()
    assert again["skipped"] is True and again["method"] == "paper"


def test_a_subset_merge_is_the_default_method_over_its_experts_only_and_goes_when_dropped(
    tmp_path,
):
    import ray
    from safetensors.torch import load_file

    skills = [*SKILLS, "dense_detail"]
    pair = "merge.subsets={pair: [counting, everyday_scenes]}"
    cfg, run = make_run(tmp_path / "run", pair, skills=skills)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        run_stage("merge", cfg, run)
        assert "merged-pair" in find_adapters(run) and "merged-paper" in find_adapters(run)
        weights = {
            n: load_file(run.path(*p, WEIGHT_NAME))
            for n, p in {
                "pair": ("merges", "pair"),
                "all": ("merged",),
                **{s: ("experts", s) for s in skills},
            }.items()
        }
        key = next(k for k in weights["pair"] if "lora_A" in k or "lora.down" in k)
        mean = (weights["counting"][key] + weights["everyday_scenes"][key]) / 2
        assert torch.allclose(weights["pair"][key], mean, atol=1e-6)  # paper: mean of the A's
        assert not torch.allclose(weights["all"][key], mean, atol=1e-3)  # all three differ
        dropped = load_config("tiny", [*_overrides(cfg), "merge.subsets={}"])
        run_stage("merge", dropped, run)
    finally:
        ray.shutdown()
    assert "merged-pair" not in find_adapters(run)
    assert not run.path("merges", "pair").exists()


def _overrides(cfg) -> list[str]:
    return [f"run.dir={cfg.run.dir}", f"prompts.skills=[{', '.join(cfg.prompts.skills)}]"]
