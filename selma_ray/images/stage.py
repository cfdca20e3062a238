"""Stage 2, images: a diffusers text-to-image pipeline renders every prompt on Ray Data.

Each image's seed comes from (run seed, skill, prompt id, image index), so the same config
gives the same images however Ray Data partitions the work. Output is a folder of Parquet
shards (prompt, skill, prompt_id, seed, generator, width, height, PNG bytes), written to a
temporary folder and moved into place when complete.

A broken image (NaN, all black, one colour) is rendered once more with a seed derived from
its own and dropped if still broken. Skills in ``images.real_data`` get imported real pairs
(``selma_ray.images.real_data``) instead of renders. A re-run reuses the images of the earlier run
whose render settings, prompt and seed still match, so new prompts are all it renders.
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
from itertools import chain
from pathlib import Path
from typing import Any

from selma_ray.config import SelmaConfig
from selma_ray.core import layout
from selma_ray.core.lineage import Lineage, digest, outputs
from selma_ray.core.rundir import MANIFEST, RunDir, atomic_write_bytes, replace_dir
from selma_ray.core.seeds import stable_seed
from selma_ray.core.udf import require_columns
from selma_ray.diffusion.common import png_bytes, torch_device_and_dtype
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


def render_key(cfg: SelmaConfig) -> str:
    """What a rendered image depends on besides its row: rows with the same key are reusable."""
    ic = cfg.images
    return cfg.fingerprint(
        extra=[cfg.models.generator, ic.steps, ic.guidance_scale, ic.resolution, ic.dtype]
        + ([ic.scheduler] if ic.scheduler != "default" else [])
    )


def _reuse_old_rows(
    run: RunDir, cfg: SelmaConfig, planned: list[dict[str, Any]], out_dir: Path
) -> set[tuple[str, int]]:
    """Copy earlier rendered rows that match a planned row into ``out_dir``; returns their keys.

    A row matches when the earlier run had the same render key and the row has the same
    prompt id, image index, prompt text and seed (or that seed's retry seed).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    old = run.path(STAGE, "data")
    manifest = run.read_manifest(STAGE) or {}
    if manifest.get("render_key") != render_key(cfg) or not old.is_dir():
        return set()
    want = {
        (r["prompt_id"], r["image_index"]): (
            r["prompt"],
            {r["seed"], stable_seed(r["seed"], "retry")},
        )
        for r in planned
    }
    reused: set[tuple[str, int]] = set()
    for n, file in enumerate(sorted(old.glob("*.parquet"))):
        table = pq.read_table(file)
        keys = table.select(["prompt_id", "image_index", "prompt", "seed", "generator"])
        mask = []
        for pid, idx, prompt, seed, gen in zip(*(c.to_pylist() for c in keys.columns), strict=True):
            plan = want.get((pid, idx))
            ok = gen == cfg.models.generator and plan is not None
            ok = ok and plan[0] == prompt and seed in plan[1] and (pid, idx) not in reused
            mask.append(ok)
            if ok:
                reused.add((pid, idx))
        kept = table.filter(pa.array(mask, type=pa.bool_()))
        if kept.num_rows:
            kept = kept.select(datasets.schema().names).cast(datasets.schema())
            pq.write_table(kept, out_dir / f"reused-{n:05d}.parquet")
    return reused


def _render(cfg: SelmaConfig, rows: list[dict[str, Any]], out_dir: Path) -> None:
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
    )
    ds.write_parquet(str(out_dir))


def _rendered_seeds(out_dir: Path) -> dict[tuple[str, int], int]:
    import pyarrow.dataset as pads

    if not any(out_dir.glob("*.parquet")):
        return {}
    table = pads.dataset(str(out_dir), format="parquet").to_table(
        columns=["prompt_id", "image_index", "seed"]
    )
    return {(p, i): s for p, i, s in zip(*(c.to_pylist() for c in table.columns), strict=True)}


def skill_digests(data_dir: Path) -> dict[str, str]:
    """One digest per skill over its rows (prompt, seed, image content), whatever the
    sharding: what each skill's expert is trained from."""
    import hashlib

    import pyarrow.parquet as pq

    rows: dict[str, list[tuple[str, int, str]]] = {}
    for file in sorted(data_dir.glob("*.parquet")):
        table = pq.read_table(file, columns=["skill", "prompt", "seed", "image"])
        for skill, prompt, seed, image in zip(*(c.to_pylist() for c in table.columns), strict=True):
            rows.setdefault(skill, []).append((prompt, seed, hashlib.sha256(image).hexdigest()))
    return {skill: digest(sorted(r)) for skill, r in sorted(rows.items())}


