"""Pure parts of the prompts stage: parsing LLM answers, the per-skill filters, requests."""

from __future__ import annotations

import pytest

from selma_ray.config import load_config
from selma_ray.core.skills import SKILLS, SUB_SKILLS, Skill, get_skills
from selma_ray.prompts.stage import build_requests, requests_needed
from selma_ray.text.filters import SkillPool, normalize
from selma_ray.text.parse import parse_candidates

# ---------------------------------------------------------------- parse_candidates


def test_parse_numbered_list_with_dots_and_parens():
    text = "1. A red cup on a table.\n2) Two cats on a sofa.\n10: A boat at sea."
    assert parse_candidates(text) == [
        "A red cup on a table.",
        "Two cats on a sofa.",
        "A boat at sea.",
    ]


def test_parse_bullets():
    text = "- A dog in the park.\n* A bird on a wire.\n\u2022 A kite in the sky."
    assert parse_candidates(text) == [
        "A dog in the park.",
        "A bird on a wire.",
        "A kite in the sky.",
    ]


def test_parse_strips_stray_quotes():
    text = "1. \"Two cats on a sofa.\"\n2. \u201cA lamp on a desk.\u201d\n3. 'A cup of tea.'"
    assert parse_candidates(text) == ["Two cats on a sofa.", "A lamp on a desk.", "A cup of tea."]


def test_parse_drops_trailing_word_count():
    text = "1. A dog chasing a ball in the park (12 words)\n2. A single red apple (1 word)"
    assert parse_candidates(text) == ["A dog chasing a ball in the park", "A single red apple"]


def test_parse_ignores_preamble_and_closing_lines():
    text = (
        "Sure! Here are 3 new image descriptions:\n"
        "\n"
        "1. A cat sleeping on a windowsill.\n"
        "2. Three mugs on a shelf.\n"
        "I hope these help with your model.\n"
    )
    assert parse_candidates(text) == ["A cat sleeping on a windowsill.", "Three mugs on a shelf."]


def test_parse_trims_indentation_and_whitespace():
    assert parse_candidates("   3.    A chair by the door.   \n") == ["A chair by the door."]


def test_parse_skips_items_that_are_empty_after_cleaning():
    assert parse_candidates('1. ""\n2.\n- \n3. A vase of tulips.') == ["A vase of tulips."]


def test_parse_falls_back_to_plain_lines_when_nothing_is_listed():
    text = 'Here are some descriptions:\n\nA cat on a mat.\n  "A dog on a log."  \n'
    assert parse_candidates(text) == ["A cat on a mat.", "A dog on a log."]


def test_parse_plain_line_fallback_is_not_used_when_any_line_is_listed():
    text = "A plain sentence line.\n1. A listed item."
    assert parse_candidates(text) == ["A listed item."]


def test_refusal_without_list_reaches_pool_and_is_counted_as_junk():
    items = parse_candidates("I'm sorry, I can't help with that.")
    pool = make_pool()
    assert [pool.offer(i) for i in items] == [False] * len(items)
    assert pool.stats["junk"] == len(items) == 1


def test_parse_strips_quotes_around_item_followed_by_word_count():
    assert parse_candidates('1. "A cat on a mat." (5 words)') == ["A cat on a mat."]


def test_normalize_collapses_whitespace_and_strips_quotes():
    assert normalize('  "A  cat\n on\ta mat."  ') == "A cat on a mat."


# ---------------------------------------------------------------- SkillPool


def make_pool(accepted=None, skill="counting", per_skill=1000, threshold=0.8):
    settings = load_config(
        "tiny", [f"prompts.per_skill={per_skill}", f"prompts.rouge_threshold={threshold}"]
    ).prompts
    rows = [{"id": f"{skill}-{i:05d}", "prompt": t} for i, t in enumerate(accepted or [])]
    return SkillPool(SKILLS[skill], settings, accepted=rows)


def texts(pool):
    return [r["prompt"] for r in pool.accepted]


def counts(pool, *keys):
    keys = keys or ("candidates", "duplicate", "too_long", "junk", "rouge")
    return {k: pool.stats[k] for k in keys}


