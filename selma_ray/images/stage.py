"""Stage 2, images: a diffusers text-to-image pipeline renders every prompt on Ray Data.

Each image's seed comes from (run seed, skill, prompt id, image index), so the same config
gives the same images however Ray Data partitions the work. Output is a folder of Parquet
shards (prompt, skill, prompt_id, seed, generator, width, height, PNG bytes) that the
render workers write straight to the run's storage; the manifest lists the shards that count.

A broken image (NaN, all black, one colour) is rendered once more with a seed derived from
its own and dropped if still broken. Skills in ``images.real_data`` get imported real pairs
(``selma_ray.images.real_data``) instead of renders. A re-run reuses the images of the earlier run
whose render settings, prompt and seed still match, so new prompts are all it renders.
"""

from __future__ import annotations

import io
import logging
from itertools import chain, islice
from typing import Any

from selma_ray.config import SelmaConfig
from selma_ray.core import layout
from selma_ray.core.devices import torch_device_and_dtype
from selma_ray.core.lineage import Lineage, digest
from selma_ray.core.rundir import RunDir
from selma_ray.core.seeds import stable_seed
from selma_ray.core.udf import require_columns
from selma_ray.diffusion.common import png_bytes
from selma_ray.images import real_data as datasets
from selma_ray.images import set_scheduler

log = logging.getLogger(__name__)
STAGE = layout.IMAGES


def is_broken(image: Any, tol: float = 1 / 255) -> bool:
    """True for an image with NaN/inf values or a single colour (e.g. all black)."""
    import numpy as np

    arr = np.asarray(image, dtype=np.float64)
    return arr.size == 0 or not np.isfinite(arr).all() or float(arr.max() - arr.min()) < tol


class DiffusionRenderer:
    """Ray Data UDF: renders ``prompt`` with the per-row ``seed``."""

    REQUIRED = ("prompt", "seed")

    def __init__(
        self,
        model: str,
        num_gpus: float,
        dtype: str,
        steps: int,
        guidance_scale: float,
        resolution: int | None,
        scheduler: str = "default",
    ):
        from diffusers import AutoPipelineForText2Image

        from selma_ray.core.logs import setup_logging
        from selma_ray.models import resolve

        setup_logging()
        self.device, torch_dtype = torch_device_and_dtype(num_gpus, dtype)
        pipe = AutoPipelineForText2Image.from_pretrained(resolve(model), dtype=torch_dtype)
        pipe.set_progress_bar_config(disable=True)
        set_scheduler(pipe, scheduler)
        self.pipe = pipe.to(self.device)
        self.model = model
        self.steps, self.guidance_scale = steps, guidance_scale
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.size = resolution or native

    def render(self, prompts: list[str], seeds: list[int]) -> list[Any]:
        """HxWx3 float images for ``prompts``, one seeded generator each."""
        import torch

        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        out = self.pipe(
            prompt=prompts,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            height=self.size,
            width=self.size,
            generator=generators,
            output_type="np",
        )
        return list(out.images)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        require_columns("DiffusionRenderer", batch, self.REQUIRED)
        prompts = [str(p) for p in batch["prompt"]]
        seeds = [int(s) for s in batch["seed"]]
        images = self.render(prompts, seeds)
        broken = [i for i, img in enumerate(images) if is_broken(img)]
        if broken:
            retry = [stable_seed(seeds[i], "retry") for i in broken]
            again = self.render([prompts[i] for i in broken], retry)
            for i, seed, img in zip(broken, retry, again, strict=True):
                seeds[i], images[i] = seed, img
        keep = [i for i, img in enumerate(images) if not is_broken(img)]
        if broken:
            log.warning(
                "images: %d broken images re-rendered with new seeds, %d still broken dropped",
                len(broken),
                len(images) - len(keep),
            )
        out = {k: np.asarray(v)[keep] for k, v in batch.items()}
        n = len(keep)
        out["seed"] = np.array(seeds, dtype=np.int64)[keep]
        out["image"] = np.array([png_bytes(images[i]) for i in keep], dtype=object)
        out["width"] = np.full(n, self.size)
        out["height"] = np.full(n, self.size)
        out["generator"] = np.array([self.model] * n, dtype=object)
        return out


