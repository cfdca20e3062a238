"""Merging adapter files: read any SD LoRA safetensors (diffusers, kohya ``lora_unet_*``, old
``lora.down``/``up`` keys), merge with a rule from ``selma_ray.merge.methods``, write a
diffusers LoRA. Also the CLI: ``python -m selma_ray.merge --method ties --out DIR A B C``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selma_ray.core.lineage import file_sha256
from selma_ray.core.lora_io import WEIGHT_NAME, adapter_file, load_adapter, save_adapter
from selma_ray.core.rundir import atomic_write_json

if TYPE_CHECKING:  # merge_math imports torch: load it only where maths happen
    from selma_ray.merge import methods as merge_math

log = logging.getLogger(__name__)
DTYPES = ("float32", "float16", "bfloat16")
_DARE = ("density", "seed")  # the settings each method's result depends on
OPTIONS = {"svd": ("rank",), "ties": ("density",), "dare_linear": _DARE, "dare_ties": _DARE}


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

    from selma_ray.merge import methods as merge_math

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

    from selma_ray.merge import methods as merge_math

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

    from selma_ray.merge import methods as merge_math

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
    from selma_ray.merge.methods import METHODS, check_weights

    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {list(METHODS)}")
    check_weights(list(inputs), weights, method)  # fail before loading anything
    loaded = {n: _read_named(p) for n, p in inputs.items()}
    shas = {n: file_sha256(weight_file(p)) for n, p in inputs.items()}
    try:
        return merge_loaded(loaded, shas, method, weights, Path(out_dir), **options)
    except ValueError as e:  # a layer's shapes or ranks: say which input has which
        ranks = ", ".join(
            f"{p} (rank {max(m.rank for m in loaded[n][0].values())})" for n, p in inputs.items()
        )
        raise ValueError(f"{e} [inputs: {ranks}]") from e


def _read_named(path: str) -> tuple[merge_math.Adapter, dict[str, Any] | None]:
    """``read_lora``, with any error about the file's content naming the file."""
    from safetensors import SafetensorError

    try:
        return read_lora(path)
    except FileNotFoundError:
        raise  # already names the path
    except (SafetensorError, ValueError, OSError, KeyError) as e:
        raise ValueError(f"{path}: cannot be read as a LoRA: {e}") from e


# The CLI options only some methods use.
OPTION_USERS = {
    "density": ("ties", "dare_linear", "dare_ties"),
    "rank": ("svd",),
    "seed": ("dare_linear", "dare_ties"),
}


def check_out(out: str, adapters: list[str], force: bool) -> None:
    """Refuses an ``--out`` that would destroy data: an input, a folder inside one or holding
    one, a file, or (without ``force``) a non-empty folder."""
    target = Path(out).resolve()
    for name in adapters:
        source = Path(name).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ValueError(
                f"--out {out} is the input {name}, inside it or holds it; choose another folder"
            )
    if target.exists() and not target.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise ValueError(f"--out {out} is a folder that is not empty; pass --force to replace it")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input)."""
    from selma_ray.core.logs import setup_logging
    from selma_ray.merge.methods import METHODS

    parser = argparse.ArgumentParser(
        prog="python -m selma_ray.merge",
        description="Merge the UNet part of diffusers-format Stable Diffusion LoRAs "
        "(safetensors; kohya and old diffusers keys too) into one diffusers LoRA.",
    )
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER", help="folder or .safetensors")
    parser.add_argument("--method", choices=METHODS, default="paper")
    parser.add_argument("--out", required=True, help="output folder, new or empty")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--weights", help="comma-separated, one per adapter (default: per method)")
    parser.add_argument("--density", type=float, help="ties/dare keep fraction (default 0.5)")
    parser.add_argument("--rank", type=int, default=None, help="svd rank (default: max input)")
    parser.add_argument("--seed", type=int, help="DARE drop-mask seed (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    for flag, users in OPTION_USERS.items():
        if getattr(args, flag) is not None and args.method not in users:
            print(
                f"warning: --{flag} is not used by --method {args.method} (only by "
                f"{', '.join(users)}); ignored",
                file=sys.stderr,
            )
    args.density = 0.5 if args.density is None else args.density
    args.seed = 0 if args.seed is None else args.seed
    try:
        if len(set(args.adapters)) != len(args.adapters):
            raise ValueError("an adapter is given twice")
        check_out(args.out, args.adapters, args.force)
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda, but no CUDA device is visible to this process")
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
