"""Stage 4, merge. The method names live here, light to import: the config schema reads them,
``selma_ray.merge.methods`` implements them."""

from typing import Literal, get_args

Method = Literal["paper", "cat", "svd", "ties", "dare_linear", "dare_ties"]
METHODS: tuple[str, ...] = get_args(Method)
