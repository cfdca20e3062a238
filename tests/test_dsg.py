"""DSG questions: dependency zeroing, the DSG-1K and TIFA readers, LLM answer parsing."""

from __future__ import annotations

import json

import pytest

from selma_ray.eval.dsg import (
    EvalPrompt,
    Question,
    dsg_score,
    fallback_questions,
    parse_questions,
    question_instruction,
    question_source,
    read_dsg_csv,
    read_prompts,
    read_questions,
    read_tifa,
)

# apple (1) <- red (2), apple (1) <- two (3), table (4) <- on (5, parents 1 and 4)
QS = [
    Question("1", "Is there an apple?"),
    Question("2", "Is the apple red?", ("1",)),
    Question("3", "Are there two apples?", ("1",)),
    Question("4", "Is there a table?"),
    Question("5", "Is the apple on the table?", ("1", "4")),
]


def test_all_yes_scores_one():
    score, per = dsg_score(QS, dict.fromkeys("12345", True))
    assert score == 1.0 and set(per.values()) == {1}


def test_child_of_a_no_scores_zero_even_if_answered_yes():
    answers = {"1": False, "2": True, "3": True, "4": True, "5": True}
    score, per = dsg_score(QS, answers)
    assert per == {"1": 0, "2": 0, "3": 0, "4": 1, "5": 0}
    assert score == pytest.approx(1 / 5)


def test_zeros_pass_down_to_grandchildren():
    qs = [Question("1", "a?"), Question("2", "b?", ("1",)), Question("3", "c?", ("2",))]
    _, per = dsg_score(qs, {"1": False, "2": True, "3": True})
    assert per == {"1": 0, "2": 0, "3": 0}
    score, per = dsg_score(qs, {"1": True, "2": False, "3": True})
    assert per == {"1": 1, "2": 0, "3": 0} and score == pytest.approx(1 / 3)


def test_only_wrong_leaf_costs_its_own_share():
    answers = {"1": True, "2": False, "3": True, "4": True, "5": True}
    assert dsg_score(QS, answers)[0] == pytest.approx(4 / 5)


def test_unknown_parent_ignored_cycle_and_empty_do_not_hang():
    qs = [Question("1", "a?", ("9",)), Question("2", "b?", ("3",)), Question("3", "c?", ("2",))]
    score, per = dsg_score(qs, {"1": True, "2": True, "3": False})
    # 1's unknown parent is ignored; 2 and 3 depend on each other: 3 is wrong, so 2 (right on
    # its own) is zeroed through its parent
    assert per == {"1": 1, "2": 0, "3": 0} and score == pytest.approx(1 / 3)
    assert dsg_score([], {}) == (0.0, {})


HEADER = "item_id,proposition_id,dependency,category_broad,category_detailed,tuple,"
DSG_CSV = (
    HEADER
    + """question_natural_language
countbench_1,1,0,entity,whole,entity - whole (apples),Are there apples?
countbench_1,2,1,other,count,"other - count (apples, ==2)",Are there two apples?
countbench_1,3,0,entity,whole,entity - whole (table),Is there a table?
countbench_1,4,"1,3",relation,spatial,"relation - spatial (apples, table, on)",Is it on it?
whoops_7,1,0,entity,whole,entity - whole (penguin),Is there a penguin?
"""
)


def test_read_dsg_csv(tmp_path):
    path = tmp_path / "dsg.csv"
    path.write_text(DSG_CSV)
    qs = read_dsg_csv(str(path))
    assert list(qs) == ["countbench_1", "whoops_7"]
    first = qs["countbench_1"]
    assert [q.id for q in first] == ["1", "2", "3", "4"]
    assert first[0].parents == () and first[1].parents == ("1",)
    assert first[3].parents == ("1", "3") and first[3].category == "relation"
    assert first[1].choices == ("yes", "no") and first[1].answer == "yes"
    assert read_questions(str(path)) == qs


def test_read_dsg_csv_names_missing_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("item_id,question\nx,Is it?\n")
    with pytest.raises(ValueError, match="proposition_id"):
        read_dsg_csv(str(path))


TIFA = [
    {
        "id": "coco_1",
        "caption": "A red bus next to a tree.",
        "question": "is there a bus?",
        "choices": ["yes", "no"],
        "answer": "yes",
        "element_type": "object",
        "element": "bus",
    },
    {
        "id": "coco_1",
        "caption": "A red bus next to a tree.",
        "question": "what color is the bus?",
        "choices": ["red", "blue", "green"],
        "answer": "Red",
        "element_type": "color",
        "element": "red",
    },
    {
        "id": "drawbench_2",
        "caption": "Three cats.",
        "question": "how many cats are there?",
        "choices": ["1", "2", "3"],
        "answer": "3",
        "element_type": "counting",
        "element": "3",
    },
]


