"""ROUGE-L against an independent LCS reference, and the diversity filter built on it."""

from __future__ import annotations

import random
from functools import cache

import pytest

from selma_ray.text.rouge import RougeFilter, lcs_length, rouge_l, tokenize


def reference_lcs(a: list[str], b: list[str]) -> int:
    """Textbook recursive LCS, memoised on suffix positions."""
    ta, tb = tuple(a), tuple(b)

    @cache
    def go(i: int, j: int) -> int:
        if i == len(ta) or j == len(tb):
            return 0
        if ta[i] == tb[j]:
            return 1 + go(i + 1, j + 1)
        return max(go(i + 1, j), go(i, j + 1))

    return go(0, 0)


def reference_rouge_l(a: list[str], b: list[str]) -> float:
    """F1 of LCS precision and recall, written as 2*LCS / (|a| + |b|)."""
    if not a or not b:
        return 0.0
    return 2 * reference_lcs(a, b) / (len(a) + len(b))


def _random_pairs(n: int, seed: int):
    rng = random.Random(seed)
    vocab = ["a", "red", "cat", "dog", "on", "the", "mat", "two", "blue", "cup"]
    for _ in range(n):
        la, lb = rng.randint(0, 14), rng.randint(0, 14)
        size = rng.randint(2, len(vocab))  # small vocabularies give long common subsequences
        yield (
            [rng.choice(vocab[:size]) for _ in range(la)],
            [rng.choice(vocab[:size]) for _ in range(lb)],
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lcs_length_matches_recursive_reference_on_random_token_lists(seed):
    for a, b in _random_pairs(200, seed):
        assert lcs_length(a, b) == reference_lcs(a, b), (a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rouge_l_matches_reference_f1_on_random_token_lists(seed):
    for a, b in _random_pairs(200, seed):
        assert rouge_l(a, b) == pytest.approx(reference_rouge_l(a, b), abs=1e-12), (a, b)


def test_rouge_l_is_symmetric():
    for a, b in _random_pairs(100, 7):
        assert rouge_l(a, b) == pytest.approx(rouge_l(b, a))


def test_rouge_l_known_value():
    # LCS("a cat on the mat", "the cat sat on a mat") = cat on mat = 3; F = 2*3/(5+6)
    a = tokenize("a cat on the mat")
    b = tokenize("the cat sat on a mat")
    assert rouge_l(a, b) == pytest.approx(6 / 11)


def test_identical_strings_score_one():
    tokens = tokenize("Two red apples next to three yellow bananas on a plate.")
    assert rouge_l(tokens, list(tokens)) == 1.0


def test_disjoint_strings_score_zero():
    assert rouge_l(tokenize("red apple"), tokenize("blue car parked outside")) == 0.0


def test_empty_token_list_scores_zero():
    assert rouge_l([], ["a"]) == 0.0
    assert rouge_l(["a"], []) == 0.0
    assert rouge_l([], []) == 0.0


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Cat, on THE mat! 3 cups.") == ["a", "cat", "on", "the", "mat", "3", "cups"]


def test_filter_keeps_a_diverse_candidate():
    f = RougeFilter(0.8, ["A man riding a bicycle down a city street."])
    assert f.offer("Three green bottles stand on a wooden shelf.")
    # and what was kept now guards later candidates
    assert f.max_score("Three green bottles stand on a wooden shelf") == 1.0


def test_filter_rejects_near_duplicate_above_threshold():
    seed = "A man riding a bicycle down a city street."
    near = "A man riding a bicycle down a busy city street."
    assert rouge_l(tokenize(seed), tokenize(near)) > 0.8
    f = RougeFilter(0.8, [seed])
    assert not f.offer(near)


def test_filter_rejects_near_duplicate_of_a_previously_accepted_candidate():
    f = RougeFilter(0.8)
    assert f.offer("A cat sleeping on a laptop keyboard.")
    assert not f.offer("a cat sleeping on the laptop keyboard")


def test_filter_score_equal_to_threshold_is_kept():
    # "a b c d" vs "a b c e": F = 2*3/8 = 0.75
    f = RougeFilter(0.75, ["a b c d"])
    assert f.max_score("a b c e") == pytest.approx(0.75)
    assert f.offer("a b c e")


def test_filter_rejects_empty_or_punctuation_only_text():
    f = RougeFilter(0.8)
    assert not f.offer("")
    assert not f.offer("  ... !!! ")
    assert f.max_score("anything") == 0.0  # nothing was kept


def test_filter_max_score_without_kept_texts_is_zero():
    assert RougeFilter(0.5).max_score("a cat") == 0.0


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, float("nan")])
def test_filter_rejects_threshold_outside_zero_one(threshold):
    with pytest.raises(ValueError, match="threshold"):
        RougeFilter(threshold)


def test_filter_accepts_threshold_one():
    assert RougeFilter(1.0).threshold == 1.0


def test_rouge_l_agrees_with_the_rouge_score_package():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(7)
    vocab = ["a", "cat", "dog", "red", "Two", "on", "the", "mat,", "sofa!", "3", "blue-green"]
    for _ in range(300):
        a = " ".join(rng.choices(vocab, k=rng.randint(0, 12)))
        b = " ".join(rng.choices(vocab, k=rng.randint(0, 12)))
        expected = scorer.score(a, b)["rougeL"].fmeasure
        assert rouge_l(tokenize(a), tokenize(b)) == pytest.approx(expected, abs=1e-12), (a, b)


def test_filter_checks_candidates_against_each_other_and_respects_the_limit():
    f = RougeFilter(0.7, ["a red bus parked by a bakery"])
    verdicts = f.filter(
        [
            "a red bus parked by the bakery",  # near the kept one
            "three dogs on a lawn",
            "three dogs on the lawn",  # near the previous candidate
            "a kite over a beach",
            "two cups of tea",  # over the limit
        ],
        limit=2,
    )
    assert [keep for keep, _ in verdicts] == [False, True, False, True, False]
    assert verdicts[0][1] > 0.7 and verdicts[2][1] > 0.7
    assert len(f) == 3
