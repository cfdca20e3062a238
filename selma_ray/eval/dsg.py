"""Eval prompts and DSG-style questions: file readers, LLM question writing, dependency scoring.

A question is atomic (one entity, attribute, relation or count), has an id and the ids of
the questions it depends on, and is multiple choice (DSG: yes/no with answer yes; TIFA: its
own choices and answer). A child question scores 0 when a parent scored 0 (DSG, Cho et al.
2024); the prompt's score is the share of questions that score 1.

Readers: eval prompts from .txt (one a line), .csv (``prompt`` or ``text``; optional
``category``/``source``/``skill`` and ``id``/``item_id``) or TIFA .json; questions from the
DSG-1K CSV (item_id, proposition_id, dependency, category_broad, category_detailed, tuple,
question_natural_language) or TIFA JSON (list of {id, caption, question, choices, answer,
element_type, ...}).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
BENCHMARKS = Path(__file__).parent / "benchmarks"
YES_NO = ("yes", "no")
# Question.source: where a question came from
FROM_FILE, LLM, HOLISTIC = "file", "llm", "holistic"


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


def dsg_score(questions: list[Question], correct: dict[str, bool]) -> tuple[float, dict[str, int]]:
    """(score, per-question 0/1) with dependency zeroing: a question scores 1 only when it was
    answered correctly and every parent scores 1 (so zeros pass down to grandchildren).
    Parents that are not among the questions are ignored; an empty list scores 0."""
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


def _resolve_path(path: str) -> Path:
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


def read_prompts(path: str) -> list[EvalPrompt]:
    """Eval prompts from a .txt, .csv or TIFA .json file (TIFA brings its questions)."""
    file = _resolve_path(path)
    if file.suffix == ".json":
        return read_tifa(file)
    if file.suffix == ".csv":
        with open(file, newline="") as f:
            rows = list(csv.DictReader(f))
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
    if len({p.id for p in out}) != len(out):
        raise ValueError(f"{file}: prompt ids must be unique")
    return out


def read_dsg_csv(path: str) -> dict[str, list[Question]]:
    """DSG-1K question CSV -> item_id -> questions (dependency "0" = no parent)."""
    file = _resolve_path(path)
    with open(file, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"item_id", "proposition_id", "dependency", "question_natural_language"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{file}: DSG CSV needs columns {sorted(need)}; got {sorted(rows[0])}")
    out: dict[str, list[Question]] = {}
    for r in rows:
        parents = tuple(
            p.strip() for p in str(r["dependency"]).split(",") if p.strip() not in ("", "0")
        )
        out.setdefault(r["item_id"].strip(), []).append(
            Question(
                id=str(r["proposition_id"]).strip(),
                question=r["question_natural_language"].strip(),
                parents=parents,
                category=(r.get("category_broad") or "").strip(),
                source=FROM_FILE,
            )
        )
    return out


def read_tifa(path: str | Path) -> list[EvalPrompt]:
    """TIFA JSON (one entry per question) -> prompts with their questions, in file order."""
    file = _resolve_path(str(path))
    data = json.loads(file.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{file}: TIFA JSON must be a list of question entries")
    prompts: dict[str, EvalPrompt] = {}
    for n, e in enumerate(data):
        missing = [k for k in ("id", "caption", "question", "choices", "answer") if k not in e]
        if missing:
            raise ValueError(f"{file}: entry {n} lacks {missing}")
        pid = str(e["id"])
        p = prompts.setdefault(pid, EvalPrompt(id=pid, prompt=str(e["caption"]).strip()))
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
    if _resolve_path(path).suffix == ".json":
        return {p.id: p.questions for p in read_tifa(path)}
    return read_dsg_csv(path)


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
    from selma_ray.text.filters import SkillPool
    from selma_ray.text.parse import parse_candidates

    pc, n = cfg.prompts, cfg.eval.generated_per_skill
    skills = get_skills(pc.skills, pc.all_custom_skills())
    # every skill's training prompts and seeds count as seen, whichever skill a prompt is for
    seen = [t for ts in training.values() for t in ts] + [t for s in skills for t in s.seeds]
    pools = {}
    for skill in skills:
        have = [{"id": "", "prompt": t} for t in seen]
        settings = SimpleNamespace(
            per_skill=len(have) + n, rouge_threshold=pc.rouge_threshold, semantic_threshold=None
        )
        pools[skill.name] = SkillPool(skill, settings, accepted=have)
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
                items.append({"key": f"{name}/{r}", "instruction": instruction, "seed": seed})
        if not items:
            break
        answers = llm_pass(cfg, items, sampling)
        for item in items:
            row = answers[item["key"]]
            if not row.get("error"):
                pool = pools[item["key"].split("/")[0]]
                pool.offer_many(parse_candidates(row["generated_text"]), round_idx)
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
