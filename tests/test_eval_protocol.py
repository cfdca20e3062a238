"""The paper's evaluation protocol: DSG-1K and TIFA v1.0 files, generated VQA answers,
dependency zeroing, the per-question and per-prompt DSG averages, and the comparability note."""

from __future__ import annotations

import csv
import json
import logging
import math
import re

import numpy as np
import pytest

from selma_ray import models
from selma_ray.config import ConfigError, load_config
from selma_ray.core.rundir import RunDir
from selma_ray.eval import dsg, protocol
from selma_ray.eval import inputs as eval_inputs
from selma_ray.eval import stage as evaluate
from selma_ray.eval import stats as eval_stats
from selma_ray.eval.dsg import Question
from selma_ray.eval.scorers import DSGScore, ScoreBatch, TIFAScore, make_vqa
from selma_ray.testing import png_bytes, random_images

DSG_SAMPLE = "builtin:dsg-1k-anns.sample.csv"
TIFA_SAMPLE = "builtin:tifa_v1.0_question_answers.sample.json"
# the header of dsg-1k-anns.csv in github.com/j-min/DSG, and the fields of the entries of
# tifa_v1.0_question_answers.json in github.com/Yushi-Hu/tifa (coco_val_id: COCO ids only)
DSG1K_HEADER = [
    "item_id",
    "text",
    "keywords",
    "proposition_id",
    "dependency",
    "category_broad",
    "category_detailed",
    "tuple",
    "question_natural_language",
]
TIFA_FIELDS = {"id", "caption", "question", "choices", "answer", "element_type", "element"}


# --- the benchmark files -------------------------------------------------------------------


def test_dsg1k_fixture_has_the_real_layout_and_parses_into_prompts_questions_and_dependencies():
    path = dsg.BENCHMARKS / DSG_SAMPLE.removeprefix("builtin:")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == DSG1K_HEADER and all(len(r) == len(DSG1K_HEADER) for r in rows)

    prompts = dsg.read_dsg1k(DSG_SAMPLE)
    assert [(p.id, p.category, len(p.questions)) for p in prompts] == [
        ("countbench_3", "countbench", 7),
        ("whoops_12", "whoops", 5),
        ("midjourney_7", "midjourney", 3),
        ("posescript_4", "posescript", 4),
    ]
    # one prompt per item_id, its text read once (a quoted text with a comma stays whole)
    assert prompts[0].prompt == "Two brown dogs sleeping on a red sofa, seen from above"
    dogs = {q.id: q for q in prompts[0].questions}
    assert dogs["1"].parents == () and dogs["1"].question == "Are there dogs?"
    assert dogs["2"].parents == ("1",) and dogs["2"].category == "other"  # count
    assert dogs["6"].parents == ("5",)
    assert dogs["7"].parents == ("1", "5") and dogs["7"].category == "relation"
    assert all(q.choices == ("yes", "no") and q.answer == "yes" for q in dogs.values())
    assert all(q.source == dsg.FROM_FILE for p in prompts for q in p.questions)
    pose = {q.id: q.parents for q in prompts[3].questions}
    assert pose == {"1": (), "2": ("1",), "3": ("2",), "4": ("1",)}  # 3 is a grandchild of 1
    # given as eval.prompts_file the file no longer fails with "prompt ids must be unique"
    as_prompts = dsg.read_prompts(DSG_SAMPLE)
    assert [(p.id, p.prompt, len(p.questions)) for p in as_prompts] == [
        (p.id, p.prompt, len(p.questions)) for p in prompts
    ]
    # and its questions are those read_dsg_csv (eval.questions_file) gives
    assert dsg.read_dsg_csv(DSG_SAMPLE) == {p.id: p.questions for p in prompts}


def test_dsg1k_reader_names_what_is_wrong(tmp_path):
    head = ",".join(DSG1K_HEADER)
    first = "a_1,one,k,1,0,entity,whole,t,Is it?"
    bad = {
        "missing.csv": (["item_id,text,question", "a_1,x,Is it?"], "proposition_id"),
        "two_texts.csv": ([head, first, "a_1,two,k,2,1,e,w,t,B?"], "two different texts"),
        "repeat.csv": ([head, first, "a_1,one,k,1,0,e,w,t,B?"], "repeats proposition 1"),
        "empty.csv": ([head], "no rows"),
    }
    for name, (lines, message) in bad.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=message):
            dsg.read_dsg1k(str(tmp_path / name))


