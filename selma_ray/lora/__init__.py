"""LoRA merging, shared by the merge stage and serving (which merges experts on demand).

The method names live here, light to import (no torch): the config schema and the request
models read them. ``selma_ray.lora.methods`` implements the rules as pure functions over
in-memory adapters; ``selma_ray.lora.files`` reads SD LoRA files into them and writes merges.
"""

from typing import Literal, get_args

Method = Literal["paper", "cat", "svd", "ties", "dare_linear", "dare_ties"]
METHODS: tuple[str, ...] = get_args(Method)
_DARE = ("density", "seed")
# The settings each method's result depends on (the others are ignored).
OPTIONS: dict[str, tuple[str, ...]] = {
    "svd": ("rank",),
    "ties": ("density",),
    "dare_linear": _DARE,
    "dare_ties": _DARE,
}
