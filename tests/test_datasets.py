"""Importing real image-text pairs: image folders, Parquet, WebDataset tars and the CLI."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from selma_ray.config import ConfigError, load_config
from selma_ray.images.real_data import ImportReport, import_sources, main, read_pairs, schema

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def image_bytes(fmt: str = "PNG", color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format=fmt)
    return buf.getvalue()


def read_out(out: Path) -> list[dict]:
    table = pads.dataset(str(out), format="parquet").to_table()
    assert table.schema.equals(schema())
    return sorted(table.to_pylist(), key=lambda r: r["prompt"])


def test_imagefolder_metadata_skips_bad_entries(tmp_path: Path) -> None:
    src = tmp_path / "folder"
    src.mkdir()
    (src / "a.png").write_bytes(image_bytes())
    (src / "b.jpg").write_bytes(image_bytes("JPEG"))
    (src / "broken.png").write_bytes(b"not an image")
    (src / "nocap.png").write_bytes(image_bytes())
    lines = [
        {"file_name": "a.png", "text": "two red apples"},
        {"file_name": "b.jpg", "caption": "three cats"},
        {"file_name": "broken.png", "text": "broken"},
        {"file_name": "nocap.png"},
        {"file_name": "gone.png", "text": "missing file"},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n{not json\n"
    (src / "metadata.jsonl").write_text(text)
    report = import_sources([str(src)], "counting", tmp_path / "out")
    rows = read_out(tmp_path / "out")
    assert [r["prompt"] for r in rows] == ["three cats", "two red apples"]
    for r in rows:
        assert r["image"].startswith(PNG_MAGIC)
        assert (r["width"], r["height"], r["skill"]) == (8, 6, "counting")
        assert r["generator"] == f"real:{src}"
    assert report.counts == {str(src): 2}
    skipped = {Path(w).name.split(":")[0]: why for w, why in report.skipped}
    assert set(skipped) == {"broken.png", "nocap.png", "gone.png", "metadata.jsonl"}
    assert "unreadable image" in skipped["broken.png"]
    assert "missing caption" in skipped["nocap.png"]


def test_imagefolder_sidecar_captions(tmp_path: Path) -> None:
    src = tmp_path / "folder"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x.webp").write_bytes(image_bytes("WEBP"))
    (src / "sub" / "x.txt").write_text("a dog on a sofa\n")
    (src / "y.png").write_bytes(image_bytes())
    report = ImportReport()
    rows = list(read_pairs(str(src), "everyday_scenes", report))
    assert [r["prompt"] for r in rows] == ["a dog on a sofa"]
    assert report.skipped == [(str(src / "y.png"), report.skipped[0][1])]


def test_parquet_bytes_and_struct_columns(tmp_path: Path) -> None:
    good = image_bytes()
    table = pa.table(
        {
            "img": [{"bytes": good, "path": "a"}, {"bytes": None, "path": "b"}, {"bytes": good}],
            "desc": ["one bird", "no bytes", ""],
        }
    )
    pq.write_table(table, tmp_path / "structs.parquet")
    pq.write_table(
        pa.table({"img": [good, b"garbage"], "desc": ["two birds", "bad image"]}),
        tmp_path / "plain.parquet",
    )
    out = tmp_path / "out"
    report = import_sources([str(tmp_path / "structs.parquet")], "counting", out, "img", "desc")
    assert [r["prompt"] for r in read_out(out)] == ["one bird"]
    assert [w.rsplit("#", 1)[1] for w, _ in report.skipped] == ["row1", "row2"]
    report = import_sources([str(tmp_path / "plain.parquet")], "counting", out, "img", "desc")
    assert [r["prompt"] for r in read_out(out)] == ["two birds"]
    assert report.skipped[0][0].endswith("plain.parquet#row1")


def test_parquet_missing_columns_are_reported(tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": [1]}), tmp_path / "d.parquet")
    report = import_sources([str(tmp_path / "d.parquet")], "counting", tmp_path / "out")
    assert report.total == 0 and "needs an image column" in report.skipped[0][1]


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tar(tmp_path: Path) -> None:
    path = tmp_path / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "s/000.png", image_bytes())
        add(tar, "s/000.txt", b"a red square")
        add(tar, "s/001.jpg", image_bytes("JPEG"))
        add(tar, "s/001.json", json.dumps({"caption": "a jpeg square"}).encode())
        add(tar, "s/002.webp", image_bytes("WEBP"))
        add(tar, "s/002.caption", b"a webp square")
        add(tar, "s/003.png", image_bytes())
        add(tar, "s/004.png", b"corrupt")
        add(tar, "s/004.txt", b"corrupt image")
    report = import_sources([str(path)], "counting", tmp_path / "out")
    assert [r["prompt"] for r in read_out(tmp_path / "out")] == [
        "a jpeg square",
        "a red square",
        "a webp square",
    ]
    assert [w for w, _ in report.skipped] == [f"{path}:s/003", f"{path}:s/004"]


def test_truncated_tar_keeps_earlier_samples(tmp_path: Path) -> None:
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "000.png", image_bytes())
        add(tar, "000.txt", b"first")
        add(tar, "001.png", image_bytes() * 50)
        add(tar, "001.txt", b"second")
    data = path.read_bytes()
    path.write_bytes(data[:1800])  # cut inside the second image
    report = import_sources([str(path)], "counting", tmp_path / "out")
    assert [r["prompt"] for r in read_out(tmp_path / "out")] == ["first"]
    assert report.skipped and all(w.startswith(str(path)) for w, _ in report.skipped)


def test_cli_summary_and_bad_args(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "folder"
    src.mkdir()
    (src / "a.png").write_bytes(image_bytes())
    (src / "a.txt").write_text("an apple")
    (src / "b.png").write_bytes(image_bytes())
    assert main(["--skill", "counting", "--out", str(tmp_path / "out"), str(src)]) == 0
    text = capsys.readouterr().out
    assert "imported 1 pairs" in text and "skipped 1" in text and str(src / "b.png") in text
    with pytest.raises(SystemExit) as e:
        main(["--skill", "bad name", "--out", str(tmp_path / "o"), str(src)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["--skill", "counting", "--out", str(tmp_path / "o"), str(tmp_path / "nope")])
    assert e.value.code == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_exits_non_zero_when_nothing_is_imported_and_keeps_the_old_output(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "folder"
    src.mkdir()
    (src / "a.png").write_bytes(image_bytes())
    (src / "a.txt").write_text("an apple")
    out = tmp_path / "out"
    assert main(["--skill", "counting", "--out", str(out), str(src)]) == 0
    before = sorted(p.name for p in out.iterdir())
    empty, corrupt = tmp_path / "empty", tmp_path / "bad.tar"
    empty.mkdir()
    corrupt.write_bytes(b"not a tar")
    for sources in ([empty], [corrupt], [empty, corrupt]):
        capsys.readouterr()
        assert main(["--skill", "counting", "--out", str(out), *map(str, sources)]) == 1
        got = capsys.readouterr()
        assert "imported 0 pairs" in got.out and "no pair imported" in got.err
        assert sorted(p.name for p in out.iterdir()) == before  # the earlier import survives
    assert [r["prompt"] for r in read_out(out)] == ["an apple"]


def test_config_real_data_is_validated() -> None:
    cfg = load_config("tiny", ["images.real_data={counting: [/data/a.tar]}"])
    assert cfg.images.real_data == {"counting": ["/data/a.tar"]}
    with pytest.raises(ConfigError, match="no sources"):
        load_config("tiny", ["images.real_data={counting: []}"])
    with pytest.raises(ConfigError, match="skill names"):
        load_config("tiny", ["images.real_data={'bad name': [x]}"])
