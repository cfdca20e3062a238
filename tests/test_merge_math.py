"""The merge rules on random LoRAs, checked against plain float64 computations written here."""

from __future__ import annotations

import math

import pytest
import torch

from selma_ray.lora import METHODS
from selma_ray.lora.methods import (
    LoraModule,
    check_weights,
    dare_mask,
    default_weights,
    delta_weight,
    disjoint_mean,
    from_state,
    merge,
    to_state,
    trim,
)

# (module name, in_features, out_features)
MODULES = [("attn1.to_q", 8, 8), ("attn2.to_k", 6, 8), ("attn2.to_out.0", 8, 5)]
SPARSE = ("ties", "dare_linear", "dare_ties")


def make_adapter(rank: int, seed: int, scale: float = 1.0, dtype=torch.float32, modules=MODULES):
    g = torch.Generator().manual_seed(seed)
    return {
        name: LoraModule(
            torch.randn(rank, fan_in, generator=g).to(dtype),
            torch.randn(fan_out, rank, generator=g).to(dtype),
            scale,
        )
        for name, fan_in, fan_out in modules
    }


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).norm().item() / ref.norm().item()


# ---------------------------------------------------------------- plain references (float64)


def ref_exact_sum(adapters, weights, name):
    """sum_i w_i * scale_i * B_i A_i."""
    total = 0
    for w, a in zip(weights, adapters, strict=True):
        m = a[name]
        total = total + w * m.scale * (m.B.double() @ m.A.double())
    return total


def ref_paper(adapters, weights, name):
    scales = {a[name].scale for a in adapters}
    fold = [1.0 if len(scales) == 1 else math.sqrt(a[name].scale) for a in adapters]
    big_a = sum(w * f * a[name].A.double() for w, f, a in zip(weights, fold, adapters, strict=True))
    big_b = sum(w * f * a[name].B.double() for w, f, a in zip(weights, fold, adapters, strict=True))
    scale = scales.pop() if len(scales) == 1 else 1.0
    return scale * big_b @ big_a


def ref_svd(adapters, weights, name, rank):
    u, s, vh = torch.linalg.svd(ref_exact_sum(adapters, weights, name), full_matrices=False)
    k = min(rank, s.numel())
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def ref_trim(x, density):
    """Zero all but the k = int(density * n) largest magnitudes."""
    k = int(density * x.numel())
    if density >= 1:
        return x.clone()
    threshold = x.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def ref_disjoint_mean(tensors, weights):
    total = torch.zeros_like(tensors[0])
    count = torch.zeros_like(tensors[0])
    majority = torch.where(sum(tensors) >= 0, 1.0, -1.0).double()
    for w, t in zip(weights, tensors, strict=True):
        agrees = (torch.sign(t) == majority).double()
        total += w * t * agrees
        count += agrees
    return total / count.clamp(min=1)


def ref_sparse(adapters, weights, name, method, density, seed):
    """peft's factor-space rules: factor weights sqrt(w s) (sign on A), A and B separately."""
    out = {}
    for factor in "AB":
        tensors, fws = [], []
        for i, (w, a) in enumerate(zip(weights, adapters, strict=True)):
            x = getattr(a[name], factor).double()
            if method == "ties":
                x = ref_trim(x, density)
            else:
                x = x * dare_mask(x.shape, density, seed, name, factor, i).double() / density
            tensors.append(x)
            fws.append(math.sqrt(w * a[name].scale))
        if method == "dare_linear":
            out[factor] = sum(fw * t for fw, t in zip(fws, tensors, strict=True))
        else:
            out[factor] = ref_disjoint_mean(tensors, fws)
    return out["B"] @ out["A"]


def reference(method, adapters, weights, name, density=0.5, rank=None, seed=0):
    if method == "paper":
        return ref_paper(adapters, weights, name)
    if method == "cat":
        return ref_exact_sum(adapters, weights, name)
    if method == "svd":
        rank = rank or max(m.rank for a in adapters for m in a.values())
        return ref_svd(adapters, weights, name, rank)
    return ref_sparse(adapters, weights, name, method, density, seed)