def run_images(cfg: SelmaConfig, run: RunDir, lineage: Lineage) -> dict[str, Any]:
    """Render all accepted prompts into ``images/*.parquet``; returns the stage summary.

    Skills listed in ``images.real_data`` take imported real pairs instead of rendering.
    Images of an earlier run with the same render settings are reused, so adding prompts
    renders only the new ones.
    """
    fp = lineage.fingerprint
    if run.is_done(fp, STAGE):
        log.info("images: finished earlier with the same inputs, skipping")
        return {**(run.read_manifest(STAGE) or {}), "skipped": True}
    real = cfg.images.real_data
    prompt_rows = layout.load_prompts(run, cfg.prompts.skills)
    planned = image_rows(cfg, [p for p in prompt_rows if p["skill"] not in real])
    if not planned and not real:
        raise RuntimeError("images: the prompts stage produced no prompts to render")
    for skill, sources in real.items():
        for source in sources:
            datasets.source_kind(source)  # a missing source fails before any rendering
        if skill not in cfg.prompts.skills:
            log.warning("images: real_data skill %r is not in prompts.skills; no expert", skill)
    final = run.path(STAGE, "data")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".data.", dir=final.parent))
    reuse_dir = Path(tempfile.mkdtemp(prefix=".reuse.", dir=final.parent))
    try:
        reused = _reuse_old_rows(run, cfg, planned, reuse_dir)
        todo = [r for r in planned if (r["prompt_id"], r["image_index"]) not in reused]
        log.info(
            "images: rendering %d images with %s (%d reused)",
            len(todo),
            cfg.models.generator,
            len(reused),
        )
        if todo:
            _render(cfg, todo, tmp)
        seeds = _rendered_seeds(tmp)
        planned_seed = {(r["prompt_id"], r["image_index"]): r["seed"] for r in todo}
        dropped = len(todo) - len(seeds)
        retried = dropped + sum(1 for k, s in seeds.items() if s != planned_seed.get(k, s))
        for file in reuse_dir.iterdir():
            file.rename(tmp / file.name)
        skipped: list[tuple[str, str]] = []
        for skill, sources in real.items():
            report = datasets.ImportReport()
            rows = chain.from_iterable(datasets.read_pairs(s, skill, report) for s in sources)
            n = datasets.write_shards(rows, tmp, f"real-{skill}")
            log.log(
                logging.INFO if n else logging.WARNING,
                "images: [%s] %d real pairs imported from %s",
                skill,
                n,
                sources,
            )
            skipped.extend(report.skipped)
        # The old manifest describes the old data: drop it first, so a kill before the new
        # manifest is written cannot pair it with the new data (and reuse the wrong rows).
        run.path(STAGE, MANIFEST).unlink(missing_ok=True)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(reuse_dir, ignore_errors=True)
    counts = write_contact_sheets(final, run.path(STAGE, "contact_sheets"))
    for skill, n in counts.items():
        log.info("images: [%s] %d images, contact sheet in %s", skill, n, STAGE)
    shards = sorted(final.glob("*.parquet"))
    return run.write_manifest(
        fp,
        STAGE,
        lineage=lineage.inputs,
        outputs=outputs(run.root, shards, skill_digests(final)),
        counts=counts,
        total=sum(counts.values()),
        path=str(final),
        render_key=render_key(cfg),
        rendered=len(seeds),
        reused=len(reused),
        broken_retried=retried,
        broken_dropped=dropped,
        real_skipped=[f"{where}: {reason}" for where, reason in skipped],
    )


def write_contact_sheets(data_dir: Path, out_dir: Path, per_sheet: int = 16) -> dict[str, int]:
    """One PNG grid per skill (first ``per_sheet`` images with their prompts); returns counts."""
    import pyarrow.dataset as pads
    from PIL import Image, ImageDraw

    table = pads.dataset(str(data_dir), format="parquet").to_table(
        columns=["skill", "prompt_id", "image_index", "prompt", "image"]
    )
    by_skill: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(table.to_pylist(), key=lambda r: (r["prompt_id"], r["image_index"])):
        by_skill.setdefault(row["skill"], []).append(row)
    cell, caption, cols = 128, 44, 4
    for skill, rows in by_skill.items():
        shown = rows[:per_sheet]
        n_rows = -(-len(shown) // cols)
        sheet = Image.new("RGB", (cols * cell, n_rows * (cell + caption)), "white")
        draw = ImageDraw.Draw(sheet)
        for i, row in enumerate(shown):
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
        atomic_write_bytes(out_dir / f"{skill}.png", buf.getvalue())
    return {skill: len(rows) for skill, rows in by_skill.items()}
