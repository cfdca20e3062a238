"""Benchmark EVAL: eval stage design choices, side by side on the tiny models (CPU, one run):

- rendering every variant from one resident ``DiffusionService`` (all adapters loaded once,
  ``set_adapters`` per variant, what the eval renderer actor does) vs a fresh pipeline plus
  ``load_lora_weights`` per variant;
- DSG answering with every (image, question, choice) of a batch in one VQA forward pass
  (``BlipVQA.choice_logprobs``) vs one call per question.

Both arms run in this process on one torch thread, as an eval actor with ``num_cpus: 1``
does. Both arms of each comparison do the same work (the same variants, prompts, seeds and steps;
the same image-question pairs), in ABBA order after an untimed warm-up of both arms. The
resident arm includes building its ``DiffusionService`` (pipeline and every adapter loaded
once); the per-variant arm builds a pipeline and loads one adapter per variant.

Goals (chosen here, none was set): resident rendering <= 1.0x the time of a pipeline per
variant (keeping every adapter loaded must never cost more than reloading); batched DSG
answering <= 1.0x the time of one question per call.

    python bench/eval_bench.py [--prompts 8] [--questions 6] [--steps 10]

Its last line of output (the headline ratio, from ``_common.ratio_line``)::

    RATIO EVAL render from one resident service vs a pipeline per variant (time): <x>x (goal <= 1)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import Comparison, abba, finish, header, progress, ratio_line, show


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_render(prompts: list[str], steps: int) -> tuple[Comparison, int]:
    import torch
    from diffusers import AutoPipelineForText2Image

    from selma_ray.core.lora_io import WEIGHT_NAME
    from selma_ray.diffusion.engine import DiffusionService, find_adapters
    from selma_ray.models import TINY_SD, resolve
    from selma_ray.testing import make_run

    root = make_run(
        Path(tempfile.mkdtemp()) / "run", ["counting", "everyday_scenes", "user_prompts"]
    )
    variants = list(find_adapters(root).values())
    seeds = list(range(len(prompts)))

    def resident() -> None:
        svc = DiffusionService(root)
        for v in variants:
            svc.generate_many(((v.name, 1.0),), prompts, seeds, steps, 7.5, 32, 32)

    def per_variant() -> None:
        for v in variants:
            pipe = AutoPipelineForText2Image.from_pretrained(resolve(TINY_SD))
            pipe.set_progress_bar_config(disable=True)
            if v.path:
                pipe.load_lora_weights(v.path, weight_name=WEIGHT_NAME, adapter_name=v.name)
            pipe(
                prompt=prompts,
                num_inference_steps=steps,
                height=32,
                width=32,
                generator=[torch.Generator().manual_seed(s) for s in seeds],
                output_type="np",
            )

    result = abba(
        {"resident": lambda: timed(resident), "per-variant": lambda: timed(per_variant)},
        log=progress,
    )
    return result, len(variants)


def bench_vqa(n_images: int, n_questions: int) -> Comparison:
    import numpy as np
    from PIL import Image

    from selma_ray.eval.scorers import BlipVQA
    from selma_ray.models import TINY_VQA

    vqa = BlipVQA(TINY_VQA)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n_images)
    ]
    pairs = [(img, f"is there object number {q}?") for img in images for q in range(n_questions)]
    choices = [("yes", "no")] * len(pairs)

    def batched() -> None:
        vqa.choice_logprobs([p[0] for p in pairs], [p[1] for p in pairs], choices)

    def one_by_one() -> None:
        for img, q in pairs:
            vqa.choice_logprobs([img], [q], [("yes", "no")])

    return abba(
        {"batched": lambda: timed(batched), "one by one": lambda: timed(one_by_one)},
        log=progress,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--questions", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    import torch

    # One torch thread, as the eval stage's actors get (resources.eval.num_cpus: 1 in the tiny
    # preset); two threads on a shared 2-core machine make timings erratic.
    torch.set_num_threads(1)
    header(
        "EVAL",
        "eval stage: resident DiffusionService vs pipeline per variant; batched vs single VQA",
        {
            "prompts": args.prompts,
            "questions": args.questions,
            "steps": args.steps,
            "resolution": 32,
            "dtype": "float32",
        },
        torch.get_num_threads(),
        ("torch", "diffusers", "peft", "transformers"),
    )
    prompts = [f"a photo of {i} red apples on a table" for i in range(args.prompts)]
    render, n = bench_render(prompts, args.steps)
    vqa = bench_vqa(args.prompts, args.questions)
    print(
        f"render, both arms: tiny-sd 32px, {args.steps} steps, {n} variants x {args.prompts} "
        f"prompts = {n * args.prompts} images (seconds per arm run)"
    )
    render_ratio = show(
        render,
        ".2f",
        lambda m: m["resident"] / m["per-variant"],
        "resident vs per-variant pipeline, the time",
    )
    print(
        f"DSG answering, both arms: tiny-vqa, {args.prompts} images x {args.questions} yes/no "
        f"questions = {args.prompts * args.questions} answers (seconds per arm run)"
    )
    vqa_ratio = show(
        vqa, ".3f", lambda m: m["batched"] / m["one by one"], "batched vs one by one, the time"
    )
    finish(
        [
            ratio_line("EVAL", "DSG answers batched vs one per call (time)", vqa_ratio[2], "<=", 1),
            ratio_line(
                "EVAL",
                "render from one resident service vs a pipeline per variant (time)",
                render_ratio[2],
                "<=",
                1,
            ),
        ]
    )


if __name__ == "__main__":
    main()