# ---------------------------------------------------------------- every method vs reference


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "rank, weights, scales",
    [
        (2, [1 / 3, 1 / 3, 1 / 3], [1.0, 1.0, 1.0]),
        (4, [0.5, 0.25, 0.25], [2.0, 2.0, 2.0]),
        (4, [2.0, 0.0, 1.0], [1.0, 0.5, 4.0]),
    ],
    ids=["mean", "weighted-alpha2", "unnormalised-mixed-alpha"],
)
def test_merged_delta_matches_plain_float64_reference(method, rank, weights, scales):
    adapters = [make_adapter(rank, seed, s) for seed, s in zip((1, 2, 3), scales, strict=True)]
    merged = merge(adapters, weights, method, density=0.6, seed=7)
    assert set(merged) == {name for name, _, _ in MODULES}
    for name in merged:
        ref = reference(method, adapters, weights, name, density=0.6, seed=7)
        assert rel_err(delta_weight(merged[name]), ref) < 1e-6, (method, name)


@pytest.mark.parametrize("rank", [1, 3, 6, 12])
def test_svd_truncates_to_the_requested_rank_like_a_float64_svd(rank):
    adapters = [make_adapter(3, seed) for seed in (1, 2)]
    merged = merge(adapters, [0.7, 0.3], "svd", rank=rank)
    for name, _, _ in MODULES:
        assert merged[name].rank == rank  # zero-padded where the layer is smaller
        ref = ref_svd(adapters, [0.7, 0.3], name, rank)
        assert rel_err(delta_weight(merged[name]), ref) < 1e-6


def _full_svd_truncation(dw: torch.Tensor, rank: int) -> torch.Tensor:
    """Truncated SVD of the whole float64 matrix (conv deltas flattened to (out, in*k*k))."""
    u, s, vh = torch.linalg.svd(dw.reshape(dw.shape[0], -1).double(), full_matrices=False)
    k = min(rank, s.numel())
    return (u[:, :k] @ torch.diag(s[:k]) @ vh[:k]).reshape(dw.shape)


@pytest.mark.parametrize("rank", [16, 80, 100], ids=["truncated", "sum-of-ranks", "above-sum"])
def test_float32_factored_svd_matches_a_float64_svd_of_the_whole_delta(rank):
    """svd factors B_cat A_cat (QR, then a small Gram eigenproblem) in float32: its dW_k is
    within 1e-4 (relative Frobenius) of a float64 SVD of the full dW, linear and conv alike;
    at rank >= the sum of ranks (5 x 16 = 80) it is the exact sum."""
    g = torch.Generator().manual_seed(5)
    adapters = [
        {
            "lin": LoraModule(
                torch.randn(16, 144, generator=g) * 0.01, torch.randn(160, 16, generator=g), 1.0
            ),
            "conv": LoraModule(
                torch.randn(16, 12, 3, 3, generator=g), torch.randn(96, 16, 1, 1, generator=g), 0.5
            ),
        }
        for _ in range(5)
    ]
    weights = [0.3, 0.1, 0.2, 0.25, 0.15]
    merged = merge(adapters, weights, "svd", rank=rank)
    for name in ("lin", "conv"):
        exact = sum(
            w * delta_weight(a[name]).double() for w, a in zip(weights, adapters, strict=True)
        )
        ref = _full_svd_truncation(exact, rank)
        got = delta_weight(merged[name])
        assert got.shape == exact.shape and merged[name].rank == rank
        assert rel_err(got, ref) < 1e-4, (name, rank, rel_err(got, ref))
        if rank >= 80:
            assert rel_err(got, exact) < 1e-4, (name, rank)
        else:  # a real truncation: far from the exact sum
            assert rel_err(got, exact) > 0.1


def test_paper_delta_is_not_the_mean_of_expert_deltas_it_has_cross_terms():
    adapters = [make_adapter(4, seed, dtype=torch.float64) for seed in (1, 2)]
    merged = merge(adapters, [0.5, 0.5], "paper")
    for name, _, _ in MODULES:
        (a1, b1), (a2, b2) = [(a[name].A, a[name].B) for a in adapters]
        delta = delta_weight(merged[name]).double()
        # B A = 1/4 (B1 A1 + B2 A2 + B1 A2 + B2 A1): the cross terms make the difference.
        expected = (b1 @ a1 + b2 @ a2 + b1 @ a2 + b2 @ a1) / 4
        assert rel_err(delta, expected) < 1e-6
        mean = (b1 @ a1 + b2 @ a2) / 2
        assert rel_err(delta, mean) > 0.1


