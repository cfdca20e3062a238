"""Scorers on tiny, randomly initialised models: each score against a hand computation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from selma_ray import models
from selma_ray.eval.dsg import Question
from selma_ray.eval.scorers import BlipVQA, ClipScore, DSGScore, PickScore, ScoreBatch, unavailable
from selma_ray.testing import png_bytes, random_images

PROMPTS = ["two red apples on a table", "a penguin on a dune", "a cat"]


@pytest.fixture(scope="module")
def clip() -> ClipScore:
    return ClipScore(models.TINY_CLIP)


def test_tiny_scorer_models_build_deterministically(monkeypatch, tmp_path):
    from safetensors.torch import load_file

    weights = []
    for name in ("a", "b"):
        monkeypatch.setenv("SELMA_CACHE", str(tmp_path / name))
        weights.append(load_file(f"{models.resolve(models.TINY_CLIP)}/model.safetensors"))
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])


def _solid(color: str):
    from PIL import Image

    return Image.new("RGB", (32, 32), color)


def _mixed() -> tuple[list, list[str]]:
    """Image-prompt pairs whose cosine under tiny-clip is positive (blue, white with "red") and
    negative (the rest): most pairs of a random CLIP are negative, which would make CLIPScore
    all zeros and hide a scorer that returns zeros."""
    images = [_solid("blue"), _solid("white"), _solid("red"), random_images(1)[0]]
    return images, ["red", "red", "red", "a cat"]


def _clip_by_hand(scorer: ClipScore, images, prompts):
    """The model's own forward pass: normalised embeddings, their cosine, its logits."""
    import torch

    inputs = scorer.processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inputs)
    img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1).numpy(), out.logits_per_image.diagonal().numpy()


def test_clipscore_is_100_times_the_clamped_cosine(clip):
    images, prompts = _mixed()
    cos, _ = _clip_by_hand(clip, images, prompts)
    assert (cos > 0).tolist() == [True, True, False, False]  # both sides of the clamp
    scores = clip.score(images, prompts)
    assert scores == pytest.approx((100 * np.maximum(cos, 0)).tolist(), abs=1e-4)
    assert scores[0] > 0 and scores[2:] == [0.0, 0.0]
    assert clip.score(images, prompts) == scores  # deterministic
    assert clip.cosine(images, prompts).numpy() == pytest.approx(cos, abs=1e-6)


def test_pickscore_is_logit_scale_times_cosine():
    import math

    pick = PickScore(models.TINY_CLIP, models.TINY_CLIP)
    images, prompts = _mixed()
    cos, logits = _clip_by_hand(pick, images, prompts)
    scores = pick.score(images, prompts)
    # the model's own logits are exp(logit_scale) * cosine
    assert scores == pytest.approx(logits.tolist(), abs=1e-4)
    # tiny-clip keeps CLIP's initial logit scale, ln(1/0.07): exp of it is 1/0.07 = 14.29
    scale = math.exp(pick.model.config.logit_scale_init_value)
    assert scale == pytest.approx(1 / 0.07, rel=1e-4)
    assert scores == pytest.approx((scale * cos).tolist(), abs=1e-4)
    # unlike CLIPScore, nothing is clamped: negative cosines give negative PickScores
    assert [s < 0 for s in scores] == [False, False, True, True]
    assert pick.score(images, prompts) == scores  # deterministic


def test_vqa_choice_logprobs_are_log_probabilities_and_deterministic():
    vqa = BlipVQA(models.TINY_VQA)
    images = random_images(2, seed=2)
    questions = ["is there a dog?", "what color is the bus?"]
    choices = [("yes", "no"), ("red", "blue", "green")]
    lp = vqa.choice_logprobs(images, questions, choices)
    assert [len(x) for x in lp] == [2, 3]
    assert all(v < 0 for row in lp for v in row)
    # yes/no alone: P(yes) + P(no) over the first answer token never exceeds 1
    assert np.logaddexp(*lp[0]) < 0
    assert vqa.choice_logprobs(images, questions, choices) == lp
    # batching does not change a pair's answer
    alone = vqa.choice_logprobs(images[1:], questions[1:], choices[1:])
    assert np.allclose(alone[0], lp[1], atol=1e-4)
    # hand-computed: the model's own forward pass with the answer as labels gives the mean
    # cross-entropy over the answer's tokens ([bos] answer [SEP]); times their number it is
    # minus the answer's log-probability
    assert vqa.model.text_decoder.label_smoothing == 0.0
    for i in (0, 1):  # float32 sums over a padded batch: agreement to 1e-4 relative
        expected = [_blip_logprob(vqa, images[i], questions[i], c) for c in choices[i]]
        assert lp[i] == pytest.approx(expected, rel=1e-4)


def _blip_logprob(vqa: BlipVQA, image, question: str, answer: str) -> float:
    import torch

    inputs = vqa.processor(images=[image], text=[question], return_tensors="pt")
    labels = vqa.tokenizer([answer], return_tensors="pt").input_ids  # [CLS] answer [SEP]
    labels[:, 0] = vqa.model.config.text_config.bos_token_id
    with torch.no_grad():
        loss = vqa.model(**inputs, labels=labels).loss
    return -loss.item() * (labels.shape[1] - 1)