def test_tifa_fixture_has_the_real_layout_and_parses_into_prompts_and_choices():
    path = dsg.BENCHMARKS / TIFA_SAMPLE.removeprefix("builtin:")
    entries = json.loads(path.read_text())
    assert all(TIFA_FIELDS <= set(e) <= TIFA_FIELDS | {"coco_val_id"} for e in entries)
    assert all(("coco_val_id" in e) == e["id"].startswith("coco_") for e in entries)

    prompts = dsg.read_tifa(TIFA_SAMPLE)
    assert [(p.id, p.category, p.prompt, len(p.questions)) for p in prompts] == [
        ("coco_101", "coco", "A man riding a bicycle past a red fire hydrant.", 4),
        ("drawbench_9", "drawbench", "Four apples in a wooden bowl.", 3),
        ("partiprompt_5", "partiprompt", "a blue cup on top of a closed book", 3),
    ]
    count = prompts[1].questions[1]
    assert count.question == "how many apples are there?"
    assert count.choices == ("1", "2", "3", "4") and count.answer == "4"
    assert count.category == "counting" and count.parents == ()
    assert [q.id for q in prompts[0].questions] == ["1", "2", "3", "4"]


def test_benchmarks_load_together_tagged_with_their_protocol_and_ids_must_not_clash(tmp_path):
    both = dsg.read_benchmarks(DSG_SAMPLE, TIFA_SAMPLE)
    assert [(p.id, p.benchmark) for p in both] == [
        ("countbench_3", "dsg"),
        ("whoops_12", "dsg"),
        ("midjourney_7", "dsg"),
        ("posescript_4", "dsg"),
        ("coco_101", "tifa"),
        ("drawbench_9", "tifa"),
        ("partiprompt_5", "tifa"),
    ]
    assert [p.benchmark for p in dsg.read_benchmarks(None, TIFA_SAMPLE)] == ["tifa"] * 3
    clash = tmp_path / "tifa.json"
    entry = json.loads((dsg.BENCHMARKS / TIFA_SAMPLE[8:]).read_text())[0]
    clash.write_text(json.dumps([{**entry, "id": "whoops_12"}]))
    with pytest.raises(ValueError, match="whoops_12"):
        dsg.read_benchmarks(DSG_SAMPLE, str(clash))


# --- scoring: zeroing, averages, judging generated answers ----------------------------------

# countbench_3: 1 dogs, 2 two (1), 3 brown (1), 4 sleeping (1), 5 sofa, 6 red (5), 7 on (1, 5)
# whoops_12: 1 snowman, 2 beach, 3 melting (1), 4 sunny (2), 5 on (1, 2)
# midjourney_7: 1 painting, 2 lighthouse, 3 dusk; posescript_4: 1 person, 2 arm (1),
# 3 raised (2), 4 standing (1)
ANSWERS = {  # prompt -> the questions answered "yes" (the others "no")
    "countbench_3": {"1", "2", "4", "6", "7"},  # sofa (5) no: 6 and 7 zeroed, brown (3) no
    "whoops_12": {"1", "2", "4", "5"},  # melting (3) no: a leaf, costs only itself
    "midjourney_7": {"1", "2", "3"},
    "posescript_4": {"2", "3", "4"},  # person (1) no: 2, 4 and grandchild 3 zeroed
}
# by hand: countbench 1,1,0,1,0,0,0 = 3/7; whoops 1,1,0,1,1 = 4/5; midjourney 3/3; pose 0/4
HAND = {"countbench_3": 3 / 7, "whoops_12": 4 / 5, "midjourney_7": 1.0, "posescript_4": 0.0}
HAND_QUESTION_AVERAGE = (3 + 4 + 3 + 0) / (7 + 5 + 3 + 4)
HAND_PROMPT_AVERAGE = (3 / 7 + 4 / 5 + 1 + 0) / 4


def test_dependency_zeroing_matches_hand_computed_scores():
    prompts = dsg.read_dsg1k(DSG_SAMPLE)
    for p in prompts:
        correct = {q.id: q.id in ANSWERS[p.id] for q in p.questions}
        score, per = dsg.dsg_score(p.questions, correct)
        assert score == pytest.approx(HAND[p.id]), p.id
    pose = prompts[3]
    _, per = dsg.dsg_score(pose.questions, {q.id: q.id in ANSWERS[pose.id] for q in pose.questions})
    assert per == {"1": 0, "2": 0, "3": 0, "4": 0}
    assert dsg.tifa_score(pose.questions, {"1": True, "2": False, "3": True, "4": True}) == 0.75