@pytest.mark.parametrize("rank", [2, 4])
def test_paper_keeps_rank_and_scale(rank):
    merged = merge([make_adapter(rank, 1, 2.0), make_adapter(rank, 2, 2.0)], [0.5, 0.5])
    for name, fan_in, fan_out in MODULES:
        assert merged[name].A.shape == (rank, fan_in)
        assert merged[name].B.shape == (fan_out, rank)
        assert merged[name].scale == 2.0
    state, r, alpha = to_state(merged)
    assert (r, alpha) == (rank, 2.0 * rank)


def test_cat_concatenates_ranks_and_writes_scale_one():
    adapters = [make_adapter(2, 1, 0.5), make_adapter(5, 2, 3.0)]
    merged = merge(adapters, [0.4, 0.6], "cat")
    for name, _, _ in MODULES:
        assert merged[name].rank == 7 and merged[name].scale == 1.0
        assert rel_err(delta_weight(merged[name]), ref_exact_sum(adapters, [0.4, 0.6], name)) < 1e-6


def test_svd_default_rank_is_the_largest_input_rank():
    merged = merge([make_adapter(2, 1), make_adapter(3, 2)], [0.5, 0.5], "svd")
    assert {m.rank for m in merged.values()} == {3}


@pytest.mark.parametrize("method", ["paper", *SPARSE])
def test_factor_space_methods_refuse_different_ranks(method):
    with pytest.raises(ValueError, match="ranks differ.*use cat or svd"):
        merge([make_adapter(2, 1), make_adapter(4, 2)], [0.5, 0.5], method)


@pytest.mark.parametrize("method", METHODS)
def test_single_adapter_comes_back_unchanged(method):
    adapter = make_adapter(4, 7, 1.5)
    merged = merge([adapter], [1.0], method)
    for name, m in adapter.items():
        assert torch.equal(merged[name].A, m.A) and torch.equal(merged[name].B, m.B)
        assert merged[name].scale == 1.5


@pytest.mark.parametrize("method", METHODS)
def test_copies_of_one_adapter_with_default_weights_merge_back_into_it(method):
    adapter = make_adapter(3, 5, 2.0)
    merged = merge([adapter] * 4, default_weights(method, 4), method, density=1.0)
    for name, m in adapter.items():
        assert rel_err(delta_weight(merged[name]), delta_weight(m).double()) < 1e-6


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_seeded(method):
    adapters = [make_adapter(4, seed) for seed in (1, 2, 3)]
    first = merge(adapters, [1, 1, 1], method, density=0.5, seed=3)
    again = merge(adapters, [1, 1, 1], method, density=0.5, seed=3)
    other = merge(adapters, [1, 1, 1], method, density=0.5, seed=4)
    for name in first:
        assert torch.equal(first[name].A, again[name].A)
        assert not torch.equal(first[name].A, other[name].A)


def test_dare_mask_keeps_about_density_and_rescaling_keeps_the_mean():
    mask = dare_mask((400, 500), 0.3, 0, "m", "A", 0)
    assert mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.3) < 0.01
    x = torch.ones(400, 500)
    assert abs((x * mask / 0.3).mean().item() - 1.0) < 0.03
    assert not torch.equal(mask, dare_mask((400, 500), 0.3, 0, "m", "B", 0))


def test_ties_keeps_the_requested_fraction_of_each_factor():
    adapter = make_adapter(4, 1, modules=[("m", 50, 40)])
    merged = merge([adapter, adapter], [1.0, 1.0], "ties", density=0.25)
    kept = (merged["m"].A != 0).float().mean().item()
    assert kept == pytest.approx(0.25, abs=0.01)


def test_trim_keeps_every_magnitude_tied_at_the_threshold():
    x = torch.tensor([[1.0, -3.0, 2.0], [-2.0, 0.5, -0.0]])
    # k = int(0.4 * 6) = 2: the second largest magnitude is 2, held by 2.0 and -2.0
    assert torch.equal(trim(x, 0.4), torch.tensor([[0.0, -3.0, 2.0], [-2.0, 0.0, 0.0]]))
    assert torch.equal(trim(x, 0.1), torch.zeros_like(x))  # k = 0
    assert torch.equal(trim(x, 1.0), x)


def test_trim_threshold_is_the_same_from_numpy_selection_and_from_kthvalue():
    # float32 on the CPU takes np.partition; other dtypes (and devices) take torch.kthvalue
    g = torch.Generator().manual_seed(0)
    magnitudes = torch.randperm(7 * 33, generator=g).float() + 1  # distinct, exact in float16
    signs = torch.randint(0, 2, (7 * 33,), generator=g).float() * 2 - 1
    x = (magnitudes * signs / 16).reshape(7, 33)
    for density in (0.1, 0.37, 0.5, 0.9):
        assert torch.equal(trim(x.half(), density).float(), trim(x, density))
        assert torch.equal(trim(x, density), ref_trim(x.double(), density).float())


