"""The Ray Data image stage: seeds independent of batching, resume, and real data."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from selma_ray.config import SelmaConfig, load_config
from selma_ray.core import layout
from selma_ray.core.rundir import RunDir
from selma_ray.images.stage import STAGE
from selma_ray.pipeline import lineage, run_stage

SKILLS = ["counting", "dense_detail"]
PROMPTS = [
    "two red apples on a table",
    "a tall lamp beside a chair",
    "three boats on a river",
    "a kite above a green hill",
    "one mug and two spoons",
    "a cat asleep on a rug",
]


@pytest.fixture(scope="module", autouse=True)
def ray_local() -> Iterator[None]:
    import ray

    os.environ.setdefault("SELMA_CACHE", "/tmp/selma_cache")
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def setup_run(root: Path, n_prompts: int, *overrides: str) -> tuple[SelmaConfig, RunDir]:
    """A run dir whose prompts stage holds the first ``n_prompts`` prompts, alternating skills."""
    cfg = load_config(
        "tiny",
        [
            f"run.dir={root}",
            f"prompts.skills={SKILLS}",
            f"prompts.per_skill={n_prompts}",
            "images.steps=2",
            "images.resolution=32",
            *overrides,
        ],
    )
    run = RunDir(root)
    by_skill: dict[str, list[str]] = {s: [] for s in SKILLS}
    for i, prompt in enumerate(PROMPTS[:n_prompts]):
        skill = SKILLS[i % 2]
        row = {"id": f"{skill}-{i:05d}", "skill": skill, "prompt": prompt}
        by_skill[skill].append(json.dumps(row) + "\n")
    files = {skill: f"prompts/{skill}.jsonl" for skill in by_skill}
    units = {skill: run.write_text("".join(by_skill[skill]), f) for skill, f in files.items()}
    # As the prompts stage does: a manifest listing what it wrote (lineage reads only that).
    run.write_manifest("test", "prompts", outputs=run.outputs(files.values(), units))
    return cfg, run


def committed_rows(run: RunDir) -> list[dict]:
    """The rows of the shards the images manifest lists (what downstream stages read)."""
    return layout.read_table(run, layout.images_files(run), None).to_pylist()


def images_by_key(run: RunDir) -> dict[tuple[str, int], bytes]:
    rows = committed_rows(run)
    keys = {(r["prompt_id"], r["image_index"]): r["image"] for r in rows}
    assert len(keys) == len(rows)
    return keys


def test_images_do_not_depend_on_batch_size_and_shards_keep_the_row_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same images whatever the batch size; no shard holds more than IMAGE_ROWS_PER_FILE rows
    (the feed decodes a shard in one task), here capped at 2."""
    import pyarrow.parquet as pq

    monkeypatch.setattr(layout, "IMAGE_ROWS_PER_FILE", 2)
    results = []
    for bs in (1, 3):
        cfg, run = setup_run(tmp_path / f"bs{bs}", 6, f"images.batch_size={bs}")
        summary = run_stage("images", cfg, run)
        assert summary["rendered"] == 6 and summary["reused"] == 0
        assert summary["broken_retried"] == 0 and summary["broken_dropped"] == 0
        results.append(images_by_key(run))
        rows = [pq.read_metadata(f).num_rows for f in layout.images_files(run)]
        assert max(rows) <= 2 and sum(rows) == 6, rows
    assert len(results[0]) == 6
    assert results[0] == results[1]


def test_resume_renders_only_missing_prompts(tmp_path: Path) -> None:
    cfg, run = setup_run(tmp_path / "run", 5)
    first = run_stage("images", cfg, run)
    before = images_by_key(run)
    cfg, run = setup_run(tmp_path / "run", 6)
    second = run_stage("images", cfg, run)
    after = images_by_key(run)
    assert (first["rendered"], second["rendered"], second["reused"]) == (5, 1, 5)
    assert len(after) == 6 and all(after[k] == v for k, v in before.items())
    again = run_stage("images", cfg, run)
    assert again["skipped"] is True
    cfg, run = setup_run(tmp_path / "run", 6, "images.steps=3")
    assert run_stage("images", cfg, run)["rendered"] == 6  # new render settings: nothing reused