def test_both_dsg_averages_match_hand_computed_values_and_the_headline_follows_the_setting():
    prompts = dsg.read_dsg1k(DSG_SAMPLE)
    cats = {p.id: p.category for p in prompts}
    # base scores as above (two seeds with the same score); merged gets every question right
    # in countbench_3 and posescript_4, so its paired gains are 4/7 (7 q.) and 1 (4 q.)
    merged = {**HAND, "countbench_3": 1.0, "posescript_4": 1.0}
    rows = [
        {"variant": v, "prompt_id": pid, "seed_index": k, "score_dsg": s}
        for v, table in (("base", HAND), ("merged", merged))
        for pid, s in table.items()
        for k in range(2)
    ]
    for headline in ("question", "prompt"):
        metrics = eval_stats.aggregate(rows, ["dsg"], cats, n_boot=200)
        protocol.dsg_averages(metrics["dsg"], rows, prompts, headline, cats, n_boot=200)
        base, top = metrics["dsg"]["base"], metrics["dsg"]["merged"]
        assert base["average"] == headline
        assert base["averages"]["question"]["mean"] == pytest.approx(HAND_QUESTION_AVERAGE)
        assert base["averages"]["question"]["n_questions"] == 19
        assert base["averages"]["prompt"]["mean"] == pytest.approx(HAND_PROMPT_AVERAGE)
        assert base["averages"]["prompt"]["n"] == 4
        gain_q = (7 * (1 - 3 / 7) + 4 * 1.0) / 19
        gain_p = ((1 - 3 / 7) + 1.0) / 4
        if headline == "question":
            assert base["mean"] == pytest.approx(HAND_QUESTION_AVERAGE)
            assert top["vs_base"]["mean"] == pytest.approx(gain_q)
            # a category of one prompt: its own score
            assert base["by_category"]["countbench"]["mean"] == pytest.approx(3 / 7)
        else:
            assert base["mean"] == pytest.approx(HAND_PROMPT_AVERAGE)
            assert top["vs_base"]["mean"] == pytest.approx(gain_p)
        assert top["vs_base"]["win_rate"] == pytest.approx(2 / 4)
        lo, hi = base["ci"]
        assert lo <= base["mean"] <= hi
    with pytest.raises(ValueError, match="choose from"):
        protocol.dsg_averages({}, rows, prompts, "image", cats)


def test_weighted_summary_is_the_plain_mean_when_all_weights_are_equal():
    x = [0.2, 0.9, 0.4, 1.0, 0.0]
    equal = protocol.weighted_summary(x, [3] * 5, n_boot=300, seed=1)
    plain = eval_stats.summarize(x, n_boot=300, seed=1)
    assert equal["mean"] == pytest.approx(plain["mean"])
    assert equal["ci"] == pytest.approx(plain["ci"])  # same resamples, same means
    assert math.isnan(protocol.weighted_summary([], [])["mean"])


def test_generated_answers_are_normalised_then_compared_with_yes_or_mapped_to_a_choice():
    yes_no = Question("1", "Is there a dog?")
    assert [dsg.normalize_answer(a) for a in ("Yes.", " YES! ", "no,", "Dark-blue")] == [
        "yes",
        "yes",
        "no",
        "dark blue",
    ]
    # DSG: right only when the normalised answer is "yes"
    assert [dsg.judge_answer(yes_no, a) == "yes" for a in ("Yes.", "yes", "yes there is", "")] == [
        True,
        True,
        False,
        False,
    ]
    color = Question("2", "what color?", choices=("red", "yellow", "blue"), answer="red")
    count = Question("3", "how many?", choices=("1", "2", "3", "4"), answer="3")
    where = Question("4", "where?", choices=("on top of the book", "under the book"), answer="x")
    assert dsg.judge_answer(color, "Red.") == "red"  # same text
    assert dsg.judge_answer(count, "three") == "3"  # number words as digits
    assert dsg.judge_answer(color, "a red fire hydrant") == "red"  # the one choice named
    shade = Question("5", "what color?", choices=("red", "green", "reddish"), answer="red")
    assert dsg.judge_answer(shade, "red and shiny") == "red"  # named; difflib says reddish
    assert dsg.judge_answer(where, "on top") == "on top of the book"  # most similar
    assert dsg.judge_answer(color, "") == ""  # nothing earns no choice
    assert dsg.judge_answer(color, "qqq") == ""  # no similarity at all: no choice
    # TIFA judges yes/no questions by nearest choice too
    assert dsg.judge_answer(yes_no, "yes there is", nearest=True) == "yes"


class _ScriptedVQA:
    """Stands in for a VQA model in a test of the scorers' own logic: answers each question
    with a scripted free-form text."""

    def __init__(self, script: dict[str, str]):
        self.script, self.calls = script, []

    def generate_answers(self, images, questions, choices, list_choices=False):
        self.calls.append(list_choices)
        return [self.script[q] for q in questions]


