"""Reading and writing UNet LoRA adapters in the diffusers safetensors format.

Adapters are stored exactly as ``StableDiffusionPipeline.save_lora_weights`` writes them
(``unet.<module>.lora_A.weight`` / ``lora_B.weight`` with the LoRA config in the file's
metadata), so ``pipe.load_lora_weights(dir)`` loads them in plain diffusers. Only
safetensors files are ever read.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from selma_ray.core.rundir import replace_dir

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_META_KEY = "lora_adapter_metadata"


def save_adapter(out_dir: Path, unet_state: dict[str, Any], lora_config: dict[str, Any]) -> Path:
    """Write a UNet LoRA (peft-format keys, without the ``unet.`` prefix) into ``out_dir``.

    The folder is written next to its final place and moved in when complete.
    """
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lora_config.items()}
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers={k: v.detach().contiguous() for k, v in unet_state.items()},
            unet_lora_adapter_metadata=config,
            safe_serialization=True,
        )
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / WEIGHT_NAME


def adapter_file(path: Path) -> Path:
    """The safetensors file of an adapter folder (or the file itself); refuses other formats."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: adapters are only loaded from .safetensors files")
    if not path.is_file():
        raise FileNotFoundError(f"no adapter at {path}")
    return path


def load_adapter(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load an adapter as (UNet LoRA state dict without the ``unet.`` prefix, LoRA config)."""
    from safetensors import safe_open

    state, config = {}, {}
    with safe_open(str(adapter_file(path)), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            if key.startswith("unet."):
                state[key[len("unet.") :]] = f.get_tensor(key)
    if _META_KEY in meta:
        config = json.loads(meta[_META_KEY])
        config = {k.removeprefix("unet."): v for k, v in config.items()}
    if not state:
        raise ValueError(f"{path}: no UNet LoRA weights found (keys must start with 'unet.')")
    return state, config


MAX_HEADER = 100 << 20  # the safetensors format's own limit on its JSON header


def header_config(stream: Any) -> dict[str, Any]:
    """The LoRA config in a safetensors file's header, read from a binary ``stream`` (a local
    file or a ranged read from object storage): only the header's bytes are read."""
    size = int.from_bytes(stream.read(8), "little")
    if not 0 < size <= MAX_HEADER:
        raise ValueError("not a safetensors file (bad header size)")
    header = json.loads(stream.read(size))
    meta = header.get("__metadata__") or {}
    config = json.loads(meta.get(_META_KEY, "{}"))
    return {k.removeprefix("unet."): v for k, v in config.items()}
