"""The skills SELMA teaches, as data: description, seed prompts, word limit, instruction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUB_SKILLS = (
    "spatial, count, animal, human, object, location, activity, color, attribute, food, "
    "material, shape"
)

INSTRUCTION = (
    "You write descriptions of images for a text-to-image model. Skill: {description}\n"
    "Here are example descriptions:\n{examples}\n"
    "Write {n} new, diverse image descriptions as a numbered list, one per line. Rules:\n"
    "- each description tests one of these visual skills: {sub_skills};\n"
    "- use everyday objects;\n"
    "- at most {max_words} words each;\n"
    "- vary the sentence style;\n"
    "{extra}"
    "Only output the numbered list."
)


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    seeds: tuple[str, ...]
    max_words: int = 30
    extra_rule: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.seeds) < 3:
            raise ValueError(f"skill {self.name!r} needs at least 3 seed prompts")

    def instruction(self, examples: list[str], n: int) -> str:
        listed = "\n".join(f"{i}. {e}" for i, e in enumerate(examples, 1))
        extra = f"- {self.extra_rule}\n" if self.extra_rule else ""
        return INSTRUCTION.format(
            description=self.description,
            examples=listed,
            n=n,
            sub_skills=SUB_SKILLS,
            max_words=self.max_words,
            extra=extra,
        )


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in [
        Skill(
            name="dense_detail",
            source="Localized Narratives",
            description="long, detailed descriptions that walk through everything in the image.",
            max_words=50,
            seeds=(
                "In this image we can see a wooden table with a blue mug, a folded newspaper and "
                "a plate of toast; behind it there is a window with white curtains.",
                "A kitchen counter holds a green kettle on the left, a cutting board with sliced "
                "carrots in the middle and a jar of spoons on the right, under hanging lamps.",
                "On a sandy beach, a striped umbrella shades two folding chairs and a red cooler, "
                "while small waves roll in and a sailboat floats far away.",
            ),
        ),
        Skill(
            name="counting",
            source="CountBench",
            description="images with a specific small number of objects that must be counted.",
            extra_rule="keep every count small: at most 3 of each object.",
            seeds=(
                "Two red apples next to three yellow bananas on a plate.",
                "Three dogs sitting in a row on a green lawn.",
                "One candle and two coffee cups on a wooden table.",
            ),
        ),
        Skill(
            name="user_prompts",
            source="DiffusionDB",
            description="prompts in the style real users type into text-to-image tools.",
            max_words=50,
            seeds=(
                "a cozy cabin in a snowy forest at night, warm light in the windows, digital art",
                "portrait of an old fisherman, dramatic lighting, highly detailed, oil painting",
                "a futuristic city street after rain, neon signs, reflections, cinematic",
            ),
        ),
        Skill(
            name="commonsense_defying",
            source="Whoops",
            description="images that combine things in ways that defy common sense.",
            extra_rule="describe an impossible or unusual combination of ordinary things.",
            seeds=(
                "A snowman melting on a hot stove in a summer kitchen.",
                "A giraffe riding a bicycle through a supermarket aisle.",
                "A candle burning underwater in a fish tank.",
            ),
        ),
        Skill(
            name="everyday_scenes",
            source="COCO",
            description="ordinary photos of everyday scenes with common objects and people.",
            seeds=(
                "A man riding a bicycle down a city street.",
                "A cat sleeping on a laptop keyboard.",
                "A group of people sharing a pizza at a restaurant table.",
            ),
        ),
    ]
}


def get_skills(names: list[str], custom: list[Any] | None = None) -> list[Skill]:
    """The skills named, in order, from the registry or ``custom`` specs (which win)."""
    known = dict(SKILLS)
    for spec in custom or []:
        known[spec.name] = Skill(
            name=spec.name,
            description=spec.description,
            seeds=tuple(spec.seeds),
            max_words=spec.max_words,
            extra_rule=spec.extra_rule,
            source="custom",
        )
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown skills {unknown}; known skills: {sorted(known)}")
    return [known[n] for n in names]