@pytest.fixture
def counting_pool() -> SkillPool:
    return make_pool()


def test_pool_accepts_good_candidate(counting_pool):
    assert counting_pool.offer("Two blue umbrellas leaning against a brick wall.")
    assert texts(counting_pool) == ["Two blue umbrellas leaning against a brick wall."]
    assert counts(counting_pool) == {
        "candidates": 1,
        "duplicate": 0,
        "too_long": 0,
        "junk": 0,
        "rouge": 0,
    }


def test_pool_normalizes_accepted_text(counting_pool):
    assert counting_pool.offer('  "One   green kettle on a stove."  ')
    assert texts(counting_pool) == ["One green kettle on a stove."]


def test_pool_counts_echoed_seed_as_duplicate(counting_pool):
    seed = SKILLS["counting"].seeds[0]
    assert not counting_pool.offer(seed)
    assert not counting_pool.offer(seed.upper())  # case does not hide an echo
    assert counting_pool.stats["duplicate"] == 2
    assert counting_pool.stats["rouge"] == 0
    assert texts(counting_pool) == []


def test_pool_counts_repeat_of_accepted_prompt_as_duplicate(counting_pool):
    text = "Three paper boats floating in a puddle."
    assert counting_pool.offer(text)
    assert not counting_pool.offer(text.lower())
    assert counting_pool.stats["duplicate"] == 1
    assert texts(counting_pool) == [text]


def test_pool_counts_too_long(counting_pool):
    limit = SKILLS["counting"].max_words
    long_text = " ".join(["word"] * (limit + 1))
    assert not counting_pool.offer(long_text)
    assert counting_pool.stats["too_long"] == 1
    # exactly at the limit is fine as far as length goes
    at_limit = "Two cats " + " ".join(["apple"] * (limit - 2))
    assert len(at_limit.split()) == limit
    assert counting_pool.offer(at_limit)


@pytest.mark.parametrize(
    "junk",
    [
        "I'm sorry, but I cannot write that.",
        "As an AI language model I will try.",
        "Here are five lovely scenes of a park.",
        "Here is a list of things.",
        "Two cats.",  # fewer than three words
    ],
)
def test_pool_counts_junk(counting_pool, junk):
    assert not counting_pool.offer(junk)
    assert counting_pool.stats["junk"] == 1
    assert texts(counting_pool) == []


def test_pool_counts_rouge_near_duplicate_of_a_seed(counting_pool):
    near = "Three dogs sitting in a row on a green lawn today."
    assert not counting_pool.offer(near)
    assert counting_pool.stats["rouge"] == 1
    assert counting_pool.stats["duplicate"] == 0


def test_pool_counts_each_rejection_reason_separately(counting_pool):
    seed = SKILLS["counting"].seeds[1]
    offers = [
        "Two blue umbrellas leaning against a brick wall.",  # accepted
        seed,  # duplicate (echoed seed)
        "Two blue umbrellas leaning against a brick wall.",  # duplicate (already accepted)
        " ".join(["many"] * 40),  # too long
        "Here are some new descriptions.",  # junk
        "Two blue umbrellas leaning against a stone wall.",  # rouge
        "Three paper boats floating in a puddle.",  # accepted
    ]
    results = [counting_pool.offer(o) for o in offers]
    assert results == [True, False, False, False, False, False, True]
    assert counts(counting_pool) == {
        "candidates": 7,
        "duplicate": 2,
        "too_long": 1,
        "junk": 1,
        "rouge": 1,
    }
    assert len(counting_pool.accepted) == 2


def test_pool_resumes_with_previously_accepted_prompts():
    earlier = ["Three paper boats floating in a puddle."]
    pool = make_pool(earlier)
    assert texts(pool) == earlier
    assert [t for _, t in pool.examples_pool()] == [*SKILLS["counting"].seeds, *earlier]
    assert not pool.offer(earlier[0])
    assert pool.stats["duplicate"] == 1
    earlier.append("mutating the caller's list must not change the pool")
    assert len(pool.accepted) == 1


# ---------------------------------------------------------------- build_requests


