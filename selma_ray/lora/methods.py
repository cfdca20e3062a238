"""LoRA merge rules as pure functions over in-memory adapters (no pipeline, no files).

An adapter is ``{module name: LoraModule(A, B, scale)}``; it changes module ``m`` by
``dW = scale * B @ A`` with A of shape (r, in[, k, k]) and B of shape (out, r[, 1, 1]), and
``scale = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). Every rule takes adapters and one
weight per adapter, computes in float32 on the chosen device and returns a new adapter.

- ``paper`` (SELMA Sec. 3.4): A = sum w_i A_i and B = sum w_i B_i. Equal ranks needed, rank
  kept, scale kept when the adapters share it (otherwise sqrt(scale_i) is folded into both
  factors first). Its dW has cross terms B_i A_j: it is *not* the mean of the experts' dW.
- ``cat``: the exact sum_i w_i dW_i, with w_i * scale_i folded into A_i and the factors
  concatenated (rank = sum of ranks).
- ``svd``: the same exact sum, re-factorised by a truncated SVD to ``rank`` (default: the
  largest input rank); exact when ``rank`` >= the sum of ranks.
- ``ties``, ``dare_linear``, ``dare_ties``: peft's ``add_weighted_adapter`` rules of the same
  names. Like peft they work in *factor space*: A's and B's are merged separately (so equal
  ranks are needed), each with factor weights sqrt(w_i * scale_i) (the sign goes on A).
  ties trims each factor to its ``density`` largest magnitudes, elects a sign per entry from
  the sum of the trimmed factors and averages the weighted entries that agree with it (the
  disjoint mean). DARE keeps each entry with probability ``density`` and rescales by
  1/density; the drop masks (float32 uniforms from numpy's PCG64, on the CPU) are seeded per
  (seed, module, factor, adapter), so a merge is reproducible whatever the order or device.
  dare_linear then sums, dare_ties elects signs.

Outputs of every rule but ``paper`` have scale 1 (``lora_alpha == r``), so diffusers applies
exactly the merged dW. Default weights (``default_weights``) are those for which N copies of
one adapter merge back into it; explicit weights are used as given.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from selma_ray.core.seeds import stable_seed
from selma_ray.lora import METHODS

log = logging.getLogger(__name__)

FACTOR_SPACE = ("paper", "ties", "dare_linear", "dare_ties")  # need equal ranks
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}


@dataclass(frozen=True)
class LoraModule:
    """One module's LoRA factors and scale: the module changes by ``scale * B @ A``."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


Adapter = dict[str, LoraModule]


def delta_weight(module: LoraModule) -> torch.Tensor:
    """The module's weight update ``scale * B @ A`` in float32 (conv shapes kept)."""
    a, b = module.A.float(), module.B.float()
    delta = b.reshape(b.shape[0], b.shape[1]) @ a.reshape(a.shape[0], -1)
    return (module.scale * delta).reshape(b.shape[0], *a.shape[1:])


def default_weights(method: str, n: int) -> list[float]:
    """Weights for which N copies of one adapter merge back into it (at density 1)."""
    if n < 1:
        raise ValueError("merge needs at least one adapter")
    if method in ("ties", "dare_ties"):
        return [1.0] * n  # the disjoint mean already averages
    if method == "dare_linear":
        return [1.0 / n**2] * n  # sqrt(w) per factor: each factor becomes a mean
    return [1.0 / n] * n


def check_weights(
    names: Sequence[str], weights: dict[str, float] | None, method: str = "paper"
) -> list[float]:
    """Per-adapter weights in ``names`` order; None means ``default_weights(method)``."""
    if not names:
        raise ValueError("merge needs at least one adapter")
    if weights is None:
        return default_weights(method, len(names))
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"merge weights name unknown adapters {unknown}; adapters: {list(names)}")
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"merge weights are missing for {missing}; give one weight per adapter")
    values = [float(weights[n]) for n in names]
    _check_values(values)
    return values


def _check_values(values: Sequence[float]) -> None:
    if not values:
        raise ValueError("merge needs at least one weight")
    if not all(math.isfinite(w) and w >= 0 for w in values) or sum(values) <= 0:
        raise ValueError(f"merge weights must be >= 0 and not all zero, got {list(values)}")


# ---------------------------------------------------------------- state dicts <-> adapters


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank/alpha pattern lookup: a key matches a module name or its dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scale(module: str, rank: int, config: dict[str, Any] | None, alpha: float | None) -> float:
    if alpha is not None:  # kohya-style network alpha
        return float(alpha) / rank
    if not config:  # no metadata: diffusers takes lora_alpha = r
        return 1.0
    lora_alpha = _pattern_value(
        config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)
    )
    root = math.sqrt(rank) if config.get("use_rslora") else rank
    return float(lora_alpha) / root


