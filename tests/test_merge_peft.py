"""Where peft's ``add_weighted_adapter`` defines the same rule, our merge agrees with it."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from selma_ray.lora.methods import LoraModule, delta_weight, merge

# module name -> (in, out)
LAYERS = {"to_q": (8, 8), "to_k": (6, 8), "to_out.0": (8, 5)}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(8, 8)
        self.to_k = nn.Linear(6, 8)
        self.to_out = nn.ModuleList([nn.Linear(8, 5)])


def random_adapter(rank: int, alpha: float, seed: int) -> dict[str, LoraModule]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: LoraModule(
            torch.randn(rank, fan_in, generator=g),
            torch.randn(fan_out, rank, generator=g),
            alpha / rank,
        )
        for name, (fan_in, fan_out) in LAYERS.items()
    }


def peft_merge(specs, weights, combination_type, **kwargs):
    """Wrap Block in a PeftModel with one adapter per (rank, alpha, adapter) and merge there."""
    model = None
    names = []
    for i, (rank, alpha, adapter) in enumerate(specs):
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LAYERS))
        name = f"a{i}"
        if model is None:
            model = get_peft_model(Block(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        for module_name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                key = module_name.removeprefix("base_model.model.")
                module.lora_A[name].weight.data.copy_(adapter[key].A)
                module.lora_B[name].weight.data.copy_(adapter[key].B)
        names.append(name)
    model.base_model.add_weighted_adapter(
        names, weights, "merged", combination_type=combination_type, **kwargs
    )
    out = {}
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            key = module_name.removeprefix("base_model.model.")
            out[key] = (
                module.lora_A["merged"].weight.detach(),
                module.lora_B["merged"].weight.detach(),
                module.get_delta_weight("merged").detach(),
            )
    return out


def close(x: torch.Tensor, y: torch.Tensor, tol: float = 1e-5) -> bool:
    return (x.double() - y.double()).norm().item() <= tol * y.double().norm().item()


MIXED = [(2, 4.0, 1), (4, 2.0, 2), (3, 3.0, 3)]  # (rank, alpha, seed): ranks and alphas differ
EQUAL_RANK = [(4, 4.0, 1), (4, 8.0, 2), (4, 2.0, 3)]  # ranks equal, alphas differ


def _specs(spec):
    return [(r, a, random_adapter(r, a, s)) for r, a, s in spec]


def test_cat_agrees_with_peft_factors_and_delta():
    specs = _specs(MIXED)
    weights = [0.5, 0.3, 0.2]
    ours = merge([a for _, _, a in specs], weights, "cat")
    theirs = peft_merge(specs, weights, "cat")
    for name, (a, b, delta) in theirs.items():
        assert torch.allclose(ours[name].A, a, atol=1e-6) and torch.allclose(ours[name].B, b)
        assert close(delta_weight(ours[name]), delta)


@pytest.mark.parametrize("rank", [None, 2, 5])  # peft fails above the smallest layer dim
def test_svd_agrees_with_peft_delta(rank):
    specs = _specs(MIXED)
    weights = [0.5, 0.3, 0.2]
    ours = merge([a for _, _, a in specs], weights, "svd", rank=rank)
    theirs = peft_merge(specs, weights, "svd", svd_rank=rank)
    for name, (_, _, delta) in theirs.items():
        assert close(delta_weight(ours[name]), delta)


def test_ties_agrees_with_peft_factors_and_delta():
    specs = _specs(EQUAL_RANK)
    weights = [1.0, 0.5, 2.0]
    ours = merge([a for _, _, a in specs], weights, "ties", density=0.5)
    theirs = peft_merge(specs, weights, "ties", density=0.5)
    for name, (a, b, delta) in theirs.items():
        assert close(ours[name].A, a) and close(ours[name].B, b)
        assert close(delta_weight(ours[name]), delta)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_without_drops_agrees_with_peft(method):
    # peft draws its DARE masks from torch's global RNG; at density 1 nothing is dropped.
    specs = _specs(EQUAL_RANK)
    weights = [1.0, 0.5, 2.0]
    ours = merge([a for _, _, a in specs], weights, method, density=1.0)
    theirs = peft_merge(specs, weights, method, density=1.0)
    for name, (_, _, delta) in theirs.items():
        assert close(delta_weight(ours[name]), delta)


def test_paper_equals_peft_linear_with_squared_weights():
    # peft linear: A = sum sqrt(w s) A_i, B = sum sqrt(w s) B_i; with one scale s this is the
    # paper's s (sum w'_i B_i)(sum w'_j A_j) for w' = sqrt(w).
    specs = _specs([(4, 8.0, 1), (4, 8.0, 2), (4, 8.0, 3)])
    weights = [0.5, 0.3, 0.2]
    ours = merge([a for _, _, a in specs], weights, "paper")
    theirs = peft_merge(specs, [w * w for w in weights], "linear")
    for name, (_, _, delta) in theirs.items():
        assert close(delta_weight(ours[name]), delta)
