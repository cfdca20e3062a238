"""Real image-text pairs imported into the image stage's data set format.

A source is an image folder (``metadata.jsonl`` with ``file_name`` and ``text``/``caption``,
or a caption ``.txt`` next to each image), Parquet (an image column of PNG/JPEG bytes or a
``{"bytes": ...}`` struct, and a text column), or WebDataset tars (``key.jpg|png|webp`` with
``key.txt|caption|json``). Every image is re-encoded to PNG; unreadable images, missing
captions and corrupt tar members are skipped and reported with their paths.

    python -m selma_ray.images.real_data --skill counting --out DIR SOURCE [SOURCE...]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selma_ray.config import SKILL_NAME
from selma_ray.core.layout import IMAGE_ROWS_PER_FILE
from selma_ray.core.rundir import replace_dir
from selma_ray.core.seeds import stable_seed

log = logging.getLogger(__name__)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TEXT_COLUMNS = ("text", "caption", "prompt")


def schema():
    """The image stage's row schema (also what rendered shards hold)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("prompt_id", pa.string()),
            ("skill", pa.string()),
            ("prompt", pa.string()),
            ("image_index", pa.int64()),
            ("seed", pa.int64()),
            ("image", pa.binary()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("generator", pa.string()),
        ]
    )


@dataclass
class ImportReport:
    """What an import read: good pairs per source and every skipped item with its reason."""

    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, where: str, reason: str) -> None:
        log.warning("datasets: skipped %s: %s", where, reason)
        self.skipped.append((where, reason))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def to_png(data: bytes) -> tuple[bytes, int, int]:
    """Decode any PIL-readable image and re-encode it as RGB PNG; returns (png, width, height)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue(), rgb.width, rgb.height


def source_kind(source: str) -> str:
    """``imagefolder``, ``parquet`` or ``webdataset``, from the path; ValueError if none fits."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".parquet":
            return "parquet"
        if path.name.endswith((".tar", ".tar.gz", ".tgz")):
            return "webdataset"
        raise ValueError(f"{source}: not a .parquet or .tar file, nor a folder")
    if not path.is_dir():
        raise ValueError(f"{source}: no such file or folder")
    if (path / "metadata.jsonl").is_file():
        return "imagefolder"
    if any(path.glob("*.parquet")):
        return "parquet"
    if any(path.glob("*.tar")):
        return "webdataset"
    return "imagefolder"


