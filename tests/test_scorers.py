"""Scorers on tiny, randomly initialised models: shapes, ranges, determinism, the maths."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from selma_ray import models
from selma_ray.eval.dsg import Question, dsg_score
from selma_ray.eval.scorers import BlipVQA, ClipScore, DSGScore, PickScore, ScoreBatch, unavailable


def _images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


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


def test_clipscore_is_100_times_the_clamped_cosine(clip):
    import torch

    images = _images(3)
    scores = clip.score(images, PROMPTS)
    assert len(scores) == 3 and all(0.0 <= s <= 100.0 for s in scores)
    assert clip.score(images, PROMPTS) == scores  # deterministic
    # hand-computed: embed separately, normalise, dot, clamp
    inputs = clip.processor(text=PROMPTS, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = clip.model(**inputs)
    img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    cos = (img * txt).sum(-1)
    assert np.allclose(scores, (100 * cos.clamp(min=0)).tolist(), atol=1e-4)
    assert np.allclose(clip.cosine(images, PROMPTS), cos, atol=1e-6)


def test_pickscore_is_logit_scale_times_cosine(clip):
    pick = PickScore(models.TINY_CLIP, models.TINY_CLIP)
    images = _images(3, seed=1)
    scores = pick.score(images, PROMPTS)
    scale = pick.model.logit_scale.exp().item()
    assert np.allclose(scores, (scale * clip.cosine(images, PROMPTS)).tolist(), atol=1e-4)
    assert any(s < 0 for s in scores) or any(s > 0 for s in scores)


def test_vqa_choice_logprobs_are_log_probabilities_and_deterministic():
    vqa = BlipVQA(models.TINY_VQA)
    images = _images(2, seed=2)
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


def test_dsg_scorer_scores_are_the_dependency_zeroed_share():
    scorer = DSGScore(models.TINY_VQA)
    qs = [
        Question("1", "is there an apple?"),
        Question("2", "is the apple red?", ("1",)),
        Question("3", "what color is it?", choices=("red", "blue"), answer="blue"),
    ]
    images = _images(2, seed=3)
    scores = scorer.score(images, PROMPTS[:2], [qs, qs[:1]])
    assert all(0.0 <= s <= 1.0 for s in scores)
    for score, details, questions in zip(scores, scorer.last_details, [qs, qs[:1]], strict=True):
        correct = {d["id"]: d["correct"] for d in details}
        assert score == dsg_score(questions, correct)[0]
        assert all(d["answer"] in q.choices for d, q in zip(details, questions, strict=True))


def test_score_batch_udf_adds_columns_and_names_missing_ones():
    udf = ScoreBatch("clip", {"model": models.TINY_CLIP})
    images = _images(2)
    batch = {"image": np.array([_png(i) for i in images], dtype=object), "prompt": PROMPTS[:2]}
    out = udf(dict(batch))
    assert out["score_clip"].shape == (2,)
    assert np.allclose(out["score_clip"], udf.scorer.score(images, PROMPTS[:2]))
    with pytest.raises(ValueError, match="needs columns"):
        udf({"prompt": PROMPTS[:1]})
    dsg = ScoreBatch("dsg", {"vqa_model": models.TINY_VQA})
    qs = json.dumps([Question("1", "is there a cat?").to_dict()])
    out = dsg({**batch, "questions": np.array([qs, qs], dtype=object)})
    assert set(out["score_dsg"]) <= {0.0, 1.0} and len(json.loads(out["dsg_detail"][0])) == 1


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
    images = _images(2, seed=4)
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
    assert 0.0 <= scorer.score(images[:1], PROMPTS[:1], [qs])[0] <= 1.0