def from_state(
    state: dict[str, torch.Tensor],
    config: dict[str, Any] | None = None,
    alphas: dict[str, float] | None = None,
) -> Adapter:
    """A peft-format UNet LoRA state dict (``<module>.lora_A.weight`` ...) as an adapter.

    The scale comes from ``alphas`` (per module, kohya style) or the LoRA config (lora_alpha,
    alpha_pattern, use_rslora); with neither it is 1, as in diffusers.
    """
    factors: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, value in state.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            other.append(key)
            continue
        factors.setdefault(key[: -len(suffix)], {})[_SUFFIXES[suffix]] = value
    if other:
        raise ValueError(
            f"unsupported LoRA keys (e.g. {sorted(other)[:3]}): only plain LoRA factors "
            "lora_A/lora_B can be merged (not DoRA magnitudes or LoRA biases)"
        )
    if config and config.get("use_dora"):
        raise ValueError("DoRA adapters cannot be merged: their magnitude vectors are not LoRA")
    adapter = {}
    for name, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{name}: has lora_{'A' if 'A' in pair else 'B'} but not its partner")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} differ")
        alpha = None if alphas is None else alphas.get(name)
        adapter[name] = LoraModule(a, b, _scale(name, a.shape[0], config, alpha))
    if not adapter:
        raise ValueError("no LoRA factors found in the state dict")
    return adapter


def to_state(
    adapter: Adapter, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], int, float]:
    """``(state dict, r, lora_alpha)`` with one rank and one scale for every module.

    Modules of lower rank are padded with zero factors, and if the scales differ each module's
    sqrt(scale) is folded into both factors (then lora_alpha == r); dW is unchanged.
    """
    if not adapter:
        raise ValueError("empty adapter")
    rank = max(m.rank for m in adapter.values())
    scales = {m.scale for m in adapter.values()}
    scale = scales.pop() if len(scales) == 1 else 1.0
    state = {}
    for name, m in adapter.items():
        a, b = m.A, m.B
        if m.scale != scale:
            root = math.sqrt(m.scale)
            a, b = a.float() * root, b.float() * root
        if m.rank < rank:
            a = torch.cat([a, a.new_zeros(rank - m.rank, *a.shape[1:])], 0)
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - m.rank, *b.shape[2:])], 1)
        state[f"{name}.lora_A.weight"] = a.to(dtype).contiguous()
        state[f"{name}.lora_B.weight"] = b.to(dtype).contiguous()
    alpha = scale * rank
    return state, rank, float(round(alpha)) if math.isclose(alpha, round(alpha)) else alpha


# ---------------------------------------------------------------- the rules, one module each


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    out = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        out.add_(t, alpha=w)
    return out


def paper_module(mods: Sequence[LoraModule], weights: Sequence[float]) -> LoraModule:
    """SELMA's rule: the weighted sum of the A's and, separately, of the B's."""
    if len({m.scale for m in mods}) == 1:
        fa = fb = list(weights)
        scale = mods[0].scale
    else:  # fold sqrt(scale_i) into both factors, so B_i A_j carries sqrt(s_i s_j)
        fa = fb = [w * math.sqrt(m.scale) for w, m in zip(weights, mods, strict=True)]
        scale = 1.0
    return LoraModule(
        _weighted_sum([m.A for m in mods], fa), _weighted_sum([m.B for m in mods], fb), scale
    )


def cat_module(mods: Sequence[LoraModule], weights: Sequence[float]) -> LoraModule:
    """Exact sum of w_i dW_i: concatenated factors, w_i * scale_i folded into A_i."""
    a = torch.cat([m.A * (w * m.scale) for w, m in zip(weights, mods, strict=True)], 0)
    return LoraModule(a, torch.cat([m.B for m in mods], 1), 1.0)