def _pools(cfg, accepted=None):
    accepted = accepted or {}
    return {
        s.name: SkillPool(
            s,
            cfg.prompts,
            accepted=[{"id": str(i), "prompt": t} for i, t in enumerate(accepted.get(s.name, []))],
        )
        for s in get_skills(cfg.prompts.skills)
    }


def test_build_requests_is_deterministic_for_same_config():
    cfg = load_config("tiny")
    first = build_requests(cfg, _pools(cfg), 0)
    second = build_requests(load_config("tiny"), _pools(cfg), 0)
    assert first == second
    pools = _pools(cfg)
    expected = sum(
        requests_needed(p, cfg.prompts.per_skill, cfg.prompts.new_per_request, 99)
        for p in pools.values()
    )
    assert len(first) == expected > 0


def test_build_requests_seeds_differ_between_rounds_requests_and_run_seeds():
    cfg = load_config("tiny")
    round0 = build_requests(cfg, _pools(cfg), 0)
    round1 = build_requests(cfg, _pools(cfg), 1)
    other = load_config("tiny", ["run.seed=1"])
    reseeded = build_requests(other, _pools(other), 0)
    seeds0 = [r["seed"] for r in round0]
    assert len(set(seeds0)) == len(seeds0)
    assert seeds0 != [r["seed"] for r in round1]
    assert seeds0 != [r["seed"] for r in reseeded]


def test_build_requests_instruction_uses_examples_from_the_skill_pool():
    cfg = load_config("tiny", ["prompts.in_context_examples=2", "prompts.new_per_request=7"])
    pools = _pools(cfg)
    for req in build_requests(cfg, pools, 0):
        pool = pools[req["skill"]]
        shown = [t for _, t in pool.examples_pool() if t in req["instruction"]]
        assert len(shown) == 2
        assert "Write 7 new" in req["instruction"]
        assert 0 <= req["seed"] < 2**31


def test_build_requests_skips_skills_that_reached_per_skill():
    cfg = load_config("tiny", ["prompts.skills=[counting, everyday_scenes]", "prompts.per_skill=2"])
    done = {"counting": ["Three paper boats in a puddle.", "One lamp beside two books."]}
    requests = build_requests(cfg, _pools(cfg, done), 0)
    assert {r["skill"] for r in requests} == {"everyday_scenes"}


def test_build_requests_is_empty_when_every_skill_is_done():
    cfg = load_config("tiny", ["prompts.skills=[counting]", "prompts.per_skill=1"])
    assert build_requests(cfg, _pools(cfg, {"counting": ["One lamp beside two books."]}), 0) == []


def test_build_requests_caps_examples_at_pool_size():
    cfg = load_config("tiny", ["prompts.skills=[counting]", "prompts.in_context_examples=50"])
    pools = _pools(cfg)
    for req in build_requests(cfg, pools, 0):
        assert all(seed in req["instruction"] for seed in SKILLS["counting"].seeds)


# ---------------------------------------------------------------- skills


def test_get_skills_keeps_requested_order():
    assert [s.name for s in get_skills(["counting", "dense_detail"])] == [
        "counting",
        "dense_detail",
    ]


def test_get_skills_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as err:
        get_skills(["counting", "juggling"])
    msg = str(err.value)
    assert "juggling" in msg
    for name in SKILLS:
        assert name in msg


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_skill_instruction_contains_word_limit_and_examples(name):
    skill = SKILLS[name]
    examples = list(skill.seeds[:2])
    text = skill.instruction(examples, 5)
    assert f"at most {skill.max_words} words" in text
    for i, example in enumerate(examples, 1):
        assert f"{i}. {example}" in text
    assert "Write 5 new" in text
    assert skill.description in text
    assert SUB_SKILLS in text
    if skill.extra_rule:
        assert skill.extra_rule in text


def test_skill_word_limits_differ_for_long_form_skills():
    assert SKILLS["dense_detail"].max_words > SKILLS["counting"].max_words
    text = SKILLS["dense_detail"].instruction(["x y z"], 3)
    assert f"at most {SKILLS['dense_detail'].max_words} words" in text


