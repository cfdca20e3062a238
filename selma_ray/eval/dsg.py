"""Eval prompts and their questions: benchmark readers, LLM question writing, answer judging
and scoring.

A question is atomic (one entity, attribute, relation or count), has an id and the ids of
the questions it depends on, and is multiple choice (DSG: yes/no with answer yes; TIFA: its
own choices and answer). A child question scores 0 when a parent scored 0 (DSG, Cho et al.
2024); the prompt's score is the share of questions that score 1.

Readers (the published layouts, checked against the files in github.com/j-min/DSG and
github.com/Yushi-Hu/tifa):

- DSG-1K, ``dsg-1k-anns.csv``: one row per question, columns ``item_id, text, keywords,
  proposition_id, dependency, category_broad, category_detailed, tuple,
  question_natural_language``; ``dependency`` is ``0`` (no parent) or parent proposition ids
  separated by commas. :func:`read_dsg1k` turns it into prompts with their questions.
- TIFA v1.0, ``tifa_v1.0_question_answers.json``: a list with one object per question,
  ``{id, caption, question, choices, answer, element_type, element[, coco_val_id]}``.
  :func:`read_tifa` turns it into prompts with their multiple-choice questions.
- Other eval prompts: .txt (one a line) or .csv (``prompt`` or ``text``; optional
  ``category``/``source``/``skill`` and ``id``/``item_id``).

Answers a VQA model *generates* are judged by :func:`judge_answer`: lower case, punctuation
dropped; a yes/no question is right when the answer then reads exactly like its answer
("yes" for DSG), a multiple-choice question takes the nearest choice (:func:`match_choice`).
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
BENCHMARKS = Path(__file__).parent / "benchmarks"
YES_NO = ("yes", "no")
# Question.source: where a question came from
FROM_FILE, LLM, HOLISTIC = "file", "llm", "holistic"
# EvalPrompt.benchmark: the published benchmarks, each scored by its own protocol
DSG, TIFA = "dsg", "tifa"
# the DSG-1K annotation CSV's columns this reader needs (the file also has keywords,
# category_detailed and tuple)
DSG1K_COLUMNS = ("item_id", "proposition_id", "dependency", "question_natural_language")


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    parents: tuple[str, ...] = ()
    choices: tuple[str, ...] = YES_NO
    answer: str = "yes"
    category: str = ""
    # "file" (DSG-1K CSV / TIFA JSON), "llm" (written by the LLM), "holistic" (the one-question
    # fallback used when the LLM wrote none that parse); "" = not recorded (older caches)
    source: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Question:
        return cls(
            id=str(d["id"]),
            question=str(d["question"]),
            parents=tuple(str(p) for p in d.get("parents", ())),
            choices=tuple(str(c) for c in d.get("choices", YES_NO)),
            answer=str(d.get("answer", "yes")),
            category=str(d.get("category", "")),
            source=str(d.get("source", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalPrompt:
    id: str
    prompt: str
    category: str = ""
    questions: list[Question] = field(default_factory=list)
    # the benchmark file the prompt came from when it is scored by that benchmark's protocol
    # (eval.dsg_file: DSG, eval.tifa_file: TIFA); "" = eval.prompts_file or generated
    benchmark: str = ""


def dsg_score(questions: list[Question], correct: dict[str, bool]) -> tuple[float, dict[str, int]]:
    """(score, per-question 0/1) with dependency zeroing: a question scores 1 only when it was
    answered correctly and every parent scores 1 (so zeros pass down to grandchildren).
    Parents that are not among the questions are ignored; an empty list scores 0.

    This matches SELMA's DSG ``evaluation.py``: it zeroes questions in place in file order, and
    DSG-1K lists parents before their children (in every item checked), so a zeroed parent
    zeroes its grandchildren too. (``calc_vqa_score`` in j-min/DSG checks only the parents'
    own answers; the two differ only when a parent answered "yes" has a grandparent answered
    "no".)"""
    by_id = {q.id: q for q in questions}
    scores: dict[str, int] = {}

    def resolve(qid: str, seen: frozenset[str]) -> int:
        if qid in scores:
            return scores[qid]
        if qid in seen:  # a dependency cycle: judge the question on its own answer
            return int(correct.get(qid, False))
        ok = correct.get(qid, False) and all(
            resolve(p, seen | {qid}) for p in by_id[qid].parents if p in by_id and p != qid
        )
        scores[qid] = int(ok)
        return scores[qid]

    for q in questions:
        resolve(q.id, frozenset())
    return (sum(scores.values()) / len(scores) if scores else 0.0), scores


def tifa_score(questions: list[Question], correct: dict[str, bool]) -> float:
    """TIFA (Hu et al. 2023): the share of the prompt's questions answered correctly (no
    dependencies); an empty list scores 0."""
    if not questions:
        return 0.0
    return sum(bool(correct.get(q.id, False)) for q in questions) / len(questions)


def normalize_answer(text: str) -> str:
    """A generated answer as compared: lower case, punctuation dropped, spaces collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