def svd_module(mods: Sequence[LoraModule], weights: Sequence[float], rank: int) -> LoraModule:
    """Best rank-``rank`` factorisation of the exact sum of w_i dW_i (zero-padded if smaller).

    dW = B_cat A_cat is never decomposed whole: with B_cat = Q R (Q kept as Householder
    reflectors, never formed), the top-``rank`` eigenvectors U of the small Gram matrix
    (R A_cat)(R A_cat)^T span dW's top left singular vectors, and dW_k = (Q U)(U^T R A_cat) is
    its truncated SVD (B = Q U has orthonormal columns, A carries the singular values). It
    runs in float32: against a float64 SVD of the full dW the truncated dW_k differs by ~1e-6
    relative at the SD v1.5 shape (printed by bench/merge_bench.py; tests/test_merge_math.py
    holds it under 1e-4), and float64 costs about twice the time. The eigensolve of the
    (sum of ranks)-square Gram matrix is most of the time and the floor of any exact route;
    torch's randomized ``svd_lowrank`` (two power iterations) measured no faster there on 2
    CPU cores, with a 2% larger residual (bench/merge_bench.py).
    """
    cat = cat_module(mods, weights)
    a_shape, b_shape = cat.A.shape, cat.B.shape
    a = cat.A.reshape(a_shape[0], -1).float()
    reflectors, tau = torch.geqrf(cat.B.reshape(b_shape[0], b_shape[1]).float())
    inner = min(reflectors.shape)  # rows of R: min(out, sum of ranks)
    projected = reflectors[:inner].triu() @ a  # R A_cat = Q^T dW
    _, vectors = torch.linalg.eigh(projected @ projected.T)  # ascending eigenvalues
    top = vectors[:, -rank:].flip(1)
    new_a = top.T @ projected
    embedded = top.new_zeros(b_shape[0], top.shape[1])
    embedded[:inner] = top
    new_b = torch.ormqr(reflectors, tau, embedded)  # Q U, without forming Q
    if new_a.shape[0] < rank:  # the layer is smaller than the rank asked for
        pad = rank - new_a.shape[0]
        new_a = torch.cat([new_a, new_a.new_zeros(pad, new_a.shape[1])], 0)
        new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], pad)], 1)
    return LoraModule(
        new_a.reshape(rank, *a_shape[1:]), new_b.reshape(b_shape[0], rank, *b_shape[2:]), 1.0
    )


def factor_weights(
    mods: Sequence[LoraModule], weights: Sequence[float]
) -> tuple[list[float], list[float]]:
    """peft's split of w_i * scale_i over the two factors: sqrt on each, the sign on A."""
    prods = [w * m.scale for w, m in zip(weights, mods, strict=True)]
    return [math.copysign(math.sqrt(abs(p)), p) for p in prods], [math.sqrt(abs(p)) for p in prods]


def trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest magnitudes, zero the rest (TIES step 1).

    Found with a k-th value threshold; magnitudes tied at the threshold are all kept, the
    only case where this differs from peft's topk.
    """
    return _trim_rows(tensor.reshape(1, -1).clone(), density).reshape(tensor.shape)


def _trim_rows(rows: torch.Tensor, density: float) -> torch.Tensor:
    """``trim`` of each row of ``rows`` (N, n), in place.

    The thresholds come from selection, not a sort or topk: on the CPU numpy's
    ``np.partition`` (the same value as ``torch.kthvalue``, several times faster on CPU),
    elsewhere ``kthvalue``. The mask is applied as a float 0/1 multiply: the same values as
    a boolean mask, without a slow mixed-dtype kernel.
    """
    n = rows.shape[1]
    k = int(density * n)
    if density >= 1 or k >= n:
        return rows
    if k == 0:
        return rows.zero_()
    magnitude = rows.abs()
    if magnitude.device.type == "cpu" and magnitude.dtype in (torch.float32, torch.float64):
        found = [np.partition(row, n - k)[n - k] for row in magnitude.numpy()]
        thresholds = torch.from_numpy(np.stack(found))
    else:
        thresholds = magnitude.kthvalue(n - k + 1, dim=1).values
    return rows.mul_(magnitude.ge_(thresholds[:, None]))


def _dare_uniform(out: np.ndarray, seed: int, where: Sequence[object]) -> np.ndarray:
    """Fill the float32 array ``out`` with uniforms in [0, 1) from numpy's PCG64 seeded by
    (seed, *where): on a 2^-24 grid like ``torch.rand``, about twice as fast as torch's CPU
    generator."""
    gen = np.random.Generator(np.random.PCG64(stable_seed("dare", seed, *where)))
    return gen.random(dtype=np.float32, out=out)


def dare_mask(shape: Sequence[int], density: float, seed: int, *where: object) -> torch.Tensor:
    """The DARE keep-mask (True = kept, probability ``density``), drawn on the CPU from a
    generator seeded by (seed, *where) so it never depends on order or device."""
    uniform = _dare_uniform(np.empty(math.prod(shape), np.float32), seed, where)
    return (torch.from_numpy(uniform) < density).reshape(tuple(shape))


def disjoint_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES steps 2-3: elect a sign per entry from the unweighted sum, then average the
    weighted entries whose sign agrees with it (divided by how many agree)."""
    rows = torch.stack(list(tensors))
    w = torch.tensor(list(weights), dtype=rows.dtype, device=rows.device)
    return _disjoint_mean_rows(rows.reshape(len(rows), -1), w).reshape(rows.shape[1:])