def test_skill_needs_three_seeds():
    with pytest.raises(ValueError, match="at least 3 seed"):
        Skill(name="x", description="d", seeds=("a", "b"))


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_registered_skill_seeds_fit_their_own_word_limit(name):
    skill = SKILLS[name]
    assert skill.name == name
    for seed in skill.seeds:
        assert len(seed.split()) <= skill.max_words


@pytest.mark.parametrize(
    "text",
    [
        "output = []",
        "type(int(num), dtype=int), type(num))",
        "I'm ready to help with the task. What's your text that needs to be edited?",
        "Sure, three cats on a mat",
        "<b>two dogs</b> in a park",
        "The number of diverse images for your text-to-image model is 15.",
        "Each description must satisfy the specified visual skills: count.",
    ],
)
def test_code_chatter_and_questions_are_junk(text):
    pool = make_pool()
    assert not pool.offer(text)
    assert pool.stats["junk"] == 1


def test_trailing_commentary_is_cut_from_a_description():
    assert normalize("A candle melting in a kitchen - This is an unusual combination.") == (
        "A candle melting in a kitchen"
    )
    assert normalize("Two cats on a sofa: it looks cozy") == "Two cats on a sofa"
    assert normalize("A red bus - parked by a bakery") == "A red bus - parked by a bakery"


def test_near_duplicates_differing_only_in_case_punctuation_or_articles_are_duplicates():
    pool = make_pool()
    assert pool.offer("Two blue umbrellas leaning against a brick wall.")
    assert not pool.offer("two blue umbrellas, leaning against the brick wall!")
    assert counts(pool, "duplicate", "rouge") == {"duplicate": 1, "rouge": 0}


def test_filters_run_in_order_and_each_candidate_gets_one_verdict():
    pool = make_pool(per_skill=2)
    records = pool.offer_many(
        [
            "Here are some lovely scenes of a park today.",  # junk beats everything after it
            " ".join(["long"] * 40) + " Here are",  # too long is checked before junk
            "Two blue umbrellas leaning against a brick wall.",
            "Three paper boats floating in a puddle.",
            "One lamp beside two books on a desk.",  # surplus: the target is reached
        ],
        round_idx=3,
        examples=["counting-seed-0"],
    )
    assert [r["verdict"] for r in records] == [
        "junk",
        "too_long",
        "accepted",
        "accepted",
        "surplus",
    ]
    assert all(r["round"] == 3 and r["examples"] == ["counting-seed-0"] for r in records)
    assert pool.accepted[0]["id"] == "counting-00000" and pool.accepted[1]["max_rouge"] < 0.8
    assert pool.stats["candidates"] == 5 and pool.stats["surplus"] == 1


def test_requests_needed_follows_the_observed_acceptance_rate():
    pool = make_pool()
    assert requests_needed(pool, per_skill=10, new_per_request=5, cap=100) == 4  # 50% prior
    pool.stats.update(candidates=100, accepted=10)
    assert requests_needed(pool, per_skill=10, new_per_request=5, cap=100) == 20
    assert requests_needed(pool, per_skill=10, new_per_request=5, cap=7) == 7
    pool.accepted = [{"prompt": "x"}] * 10
    assert requests_needed(pool, per_skill=10, new_per_request=5, cap=7) == 0


def test_parse_handles_parenthesised_numbers_and_echoed_instructions():
    text = "Write 3 new descriptions:\n(1) Two cats on a sofa.\n(2) A kite over a beach.\n\n"
    assert parse_candidates(text) == ["Two cats on a sofa.", "A kite over a beach."]


def test_semantic_filter_rejects_paraphrases_that_rouge_lets_through():
    settings = load_config(
        "tiny", ["prompts.semantic_threshold=0.8", "prompts.rouge_threshold=0.8"]
    ).prompts
    pool = SkillPool(SKILLS["counting"], settings)
    assert pool.offer("Two red apples next to a blue cup on the kitchen table.")
    assert not pool.offer("A pair of crimson apples beside one blue mug on a kitchen table.")
    assert pool.offer("Three children flying kites over a windy beach.")
    assert counts(pool, "semantic", "rouge") == {"semantic": 1, "rouge": 0}
