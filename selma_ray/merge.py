"""Stage 4, merge: a Ray actor merges the skill experts; also a CLI for any SD LoRAs.

The rules are pure functions in ``selma_ray.merge_math``; this module reads and writes
adapters and runs the stage. Each method in ``merge.methods`` goes to ``merges/<method>/``
(the experts' diffusers LoRA format, with a manifest: method, weights, input sha256, score).
``merged/`` gets ``merge.default`` or, with ``merge.select=validation``, the method with the
lowest denoising loss on a fixed sample of the run's images.

CLI for any SD LoRA safetensors (diffusers, kohya ``lora_unet_*``, old ``lora.down``/``up``):
``python -m selma_ray.merge --method ties --out DIR A B C``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selma_ray import experts as experts_stage
from selma_ray import images as images_stage
from selma_ray.config import SelmaConfig
from selma_ray.lora_io import WEIGHT_NAME, adapter_file, load_adapter, save_adapter
from selma_ray.rundir import RunDir, atomic_write_json, replace_dir

if TYPE_CHECKING:  # merge_math imports torch: load it only where maths happen
    from selma_ray import merge_math

log = logging.getLogger(__name__)
STAGE = "merged"
MERGES = "merges"
DTYPES = ("float32", "float16", "bfloat16")
_DARE = ("density", "seed")  # the settings each method's result depends on
OPTIONS = {"svd": ("rank",), "ties": ("density",), "dare_linear": _DARE, "dare_ties": _DARE}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weight_file(path: str | Path) -> Path:
    """An adapter's safetensors file: the file itself, or the folder's only one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no adapter at {path}")
    if path.is_dir() and not (path / WEIGHT_NAME).exists():
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
    return adapter_file(path)


def read_lora(path: str | Path) -> tuple[merge_math.Adapter, dict[str, Any] | None]:
    """The UNet part of an SD LoRA (safetensors only) as an adapter, plus its LoRA config."""
    from safetensors import safe_open

    from selma_ray import merge_math

    file = weight_file(path)
    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
    if any(k.startswith("unet.") and ".lora_A." in k for k in keys):
        state, config = load_adapter(file)
        return merge_math.from_state(state, config or None), config or None
    return _read_foreign(file), None


def _read_foreign(file: Path) -> merge_math.Adapter:
    """kohya or old-diffusers keys, normalised by diffusers itself (from tensors, no pickle)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    from selma_ray import merge_math

    state, alphas = StableDiffusionPipeline.lora_state_dict(load_file(str(file)))
    # Old attention-processor files hold the UNet only, without a prefix.
    prefixed = any(k.startswith(("unet.", "text_encoder")) for k in state)
    unet = {
        k.removeprefix("unet."): v for k, v in state.items() if k[:5] == "unet." or not prefixed
    }
    if not unet:
        raise ValueError(f"{file}: no UNet LoRA weights found (only text-encoder ones?)")
    if len(unet) < len(state):
        log.info("%s: ignoring %d text-encoder tensors", file.name, len(state) - len(unet))
    if not any(".lora_A." in k for k in unet):
        unet = convert_unet_state_dict_to_peft(unet)
    unet_alphas = {}  # keys: unet.<module>[.processor.to_q_lora.down.weight].alpha
    for key, alpha in (alphas or {}).items():
        if key.startswith("unet."):
            (name,) = convert_unet_state_dict_to_peft({key[5:].removesuffix(".alpha"): 0})
            unet_alphas[name.split(".lora_A")[0]] = float(alpha)
    return merge_math.from_state(unet, None, unet_alphas or None)


def merged_config(
    configs: list[dict[str, Any] | None], adapter: merge_math.Adapter, r: int, alpha: float
) -> dict[str, Any]:
    """LoRA config of a merged adapter: the first input's, with the new rank and scale."""
    targets = [(c or {}).get("target_modules") for c in configs]
    if all(isinstance(t, list) and t for t in targets):
        target_modules = sorted(set().union(*targets))
    else:  # foreign inputs: name every merged module in full
        target_modules = sorted(adapter)
    base = next((c for c in configs if c), {})
    return {
        **base,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "target_modules": target_modules,
    }