def test_read_tifa_groups_questions_by_caption(tmp_path):
    path = tmp_path / "tifa.json"
    path.write_text(json.dumps(TIFA))
    prompts = read_tifa(path)
    assert [(p.id, p.prompt) for p in prompts] == [
        ("coco_1", "A red bus next to a tree."),
        ("drawbench_2", "Three cats."),
    ]
    color = prompts[0].questions[1]
    assert color.choices == ("red", "blue", "green") and color.answer == "red"
    assert color.category == "color" and color.parents == ()
    assert read_prompts(str(path))[1].questions[0].answer == "3"


def test_read_tifa_rejects_answer_outside_choices(tmp_path):
    path = tmp_path / "tifa.json"
    path.write_text(json.dumps([{**TIFA[0], "answer": "maybe"}]))
    with pytest.raises(ValueError, match="not among"):
        read_tifa(path)


def test_read_prompts_csv_txt_and_builtin(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("item_id,text,source\na1,a cat on a mat,coco\na2,two dogs,countbench\n")
    prompts = read_prompts(str(csv))
    assert [(p.id, p.prompt, p.category) for p in prompts] == [
        ("a1", "a cat on a mat", "coco"),
        ("a2", "two dogs", "countbench"),
    ]
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\na dog\n")
    assert [p.prompt for p in read_prompts(str(txt))] == ["a cat", "a dog"]
    tiny = read_prompts("builtin:tiny_eval.csv")
    assert len(tiny) >= 10 and all(p.category for p in tiny)
    with pytest.raises(ValueError, match="shipped"):
        read_prompts("builtin:nope.csv")
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts(str(tmp_path / "missing.csv"))


def test_parse_llm_questions():
    text = (
        "Here are the questions:\n"
        "1 | 0 | Is there a dog?\n"
        "2 | 1 | Is the dog brown?\n"
        "3 | 1, 9 | Is the dog sleeping?\n"
        "4 | 0 | A statement, not a question.\n"
        "5. Is there a sofa?\n"
        "2 | 0 | Duplicate id?\n"
    )
    qs = parse_questions(text, max_questions=10)
    assert [(q.id, q.parents) for q in qs] == [("1", ()), ("2", ("1",)), ("3", ("1",)), ("5", ())]
    assert qs[1].question == "Is the dog brown?"
    assert len(parse_questions(text, max_questions=2)) == 2
    assert "two red apples" in question_instruction("two red apples", 5)


def test_parse_drops_copied_example_and_repeated_questions_given_the_prompt():
    text = (
        "1 | 0 | Are there apples?\n"  # copied from the instruction's example
        "2 | 0 | Is there a workbench?\n"
        "3 | 2 | Is the workbench cluttered?\n"
        "4 | 1 | Are the apples red?\n"
        "5 | 2 | Is the workbench cluttered?\n"
        "6 | 1,2 | Is a soldering iron on the workbench?\n"
    )
    qs = parse_questions(text, 10, prompt="a cluttered workbench with a soldering iron")
    assert [(q.id, q.parents) for q in qs] == [("2", ()), ("3", ("2",)), ("6", ("2",))]
    assert len(parse_questions(text, 10)) == 5  # without the prompt only the repeat goes


def test_questions_record_where_they_came_from(tmp_path):
    path = tmp_path / "dsg.csv"
    path.write_text(DSG_CSV)
    tifa = tmp_path / "tifa.json"
    tifa.write_text(json.dumps(TIFA))
    prompt = "a dog on a sofa"
    parsed = parse_questions("1 | 0 | Is there a dog?\n2 | 1 | Is the dog on a sofa?", 5, prompt)
    fallback = fallback_questions(prompt + ".")
    assert fallback == [Question("1", "Does the image show a dog on a sofa?", source="holistic")]
    assert {q.source for qs in read_dsg_csv(str(path)).values() for q in qs} == {"file"}
    assert {q.source for p in read_tifa(tifa) for q in p.questions} == {"file"}
    assert [q.source for q in parsed] == ["llm", "llm"]
    # the source survives the JSON round trip of the questions cache
    assert [Question.from_dict(q.to_dict()) for q in fallback] == fallback
    kinds = {
        "llm": question_source(EvalPrompt("a", prompt, questions=parsed)),
        "holistic": question_source(EvalPrompt("b", prompt, questions=fallback)),
        "file": question_source(
            EvalPrompt("c", "x", questions=read_dsg_csv(str(path))["whoops_7"])
        ),
        # cached before questions had a source: the fallback is known by its text
        "old holistic": question_source(
            EvalPrompt("d", prompt, questions=[Question("1", fallback[0].question)])
        ),
        "old llm": question_source(EvalPrompt("e", prompt, questions=[Question("1", "Is it?")])),
        "none": question_source(EvalPrompt("f", prompt)),
    }
    assert kinds == {
        "llm": "llm",
        "holistic": "holistic",
        "file": "file",
        "old holistic": "holistic",
        "old llm": "llm",
        "none": "",
    }