def _picks(vqa, image, questions: list[Question]) -> list[str]:
    """The choice the VQA model ranks highest for each question about ``image``."""
    lps = vqa.choice_logprobs(
        [image] * len(questions), [q.question for q in questions], [q.choices for q in questions]
    )
    return [q.choices[int(np.argmax(lp))] for q, lp in zip(questions, lps, strict=True)]


def _other(q: Question, picked: str) -> str:
    return next(c for c in q.choices if c != picked)


def test_dsg_scorer_scores_are_the_dependency_zeroed_share():
    from dataclasses import replace

    scorer = DSGScore(models.TINY_VQA)
    qs = [
        Question("1", "is there an apple?"),
        Question("2", "is the apple red?", ("1",)),
        Question("3", "what color is it?", choices=("red", "blue")),
    ]
    images = random_images(2, seed=3)
    picks = _picks(scorer.vqa, images[0], qs)
    # image 0: the parent is answered wrongly, its child and question 3 rightly
    first = [
        replace(qs[0], answer=_other(qs[0], picks[0])),
        replace(qs[1], answer=picks[1]),
        replace(qs[2], answer=picks[2]),
    ]
    # image 1: its one question is answered rightly
    second = [replace(qs[0], answer=_picks(scorer.vqa, images[1], qs[:1])[0])]
    scores = scorer.score(images, PROMPTS[:2], [first, second])
    # 1 wrong -> 0, 2 right but its parent scored 0 -> 0, 3 right -> 1: 1/3 (2/3 without
    # the zeroing); image 1: 1/1
    assert scores == pytest.approx([1 / 3, 1.0])
    assert scorer.last_details == [
        [
            {"id": "1", "answer": picks[0], "correct": False},
            {"id": "2", "answer": picks[1], "correct": True},
            {"id": "3", "answer": picks[2], "correct": True},
        ],
        [{"id": "1", "answer": second[0].answer, "correct": True}],
    ]


def test_score_batch_udf_adds_columns_and_names_missing_ones():
    udf = ScoreBatch("clip", {"model": models.TINY_CLIP})
    images = random_images(2)
    batch = {"image": np.array([png_bytes(i) for i in images], dtype=object), "prompt": PROMPTS[:2]}
    out = udf(dict(batch))
    assert out["score_clip"].shape == (2,)
    assert np.allclose(out["score_clip"], udf.scorer.score(images, PROMPTS[:2]))
    with pytest.raises(ValueError, match="needs columns"):
        udf({"prompt": PROMPTS[:1]})
    dsg = ScoreBatch("dsg", {"vqa_model": models.TINY_VQA})
    cat = Question("1", "is there a cat?")
    qs = json.dumps([cat.to_dict()])
    out = dsg({**batch, "questions": np.array([qs, qs], dtype=object)})
    # the decoded PNGs are the same pixels, so the answers are those for the images themselves
    picks = [_picks(dsg.scorer.vqa, img, [cat])[0] for img in images]
    assert out["score_dsg"].tolist() == [1.0 if p == "yes" else 0.0 for p in picks]
    assert [json.loads(d) for d in out["dsg_detail"]] == [
        [{"id": "1", "answer": p, "correct": p == "yes"}] for p in picks
    ]


def test_optional_scorers_skip_with_a_reason_when_not_installed():
    import importlib.util

    for name, module in (("image_reward", "ImageReward"), ("hps", "hpsv2")):
        reason = unavailable(name)
        if importlib.util.find_spec(module) is None:
            assert reason and "not installed" in reason
        else:
            assert reason is None
    assert unavailable("clip") is None


def test_vlm_answers_by_choice_likelihood_and_dsg_runs_on_it():
    from selma_ray.eval.scorers import VLMVQA, make_vqa

    vqa = make_vqa(models.TINY_VLM)
    assert isinstance(vqa, VLMVQA) and isinstance(make_vqa(models.TINY_VQA), BlipVQA)
    images = random_images(2, seed=4)
    questions = ["is there a dog?", "what color is the bus?"]
    choices = [("yes", "no"), ("red", "blue", "green")]
    lp = vqa.choice_logprobs(images, questions, choices)
    assert [len(x) for x in lp] == [2, 3] and all(v < 0 for row in lp for v in row)
    assert vqa.choice_logprobs(images[1:], questions[1:], choices[1:])[0] == pytest.approx(lp[1])
    # hand-computed: the answer tokens' log-probabilities right after the chat prompt
    import torch

    ask = "is there a dog? Answer with one of: yes, no."
    content = [{"type": "image"}, {"type": "text", "text": ask}]
    prompt = vqa.processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )
    inputs = vqa.processor(text=[prompt], images=images[:1], return_tensors="pt")
    with torch.no_grad():
        last = vqa.model(**inputs).logits[0, -1].float().log_softmax(-1)
    ids = [vqa.processor.tokenizer(c, add_special_tokens=False).input_ids for c in ("yes", "no")]
    assert all(len(i) == 1 for i in ids)
    assert lp[0] == pytest.approx([last[i[0]].item() for i in ids], abs=1e-4)
    scorer = DSGScore(models.TINY_VLM)
    qs = [Question("1", "is there an apple?"), Question("2", "is it red?", ("1",))]
    right = [p == "yes" for p in _picks(scorer.vqa, images[0], qs)]
    expected = (right[0] + (right[0] and right[1])) / 2  # 2 counts only when its parent does
    assert scorer.score(images[:1], PROMPTS[:1], [qs]) == [expected]
