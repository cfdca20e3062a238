"""Eval stage design choices, measured side by side on the tiny models (CPU, one run):

- rendering every variant from one resident ``DiffusionService`` (all adapters loaded once,
  ``set_adapters`` per variant, what the eval renderer actor does) vs a fresh pipeline plus
  ``load_lora_weights`` per variant;
- DSG answering with every (image, question, choice) of a batch in one VQA forward pass
  (``BlipVQA.choice_logprobs``) vs one call per question.

    python bench/eval_bench.py [--prompts 8] [--questions 6] [--steps 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_render(prompts: list[str], steps: int) -> tuple[float, float, int]:
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

    resident()  # warm caches (model files, imports) before timing either side
    return timed(resident), timed(per_variant), len(variants)


def bench_vqa(n_images: int, n_questions: int) -> tuple[float, float]:
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

    batched()
    return timed(batched), timed(one_by_one)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--questions", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    prompts = [f"a photo of {i} red apples on a table" for i in range(args.prompts)]
    resident, reload, n = bench_render(prompts, args.steps)
    batched, single = bench_vqa(args.prompts, args.questions)
    print(f"\ntiny-sd 32px, {args.steps} steps, {n} variants x {args.prompts} prompts, CPU")
    print(
        f"  render, one resident service: {resident:6.2f} s; pipeline per variant: {reload:6.2f} s"
    )
    print(f"  resident vs per-variant pipeline: {resident / reload:.2f}x the time")
    print(f"tiny-vqa, {args.prompts} images x {args.questions} yes/no questions")
    print(f"  DSG answers batched: {batched:6.3f} s; one question per call: {single:6.3f} s")
    print(f"  batched vs one by one: {batched / single:.2f}x the time")


if __name__ == "__main__":
    main()