def test_dsg_and_tifa_scorers_judge_generated_answers_by_their_protocols():
    prompts = {p.id: p for p in dsg.read_benchmarks(DSG_SAMPLE, TIFA_SAMPLE)}
    pose, cup = prompts["posescript_4"], prompts["partiprompt_5"]
    script = {q.question: "Yes." for q in pose.questions}
    script[pose.questions[0].question] = "no"  # the person: its children are zeroed
    script.update(
        {"is there a cup?": "yes", "what color is the cup?": "Blue!", "where is the cup?": "under"}
    )
    scorer = object.__new__(DSGScore)  # the model is scripted; the scoring logic is real
    scorer.vqa, scorer.mode, scorer.last_details = _ScriptedVQA(script), "generate", []
    assert scorer.score([None], ["p"], [pose.questions]) == [0.0]
    assert [d["correct"] for d in scorer.last_details[0]] == [False, True, True, True]
    assert scorer.last_details[0][0] == {
        "id": "1",
        "answer": "no",
        "correct": False,
        "generated": "no",
    }
    tifa = object.__new__(TIFAScore)
    tifa.vqa, tifa.mode, tifa.last_details = _ScriptedVQA(script), "generate", []
    assert tifa.score([None, None], ["a", "b"], [cup.questions, None])[0] == pytest.approx(2 / 3)
    assert [d["answer"] for d in tifa.last_details[0]] == ["yes", "blue", "under the book"]
    assert tifa.last_details[1] == []
    assert math.isnan(tifa.score([None], ["b"], [None])[0])  # not a TIFA prompt: not scored
    assert tifa.vqa.calls[0] is True and scorer.vqa.calls[0] is False  # TIFA lists choices


# --- generate mode on real (tiny) models ---------------------------------------------------


def _blip_generate(vqa, image, question: str) -> str:
    """The model's own greedy answer, decoded without its start token."""
    import torch

    inputs = vqa.processor(images=[image], text=[question], return_tensors="pt")
    with torch.no_grad():
        out = vqa.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return vqa.tokenizer.decode(out[0, 1:], skip_special_tokens=True).strip()


def _bias_answer(vqa, word: str) -> None:
    """Make the tiny BLIP answer ``word``: its logit first, then [SEP] (end of answer), which
    the first step may not produce."""
    import torch

    tok = vqa.tokenizer
    bias = vqa.model.text_decoder.cls.predictions.decoder.bias
    with torch.no_grad():
        bias[tok.convert_tokens_to_ids(word)] += 50.0
        bias[tok.sep_token_id] += 100.0
    vqa.model.text_decoder.generation_config.min_new_tokens = 1


def test_generate_mode_with_tiny_blip_vqa_scores_what_the_model_generates():
    images = random_images(2, seed=5)
    qs = [Question("1", "is there a dog?"), Question("2", "is the dog brown?", ("1",))]
    scorer = DSGScore(models.TINY_VQA, mode="generate")
    scores = scorer.score(images, ["a", "b"], [qs, qs])
    for image, details, value in zip(images, scorer.last_details, scores, strict=True):
        generated = [_blip_generate(scorer.vqa, image, q.question) for q in qs]
        assert [d["generated"] for d in details] == generated
        right = [dsg.normalize_answer(g) == "yes" for g in generated]
        assert [d["correct"] for d in details] == right
        assert value == (right[0] + (right[0] and right[1])) / 2
    # a model that answers "yes": every question right; one that answers "no": none
    _bias_answer(scorer.vqa, "yes")
    assert scorer.score(images, ["a", "b"], [qs, qs]) == [1.0, 1.0]
    assert [d["generated"] for d in scorer.last_details[0]] == ["yes", "yes"]
    no = DSGScore(models.TINY_VQA, mode="generate")
    _bias_answer(no.vqa, "no")
    assert no.score(images, ["a", "b"], [qs, qs]) == [0.0, 0.0]
    tifa = TIFAScore(models.TINY_VQA, mode="generate")
    _bias_answer(tifa.vqa, "no")
    mc = [Question("1", "is it empty?", answer="no"), Question("2", "is it red?")]
    assert tifa.score(images[:1], ["a"], [mc]) == [0.5]


