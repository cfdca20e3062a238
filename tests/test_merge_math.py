"""The paper merge rule on synthetic LoRA state dicts, checked against float64 arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from selma_ray.merge import check_weights, paper_merge

# (module name, in_features, out_features)
MODULES = [("attn1.to_q", 8, 8), ("attn2.to_k", 6, 8), ("attn2.to_out.0", 8, 5)]


def make_lora(rank: int, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, fan_in, fan_out in MODULES:
        state[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g).to(dtype)
        state[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g).to(dtype)
    return state


def reference_merge(states, weights):
    """A = sum w_i A_i and B = sum w_i B_i, in float64, written out element by element."""
    out = {}
    for key in states[0]:
        acc = torch.zeros(states[0][key].shape, dtype=torch.float64)
        for w, s in zip(weights, states, strict=True):
            acc = acc + float(w) * s[key].to(torch.float64)
        out[key] = acc
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.to(torch.float64) - ref).norm().item() / ref.norm().item()


@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize(
    "weights",
    [[1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25], [2.0, 0.0, 1.0]],
    ids=["mean", "weighted", "unnormalised"],
)
def test_paper_merge_equals_weighted_sum_of_a_and_of_b(rank, weights):
    states = [make_lora(rank, seed) for seed in (1, 2, 3)]
    merged = paper_merge(states, weights)
    ref = reference_merge(states, weights)
    assert set(merged) == set(ref)
    for key, value in merged.items():
        assert value.shape == ref[key].shape
        assert value.dtype == torch.float32
        assert rel_err(value, ref[key]) < 1e-6, key


@pytest.mark.parametrize("rank", [2, 4])
def test_paper_merge_keeps_rank(rank):
    merged = paper_merge([make_lora(rank, 1), make_lora(rank, 2)], [0.5, 0.5])
    for name, fan_in, fan_out in MODULES:
        assert merged[f"{name}.lora_A.weight"].shape == (rank, fan_in)
        assert merged[f"{name}.lora_B.weight"].shape == (fan_out, rank)


def test_merged_delta_w_is_not_the_mean_of_expert_delta_ws():
    states = [make_lora(4, seed, torch.float64) for seed in (1, 2)]
    merged = paper_merge(states, [0.5, 0.5])
    for name, _, _ in MODULES:
        a, b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        merged_delta = merged[b].double() @ merged[a].double()
        mean_delta = sum(s[b] @ s[a] for s in states) / 2
        # B A = 1/4 (B1 A1 + B2 A2 + B1 A2 + B2 A1): the cross terms make the difference.
        cross = (states[0][b] @ states[1][a] + states[1][b] @ states[0][a]) / 4
        expected = (states[0][b] @ states[0][a] + states[1][b] @ states[1][a]) / 4 + cross
        assert torch.allclose(merged_delta, expected, rtol=1e-5, atol=1e-5)  # float32 sums
        assert not torch.allclose(merged_delta, mean_delta, rtol=1e-3, atol=1e-3)


def test_single_adapter_with_weight_one_comes_back_unchanged():
    state = make_lora(4, 7)
    merged = paper_merge([state], [1.0])
    assert set(merged) == set(state)
    for key in state:
        assert torch.equal(merged[key], state[key])


def test_merging_identical_adapters_with_mean_weights_is_identity():
    state = make_lora(2, 5)
    merged = paper_merge([state, state, state, state], check_weights(list("abcd"), None))
    for key in state:
        assert torch.allclose(merged[key], state[key], rtol=1e-6, atol=1e-7)


def test_paper_merge_keeps_half_precision_dtype_and_accumulates_in_float32():
    states = [make_lora(2, seed, torch.float16) for seed in (1, 2)]
    merged = paper_merge(states, [0.5, 0.5])
    ref = reference_merge(states, [0.5, 0.5])
    for key, value in merged.items():
        assert value.dtype == torch.float16
        assert rel_err(value, ref[key]) < 1e-3


def test_paper_merge_does_not_modify_inputs():
    states = [make_lora(2, 1), make_lora(2, 2)]
    copies = [{k: v.clone() for k, v in s.items()} for s in states]
    paper_merge(states, [0.5, 0.5])
    for s, c in zip(states, copies, strict=True):
        for key in s:
            assert torch.equal(s[key], c[key])


def test_mismatched_ranks_raise_value_error_naming_the_key():
    with pytest.raises(ValueError) as err:
        paper_merge([make_lora(2, 1), make_lora(4, 2)], [0.5, 0.5])
    msg = str(err.value)
    assert "shapes differ" in msg
    assert "lora_" in msg
    assert "equal ranks" in msg


def test_mismatched_keys_raise_value_error_naming_the_modules():
    a, b = make_lora(2, 1), make_lora(2, 2)
    b["attn9.to_v.lora_A.weight"] = b.pop("attn1.to_q.lora_A.weight")
    with pytest.raises(ValueError) as err:
        paper_merge([a, b], [0.5, 0.5])
    msg = str(err.value)
    assert "different modules" in msg
    assert "attn1.to_q.lora_A.weight" in msg or "attn9.to_v.lora_A.weight" in msg


def test_extra_key_in_later_adapter_is_rejected():
    a, b = make_lora(2, 1), make_lora(2, 2)
    b["extra.lora_A.weight"] = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="different modules"):
        paper_merge([a, b], [0.5, 0.5])


def test_weight_count_must_match_adapter_count():
    with pytest.raises(ValueError, match="2 adapters but 3 weights"):
        paper_merge([make_lora(2, 1), make_lora(2, 2)], [0.3, 0.3, 0.4])


# ---------------------------------------------------------------- check_weights


@pytest.mark.parametrize("n", [1, 2, 5])
def test_check_weights_none_means_one_over_n(n):
    names = [f"s{i}" for i in range(n)]
    weights = check_weights(names, None)
    assert weights == [pytest.approx(1 / n)] * n
    assert math.isclose(sum(weights), 1.0)


def test_check_weights_returns_weights_in_name_order():
    assert check_weights(["b", "a"], {"a": 1, "b": 3}) == [3.0, 1.0]


def test_check_weights_allows_some_zero_weights():
    assert check_weights(["a", "b"], {"a": 0.0, "b": 1.0}) == [0.0, 1.0]


def test_check_weights_rejects_no_adapters():
    with pytest.raises(ValueError, match="at least one adapter"):
        check_weights([], None)


def test_check_weights_rejects_unknown_names():
    with pytest.raises(ValueError) as err:
        check_weights(["counting"], {"counting": 1.0, "juggling": 1.0})
    assert "juggling" in str(err.value)
    assert "unknown" in str(err.value)


def test_check_weights_rejects_missing_names():
    with pytest.raises(ValueError) as err:
        check_weights(["counting", "dense_detail"], {"counting": 1.0})
    assert "dense_detail" in str(err.value)
    assert "missing" in str(err.value)


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_check_weights_rejects_negative_or_nan(bad):
    with pytest.raises(ValueError, match=">= 0"):
        check_weights(["a", "b"], {"a": 1.0, "b": bad})


def test_check_weights_rejects_all_zero():
    with pytest.raises(ValueError, match="not all zero"):
        check_weights(["a", "b"], {"a": 0.0, "b": 0.0})