def image_rows(cfg: SelmaConfig, prompt_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per image to render, each with its own stable seed."""
    rows = []
    for p in prompt_rows:
        for k in range(cfg.images.images_per_prompt):
            seed = stable_seed(cfg.run.seed, p["skill"], p["id"], k)
            rows.append(
                {
                    "prompt_id": p["id"],
                    "skill": p["skill"],
                    "prompt": p["prompt"],
                    "image_index": k,
                    "seed": seed,
                }
            )
    return rows


def real_prompts(cfg: SelmaConfig) -> list[dict[str, Any]]:
    """With ``images.real_data_use=prompts``: each real_data skill's captions as prompts to
    render, the first ``prompts.per_skill`` its sources hold (the images are not kept)."""
    rows = []
    for skill, sources in cfg.images.real_data.items():
        report = datasets.ImportReport()
        pairs = chain.from_iterable(datasets.read_pairs(s, skill, report) for s in sources)
        taken = [
            {"id": r["prompt_id"], "skill": skill, "prompt": r["prompt"]}
            for r in islice(pairs, cfg.prompts.per_skill)
        ]
        if not taken:
            raise RuntimeError(f"images: real_data for {skill!r} holds no captions: {sources}")
        log.info("images: [%s] rendering %d real captions from %s", skill, len(taken), sources)
        rows += taken
    return rows


def render_key(cfg: SelmaConfig) -> str:
    """What a rendered image depends on besides its row: rows with the same key are reusable."""
    ic = cfg.images
    return cfg.fingerprint(
        extra=[cfg.models.generator, ic.steps, ic.guidance_scale, ic.resolution, ic.dtype]
        + ([ic.scheduler] if ic.scheduler != "default" else [])
    )


def _reuse_old_rows(
    run: RunDir, cfg: SelmaConfig, planned: list[dict[str, Any]], tag: str
) -> tuple[list[str], set[tuple[str, int]]]:
    """The committed shards of an earlier run that still hold planned rows: a shard whose rows
    are all wanted is kept as it is (no copy), one with some wanted rows is rewritten filtered.
    Returns (the shards to list in the new manifest, the reused row keys).

    A row matches when the earlier run had the same render key and the row has the same
    prompt id, image index, prompt text and seed (or that seed's retry seed).
    """

    manifest = run.read_manifest(STAGE) or {}
    if manifest.get("render_key") != render_key(cfg):
        return [], set()
    want = {
        (r["prompt_id"], r["image_index"]): (
            r["prompt"],
            {r["seed"], stable_seed(r["seed"], "retry")},
        )
        for r in planned
    }
    reused: set[tuple[str, int]] = set()
    kept_files: list[str] = []
    keys_cols = ["prompt_id", "image_index", "prompt", "seed", "generator"]
    for n, file in enumerate(layout.images_files(run)):
        keys = layout.read_table(run, [file], keys_cols)
        mask = []
        for pid, idx, prompt, seed, gen in zip(*(c.to_pylist() for c in keys.columns), strict=True):
            plan = want.get((pid, idx))
            ok = gen == cfg.models.generator and plan is not None
            ok = ok and plan[0] == prompt and seed in plan[1] and (pid, idx) not in reused
            mask.append(ok)
            if ok:
                reused.add((pid, idx))
        if all(mask) and mask:
            kept_files.append(file)  # immutable: list it again, nothing moves
        elif any(mask):
            out = run.key(layout.IMAGES_DATA, f"reused-{tag}-{n:05d}.parquet")
            _copy_rows(run, file, out, mask)
            kept_files.append(out)
    return kept_files, reused


def _copy_rows(run: RunDir, src: str, dst: str, mask: list[bool]) -> None:
    """Copies the rows of ``src`` where ``mask`` holds into ``dst``, one record batch at a
    time: memory holds a batch of images, never the shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, start = datasets.schema(), 0
    with (
        run.fs.open_input_file(src) as f,
        pq.ParquetWriter(dst, schema, filesystem=run.fs) as writer,
    ):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=schema.names):
            keep = pa.array(mask[start : start + batch.num_rows], pa.bool_())
            start += batch.num_rows
            part = pa.Table.from_batches([batch]).filter(keep)
            if part.num_rows:
                writer.write_table(part.select(schema.names).cast(schema))


def _render(cfg: SelmaConfig, run: RunDir, rows: list[dict[str, Any]]) -> None:
    import ray

    ic, res = cfg.images, cfg.resources.images
    ds = ray.data.from_items(rows).map_batches(
        DiffusionRenderer,
        fn_constructor_kwargs={
            "model": cfg.models.generator,
            "num_gpus": res.num_gpus,
            "dtype": ic.dtype,
            "steps": ic.steps,
            "guidance_scale": ic.guidance_scale,
            "resolution": ic.resolution,
            "scheduler": ic.scheduler,
        },
        compute=ray.data.ActorPoolStrategy(min_size=res.min_size, max_size=res.max_size),
        batch_size=ic.batch_size,
        num_gpus=res.num_gpus,
        num_cpus=res.num_cpus,
        resources=res.custom,
    )
    # Written by the workers straight to the run's storage (whichever node they are on), in
    # shards small enough that reading one back never floods the object store.
    ds.write_parquet(
        run.key(layout.IMAGES_DATA),
        filesystem=run.fs,
        max_rows_per_file=layout.IMAGE_ROWS_PER_FILE,
    )


def _rendered_seeds(run: RunDir, files: list[str]) -> dict[tuple[str, int], int]:
    table = layout.read_table(run, files, ["prompt_id", "image_index", "seed"])
    return {(p, i): s for p, i, s in zip(*(c.to_pylist() for c in table.columns), strict=True)}


def _hash_images(batch: dict[str, Any]) -> dict[str, Any]:
    import hashlib

    import numpy as np

    out = {k: batch[k] for k in ("skill", "prompt", "seed")}
    out["sha"] = np.array([hashlib.sha256(bytes(b)).hexdigest() for b in batch["image"]])
    return out


def skill_digests(run: RunDir, files: list[str]) -> dict[str, str]:
    """One digest per skill over its rows (prompt, seed, image content), whatever the
    sharding: what each skill's expert is trained from. The images are hashed on the
    workers; only the hashes reach the driver."""
    if not files:
        return {}
    ds = layout.read_dataset(run, files, ["skill", "prompt", "seed", "image"])
    rows: dict[str, list[tuple[str, int, str]]] = {}
    for r in ds.map_batches(_hash_images, batch_format="numpy").iter_rows():
        rows.setdefault(str(r["skill"]), []).append((str(r["prompt"]), int(r["seed"]), r["sha"]))
    return {skill: digest(sorted(r)) for skill, r in sorted(rows.items())}


def run_images(cfg: SelmaConfig, run: RunDir, lineage: Lineage) -> dict[str, Any]:
    """Render all accepted prompts into Parquet shards under ``images/data/``; returns the
    stage summary.

    Skills listed in ``images.real_data`` take imported real pairs instead of rendering.
    Images of an earlier run with the same render settings are reused, so adding prompts
    renders only the new ones. New shards get new names and the old ones are never changed,
    so the earlier manifest stays true until the new one replaces it; shards that no manifest
    lists (an earlier kill's, or replaced ones) are deleted after the commit.
    """
    import uuid

    fp = lineage.fingerprint
    if run.is_done(fp, STAGE):
        log.info("images: finished earlier with the same inputs, skipping")
        return {**(run.read_manifest(STAGE) or {}), "skipped": True}
    real = cfg.images.real_data
    for skill, sources in real.items():
        for source in sources:
            datasets.source_kind(source)  # a missing source fails before any rendering
        if skill not in cfg.prompts.skills:
            log.warning("images: real_data skill %r is not in prompts.skills; no expert", skill)
    prompt_rows = [
        p for p in layout.load_prompts(run, cfg.prompts.skills) if p["skill"] not in real
    ]
    if cfg.images.real_data_use == "prompts":  # real captions, rendered by the generator
        prompt_rows += real_prompts(cfg)
        real = {}
    planned = image_rows(cfg, prompt_rows)
    if not planned and not real:
        raise RuntimeError("images: the prompts stage produced no prompts to render")
    tag = uuid.uuid4().hex[:8]
    kept, reused = _reuse_old_rows(run, cfg, planned, tag)
    todo = [r for r in planned if (r["prompt_id"], r["image_index"]) not in reused]
    log.info(
        "images: rendering %d images with %s (%d reused)",
        len(todo),
        cfg.models.generator,
        len(reused),
    )
    before = set(run.files(layout.IMAGES_DATA, suffix=".parquet"))
    if todo:
        _render(cfg, run, todo)
    new = sorted(set(run.files(layout.IMAGES_DATA, suffix=".parquet")) - before)
    seeds = _rendered_seeds(run, [run.key(f) for f in new])
    planned_seed = {(r["prompt_id"], r["image_index"]): r["seed"] for r in todo}
    dropped = len(todo) - len(seeds)
    retried = dropped + sum(1 for k, s in seeds.items() if s != planned_seed.get(k, s))
    skipped: list[tuple[str, str]] = []
    shards = [run.rel(k) for k in kept] + new
    for skill, sources in real.items():
        report = datasets.ImportReport()
        rows = chain.from_iterable(datasets.read_pairs(s, skill, report) for s in sources)
        prefix = f"real-{skill}-{tag}"
        n = datasets.write_shards(rows, run.key(layout.IMAGES_DATA), prefix, run.fs)
        shards += [
            f
            for f in run.files(layout.IMAGES_DATA, suffix=".parquet")
            if f.rsplit("/", 1)[-1].startswith(f"{prefix}-")
        ]
        log.log(
            logging.INFO if n else logging.WARNING,
            "images: [%s] %d real pairs imported from %s",
            skill,
            n,
            sources,
        )
        skipped.extend(report.skipped)
    shards = sorted(set(shards))
    files = [run.key(f) for f in shards]
    counts = write_contact_sheets(run, files)
    for skill, n in counts.items():
        log.info("images: [%s] %d images, contact sheet in %s", skill, n, STAGE)
    manifest = run.write_manifest(
        fp,
        STAGE,
        lineage=lineage.inputs,
        outputs=run.outputs(shards, skill_digests(run, files)),
        counts=counts,
        total=sum(counts.values()),
        path=run.url(layout.IMAGES_DATA),
        render_key=render_key(cfg),
        rendered=len(seeds),
        reused=len(reused),
        broken_retried=retried,
        broken_dropped=dropped,
        real_skipped=[f"{where}: {reason}" for where, reason in skipped],
    )
    for stray in set(run.files(layout.IMAGES_DATA)) - set(shards):
        run.delete(stray)  # after the commit: replaced shards and an earlier kill's leftovers
    return manifest


def write_contact_sheets(run: RunDir, files: list[str], per_sheet: int = 16) -> dict[str, int]:
    """One PNG grid per skill (first ``per_sheet`` images with their prompts) in
    ``images/contact_sheets/``; returns the image count per skill. Only the shown rows' images
    are read."""
    import pyarrow.dataset as pads
    from PIL import Image, ImageDraw

    keys = layout.read_table(run, files, ["skill", "prompt_id", "image_index"]).to_pylist()
    by_skill: dict[str, list[tuple[str, int]]] = {}
    for row in sorted(keys, key=lambda r: (r["prompt_id"], r["image_index"])):
        by_skill.setdefault(row["skill"], []).append((row["prompt_id"], row["image_index"]))
    shown_ids = sorted({pid for rows in by_skill.values() for pid, _ in rows[:per_sheet]})
    shown = {
        (r["prompt_id"], r["image_index"]): r
        for r in layout.read_table(
            run,
            files,
            ["prompt_id", "image_index", "prompt", "image"],
            filter=pads.field("prompt_id").isin(shown_ids),
        ).to_pylist()
    }
    cell, caption, cols = 128, 44, 4
    for skill, rows in by_skill.items():
        cells = [shown[k] for k in rows[:per_sheet]]
        n_rows = -(-len(cells) // cols)
        sheet = Image.new("RGB", (cols * cell, n_rows * (cell + caption)), "white")
        draw = ImageDraw.Draw(sheet)
        for i, row in enumerate(cells):
            x, y = (i % cols) * cell, (i // cols) * (cell + caption)
            img = Image.open(io.BytesIO(row["image"])).convert("RGB").resize((cell, cell))
            sheet.paste(img, (x, y))
            words, lines = row["prompt"].split(), [""]
            for w in words:
                if len(lines[-1]) + len(w) > 21 and len(lines) < 3:
                    lines.append("")
                lines[-1] = f"{lines[-1]} {w}".strip()
            draw.multiline_text((x + 2, y + cell + 2), "\n".join(lines[:3]), fill="black")
        buf = io.BytesIO()
        sheet.save(buf, format="PNG")
        run.write_bytes(buf.getvalue(), STAGE, "contact_sheets", f"{skill}.png")
    return {skill: len(rows) for skill, rows in by_skill.items()}