def test_blip_answers_do_not_depend_on_the_other_questions_in_their_batch():
    """transformers' BLIP decoder attends to a padded question's padding; questions are
    batched by length so that a short question batched with a long one keeps its answer."""
    import torch

    from selma_ray.eval.scorers import BlipVQA

    vqa = BlipVQA(models.TINY_VQA)
    with torch.no_grad():  # the random tiny model barely looks at its input: make it look
        for name, param in vqa.model.text_decoder.named_parameters():
            if "crossattention" in name and name.endswith("weight"):
                param.mul_(8.0)
        vqa.model.text_decoder.cls.predictions.decoder.weight.mul_(8.0)
    images = random_images(3, seed=11)
    questions = ["a?", "is there a very long question about many different things here?", "dog?"]
    choices = [("yes", "no")] * 3
    alone = [_blip_generate(vqa, i, q) for i, q in zip(images, questions, strict=True)]
    assert len(set(alone)) > 1  # the answers depend on the question and image
    assert vqa.generate_answers(images, questions, choices) == alone
    batched = vqa.choice_logprobs(images, questions, choices)
    for k in range(3):
        single = vqa.choice_logprobs(images[k : k + 1], questions[k : k + 1], choices[:1])[0]
        assert batched[k] == pytest.approx(single, abs=1e-4)