def test_real_data_replaces_rendering_for_its_skill(tmp_path: Path) -> None:
    src = tmp_path / "real"
    src.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (16, 16), color).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"real picture {i}")
    (src / "nocaption.png").write_bytes((src / "0.png").read_bytes())
    cfg, run = setup_run(tmp_path / "run", 2, f"images.real_data={{counting: [{src}]}}")
    summary = run_stage("images", cfg, run)
    rows = committed_rows(run)
    real = sorted((r for r in rows if r["skill"] == "counting"), key=lambda r: r["prompt"])
    assert [r["prompt"] for r in real] == ["real picture 0", "real picture 1"]
    assert {r["generator"] for r in real} == {f"real:{src}"}
    assert Image.open(io.BytesIO(real[0]["image"])).size == (16, 16)
    assert [r["skill"] for r in rows if r["generator"] == "tiny-sd"] == ["dense_detail"]
    assert summary["counts"] == {"counting": 2, "dense_detail": 1} and summary["rendered"] == 1
    assert summary["real_skipped"] == [
        f"{src / 'nocaption.png'}: " + summary["real_skipped"][0].split(": ", 1)[1]
    ]
    old = lineage("images", cfg, run).fingerprint
    (src / "1.txt").write_text("a changed caption")
    os.utime(src / "1.txt", ns=(1, 1))
    assert lineage("images", cfg, run).fingerprint != old


def test_missing_real_data_source_fails_before_rendering(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    cfg, run = setup_run(tmp_path / "run", 2, f"images.real_data={{counting: [{missing}]}}")
    with pytest.raises(ValueError, match="no such file or folder"):
        run_stage("images", cfg, run)
    assert not run.path(STAGE, "data").exists()


def test_a_rerun_lists_only_committed_shards_and_clears_strays(tmp_path: Path) -> None:
    cfg, run = setup_run(tmp_path / "run", 3)
    run_stage("images", cfg, run)
    stray = run.path(STAGE, "data", "killed-attempt-00000.parquet")  # a kill's leftover
    stray.write_bytes(b"PAR1 half written")
    assert len(images_by_key(run)) == 3  # never read: no manifest lists it
    cfg, run = setup_run(tmp_path / "run", 4)
    assert run_stage("images", cfg, run)["reused"] == 3
    assert not stray.exists()  # cleared after the new commit
    assert set(run.files(STAGE, "data")) == set(run.read_manifest(STAGE)["outputs"]["files"])


def test_a_partly_reused_shard_is_copied_batch_by_batch_keeping_only_wanted_rows(
    tmp_path: Path,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from selma_ray.images import real_data
    from selma_ray.images.stage import _copy_rows

    schema = real_data.schema()
    n = 150  # more than one record batch (64 rows)
    table = pa.table(
        {
            "prompt_id": [f"p{i}" for i in range(n)],
            "skill": ["counting"] * n,
            "prompt": [f"prompt {i}" for i in range(n)],
            "image_index": [0] * n,
            "seed": list(range(n)),
            "image": [bytes([i % 256]) * 8 for i in range(n)],
            "width": [8] * n,
            "height": [8] * n,
            "generator": ["tiny-sd"] * n,
            "extra": ["dropped"] * n,  # columns outside the schema are not copied
        }
    )
    src = tmp_path / "old.parquet"
    pq.write_table(table, src, row_group_size=50)
    mask = [i % 3 == 0 or 60 <= i < 70 for i in range(n)]
    run = RunDir(tmp_path)
    _copy_rows(run, run.key("old.parquet"), run.key("new.parquet"), mask)
    out = pq.read_table(tmp_path / "new.parquet")
    assert out.schema.equals(schema)
    assert out.column("seed").to_pylist() == [i for i in range(n) if mask[i]]
    assert out.column("image").to_pylist() == [bytes([i % 256]) * 8 for i in range(n) if mask[i]]