def test_disjoint_mean_elects_plus_where_entries_cancel_and_averages_only_agreeing_ones():
    first = torch.tensor([2.0, 3.0, -1.0, 0.0, -0.0])
    second = torch.tensor([-2.0, -1.0, -1.0, 0.0, -0.0])
    got = disjoint_mean([first, second], [1.0, 0.5])
    # sums 0 (elect +: only 2.0 agrees), 2 (+: 3.0), -2 (-: both), 0 and -0 (nothing agrees)
    assert torch.equal(got, torch.tensor([2.0, 3.0, -0.75, 0.0, 0.0]))


def test_ties_merge_elects_plus_where_the_factors_cancel():
    adapters = [
        {"m": LoraModule(torch.tensor([[2.0, 3.0, -1.0, 0.0]]), torch.ones(1, 1), 1.0)},
        {"m": LoraModule(torch.tensor([[-2.0, -1.0, -1.0, 0.0]]), torch.ones(1, 1), 1.0)},
    ]
    merged = merge(adapters, [1.0, 1.0], "ties", density=1.0)
    assert torch.equal(delta_weight(merged["m"]), torch.tensor([[2.0, 3.0, -1.0, 0.0]]))


def test_half_precision_inputs_and_outputs_accumulate_in_float32():
    adapters = [make_adapter(2, seed, dtype=torch.float16) for seed in (1, 2)]
    merged = merge(adapters, [0.5, 0.5], "paper", dtype=torch.bfloat16)
    for name, _, _ in MODULES:
        assert merged[name].A.dtype == torch.bfloat16
        assert rel_err(delta_weight(merged[name]), ref_paper(adapters, [0.5, 0.5], name)) < 2e-2


@pytest.mark.parametrize("method", METHODS)
def test_merge_does_not_modify_inputs(method):
    adapters = [make_adapter(2, 1), make_adapter(2, 2)]
    copies = [{k: (m.A.clone(), m.B.clone()) for k, m in a.items()} for a in adapters]
    merge(adapters, [0.5, 0.5], method)
    for a, c in zip(adapters, copies, strict=True):
        for k, m in a.items():
            assert torch.equal(m.A, c[k][0]) and torch.equal(m.B, c[k][1])


def test_conv_lora_delta_is_exact_for_cat_and_svd():
    g = torch.Generator().manual_seed(0)
    adapters = [
        {"conv": LoraModule(torch.randn(3, 4, 3, 3, generator=g), torch.randn(6, 3, 1, 1), 1.0)}
        for _ in range(2)
    ]
    for method in ("cat", "svd"):
        merged = merge(adapters, [0.5, 0.5], method, rank=6)
        delta = delta_weight(merged["conv"])
        ref = sum(0.5 * delta_weight(a["conv"]).double() for a in adapters)
        assert delta.shape == (6, 4, 3, 3)
        assert rel_err(delta, ref) < 1e-6


# ---------------------------------------------------------------- modules and shapes


def test_module_missing_from_one_adapter_counts_as_zero_update():
    full, partial = make_adapter(2, 1), make_adapter(2, 2)
    del partial["attn1.to_q"]
    merged = merge([full, partial], [0.5, 0.5], "cat")
    ref = 0.5 * delta_weight(full["attn1.to_q"]).double()
    assert rel_err(delta_weight(merged["attn1.to_q"]), ref) < 1e-6


def test_adapters_without_a_common_module_are_refused():
    a = make_adapter(2, 1, modules=[("x", 4, 4)])
    b = make_adapter(2, 2, modules=[("y", 4, 4)])
    with pytest.raises(ValueError, match="share no module"):
        merge([a, b], [0.5, 0.5], "cat")


def test_different_layer_shapes_are_refused_naming_the_module():
    a = make_adapter(2, 1, modules=[("x", 4, 4)])
    b = make_adapter(2, 2, modules=[("x", 4, 6)])
    with pytest.raises(ValueError, match="x: the adapters' layer shapes differ"):
        merge([a, b], [0.5, 0.5], "svd")


# ---------------------------------------------------------------- weights and options