def _disjoint_mean_rows(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``disjoint_mean`` over the rows of ``rows`` (N, n) with ``weights`` (N,); overwrites rows.

    The elected sign s is +1 where the sum is >= 0 (copysign gives -1 for a sum of -0.0, which
    happens only when every entry is zero: then nothing agrees either way). An entry agrees
    when x * s > 0, so relu(x * s) holds the agreeing magnitudes: one matmul with the weights
    gives the numerator, one with ones (of their signs) the count.
    """
    sign = torch.ones((), dtype=rows.dtype, device=rows.device).copysign(rows.sum(0))
    agreeing = rows.mul_(sign).clamp_(min=0)
    total = weights @ agreeing
    count = torch.ones_like(weights) @ agreeing.sign_()
    return total.mul_(sign).div_(count.clamp_(min=1))


def sparse_module(
    mods: Sequence[LoraModule],
    weights: Sequence[float],
    method: str,
    density: float,
    seed: int,
    name: str,
    indices: Sequence[int],
) -> LoraModule:
    """ties / dare_linear / dare_ties on each factor separately; ``indices`` seed the masks.

    Each factor of all the adapters is stacked into one (adapters, numel) matrix, so every
    step is one kernel over all of them and the weighted sums are matrix products.
    """
    out = {}
    for factor, fw in zip("AB", factor_weights(mods, weights), strict=True):
        shape = getattr(mods[0], factor).shape
        rows = torch.stack([getattr(m, factor) for m in mods]).reshape(len(mods), -1)
        w = torch.tensor(fw, dtype=rows.dtype, device=rows.device)
        if method == "ties":
            rows = _trim_rows(rows, density)
        elif density < 1:
            keep = torch.empty(rows.shape)  # drawn on the CPU whatever the device
            for row, i in zip(keep.numpy(), indices, strict=True):
                _dare_uniform(row, seed, (name, factor, i))
            rows.mul_(keep.lt_(density).to(rows.device))  # float 0/1: as dare_mask's True/False
            w /= density
        if method == "dare_linear":
            out[factor] = (w @ rows).reshape(shape)
        else:
            out[factor] = _disjoint_mean_rows(rows, w).reshape(shape)
    return LoraModule(out["A"], out["B"], 1.0)


# ---------------------------------------------------------------- the whole adapter


def merge(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    method: str = "paper",
    *,
    density: float = 0.5,
    rank: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Adapter:
    """Merge ``adapters`` module by module with ``method``; the result lives on the CPU.

    A module missing from some adapters is merged from those that have it (a missing module
    is a zero update). One adapter comes back unchanged whatever the method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {list(METHODS)}")
    if not adapters:
        raise ValueError("merge needs at least one adapter")
    if len(adapters) != len(weights):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    _check_values(weights)
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if rank is not None and rank < 1:
        raise ValueError(f"svd rank must be >= 1, got {rank}")
    if len(adapters) == 1:
        log.info("merge: one adapter, returned unchanged")
        return {
            k: LoraModule(m.A.to(dtype), m.B.to(dtype), m.scale) for k, m in adapters[0].items()
        }
    names = sorted(set().union(*adapters))
    if not set(adapters[0]).intersection(*adapters[1:]):
        raise ValueError("the adapters share no module: are they LoRAs of the same base model?")
    partial = [n for n in names if any(n not in a for a in adapters)]
    if partial:
        log.warning(
            "merge: %d modules are missing from some adapters (e.g. %s)", len(partial), partial[0]
        )
    svd_rank = rank or max(m.rank for a in adapters for m in a.values())
    merged = {}
    for name in names:
        idx = [i for i, a in enumerate(adapters) if name in a]
        mods = [_on(adapters[i][name], device) for i in idx]
        w = [weights[i] for i in idx]
        _check_shapes(name, mods, method)
        if method == "paper":
            out = paper_module(mods, w)
        elif method == "cat":
            out = cat_module(mods, w)
        elif method == "svd":
            out = svd_module(mods, w, svd_rank)
        else:
            out = sparse_module(mods, w, method, density, seed, name, idx)
        merged[name] = LoraModule(out.A.to("cpu", dtype), out.B.to("cpu", dtype), out.scale)
    return merged


def _on(m: LoraModule, device: str | torch.device) -> LoraModule:
    return LoraModule(m.A.to(device, torch.float32), m.B.to(device, torch.float32), m.scale)


def _check_shapes(name: str, mods: Sequence[LoraModule], method: str) -> None:
    dims = {(tuple(m.A.shape[1:]), m.B.shape[0], tuple(m.B.shape[2:])) for m in mods}
    if len(dims) > 1:
        raise ValueError(
            f"{name}: the adapters' layer shapes differ ({sorted(dims)}); "
            "are they LoRAs of the same base model?"
        )
    ranks = sorted({m.rank for m in mods})
    if len(ranks) > 1 and method in FACTOR_SPACE:
        raise ValueError(
            f"{name}: ranks differ {ranks}; the {method} merge averages A's and B's and needs "
            "equal ranks; use cat or svd, which merge adapters of any ranks"
        )