def _imagefolder(root: Path, report: ImportReport) -> Iterator[tuple[str, bytes, str]]:
    meta = root / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{meta}:{n}"
            try:
                rec = json.loads(line)
                name = rec["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                report.skip(where, f"bad metadata line ({e})")
                continue
            text = rec.get("text") or rec.get("caption")
            file = root / name
            if not text:
                report.skip(str(file), "missing caption")
            elif not file.is_file():
                report.skip(str(file), "image file not found")
            else:
                yield str(file), file.read_bytes(), str(text)
        return
    for file in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        side = file.with_suffix(".txt")
        text = side.read_text().strip() if side.is_file() else ""
        if not text:
            report.skip(str(file), "missing caption (no metadata.jsonl, no .txt file)")
            continue
        yield str(file), file.read_bytes(), text


def _parquet(
    source: Path, report: ImportReport, image_column: str, text_column: str | None
) -> Iterator[tuple[str, bytes, str]]:
    import pyarrow.parquet as pq

    files = [source] if source.is_file() else sorted(source.glob("*.parquet"))
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except Exception as e:  # pyarrow raises several types for a bad file
            report.skip(str(file), f"unreadable Parquet ({e})")
            continue
        names = pf.schema_arrow.names
        text_col = text_column or next((c for c in TEXT_COLUMNS if c in names), None)
        missing = [c for c in (image_column, text_col) if c is None or c not in names]
        if missing:
            report.skip(
                str(file),
                f"needs an image column {image_column!r} and a text column "
                f"({text_column or ' or '.join(TEXT_COLUMNS)}); has {names}",
            )
            continue
        row = 0
        for batch in pf.iter_batches(batch_size=64, columns=[image_column, text_col]):
            for image, text in zip(
                batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True
            ):
                where = f"{file}#row{row}"
                row += 1
                if isinstance(image, dict):
                    image = image.get("bytes")
                if not isinstance(image, bytes) or not image:
                    report.skip(where, "no image bytes")
                elif not text:
                    report.skip(where, "missing caption")
                else:
                    yield where, image, str(text)


def _caption(parts: dict[str, bytes]) -> str:
    for ext in ("txt", "caption"):
        if ext in parts:
            return parts[ext].decode("utf-8", "replace").strip()
    if "json" in parts:
        try:
            rec = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return ""
        if isinstance(rec, dict):
            return str(next((rec[k] for k in TEXT_COLUMNS if rec.get(k)), "")).strip()
    return ""


def _tar_samples(tar_path: Path, report: ImportReport) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for consecutive members sharing a key, WebDataset style."""
    key, parts = None, {}
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                this = os.path.join(os.path.dirname(member.name), stem)
                if this != key and key is not None:
                    yield key, parts
                    parts = {}
                key = this
                try:
                    f = tar.extractfile(member)
                    parts[ext.lower()] = f.read() if f else b""
                except (tarfile.TarError, OSError) as e:
                    report.skip(f"{tar_path}:{member.name}", f"corrupt tar member ({e})")
    except (tarfile.TarError, OSError, EOFError) as e:
        report.skip(str(tar_path), f"corrupt tar, stopped reading ({e})")
    if key is not None:
        yield key, parts


def _webdataset(source: Path, report: ImportReport) -> Iterator[tuple[str, bytes, str]]:
    tars = [source] if source.is_file() else sorted(source.glob("*.tar"))
    for tar_path in tars:
        for key, parts in _tar_samples(tar_path, report):
            where = f"{tar_path}:{key}"
            image = next((parts[e] for e in ("png", "jpg", "jpeg", "webp") if e in parts), None)
            text = _caption(parts)
            if image is None:
                report.skip(where, "no .jpg/.png/.webp image")
            elif not text:
                report.skip(where, "missing caption (.txt, .caption or json text)")
            else:
                yield where, image, text


def read_pairs(
    source: str,
    skill: str,
    report: ImportReport,
    image_column: str = "image",
    text_column: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows in the image stage's format for one source; bad items go to ``report``."""
    kind = source_kind(source)
    path = Path(source)
    if kind == "imagefolder":
        pairs: Iterable[tuple[str, bytes, str]] = _imagefolder(path, report)
    elif kind == "parquet":
        pairs = _parquet(path, report, image_column, text_column)
    else:
        pairs = _webdataset(path, report)
    report.counts.setdefault(source, 0)
    for where, data, text in pairs:
        try:
            png, width, height = to_png(data)
        except Exception as e:  # PIL raises many types for bad image data
            report.skip(where, f"unreadable image ({type(e).__name__}: {e})")
            continue
        n = report.counts[source]
        report.counts[source] += 1
        prompt_id = f"{skill}-real-{stable_seed(source, where):08x}-{n:06d}"
        yield {
            "prompt_id": prompt_id,
            "skill": skill,
            "prompt": text,
            "image_index": 0,
            "seed": stable_seed(skill, prompt_id),
            "image": png,
            "width": width,
            "height": height,
            "generator": f"real:{source}",
        }


def write_shards(
    rows: Iterable[dict[str, Any]], out_dir: Path | str, prefix: str, filesystem: Any = None
) -> int:
    """Write rows as ``<prefix>-NNNNN.parquet`` shards of the stage schema into ``out_dir``
    (a local folder, or a path inside ``filesystem``); returns the count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if filesystem is None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    elif filesystem.type_name == "local":  # a run whose every skill is imported has none yet
        filesystem.create_dir(str(out_dir), recursive=True)
    buf: list[dict[str, Any]] = []
    total = shard = 0

    def flush() -> None:
        nonlocal shard
        table = pa.Table.from_pylist(buf, schema=schema())
        pq.write_table(table, f"{out_dir}/{prefix}-{shard:05d}.parquet", filesystem=filesystem)
        shard += 1
        buf.clear()

    for row in rows:
        buf.append(row)
        total += 1
        if len(buf) >= IMAGE_ROWS_PER_FILE:
            flush()
    if buf:
        flush()
    return total


def import_sources(
    sources: list[str],
    skill: str,
    out: str | os.PathLike[str],
    image_column: str = "image",
    text_column: str | None = None,
) -> ImportReport:
    """Import ``sources`` as ``skill`` pairs into the Parquet folder ``out`` (atomically). An
    import that finds no pair leaves ``out`` as it was (see ``report.total``)."""
    for s in sources:
        source_kind(s)  # fail on a missing path before writing anything
    final = Path(out).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    report = ImportReport()
    try:
        for i, source in enumerate(sources):
            rows = read_pairs(source, skill, report, image_column, text_column)
            write_shards(rows, tmp, f"real-{skill}-{i:03d}")
        if report.total:
            replace_dir(tmp, final)
        else:
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def source_signature(sources: list[str]) -> list[list[Any]]:
    """(path, size, mtime) of every file under ``sources``, so edits change stage fingerprints."""
    sig: list[list[Any]] = []
    for source in sources:
        path = Path(source)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            st = f.stat() if f.exists() else None
            sig.append([str(f), st.st_size if st else None, st.st_mtime_ns if st else None])
    return sig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selma_ray.images.real_data",
        description="Import real image-text pairs for one skill into the image stage format.",
    )
    parser.add_argument("--skill", required=True, help="Skill label for every imported pair.")
    parser.add_argument("--out", required=True, help="Output folder of Parquet shards.")
    parser.add_argument("--image-column", default="image", help="Parquet image column.")
    parser.add_argument(
        "--text-column", default=None, help="Parquet text column (default: text/caption/prompt)."
    )
    parser.add_argument("sources", nargs="+", help="Image folders, Parquet files or tars.")
    args = parser.parse_args(argv)
    if not re.match(SKILL_NAME, args.skill):
        parser.exit(2, f"error: --skill {args.skill!r}: use letters, digits, '_' or '-'\n")
    try:
        report = import_sources(
            args.sources, args.skill, args.out, args.image_column, args.text_column
        )
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"imported {report.total} pairs for skill {args.skill!r} into {args.out}")
    for source, n in report.counts.items():
        print(f"  {source}: {n}")
    print(f"skipped {len(report.skipped)}")
    for where, reason in report.skipped:
        print(f"  {where}: {reason}")
    if not report.total:
        print(f"error: no pair imported; {args.out} was left as it was", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    sys.exit(main())