def merge_loaded(
    loaded: dict[str, tuple[merge_math.Adapter, dict[str, Any] | None]],
    shas: dict[str, str],
    method: str,
    weights: dict[str, float] | None,
    out_dir: Path,
    *,
    density: float = 0.5,
    rank: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Merge loaded adapters with one method into ``out_dir``; returns what was done."""
    import torch

    from selma_ray import merge_math

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("merge.device=cuda but no CUDA device is visible to this process")
    names = list(loaded)
    w = merge_math.check_weights(names, weights, method)
    merged = merge_math.merge(
        [loaded[n][0] for n in names],
        w,
        method,
        density=density,
        rank=rank,
        seed=seed,
        device=device,
        dtype=getattr(torch, dtype),
    )
    state, r, alpha = merge_math.to_state(merged, getattr(torch, dtype))
    path = save_adapter(
        out_dir, state, merged_config([c for _, c in loaded.values()], merged, r, alpha)
    )
    given = {"density": density, "seed": seed, "rank": rank}
    return {
        "method": method,
        "weights": dict(zip(names, w, strict=True)),
        "inputs": shas,
        "adapter": str(path),
        "r": r,
        "lora_alpha": alpha,
        "dtype": dtype,
        "options": {k: given[k] for k in OPTIONS.get(method, ())},
    }


def merge_adapters(
    inputs: dict[str, str],
    weights: dict[str, float] | None,
    out_dir: str,
    method: str = "paper",
    **options: Any,
) -> dict[str, Any]:
    """Merge adapter folders or files (by name) with ``method`` into ``out_dir``."""
    from selma_ray.merge_math import METHODS, check_weights

    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {list(METHODS)}")
    check_weights(list(inputs), weights, method)  # fail before loading anything
    loaded = {n: read_lora(p) for n, p in inputs.items()}
    shas = {n: file_sha256(weight_file(p)) for n, p in inputs.items()}
    return merge_loaded(loaded, shas, method, weights, Path(out_dir), **options)


def validation_scores(
    base: str, images_dir: Path, adapters: dict[str, str], samples: int, seed: int, device: str
) -> dict[str, float]:
    """Denoising loss (lower is better) of each adapter, and of ``base`` without one, on a
    seeded sample of the run's images at fixed timesteps with fixed noise."""
    import pyarrow.dataset as pads
    import torch
    from diffusers import DDPMScheduler, DiffusionPipeline

    from selma_ray.models import resolve
    from selma_ray.training import decode_images

    table = pads.dataset(str(images_dir), format="parquet").to_table(columns=["prompt", "image"])
    if table.num_rows == 0:
        raise RuntimeError(f"merge: no images in {images_dir} to score the merges on")
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(table.num_rows, generator=gen)[:samples].tolist()
    pipe = DiffusionPipeline.from_pretrained(resolve(base)).to(device)
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise NotImplementedError(f"{base}: validation selection does not support SDXL yet")
    pipe.set_progress_bar_config(disable=True)
    unet, scheduler = pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
    size = unet.config.sample_size * pipe.vae_scale_factor
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.tensor([steps // 10, steps * 3 // 10, steps // 2, steps * 7 // 10])
    with torch.no_grad():
        pixels = decode_images(table.column("image").take(rows).to_pylist(), size).to(device)
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(
            [str(p) for p in table.column("prompt").take(rows).to_pylist()],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        hidden = pipe.text_encoder(ids.to(device))[0]
    n, t = len(rows), timesteps.repeat_interleave(len(rows)).to(device)
    latents, hidden = latents.repeat(len(timesteps), 1, 1, 1), hidden.repeat(len(timesteps), 1, 1)
    noise = torch.randn(latents.shape, generator=gen).to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, t) if v_pred else noise

    def loss() -> float:
        with torch.no_grad():
            total = 0.0
            for i in range(0, len(t), n):  # one image batch per timestep
                pred = unet(noisy[i : i + n], t[i : i + n], encoder_hidden_states=hidden[i : i + n])
                total += torch.nn.functional.mse_loss(pred.sample.float(), target[i : i + n]).item()
            return total / len(timesteps)

    scores = {"base": loss()}
    for name, path in adapters.items():
        pipe.load_lora_weights(path, weight_name=WEIGHT_NAME, adapter_name=name)
        pipe.set_adapters([name])
        scores[name] = loss()
        pipe.delete_adapters(name)
    return scores


def merge_run(job: dict[str, Any]) -> dict[str, Any]:
    """Write every configured merge of a run and choose ``merged``; returns its manifest info."""
    run = RunDir(job["run_dir"])
    inputs, methods = job["inputs"], job["methods"]
    loaded = {n: read_lora(p) for n, p in inputs.items()}
    shas = {n: file_sha256(weight_file(p)) for n, p in inputs.items()}
    done = {}
    for method in methods:
        out = run.path(MERGES, method)
        done[method] = merge_loaded(loaded, shas, method, job["weights"], out, **job["options"])
        log.info("merge: %s of %d experts -> %s", method, len(inputs), out)
    del loaded
    scores: dict[str, float] = {}
    chosen = job["default"]
    if job["select"] == "validation":
        paths = {m: str(run.path(MERGES, m)) for m in methods}
        images = run.path(images_stage.STAGE, "data")
        opts = job["options"]
        scores = validation_scores(
            job["base"], images, paths, job["samples"], opts["seed"], opts["device"]
        )
        chosen = min(methods, key=lambda m: scores[m])
        log.info("merge: validation losses %s -> %s", scores, chosen)
    for method, info in done.items():
        extra = {"score": scores[method]} if method in scores else {}
        run.write_manifest(job["fingerprint"], MERGES, method, **info, **extra)
    tmp = Path(tempfile.mkdtemp(prefix=f".{STAGE}.", dir=run.root))
    try:
        shutil.copy2(run.path(MERGES, chosen, WEIGHT_NAME), tmp / WEIGHT_NAME)
        replace_dir(tmp, run.path(STAGE))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        **done[chosen],
        "adapter": str(run.path(STAGE, WEIGHT_NAME)),
        "selected_by": job["select"],
        "scores": scores,
        "merges": {m: info["adapter"] for m, info in done.items()},
    }


class MergeActor:
    """Ray actor that merges on the resources given to it (CPU by default)."""

    def __init__(self) -> None:
        from selma_ray.logs import setup_logging

        setup_logging()

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        return merge_run(job)


def fingerprint(cfg: SelmaConfig) -> str:
    experts = {s: experts_stage.fingerprint(cfg, s) for s in cfg.prompts.skills}
    return cfg.fingerprint("merge", extra={"experts": experts})


def merge_job(cfg: SelmaConfig, run: RunDir) -> dict[str, Any]:
    """What ``merge_run`` needs, as plain data for the actor."""
    mc = cfg.merge
    return {
        "run_dir": str(run.root),
        "inputs": {s: str(run.path(experts_stage.STAGE, s)) for s in cfg.prompts.skills},
        "methods": list(mc.methods),
        "default": mc.default,
        "select": mc.select,
        "weights": mc.weights,
        "options": {
            "rank": mc.svd_rank,
            **mc.model_dump(include={"density", "seed", "device", "dtype"}),
        },
        "base": cfg.models.base,
        "samples": mc.val_samples,
        "fingerprint": fingerprint(cfg),
    }


def run_merge(cfg: SelmaConfig, run: RunDir) -> dict[str, Any]:
    """Write every configured merge of this run's experts and ``merged/``; returns the summary."""
    import ray

    fp = fingerprint(cfg)
    if run.is_done(fp, STAGE):
        log.info("merge: finished earlier with the same config, skipping")
        return {**(run.read_manifest(STAGE) or {}), "skipped": True}
    res = cfg.resources.merge
    if cfg.merge.device == "cuda" and res.num_gpus <= 0:
        raise ValueError("merge.device=cuda needs resources.merge.num_gpus > 0")
    merges_dir = run.path(MERGES)
    if merges_dir.is_dir():  # merges of methods no longer configured would be served stale
        for old in merges_dir.iterdir():
            if old.name not in cfg.merge.methods:
                shutil.rmtree(old, ignore_errors=True)
    actor = ray.remote(MergeActor).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus).remote()
    try:
        info = ray.get(actor.run.remote(merge_job(cfg, run)))
    finally:
        ray.kill(actor)
    log.info("merge: 'merged' is %s (%s) -> %s", info["method"], cfg.merge.select, info["adapter"])
    return run.write_manifest(fp, STAGE, **info)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input)."""
    from selma_ray.logs import setup_logging
    from selma_ray.merge_math import METHODS

    parser = argparse.ArgumentParser(
        prog="python -m selma_ray.merge",
        description="Merge the UNet part of diffusers-format Stable Diffusion LoRAs "
        "(safetensors; kohya and old diffusers keys too) into one diffusers LoRA.",
    )
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER", help="folder or .safetensors")
    parser.add_argument("--method", choices=METHODS, default="paper")
    parser.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    parser.add_argument("--weights", help="comma-separated, one per adapter (default: per method)")
    parser.add_argument("--density", type=float, default=0.5, help="ties/dare keep fraction")
    parser.add_argument("--rank", type=int, default=None, help="svd rank (default: max input)")
    parser.add_argument("--seed", type=int, default=0, help="DARE drop-mask seed")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    try:
        if len(set(args.adapters)) != len(args.adapters):
            raise ValueError("an adapter is given twice")
        weights = None
        if args.weights:
            values = args.weights.split(",")
            if len(values) != len(args.adapters):
                raise ValueError(f"{len(values)} weights for {len(args.adapters)} adapters")
            try:
                weights = dict(zip(args.adapters, map(float, values), strict=True))
            except ValueError:
                raise ValueError(f"--weights must be numbers, got {args.weights!r}") from None
        options = {k: getattr(args, k) for k in ("density", "rank", "seed", "device", "dtype")}
        info = merge_adapters(
            {a: a for a in args.adapters}, weights, args.out, args.method, **options
        )
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write_json(Path(args.out) / "manifest.json", info)
    print(f"{args.method} merge of {len(args.adapters)} adapters (rank {info['r']}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
