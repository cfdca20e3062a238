"""Mixed-adapter batches: one pipeline call in which every sample has its own adapter spec.

Each PEFT LoRA layer of the pipeline gets a forward hook that adds, per sample, that
sample's own low-rank update ``x @ A^T @ B^T`` to the base layer's output, while LoRA itself
is disabled (so the layer computes the base output only). The per-sample factors are
gathered once per pipeline call, not per denoising step: a single adapter is its ``A`` and
``B``; a weighted mix is its adapters' ranks concatenated (``A`` stacked, each ``B`` scaled
by its weight); ``base`` is zero. ``B`` carries the PEFT scale (``lora_alpha / r``, or
``/ sqrt(r)`` for rsLoRA) and the spec's weight, then every sample is zero-padded to the
largest rank in the batch and the update runs as two batched matmuls (``torch.bmm``). Where
that rank exceeds what the layer's shape can hold (``rank * (in + out) > in * out``: a wide
adapter on a narrow layer), each sample's two factors are multiplied once per pipeline call
into one (in, out) matrix, and the update is a single batched matmul with fewer
multiply-adds per row; the same update, rounded differently.

Why hooks with a gathered bmm and not PEFT's own mixed-batch inference (``adapter_names=``
per sample, which diffusers' UNet does not pass down, so it too would need hooks on every
LoRA layer): PEFT's route serves one adapter per sample, so it cannot serve weighted mixes,
and it loops over the adapters present in the batch in every layer at every step (a gather
of the sub-batch, two small matmuls and a scatter-add each). The gathered bmm is two matmuls
(or one) per layer whatever the mix of adapters. Measured on the tiny model
(``bench/serve_bench.py --mode mixed --clock cpu``: six adapters cycling, batches of 8, CFG
on, 10 steps, one torch thread, CPU seconds of the process, means of an ABBA run), the
gathered route gave 1.28x the throughput of PEFT's at rank 4 and 1.43x at rank 128 (where
the tiny model's 32- and 64-wide layers take the one-matrix route). At rank 4 its pixels are
PEFT's route's, and each image is within 1/255 of its request alone; at rank 128, random
adapters make the tiny model so sensitive that batching alone moves pixels by 37/255.

Which row belongs to which sample: every module of a diffusers text-to-image pipeline sees
the batch in sample order, once (no guidance, and the text encoders) or in blocks of the
batch (classifier-free guidance concatenates [negative, positive]), so row ``i`` is sample
``i % len(specs)``. A layer whose batch is not a multiple of the number of samples raises.

Only LoRA on ``torch.nn.Linear`` layers is supported (what the experts train: the UNet's
attention projections, and optionally the text encoder's); an adapter with LoRA on another
layer type (a convolution, an embedding), with DoRA or another LoRA variant, or with a LoRA
bias raises ``UnsupportedMix`` naming the layer, rather than being ignored.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

# An adapter spec as the pipeline knows it: (internal adapter name, weight) pairs; () is base.
InternalSpec = tuple[tuple[str, float], ...]


class UnsupportedMix(ValueError):
    """The loaded adapters have a LoRA layer that mixed batches cannot apply per sample."""


def lora_layers(pipe: Any) -> dict[str, Any]:
    """Every PEFT LoRA layer of a pipeline's models, by ``<component>.<module path>``."""
    import torch
    from peft.tuners.lora import LoraLayer

    found = {}
    for component, model in pipe.components.items():
        if isinstance(model, torch.nn.Module):
            for path, module in model.named_modules():
                if isinstance(module, LoraLayer):
                    found[f"{component}.{path}"] = module
    return found


def unsupported(layers: dict[str, Any], adapters: set[str] | None = None) -> str | None:
    """Why the layers cannot serve ``adapters`` (default: every adapter they hold) in a mixed
    batch, or None when they can."""
    from peft.tuners.lora import Linear

    for path, layer in layers.items():
        held = set(layer.lora_A) if adapters is None else adapters & set(layer.lora_A)
        if not held:
            continue
        if type(layer) is not Linear:
            return (
                f"{path} is a LoRA {type(layer).__module__}.{type(layer).__name__} (adapters "
                f"{sorted(held)}); mixed-adapter batches support LoRA on Linear layers only, "
                "so train adapters on Linear target modules (e.g. to_q, to_k, to_v, to_out.0) "
                "or serve them one adapter per forward pass"
            )
        for name in sorted(held):
            if name in layer.lora_variant:
                kind = type(layer.lora_variant[name]).__name__
                return f"{path}: adapter {name} is a LoRA variant ({kind}); mix plain LoRA only"
            if getattr(layer, "lora_bias", {}).get(name):
                return f"{path}: adapter {name} has a LoRA bias; mix plain LoRA only"
        if layer.merged:
            return f"{path}: adapters {layer.merged_adapters} are merged into the base weights"
    return None


