"""Stage 2, images: a diffusers text-to-image pipeline renders every prompt on Ray Data.

Each image's seed comes from (run seed, skill, prompt id, image index), so the same config
gives the same images however Ray Data partitions the work. Output is a folder of Parquet
shards (prompt, skill, prompt_id, seed, generator, width, height, PNG bytes), written to a
temporary folder and moved into place when complete.
"""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path
from typing import Any

from selma_ray import prompts as prompts_stage
from selma_ray.config import SelmaConfig
from selma_ray.rundir import RunDir, atomic_write_bytes, replace_dir
from selma_ray.seeds import stable_seed

log = logging.getLogger(__name__)
STAGE = "images"


def torch_device_and_dtype(num_gpus: float, dtype: str):
    """Pick the device from the resources and the dtype from config (auto: fp16 on GPU)."""
    import torch

    on_gpu = num_gpus > 0 and torch.cuda.is_available()
    if dtype == "auto":
        return ("cuda" if on_gpu else "cpu"), (torch.float16 if on_gpu else torch.float32)
    return ("cuda" if on_gpu else "cpu"), getattr(torch, dtype)


def png_bytes(array) -> bytes:
    """PNG-encode an HxWx3 float image in [0, 1]."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


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
    ):
        from diffusers import AutoPipelineForText2Image

        from selma_ray.logs import setup_logging
        from selma_ray.models import resolve

        setup_logging()
        self.device, torch_dtype = torch_device_and_dtype(num_gpus, dtype)
        pipe = AutoPipelineForText2Image.from_pretrained(resolve(model), dtype=torch_dtype)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.model = model
        self.steps, self.guidance_scale = steps, guidance_scale
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.size = resolution or native

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        missing = [c for c in self.REQUIRED if c not in batch]
        if missing:
            raise ValueError(f"DiffusionRenderer needs columns {missing}; got {sorted(batch)}")
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in batch["seed"]]
        out = self.pipe(
            prompt=[str(p) for p in batch["prompt"]],
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            height=self.size,
            width=self.size,
            generator=generators,
            output_type="np",
        )
        n = len(generators)
        batch["image"] = np.array([png_bytes(img) for img in out.images], dtype=object)
        batch["width"] = np.full(n, self.size)
        batch["height"] = np.full(n, self.size)
        batch["generator"] = np.array([self.model] * n, dtype=object)
        return batch


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


def fingerprint(cfg: SelmaConfig) -> str:
    return cfg.fingerprint(
        "images",
        extra={"generator": cfg.models.generator, "prompts": prompts_stage.fingerprint(cfg)},
    )


def run_images(cfg: SelmaConfig, run: RunDir) -> dict[str, Any]:
    """Render all accepted prompts into ``images/*.parquet``; returns the stage summary."""
    import ray

    fp = fingerprint(cfg)
    if run.is_done(fp, STAGE):
        log.info("images: finished earlier with the same config, skipping")
        return {**(run.read_manifest(STAGE) or {}), "skipped": True}
    rows = image_rows(cfg, prompts_stage.load_prompts(run, cfg.prompts.skills))
    if not rows:
        raise RuntimeError("images: the prompts stage produced no prompts to render")
    ic, res = cfg.images, cfg.resources.images
    log.info("images: rendering %d images with %s", len(rows), cfg.models.generator)
    ds = ray.data.from_items(rows).map_batches(
        DiffusionRenderer,
        fn_constructor_kwargs={
            "model": cfg.models.generator,
            "num_gpus": res.num_gpus,
            "dtype": ic.dtype,
            "steps": ic.steps,
            "guidance_scale": ic.guidance_scale,
            "resolution": ic.resolution,
        },
        compute=ray.data.ActorPoolStrategy(min_size=res.min_size, max_size=res.max_size),
        batch_size=ic.batch_size,
        num_gpus=res.num_gpus,
        num_cpus=res.num_cpus,
    )
    final = run.path(STAGE, "data")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".data.", dir=final.parent))
    ds.write_parquet(str(tmp))
    replace_dir(tmp, final)
    counts = write_contact_sheets(final, run.path(STAGE, "contact_sheets"))
    for skill, n in counts.items():
        log.info("images: [%s] %d images, contact sheet in %s", skill, n, STAGE)
    return run.write_manifest(fp, STAGE, counts=counts, total=sum(counts.values()), path=str(final))


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