@pytest.mark.parametrize(
    "weights, match",
    [
        ([0.5, -0.5], ">= 0"),
        ([0.5, float("nan")], ">= 0"),
        ([0.0, 0.0], "not all zero"),
        ([], "2 adapters but 0 weights"),
        ([0.3, 0.3, 0.4], "2 adapters but 3 weights"),
    ],
)
def test_merge_rejects_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        merge([make_adapter(2, 1), make_adapter(2, 2)], weights, "paper")


def test_merge_rejects_no_adapters_unknown_method_and_bad_density():
    with pytest.raises(ValueError, match="at least one adapter"):
        merge([], [], "paper")
    with pytest.raises(ValueError, match="unknown merge method 'mean'"):
        merge([make_adapter(2, 1)], [1.0], "mean")
    for density in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            merge([make_adapter(2, 1), make_adapter(2, 2)], [1, 1], "ties", density=density)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_check_weights_none_means_the_method_default(n):
    names = [f"s{i}" for i in range(n)]
    assert check_weights(names, None) == [pytest.approx(1 / n)] * n
    assert check_weights(names, None, "ties") == [1.0] * n
    assert check_weights(names, None, "dare_linear") == [pytest.approx(1 / n**2)] * n


def test_check_weights_returns_weights_in_name_order_and_allows_zeros():
    assert check_weights(["b", "a"], {"a": 1, "b": 3}) == [3.0, 1.0]
    assert check_weights(["a", "b"], {"a": 0.0, "b": 1.0}) == [0.0, 1.0]


def test_check_weights_rejects_empty_unknown_and_missing_names():
    with pytest.raises(ValueError, match="at least one adapter"):
        check_weights([], None)
    with pytest.raises(ValueError, match=r"unknown adapters \['juggling'\]"):
        check_weights(["counting"], {"counting": 1.0, "juggling": 1.0})
    with pytest.raises(ValueError, match=r"missing for \['dense_detail'\]"):
        check_weights(["counting", "dense_detail"], {"counting": 1.0})


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_check_weights_rejects_negative_nan_or_infinite(bad):
    with pytest.raises(ValueError, match=">= 0"):
        check_weights(["a", "b"], {"a": 1.0, "b": bad})


def test_check_weights_rejects_all_zero():
    with pytest.raises(ValueError, match="not all zero"):
        check_weights(["a", "b"], {"a": 0.0, "b": 0.0})


# ---------------------------------------------------------------- state dicts


def _state(rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "blk.to_q.lora_A.weight": torch.randn(rank, 6, generator=g),
        "blk.to_q.lora_B.weight": torch.randn(5, rank, generator=g),
        "blk.to_v.lora_A.weight": torch.randn(rank, 6, generator=g),
        "blk.to_v.lora_B.weight": torch.randn(5, rank, generator=g),
    }


def test_scale_follows_lora_alpha_alpha_pattern_rslora_and_network_alphas():
    state = _state()
    assert from_state(state, None)["blk.to_q"].scale == 1.0  # diffusers: no metadata, alpha = r
    cfg = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"to_v": 2}}
    adapter = from_state(state, cfg)
    assert adapter["blk.to_q"].scale == 2.0 and adapter["blk.to_v"].scale == 0.5
    assert from_state(state, {"lora_alpha": 8, "use_rslora": True})["blk.to_q"].scale == 4.0
    assert from_state(state, None, {"blk.to_q": 1.0})["blk.to_q"].scale == 0.25


def test_to_state_pads_ranks_and_folds_differing_scales_keeping_delta():
    adapter = {
        "a": LoraModule(torch.randn(2, 6), torch.randn(5, 2), 0.5),
        "b": LoraModule(torch.randn(4, 6), torch.randn(5, 4), 2.0),
    }
    state, r, alpha = to_state(adapter)
    assert (r, alpha) == (4, 4.0)
    back = from_state(state, {"r": r, "lora_alpha": alpha})
    for name, m in adapter.items():
        assert back[name].rank == 4
        assert rel_err(delta_weight(back[name]), delta_weight(m).double()) < 1e-6


def test_from_state_refuses_dora_biases_and_unpaired_factors():
    state = _state()
    with pytest.raises(ValueError, match="only plain LoRA factors"):
        from_state({**state, "blk.to_q.lora_magnitude_vector": torch.ones(5)})
    with pytest.raises(ValueError, match="DoRA"):
        from_state(state, {"use_dora": True, "lora_alpha": 4})
    del state["blk.to_v.lora_B.weight"]
    with pytest.raises(ValueError, match="blk.to_v: has lora_A but not its partner"):
        from_state(state)