_NUMBERS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}


def _numeral(text: str) -> str:
    return " ".join(_NUMBERS.get(w, w) for w in text.split())


def match_choice(answer: str, choices: tuple[str, ...]) -> str:
    """The choice a free-form ``answer`` means, or "" when it means none (an empty answer
    never earns a choice). In order: the same normalised text; the same with number words
    as digits ("three" = "3"); the only choice found as whole words in the answer ("a red
    bus" -> "red"); else the most similar choice by ``difflib`` ratio, the first on a tie.
    TIFA's own code takes the nearest choice by SBERT embeddings (all-mpnet-base-v2), which
    is not available offline; this is the string-similarity stand-in."""
    text = _numeral(normalize_answer(answer))
    if not text:
        return ""
    norm = [_numeral(normalize_answer(c)) for c in choices]
    for choice, n in zip(choices, norm, strict=True):
        if n == text:
            return choice
    padded = f" {text} "
    found = [c for c, n in zip(choices, norm, strict=True) if n and f" {n} " in padded]
    if len(found) == 1:
        return found[0]
    ratios = [difflib.SequenceMatcher(None, text, n).ratio() for n in norm]
    best = max(range(len(choices)), key=ratios.__getitem__) if choices else None
    return "" if best is None or ratios[best] == 0 else choices[best]


def judge_answer(question: Question, generated: str, nearest: bool | None = None) -> str:
    """What a generated answer counts as for ``question``: compared with its ``answer``.

    ``nearest=False``: the normalised answer itself (DSG: right only when it reads "yes");
    ``nearest=True``: the choice it means (:func:`match_choice`; TIFA). By default yes/no
    questions are judged as they read and other multiple-choice questions by nearest choice.
    """
    if nearest is None:
        nearest = tuple(question.choices) != YES_NO
    return match_choice(generated, question.choices) if nearest else normalize_answer(generated)


def resolve_path(path: str) -> Path:
    """A benchmark or prompts file: ``builtin:NAME`` (shipped) or a path that must exist."""
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        file = BENCHMARKS / name
        if "/" in name or not file.is_file():
            shipped = sorted(p.name for p in BENCHMARKS.iterdir() if not p.name.startswith("_"))
            raise ValueError(f"no built-in benchmark {name!r}; shipped: {shipped}")
        return file
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"eval prompts/questions file {path!r} does not exist")
    return file


def _pick(row: dict[str, str], *names: str) -> str:
    for n in names:
        if row.get(n):
            return row[n].strip()
    return ""


def source_of(item_id: str) -> str:
    """The source data set in a DSG-1K or TIFA id: ``whoops_5`` -> ``whoops``,
    ``localized_narratives_95`` -> ``localized_narratives``, ``coco_301091`` -> ``coco``."""
    head, sep, _ = item_id.rpartition("_")
    return head if sep and head else ""


