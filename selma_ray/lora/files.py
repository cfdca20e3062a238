"""Adapter files for merging: read any SD LoRA safetensors (diffusers, kohya ``lora_unet_*``,
old ``lora.down``/``up`` keys) into an in-memory adapter, merge loaded adapters with a rule
from ``selma_ray.lora.methods`` and write the result as a diffusers LoRA. The merge stage and
serving's on-demand merges both use it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selma_ray.core.lora_io import WEIGHT_NAME, adapter_file, load_adapter, save_adapter
from selma_ray.lora import OPTIONS

if TYPE_CHECKING:  # merge_math imports torch: load it only where maths happen
    from selma_ray.lora import methods as merge_math

log = logging.getLogger(__name__)
DTYPES = ("float32", "float16", "bfloat16")


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

    from selma_ray.lora import methods as merge_math

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

    from selma_ray.lora import methods as merge_math

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

    from selma_ray.lora import methods as merge_math

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
