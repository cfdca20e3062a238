"""The merge CLI and merging of adapter files by name: ``merge_adapters`` reads the inputs
with ``selma_ray.lora.files`` and merges them with a rule from ``selma_ray.lora.methods``.
``python -m selma_ray.merge --method ties --out DIR A B C``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selma_ray.core.lineage import file_sha256
from selma_ray.core.rundir import atomic_write_json
from selma_ray.lora import METHODS
from selma_ray.lora.files import DTYPES, merge_loaded, read_lora, weight_file

if TYPE_CHECKING:  # merge_math imports torch: load it only where maths happen
    from selma_ray.lora import methods as merge_math


def merge_adapters(
    inputs: dict[str, str],
    weights: dict[str, float] | None,
    out_dir: str,
    method: str = "paper",
    **options: Any,
) -> dict[str, Any]:
    """Merge adapter folders or files (by name) with ``method`` into ``out_dir``."""
    from selma_ray.lora.methods import check_weights

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
