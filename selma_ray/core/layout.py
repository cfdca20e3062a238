"""Where each stage's outputs live in a run directory, and how a downstream stage reads them.

This is the contract between stages: a stage writes here and a later stage (or Serve, or the
evaluation) reads here, without importing the stage that wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selma_ray.core.rundir import RunDir

PROMPTS = "prompts"
IMAGES = "images"
EXPERTS = "experts"
MERGED = "merged"  # the served merge
MERGES = "merges"  # one folder per merge method
EVAL = "eval"


def prompts_file(run: RunDir, skill: str) -> Path:
    return run.path(PROMPTS, f"{skill}.jsonl")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def load_prompts(run: RunDir, skills: list[str]) -> list[dict[str, Any]]:
    """All accepted prompts of a finished prompts stage, in skill order."""
    return [row for name in skills for row in read_jsonl(prompts_file(run, name))]


def images_data(run: RunDir) -> Path:
    """The images stage's Parquet shards (prompt, skill, seed, PNG bytes, ...)."""
    return run.path(IMAGES, "data")


def expert_dir(run: RunDir, skill: str) -> Path:
    return run.path(EXPERTS, skill)
