"""Ray Serve app: a FastAPI ingress in front of a diffusion deployment.

The diffusion deployment holds the base model with every expert of a run and ``merged``
loaded once; each request picks one by name (``base`` for no adapter). Use it with
``serve run serve/config.yaml`` / ``serve deploy serve/config.yaml``, or let
``jobs/full_pipeline.py`` deploy it at the end of a run.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from selma_ray.serving import DiffusionService, load_run_config

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
api = FastAPI(title="selma_ray images API", version="0.1.0")


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="What to draw.")
    adapter: str = Field("merged", description="'merged', a skill expert's name, or 'base'.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    num_inference_steps: int | None = Field(None, ge=1, description="Default: from the run.")
    guidance_scale: float = Field(7.5, ge=0.0, le=30.0)
    size: int | None = Field(None, description="Square size in pixels; default: the run's.")
    negative_prompt: str | None = None


@serve.deployment
class Diffusion:
    def __init__(self, run_dir: str):
        self.service = DiffusionService(run_dir)

    def adapters(self) -> list[dict[str, Any]]:
        return self.service.describe()

    def native_size(self) -> int:
        return self.service.native_size

    async def generate(self, request: dict[str, Any]) -> bytes:
        # The pipeline is not re-entrant; DiffusionService serialises calls with a lock,
        # and the work runs off the event loop so health checks stay responsive.
        return await asyncio.to_thread(self.service.generate, **request)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, diffusion: DeploymentHandle, run_dir: str):
        self.diffusion = diffusion
        self.limits = load_run_config(run_dir).serve
        self.run_dir = run_dir

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/adapters")
    async def adapters(self) -> dict[str, Any]:
        return {"run": self.run_dir, "adapters": await self.diffusion.adapters.remote()}

    @api.post(
        "/v1/images/generations",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def generate(self, req: GenerationRequest) -> Response:
        limits = self.limits
        if len(req.prompt) > limits.max_prompt_chars:
            raise HTTPException(
                422,
                f"prompt is {len(req.prompt)} characters; the limit is {limits.max_prompt_chars}",
            )
        steps = req.num_inference_steps or limits.default_steps
        if steps > limits.max_steps:
            raise HTTPException(422, f"num_inference_steps must be 1..{limits.max_steps}")
        names = [a["name"] for a in await self.diffusion.adapters.remote()]
        if req.adapter not in names:
            raise HTTPException(404, f"unknown adapter {req.adapter!r}; valid: {sorted(names)}")
        size = req.size or await self.diffusion.native_size.remote()
        if size % 8 or not 8 <= size <= limits.max_size:
            raise HTTPException(422, f"size must be a multiple of 8 in 8..{limits.max_size}")
        png = await self.diffusion.generate.remote(
            {
                "prompt": req.prompt,
                "adapter": req.adapter,
                "seed": req.seed,
                "steps": steps,
                "guidance_scale": req.guidance_scale,
                "size": size,
                "negative_prompt": req.negative_prompt,
            }
        )
        return Response(
            content=png,
            media_type="image/png",
            headers={"X-Adapter": req.adapter, "X-Seed": str(req.seed)},
        )


def resolve_run_dir(run_dir: str) -> str:
    """Relative run directories are relative to the project root, wherever Serve runs."""
    path = Path(run_dir).expanduser()
    return str(path if path.is_absolute() else (PROJECT_ROOT / path).resolve())


def build_app(args: dict[str, Any]):
    """Serve application builder: ``args`` holds ``run_dir``."""
    if "run_dir" not in args:
        raise ValueError("the selma_ray Serve app needs args.run_dir (a finished run directory)")
    run_dir = resolve_run_dir(str(args["run_dir"]))
    res = load_run_config(run_dir).resources.serve
    diffusion = Diffusion.options(
        ray_actor_options={"num_cpus": res.num_cpus, "num_gpus": res.num_gpus},
        max_ongoing_requests=res.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": res.min_replicas,
            "max_replicas": res.max_replicas,
            "target_ongoing_requests": 2,
        },
    ).bind(run_dir)
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(diffusion, run_dir)