def _scale(layer: Any, name: str) -> float:
    """PEFT's scale of an adapter at weight 1. ``layer.scaling`` is not read: ``set_adapters``
    writes the last request's weight into it."""
    rank = layer.r[name]
    return layer.lora_alpha[name] / (math.sqrt(rank) if layer.use_rslora.get(name) else rank)


class _Factors:
    """One layer's per-sample matrices, applied in turn with ``torch.bmm``: ``A^T`` (samples,
    in, rank) then scaled ``B^T`` (samples, rank, out), or their product (samples, in, out)
    alone; and their copies for a batch of ``k`` blocks of the samples."""

    def __init__(self, *chain: Any):
        self.by_blocks = {1: chain}
        self.samples = chain[0].shape[0]

    def rows(self, rows: int, path: str) -> tuple[Any, ...]:
        if rows % self.samples:
            raise RuntimeError(
                f"{path} got a batch of {rows} rows for {self.samples} samples; mixed-adapter "
                "batches need every batch in blocks of the samples (as diffusers' text-to-image "
                "pipelines run them)"
            )
        k = rows // self.samples
        if k not in self.by_blocks:
            self.by_blocks[k] = tuple(m.repeat(k, 1, 1) for m in self.by_blocks[1])
        return self.by_blocks[k]


def gather(layer: Any, specs: Sequence[InternalSpec]) -> _Factors | None:
    """The per-sample factors of one layer, or None when no sample's adapters touch it."""
    import torch

    ref = None
    per_spec: dict[InternalSpec, tuple[Any, Any] | None] = {}
    for spec in dict.fromkeys(specs):
        parts = [(n, w) for n, w in spec if n in layer.lora_A]
        if not parts:
            per_spec[spec] = None
            continue
        a = torch.cat([layer.lora_A[n].weight for n, _ in parts])  # (rank, in)
        b = torch.cat(
            [layer.lora_B[n].weight * (w * _scale(layer, n)) for n, w in parts], dim=1
        )  # (out, rank)
        per_spec[spec] = (a, b)
        ref = a
    if ref is None:
        return None
    rank = max(f[0].shape[0] for f in per_spec.values() if f is not None)
    a_all = ref.new_zeros(len(specs), ref.shape[1], rank)
    b_all = ref.new_zeros(len(specs), rank, layer.out_features)
    for i, spec in enumerate(specs):
        if (found := per_spec[spec]) is not None:
            a, b = found
            a_all[i, :, : a.shape[0]] = a.T
            b_all[i, : a.shape[0], :] = b.T
    if rank * (ref.shape[1] + layer.out_features) > ref.shape[1] * layer.out_features:
        # The rank exceeds what the layer's shape can hold: one (in, out) matrix per sample
        # is fewer multiply-adds per row than the two factors, and the same update.
        return _Factors(torch.bmm(a_all, b_all))
    return _Factors(a_all, b_all)


def _add_update(path: str, factors: _Factors) -> Any:
    import torch

    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else kwargs.get("x")
        if x is None:
            raise RuntimeError(f"{path} was called without its input as the first argument")
        chain = factors.rows(x.shape[0], path)
        update = x.reshape(x.shape[0], -1, x.shape[-1]).to(chain[0].dtype)
        for matrix in chain:
            update = torch.bmm(update, matrix)
        return output + update.reshape(output.shape).to(output.dtype)

    return hook


@contextlib.contextmanager
def per_sample_adapters(pipe: Any, specs: Sequence[InternalSpec]) -> Iterator[None]:
    """Within the block, a call of ``pipe`` with ``len(specs)`` prompts gives sample ``i``
    the adapters of ``specs[i]`` (internal names and weights; ``()`` for base). LoRA is
    disabled on the pipeline; callers that need it enabled afterwards enable it again."""
    if not specs:
        raise ValueError("per_sample_adapters needs one spec per sample; got none")
    layers = lora_layers(pipe)
    used = {n for spec in specs for n, _ in spec}
    problem = unsupported(layers, used)
    if problem:
        raise UnsupportedMix(problem)
    missing = used - {n for layer in layers.values() for n in layer.lora_A}
    if missing:
        raise KeyError(f"adapters {sorted(missing)} are not loaded in the pipeline")
    handles = []
    pipe.disable_lora()
    try:
        for path, layer in layers.items():
            factors = gather(layer, specs)
            if factors is not None:
                handles.append(
                    layer.register_forward_hook(_add_update(path, factors), with_kwargs=True)
                )
        log.debug("mixed batch of %d samples: %d LoRA layers hooked", len(specs), len(handles))
        yield
    finally:
        for handle in handles:
            handle.remove()
