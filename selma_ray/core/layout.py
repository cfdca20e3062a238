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
# Rows per image shard, whoever writes it (the images stage, imports, benchmarks). A feed
# reads and decodes a shard in one task, so a shard is the unit of what is in flight: 32 PNGs
# are about 10 MB at 512 px and about 50 MB at 1024 px, whatever the data size.
IMAGE_ROWS_PER_FILE = 32


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


def files_holding(
    run: RunDir, files: list[str], column: str, values: list[Any]
) -> dict[Any, list[str]]:
    """For each of ``values``, the Parquet ``files`` in ``run.fs`` that may hold rows where
    ``column`` equals it, judged from the files' row-group statistics (a file without them is
    kept for every value). Each footer is read once, whatever the number of values; a read
    of one value then has no task per shard of the others."""
    import pyarrow.parquet as pq

    keep: dict[Any, list[str]] = {v: [] for v in values}
    for file in files:
        with run.fs.open_input_file(file) as f:
            meta = pq.ParquetFile(f).metadata
        names = meta.schema.names
        index = names.index(column) if column in names else None
        for value in values:
            if index is None or any(
                _may_hold(meta.row_group(g).column(index).statistics, value)
                for g in range(meta.num_row_groups)
            ):
                keep[value].append(file)
    return keep


def _may_hold(stats: Any, value: Any) -> bool:
    return stats is None or not stats.has_min_max or stats.min <= value <= stats.max


def read_dataset(
    run: RunDir,
    files: list[str],
    columns: list[str] | None,
    filter: Any = None,
    num_cpus: float | None = None,
    whole_files: bool = False,
    concurrency: int | None = None,
) -> Any:
    """Parquet ``files`` in ``run.fs`` as a Ray Dataset read on the cluster's workers, with
    column projection and, when given, a ``filter`` (a ``ray.data.expressions`` predicate,
    which Ray Data pushes down into the Parquet scan); ``num_cpus`` per read task (Ray's
    default: 1); ``concurrency`` caps its tasks in flight.

    With ``whole_files``, one task reads each file, unsplit. Ray Data otherwise splits the
    blocks of a read that has fewer files than its target parallelism, and a split read
    cannot fuse with the maps after it: every file would then sit whole in the object store
    until they consume it. Unsplit, the read runs in the same task as those maps, and only
    their outputs reach the store.

    With ``num_cpus``, the read is planned as one operator whose every task takes that
    reservation. Ray Data's newer file source adds a listing task that always asks for a
    whole CPU, and a feed read while trainers hold most CPUs would wait for it forever."""
    import ray
    from ray.data import DataContext

    kwargs: dict[str, Any] = {"filesystem": run.fs, "columns": columns, "concurrency": concurrency}
    if whole_files:
        kwargs["override_num_blocks"] = len(files)
    if num_cpus is None:
        ds = ray.data.read_parquet(files, **kwargs)
    else:
        ctx = DataContext.get_current()
        v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
        try:
            ds = ray.data.read_parquet(files, num_cpus=num_cpus, **kwargs)
        finally:
            ctx.use_datasource_v2 = v2
    return ds if filter is None else ds.filter(expr=filter)