def test_generate_mode_with_a_tiny_vlm_decodes_only_the_new_tokens():
    import torch

    vqa = make_vqa(models.TINY_VLM)
    images = random_images(2, seed=6)
    questions, choices = ["is there a dog?", "what color?"], [("yes", "no"), ("red", "blue")]
    answers = vqa.generate_answers(images, questions, choices)
    for image, q, c, answer in zip(images, questions, choices, answers, strict=True):
        inputs = vqa.processor(text=[vqa._chat(q, c)], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = vqa.model.generate(**inputs, max_new_tokens=16, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        assert answer == vqa.processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def _tiny_blip2(out, language_model: str) -> str:
    """A tiny, randomly initialised Blip2ForConditionalGeneration (OPT or T5 language model)
    with the tiny BLIP VQA model's tokenizer and image processor, saved to ``out``."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipProcessor,
    )

    blip = BlipProcessor.from_pretrained(models.resolve(models.TINY_VQA))
    tok = blip.tokenizer
    processor = Blip2Processor(
        image_processor=blip.image_processor, tokenizer=tok, num_query_tokens=4
    )
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.sep_token_id}
    if language_model == "opt":
        text = {
            "model_type": "opt",
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 128,
            "bos_token_id": tok.cls_token_id,
            **ids,
        }
    else:
        text = {
            "model_type": "t5",
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 2,
            "num_heads": 4,
            "decoder_start_token_id": tok.pad_token_id,
            **ids,
        }
    text["vocab_size"] = len(tok)
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        qformer_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": len(tok),
        },
        text_config=text,
        num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    Blip2ForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("language_model", ["opt", "t5"])
def test_generate_mode_runs_with_a_tiny_blip2(tmp_path, language_model):
    import torch

    from selma_ray.eval.scorers import Blip2VQA

    path = _tiny_blip2(tmp_path / "blip2", language_model)
    scorer = TIFAScore(path, mode="generate")
    vqa = scorer.vqa
    assert isinstance(vqa, Blip2VQA) and vqa.encoder_decoder == (language_model == "t5")
    images = random_images(2, seed=7)
    qs = [
        Question("1", "what color is it?", choices=("red", "blue"), answer="red"),
        Question("2", "is it round?"),
    ]
    scores = scorer.score(images, ["a", "b"], [qs, qs])
    for image, details, value in zip(images, scorer.last_details, scores, strict=True):
        for q, d in zip(qs, details, strict=True):
            # by hand: the model's own greedy answer to SELMA's TIFA prompt for BLIP-2
            prompt = f"Question: {q.question} Options: {', '.join(q.choices)} Answer:"
            inputs = vqa.processor(images=[image], text=[prompt], return_tensors="pt")
            with torch.no_grad():
                out = vqa.model.generate(**inputs, max_new_tokens=16, do_sample=False)[0]
            n = inputs["input_ids"].shape[1]
            if language_model == "opt" and out.shape[0] >= n:
                assert torch.equal(out[:n], inputs["input_ids"][0])  # the prompt comes back
                out = out[n:]
            expected = vqa.processor.tokenizer.decode(out, skip_special_tokens=True).strip()
            assert d["generated"] == expected
            assert d["answer"] == dsg.match_choice(expected, q.choices)
            assert d["correct"] == (d["answer"] == q.answer)
        assert value == sum(d["correct"] for d in details) / 2
    # made to answer "yes" (then the end): right where the key is yes, wrong where it is no
    tok = vqa.processor.tokenizer
    config = vqa.model.language_model.generation_config
    config.sequence_bias = {(tok.convert_tokens_to_ids("yes"),): 50.0, (tok.sep_token_id,): 100.0}
    config.min_new_tokens = 1
    yes_no = [Question("1", "is it round?"), Question("2", "is it empty?", answer="no")]
    assert scorer.score(images[:1], ["a"], [yes_no]) == [0.5]
    assert [d["generated"] for d in scorer.last_details[0]] == ["yes", "yes"]
    with pytest.raises(ValueError, match="vqa_mode=generate"):
        DSGScore(path, mode="rank")


def test_score_batch_scores_only_the_prompts_given_questions_for(tmp_path):
    images = random_images(3, seed=8)
    batch = {
        "image": np.array([png_bytes(i) for i in images], dtype=object),
        "prompt": np.array(["a", "b", "c"], dtype=object),
        "prompt_id": np.array(["t1", "d1", "t1"], dtype=object),
    }
    q = Question("1", "is it red?", choices=("yes", "no"), answer="yes")
    udf = ScoreBatch(
        "tifa",
        {"vqa_model": models.TINY_VQA, "vqa_mode": "generate"},
        questions={"t1": [q.to_dict()]},
    )
    _bias_answer(udf.scorer.vqa, "yes")
    out = udf(dict(batch))
    assert out["score_tifa"][[0, 2]].tolist() == [1.0, 1.0] and math.isnan(out["score_tifa"][1])
    details = [json.loads(d) for d in out["tifa_detail"]]
    assert details[1] == [] and details[0] == [
        {"id": "1", "answer": "yes", "correct": True, "generated": "yes"}
    ]
    with pytest.raises(ValueError, match="prompt_id"):
        udf({"image": batch["image"], "prompt": batch["prompt"]})


# --- config, stage and report --------------------------------------------------------------

SKILLS = ["counting", "everyday_scenes"]


def _cfg(root, *overrides: str):
    return load_config(
        "tiny", [f"run.dir={root}", f"prompts.skills=[{', '.join(SKILLS)}]", *overrides]
    )


def _training(root) -> None:
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    for skill in SKILLS:
        row = {"id": f"{skill}-0", "skill": skill, "prompt": f"a {skill} training prompt"}
        (root / "prompts" / f"{skill}.jsonl").write_text(json.dumps(row) + "\n")


def test_paper_presets_evaluate_like_the_paper_and_benchmark_files_are_checked():
    for preset in ("sd14", "sd2", "sdxl", "weak_to_strong"):
        ec = load_config(preset).eval
        assert (ec.vqa_mode, ec.dsg_average) == ("generate", "question"), preset
        assert {"dsg", "tifa"} <= set(ec.scorers) and ec.tifa_vqa_model, preset
        assert ec.dsg_file is None and ec.tifa_file is None  # the user's files
    tiny = load_config("tiny").eval
    assert (tiny.vqa_mode, tiny.dsg_average) == ("rank", "prompt")  # unchanged default
    with pytest.raises(ConfigError, match="eval.dsg_file.*DSG-1K annotation CSV"):
        load_config("sd14", ["eval.dsg_file=/data/tifa_v1.0_question_answers.json"])
    with pytest.raises(ConfigError, match="eval.tifa_file.*TIFA v1.0 question JSON"):
        load_config("sd14", ["eval.tifa_file=/data/dsg-1k-anns.csv"])
    with pytest.raises(ConfigError, match="eval.vqa_mode"):
        load_config("sd14", ["eval.vqa_mode=likelihood"])


# The first two prompts of each benchmark sample, scored in generate mode.
BENCHMARK_FILES = (
    f"eval.dsg_file={DSG_SAMPLE}",
    f"eval.tifa_file={TIFA_SAMPLE}",
    "eval.max_prompts=2",
    "eval.scorers=[clip, dsg, tifa]",
    "eval.vqa_mode=generate",
)


def test_benchmark_files_replace_the_prompts_file_and_keep_their_questions(tmp_path):
    root = tmp_path / "run"
    _training(root)
    cfg = _cfg(
        root,
        *BENCHMARK_FILES,
    )
    prompts, dropped = eval_inputs.load_eval_prompts(cfg, RunDir(root))
    # the first 2 of each benchmark; eval.prompts_file (builtin:tiny_eval.csv) is not used
    assert [(p.id, p.benchmark) for p in prompts] == [
        ("countbench_3", "dsg"),
        ("whoops_12", "dsg"),
        ("coco_101", "tifa"),
        ("drawbench_9", "tifa"),
    ] and not dropped
    before = [list(p.questions) for p in prompts]
    eval_inputs.attach_questions(cfg, prompts, RunDir(root))  # questions=llm: not for these
    assert [p.questions for p in prompts] == before
    routed = {n: evaluate.scorer_questions(n, prompts) for n in ("dsg", "tifa", "clip")}
    assert set(routed["dsg"]) == {"countbench_3", "whoops_12"}
    assert set(routed["tifa"]) == {"coco_101", "drawbench_9"} and routed["clip"] is None
    assert len(routed["dsg"]["countbench_3"]) == 7
    status = evaluate.scorer_status(cfg)
    assert status["dsg"]["label"] == "DSG" and status["tifa"]["label"] == "TIFA"
    assert "DSG-1K prompts, questions and dependencies" in status["dsg"]["protocol"]
    assert "generated answers" in status["dsg"]["protocol"]
    assert status["dsg"]["model_ids"] == {"vqa_model": "tiny-vqa", "vqa_mode": "generate"}
    assert protocol.notes(cfg) == []  # both files, generated answers: as published
    only_tifa = evaluate.scorer_status(_cfg(root, f"eval.tifa_file={TIFA_SAMPLE}"))
    assert only_tifa["dsg"]["status"] == "skipped" and "eval.dsg_file" in only_tifa["dsg"]["reason"]
    paper = evaluate.scorer_status(load_config("sd14", [f"run.dir={root}"]))
    assert paper["tifa"]["status"] == "skipped" and "eval.tifa_file" in paper["tifa"]["reason"]


def _doc(cfg, root, prompts, table):
    scorers = evaluate.scorer_status(cfg)
    active = [n for n, s in scorers.items() if s["status"] == "ok"]
    cats = {p.id: p.category for p in prompts}
    metrics = eval_stats.aggregate(table, active, cats, n_boot=100)
    run = RunDir(root)
    doc = evaluate.build_doc(cfg, run, prompts, [], scorers, ["base", "merged"], table, metrics)
    evaluate.write_outputs(run, doc, table, prompts, [])
    return run.read_json("eval", "metrics.json"), run.read_text("eval", "report.html")


def test_metrics_and_report_give_both_dsg_averages_tifa_and_say_which_is_the_headline(tmp_path):
    root = tmp_path / "run"
    cfg = _cfg(
        root,
        f"eval.dsg_file={DSG_SAMPLE}",
        f"eval.tifa_file={TIFA_SAMPLE}",
        "eval.scorers=[dsg, tifa]",
        "eval.vqa_mode=generate",
        "eval.dsg_average=question",
        "eval.bootstrap=100",
    )
    prompts = dsg.read_benchmarks(DSG_SAMPLE, TIFA_SAMPLE)
    tifa_scores = {"coco_101": 0.75, "drawbench_9": 1 / 3, "partiprompt_5": 1.0}
    nan = float("nan")
    table = [
        {
            "variant": v,
            "prompt_id": p.id,
            "seed_index": 0,
            "score_dsg": HAND.get(p.id, nan),
            "score_tifa": tifa_scores.get(p.id, nan),
            "dsg_detail": [{"id": "1", "answer": "yes", "correct": True}] if p.id in HAND else [],
            "tifa_detail": [],
        }
        for v in ("base", "merged")
        for p in prompts
    ]
    saved, html = _doc(cfg, root, prompts, table)
    d = saved["metrics"]["dsg"]["base"]
    assert d["average"] == "question" and d["mean"] == pytest.approx(HAND_QUESTION_AVERAGE)
    assert d["averages"]["prompt"]["mean"] == pytest.approx(HAND_PROMPT_AVERAGE)
    assert d["questions"]["from_file"] == 4 and d["questions"]["holistic_fallback"] == 0
    t = saved["metrics"]["tifa"]["base"]
    assert t["mean"] == pytest.approx(sum(tifa_scores.values()) / 3) and t["n"] == 3
    assert saved["scorers"]["dsg"]["average"] == "question"
    assert saved["scorers"]["tifa"]["average"] == "prompt"
    assert saved["benchmark"]["notes"] == [] and saved["prompts"]["by_benchmark"] == {
        "dsg": 4,
        "tifa": 3,
    }
    assert "<h2>DSG</h2>" in html and "<h2>TIFA</h2>" in html
    assert "headline: the per-question average" in html
    assert "<th>per-question avg</th><th>per-prompt avg</th>" in html
    assert "Comparability with the paper" not in html


def test_without_benchmark_files_the_job_warns_and_the_report_says_not_comparable(tmp_path, caplog):
    root = tmp_path / "run"
    cfg = load_config("sd14", [f"run.dir={root}", "eval.scorers=[dsg]", "eval.bootstrap=100"])
    notes = protocol.notes(cfg)
    assert len(notes) == 1 and "NOT comparable with the paper's DSG/TIFA results" in notes[0]
    assert "github.com/j-min/DSG" in notes[0] and "github.com/Yushi-Hu/tifa" in notes[0]
    ranked = protocol.notes(load_config("sd14", ["eval.vqa_mode=rank"]))
    assert any("vqa_mode=rank" in n for n in ranked)

    prompts = dsg.read_prompts("builtin:tiny_eval.csv")[:2]
    prompts[0].questions = [Question("1", "Is there a bench?", source=dsg.LLM)]
    prompts[1].questions = dsg.fallback_questions(prompts[1].prompt)
    table = [
        {"variant": v, "prompt_id": p.id, "seed_index": 0, "score_dsg": 0.5}
        for v in ("base", "merged")
        for p in prompts
    ]
    with caplog.at_level(logging.WARNING, logger="selma_ray.eval"):
        assert protocol.warn(cfg) == notes  # what run_eval logs first
    assert [r.levelname for r in caplog.records if "NOT comparable" in r.getMessage()] == [
        "WARNING"
    ]
    saved, html = _doc(cfg, root, prompts, table)
    assert saved["benchmark"]["notes"] == notes
    assert "Comparability with the paper" in html and "NOT comparable" in html
    # the holistic fallback count stays visible
    assert saved["metrics"]["dsg"]["base"]["questions"]["holistic_fallback"] == 1
    assert re.search(r"<b class='warn'>1 holistic fallback</b>", html)
    assert saved["scorers"]["dsg"]["label"] == "DSG-style"


@pytest.mark.slow
def test_eval_stage_scores_dsg1k_and_tifa_prompts_each_by_its_protocol(tmp_path):
    import ray

    from selma_ray.pipeline import run_stage
    from selma_ray.testing import make_run

    root = make_run(tmp_path / "run", SKILLS)
    cfg = _cfg(
        root,
        *BENCHMARK_FILES,
        "eval.dsg_average=question",
        "eval.variants=[base, merged]",
        "eval.steps=2",
        "eval.bootstrap=100",
        "eval.grid_prompts=2",
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_stage("eval", cfg, RunDir(root))
    finally:
        ray.shutdown()
    doc = json.loads((root / "eval" / "metrics.json").read_text())
    rows = [json.loads(x) for x in (root / "eval" / "scores.jsonl").read_text().splitlines()]
    html = (root / "eval" / "report.html").read_text()
    prompts = {p.id: p for p in dsg.read_benchmarks(DSG_SAMPLE, TIFA_SAMPLE)}
    assert doc["prompts"]["by_benchmark"] == {"dsg": 2, "tifa": 2} and len(rows) == 2 * 4
    for r in rows:
        p = prompts[r["prompt_id"]]
        assert math.isfinite(r["score_clip"])
        if p.benchmark == "dsg":  # DSG-1K prompts: dsg only, yes or not, zeros passed down
            assert math.isnan(r["score_tifa"]) and r["tifa_detail"] == []
            details = r["dsg_detail"]
            assert [d["id"] for d in details] == [q.id for q in p.questions]
            for d in details:
                assert d["correct"] == (dsg.normalize_answer(d["generated"]) == "yes")
            correct = {d["id"]: d["correct"] for d in details}
            assert r["score_dsg"] == pytest.approx(dsg.dsg_score(p.questions, correct)[0])
        else:  # TIFA prompts: tifa only, each answer mapped to a choice
            assert math.isnan(r["score_dsg"]) and r["dsg_detail"] == []
            details = r["tifa_detail"]
            for q, d in zip(p.questions, details, strict=True):
                assert d["answer"] == dsg.match_choice(d["generated"], q.choices)
                assert d["correct"] == (d["answer"] == q.answer)
            assert r["score_tifa"] == pytest.approx(
                sum(d["correct"] for d in details) / len(details)
            )
    for v in ("base", "merged"):
        mine = [r for r in rows if r["variant"] == v and prompts[r["prompt_id"]].benchmark == "dsg"]
        n = [len(prompts[r["prompt_id"]].questions) for r in mine]
        by_question = sum(r["score_dsg"] * k for r, k in zip(mine, n, strict=True)) / sum(n)
        entry = doc["metrics"]["dsg"][v]
        assert entry["mean"] == pytest.approx(by_question)  # the headline: per question
        assert entry["averages"]["prompt"]["mean"] == pytest.approx(
            sum(r["score_dsg"] for r in mine) / len(mine)
        )
        tifa = [
            r["score_tifa"] for r in rows if r["variant"] == v and math.isfinite(r["score_tifa"])
        ]
        assert doc["metrics"]["tifa"][v]["mean"] == pytest.approx(sum(tifa) / 2)
    assert doc["scorers"]["dsg"]["label"] == "DSG" and doc["benchmark"]["notes"] == []
    assert result["averages"] == {"dsg": "question", "tifa": "prompt"}
    assert result["comparability"] == [] and result["labels"]["tifa"] == "TIFA"
    assert "<h2>TIFA</h2>" in html and "per-question avg" in html