def _read_csv(file: Path) -> list[dict[str, str]]:
    with open(file, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _is_dsg1k(rows: list[dict[str, str]]) -> bool:
    return bool(rows) and set(DSG1K_COLUMNS) <= set(rows[0])


def read_prompts(path: str) -> list[EvalPrompt]:
    """Eval prompts from a .txt, .csv or TIFA .json file (TIFA and DSG-1K files bring their
    questions: a DSG-1K annotation CSV has one row per question and becomes one prompt per
    item_id)."""
    file = resolve_path(path)
    if file.suffix == ".json":
        return read_tifa(file)
    if file.suffix == ".csv":
        rows = _read_csv(file)
        if _is_dsg1k(rows):
            return read_dsg1k(str(file))
        if rows and not ({"prompt", "text"} & set(rows[0])):
            raise ValueError(
                f"{file}: a prompts CSV needs a 'prompt' or 'text' column; got {sorted(rows[0])} "
                "(a DSG question CSV goes in eval.questions_file)"
            )
        out = [
            EvalPrompt(
                id=_pick(r, "id", "item_id") or f"p{i:05d}",
                prompt=_pick(r, "prompt", "text"),
                category=_pick(r, "category", "skill", "source"),
            )
            for i, r in enumerate(rows)
        ]
    else:
        lines = [line.strip() for line in file.read_text().splitlines()]
        out = [EvalPrompt(id=f"p{i:05d}", prompt=t) for i, t in enumerate(lines) if t]
    out = [p for p in out if p.prompt]
    if not out:
        raise ValueError(f"{file}: no prompts found")
    counts = Counter(p.id for p in out)
    dupes = sorted(i for i, n in counts.items() if n > 1)
    if dupes:
        raise ValueError(f"{file}: prompt ids must be unique; repeated: {dupes[:5]}")
    return out


def _dsg_question(file: Path, n: int, r: dict[str, str]) -> Question:
    qid = str(r["proposition_id"]).strip()
    if not qid or not r["question_natural_language"].strip():
        raise ValueError(f"{file}: row {n + 2} has no proposition_id or question")
    parents = tuple(
        p.strip() for p in str(r["dependency"] or "").split(",") if p.strip() not in ("", "0")
    )
    return Question(
        id=qid,
        question=r["question_natural_language"].strip(),
        parents=parents,
        category=(r.get("category_broad") or "").strip(),
        source=FROM_FILE,
    )


def _dsg_rows(path: str) -> tuple[Path, list[dict[str, str]]]:
    file = resolve_path(path)
    rows = _read_csv(file)
    if not rows:
        raise ValueError(f"{file}: no rows (expected the DSG-1K annotation CSV)")
    if not _is_dsg1k(rows):
        raise ValueError(
            f"{file}: a DSG-1K CSV needs columns {sorted(DSG1K_COLUMNS)}; got {sorted(rows[0])}"
        )
    return file, rows


def read_dsg_csv(path: str) -> dict[str, list[Question]]:
    """DSG-1K question CSV -> item_id -> questions (dependency "0" = no parent)."""
    file, rows = _dsg_rows(path)
    out: dict[str, list[Question]] = {}
    for n, r in enumerate(rows):
        out.setdefault(r["item_id"].strip(), []).append(_dsg_question(file, n, r))
    return out


def read_dsg1k(path: str) -> list[EvalPrompt]:
    """The DSG-1K annotation CSV (``dsg-1k-anns.csv``) -> one prompt per ``item_id``, in file
    order, with its questions and their dependency graph; category = the source data set
    (``whoops``, ``countbench``, ...). The real file holds 1,060 prompts."""
    file, rows = _dsg_rows(path)
    if "text" not in rows[0]:
        raise ValueError(f"{file}: the DSG-1K CSV has no 'text' column (the prompt)")
    prompts: dict[str, EvalPrompt] = {}
    for n, r in enumerate(rows):
        item = r["item_id"].strip()
        text = " ".join((r["text"] or "").split())
        p = prompts.get(item)
        if p is None:
            p = prompts[item] = EvalPrompt(id=item, prompt=text, category=source_of(item))
        elif text != p.prompt:
            raise ValueError(f"{file}: row {n + 2}: item {item!r} has two different texts")
        q = _dsg_question(file, n, r)
        if any(x.id == q.id for x in p.questions):
            raise ValueError(f"{file}: row {n + 2}: item {item!r} repeats proposition {q.id}")
        p.questions.append(q)
    out = [p for p in prompts.values() if p.prompt]
    if not out:
        raise ValueError(f"{file}: no prompts found")
    return out


def read_tifa(path: str | Path) -> list[EvalPrompt]:
    """TIFA JSON (one entry per question) -> prompts with their questions, in file order;
    category = the source data set in the id (``coco``, ``drawbench``, ...)."""
    file = resolve_path(str(path))
    data = json.loads(file.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{file}: TIFA JSON must be a list of question entries")
    prompts: dict[str, EvalPrompt] = {}
    for n, e in enumerate(data):
        if not isinstance(e, dict):
            raise ValueError(f"{file}: entry {n} is not an object")
        missing = [k for k in ("id", "caption", "question", "choices", "answer") if k not in e]
        if missing:
            raise ValueError(f"{file}: entry {n} lacks {missing}")
        pid = str(e["id"])
        caption = str(e["caption"]).strip()
        p = prompts.setdefault(pid, EvalPrompt(id=pid, prompt=caption, category=source_of(pid)))
        choices = tuple(str(c).strip().lower() for c in e["choices"])
        answer = str(e["answer"]).strip().lower()
        if answer not in choices:
            raise ValueError(f"{file}: entry {n}: answer {answer!r} is not among {choices}")
        p.questions.append(
            Question(
                id=str(len(p.questions) + 1),
                question=str(e["question"]).strip(),
                choices=choices,
                answer=answer,
                category=str(e.get("element_type", "")),
                source=FROM_FILE,
            )
        )
    return list(prompts.values())


def read_questions(path: str) -> dict[str, list[Question]]:
    """Questions by prompt id from a DSG-1K CSV or a TIFA JSON file."""
    if resolve_path(path).suffix == ".json":
        return {p.id: p.questions for p in read_tifa(path)}
    return read_dsg_csv(path)


def read_benchmarks(dsg_file: str | None, tifa_file: str | None) -> list[EvalPrompt]:
    """The prompts of the published benchmarks given: DSG-1K's (``benchmark="dsg"``), then
    TIFA v1.0's (``benchmark="tifa"``), each with its questions from the file."""
    out: list[EvalPrompt] = []
    for path, reader, name in ((dsg_file, read_dsg1k, DSG), (tifa_file, read_tifa, TIFA)):
        if path:
            for p in reader(path):
                p.benchmark = name
                out.append(p)
    both = sorted(i for i, n in Counter(p.id for p in out).items() if n > 1)
    if both:
        raise ValueError(
            f"eval: prompt ids {both[:5]} are in both {dsg_file} and {tifa_file}; the published "
            "DSG-1K and TIFA v1.0 files share no ids, so check that these are those files"
        )
    return out


_EXAMPLE = """Description: two red apples on a wooden table
1 | 0 | Are there apples?
2 | 1 | Are there two apples?
3 | 1 | Are the apples red?
4 | 0 | Is there a table?
5 | 4 | Is the table wooden?
6 | 1,4 | Are the apples on the table?"""


def question_instruction(prompt: str, max_questions: int) -> str:
    """The LLM instruction that turns one prompt into DSG questions."""
    return (
        "Write atomic yes/no questions that check whether an image matches a description. "
        "First ask whether each entity is there, then about its attributes, counts and "
        "relations. One question per line, as: id | parent ids (0 if none) | question. "
        "A question about an attribute, count or relation names as parents the ids of the "
        f"entity questions it depends on. At most {max_questions} questions.\n\n"
        f"{_EXAMPLE}\n\nDescription: {prompt}\n"
    )


_LINE = re.compile(r"^\s*(\d+)\s*[|.):]\s*(?:([\d,\s]*)\|\s*)?(.+?)\s*$")
_STOP = set(
    "the and are there any image does with that this what which from into onto over under "
    "its their them they than then have has been being about above below near next".split()
)


def content_words(text: str) -> set[str]:
    """Lower-case words of 3+ letters, stop words dropped, a plural 's' removed."""
    words = re.findall(r"[a-z]{3,}", text.lower())
    return {w[:-1] if w.endswith("s") and len(w) > 3 else w for w in words if w not in _STOP}


def parse_questions(text: str, max_questions: int, prompt: str | None = None) -> list[Question]:
    """Questions from an LLM answer in the ``id | parents | question`` format.

    Lenient about missing parents; drops non-questions, repeated questions, parents that are
    not earlier kept questions and, given ``prompt``, questions sharing no content word with
    it (small models copy the in-context example).
    """
    out: list[Question] = []
    seen_text: set[str] = set()
    about = content_words(prompt) if prompt else None
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or not m.group(3).endswith("?"):
            continue
        qid, question = m.group(1), m.group(3).strip()
        key = " ".join(question.lower().split())
        if any(q.id == qid for q in out) or key in seen_text:
            continue
        if about is not None and not content_words(question) & about:
            continue
        kept = {q.id for q in out}
        parents = tuple(
            p for p in re.split(r"[,\s]+", m.group(2) or "") if p and p != "0" and p in kept
        )
        out.append(Question(id=qid, question=question, parents=parents, source=LLM))
        seen_text.add(key)
        if len(out) >= max_questions:
            break
    return out


def fallback_questions(prompt: str) -> list[Question]:
    """One holistic question, used when the LLM wrote none that parse."""
    text = f"Does the image show {prompt.rstrip('.')}?"
    return [Question(id="1", question=text, source=HOLISTIC)]


def question_source(prompt: EvalPrompt) -> str:
    """Where ``prompt``'s questions came from: ``holistic`` (the fallback question), ``llm`` or
    ``file``; ``""`` without questions. Questions cached before ``Question.source`` existed are
    recognised as the fallback by their text, and otherwise count as LLM-written."""
    qs = prompt.questions
    if not qs:
        return ""
    holistic = [q.question for q in fallback_questions(prompt.prompt)]
    if any(q.source == HOLISTIC for q in qs) or [q.question for q in qs] == holistic:
        return HOLISTIC
    return FROM_FILE if all(q.source == FROM_FILE for q in qs) else LLM


def llm_pass(
    cfg: Any, items: list[dict[str, Any]], sampling: dict[str, Any], model: str | None = None
) -> dict[str, dict[str, Any]]:
    """One Ray Data pass of the configured LLM backend over ``items`` (each with ``key``,
    ``instruction`` and ``seed``); returns the answer rows by key."""
    from selma_ray.models.llm_data import generate_with_ray_data

    return {r["key"]: r for r in generate_with_ray_data(cfg, items, sampling, model)}


def generate_questions(cfg: Any, prompts: list[EvalPrompt]) -> dict[str, list[Question]]:
    """Questions for each prompt, written by the configured LLM backend on Ray Data (greedy)."""
    from selma_ray.core.seeds import stable_seed

    ec = cfg.eval
    items = [
        {
            "key": p.id,
            "instruction": question_instruction(p.prompt, ec.max_questions),
            "seed": stable_seed(cfg.run.seed, "dsg", p.id),
        }
        for p in prompts
    ]
    sampling = {"temperature": 0.0, "max_tokens": 40 * ec.max_questions}
    answers = llm_pass(cfg, items, sampling, ec.question_llm)
    out, fallbacks = {}, 0
    for p in prompts:
        row = answers[p.id]
        text = "" if row.get("error") else row["generated_text"]
        qs = parse_questions(text, ec.max_questions, p.prompt)
        if not qs:
            qs, fallbacks = fallback_questions(p.prompt), fallbacks + 1
        out[p.id] = qs
    if fallbacks:
        log.warning(
            "eval: %d/%d prompts got no parseable questions; asked one holistic question instead",
            fallbacks,
            len(prompts),
        )
    return out


def generate_prompts(cfg: Any, training: dict[str, list[str]], rounds: int = 3) -> list[EvalPrompt]:
    """``eval.generated_per_skill`` new prompts per skill, written like the training prompts
    (same skill instructions, other seeds) and held out by the same filters: a candidate that
    is a near-duplicate of, or too ROUGE-L-similar to, any training prompt or seed is dropped."""
    import random
    from types import SimpleNamespace

    from selma_ray.core.seeds import stable_seed
    from selma_ray.core.skills import get_skills
    from selma_ray.models.llm_data import request_max_tokens
    from selma_ray.text.filters import SkillPool
    from selma_ray.text.parse import split_cut_item

    pc, n = cfg.prompts, cfg.eval.generated_per_skill
    skills = get_skills(pc.skills, pc.all_custom_skills())
    # every skill's training prompts and seeds count as seen, whichever skill a prompt is for
    seen = [t for ts in training.values() for t in ts] + [t for s in skills for t in s.seeds]
    pools = {}
    for skill in skills:
        have = [{"id": "", "prompt": t} for t in seen]
        settings = SimpleNamespace(
            per_skill=len(have) + n,
            rouge_threshold=pc.rouge_threshold,
            semantic_threshold=None,
            max_count=pc.max_count,  # held-out counting prompts keep the training rule
        )
        pools[skill.name] = SkillPool(skill, settings, accepted=have)
    # each request carries its skill's answer budget, as in the prompts stage
    sampling = {"temperature": pc.temperature, "top_p": pc.top_p, "max_tokens": pc.max_tokens}
    for round_idx in range(rounds):
        items = []
        for name, pool in pools.items():
            missing = pool.target - len(pool.accepted)
            for r in range(-(-missing // pc.new_per_request) + 1 if missing > 0 else 0):
                seed = stable_seed(cfg.run.seed, "eval-prompts", name, round_idx, r)
                k = min(pc.in_context_examples, len(pool.skill.seeds))
                examples = random.Random(seed).sample(list(pool.skill.seeds), k)
                instruction = pool.skill.instruction(examples, pc.new_per_request)
                items.append(
                    {
                        "key": f"{name}/{r}",
                        "instruction": instruction,
                        "seed": seed,
                        "max_tokens": request_max_tokens(pc, pool.skill.max_words),
                    }
                )
        if not items:
            break
        answers = llm_pass(cfg, items, sampling)
        for item in items:
            row = answers[item["key"]]
            if not row.get("error"):
                pool = pools[item["key"].split("/")[0]]
                cut_off = row.get("finish_reason") == "length"
                texts, cut = split_cut_item(row["generated_text"], cut_off)
                pool.offer_many(texts, round_idx, truncated=cut)
    out = []
    for name, pool in pools.items():
        new = pool.accepted[len(seen) :]
        if len(new) < n:
            log.warning("eval: only %d/%d held-out prompts generated for %s", len(new), n, name)
        out += [
            EvalPrompt(id=f"gen-{name}-{i}", prompt=r["prompt"], category=name)
            for i, r in enumerate(new)
        ]
    return out
