"""Where each stage's outputs live in a run directory, and how a downstream stage reads them.

This is the contract between stages: a stage writes here and a later stage (or Serve, or the
evaluation) reads here, without importing the stage that wrote it.
"""

from __future__ import annotations

import json
from typing import Any

from selma_ray.core.rundir import RunDir

PROMPTS = "prompts"
IMAGES = "images"
EXPERTS = "experts"
MERGED = "merged"  # the served merge
MERGES = "merges"  # one folder per merge method
EVAL = "eval"


def prompts_file(skill: str) -> str:
    """A skill's accepted prompts, relative to the run."""
    return f"{PROMPTS}/{skill}.jsonl"


def read_jsonl(run: RunDir, rel: str) -> list[dict[str, Any]]:
    try:
        text = run.read_text(rel)
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line]


def load_prompts(run: RunDir, skills: list[str]) -> list[dict[str, Any]]:
    """All accepted prompts of a finished prompts stage, in skill order."""
    return [row for name in skills for row in read_jsonl(run, prompts_file(name))]


IMAGES_DATA = f"{IMAGES}/data"


def images_files(run: RunDir, stage: str = IMAGES) -> list[str]:
    """The Parquet shards (prompt, skill, seed, PNG bytes, ...) that the images stage's
    manifest lists, as paths inside ``run.fs``: only committed shards, never strays."""
    manifest = run.read_manifest(stage) or {}
    listed = (manifest.get("outputs") or {}).get("files", {})
    return [run.key(rel) for rel in sorted(listed) if rel.endswith(".parquet")]


def expert_dir(skill: str) -> tuple[str, str]:
    """A skill expert's folder (parts relative to the run)."""
    return (EXPERTS, skill)


def read_table(run: RunDir, files: list[str], columns: list[str] | None, filter: Any = None) -> Any:
    """Only ``columns`` (and the rows ``filter`` keeps) of Parquet ``files`` in ``run.fs``, as
    one Arrow table: for the small reads a driver does (keys, a sample, a contact sheet)."""
    import pyarrow.dataset as pads

    if not files:
        import pyarrow as pa

        return pa.table({c: [] for c in columns or []})
    dataset = pads.dataset(files, format="parquet", filesystem=run.fs)
    return dataset.to_table(columns=columns, filter=filter)


def read_dataset(
    run: RunDir,
    files: list[str],
    columns: list[str] | None,
    filter: Any = None,
    num_cpus: float | None = None,
) -> Any:
    """Parquet ``files`` in ``run.fs`` as a Ray Dataset read on the cluster's workers, with
    column projection and, when given, a ``filter`` (a ``ray.data.expressions`` predicate,
    which Ray Data pushes down into the Parquet scan); ``num_cpus`` per read task (Ray's
    default: 1).

    With ``num_cpus``, the read is planned as one operator whose every task takes that
    reservation. Ray Data's newer file source adds a listing task that always asks for a
    whole CPU, and a feed read while trainers hold most CPUs would wait for it forever."""
    import ray
    from ray.data import DataContext

    if num_cpus is None:
        ds = ray.data.read_parquet(files, filesystem=run.fs, columns=columns)
    else:
        ctx = DataContext.get_current()
        v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
        try:
            ds = ray.data.read_parquet(files, filesystem=run.fs, columns=columns, num_cpus=num_cpus)
        finally:
            ctx.use_datasource_v2 = v2
    return ds if filter is None else ds.filter(expr=filter)
