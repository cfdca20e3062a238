"""Ray Serve app: a FastAPI ingress in front of a diffusion deployment.

The diffusion deployment holds the base model with every expert and merge of a run loaded
once, unfused; each request picks one by name (``adapter``, or OpenAI's ``model``), ``base``
for none, a weighted mix, or a merge of experts that the replica makes on demand (with the
shared ``selma_ray.lora``). Requests arriving together are micro-batched (``@serve.batch``)
and grouped by the sampling settings one diffusers call shares (steps, size, guidance); the
adapters, mixes and ``base`` of one group run in one forward pass, each image with its own.
One deployment can serve several runs of the same base model: the app's ``runs`` allowlist
names them, a request picks one by name (``run``, or the ``serve_multiplexed_model_id``
header), and each diffusion replica loads the runs it is asked for into its one pipeline
(Ray Serve model multiplexing, keyed by the run's name; least recently used unloaded first).
Use it with ``serve run serve/config.yaml`` / ``serve deploy serve/config.yaml``, or let
``jobs/full_pipeline.py`` deploy it at the end of a run.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from selma_ray.config import ServeSection
from selma_ray.core.rundir import RunDir
from selma_ray.diffusion.engine import (
    BaseModelMismatch,
    DiffusionService,
    MergeSpec,
    load_run_config,
    parse_adapter_spec,
)
from selma_ray.lora import Method

log = logging.getLogger(__name__)
OPEN_PATHS = {"/", "/healthz", "/docs", "/openapi.json"}
PLAYGROUND = (Path(__file__).parent / "playground.html").read_text()
api = FastAPI(title="selma_ray images API", version="0.2.0")
DEFAULT_ADAPTER = "merged"  # what a request that names none gets
# The header Ray Serve routes multiplexed requests by; here it names a run of `runs`.
RUN_HEADER = "serve_multiplexed_model_id"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class MergeRequest(BaseModel):
    """A merge of the run's experts that the run did not precompute, made by the replica."""

    model_config = ConfigDict(extra="forbid")

    merge: Method = Field(description="The merge method, as in merge.methods.")
    experts: list[str] = Field(min_length=2, description="Two or more of the run's experts.")
    weights: list[float] | None = Field(
        None, description="One per expert; default: the method's own."
    )
    density: float = Field(0.5, gt=0.0, le=1.0, description="ties / dare_*: entries kept.")
    rank: int | None = Field(None, ge=1, description="svd: the merged rank.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="dare_*: the drop masks' seed.")

    def spec(self) -> MergeSpec:
        return MergeSpec(
            self.merge,
            tuple(self.experts),
            None if self.weights is None else tuple(self.weights),
            self.density,
            self.rank,
            self.seed,
        )


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="What to draw.")
    n: int = Field(1, ge=1, description="Images to return (seeds seed, seed+1, ...).")
    size: str | None = Field(
        None, pattern=r"^\d{1,5}x\d{1,5}$", description="'WIDTHxHEIGHT'; default: the run's."
    )
    response_format: str = Field(
        "b64_json", description="Only 'b64_json': images come back inline, never as URLs."
    )
    adapter: str | dict[str, float] | MergeRequest | None = Field(
        None,
        description="'merged' (the default), a skill, 'merged-<method>', 'base', a weighted "
        "mix, or a merge made on demand ({merge, experts, ...}).",
    )
    model: str | None = Field(
        None,
        description="The adapter, as OpenAI-compatible clients name it: the same names as "
        "adapter (GET /v1/models lists them). With adapter too, both must name the same one.",
    )
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = Field(
        None, description="Accepted from OpenAI clients and ignored: num_inference_steps sets it."
    )
    style: Literal["vivid", "natural"] | None = Field(
        None, description="Accepted from OpenAI clients and ignored."
    )
    user: str | None = Field(
        None, max_length=256, description="An end-user id from OpenAI clients; not stored."
    )
    run: str | None = Field(
        None,
        max_length=64,
        description="Which of the deployment's runs to draw with, by its name in the app's "
        "`runs` (or the serve_multiplexed_model_id header); default: the app's run_dir.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    num_inference_steps: int | None = Field(None, ge=1, description="Default: from the run.")
    guidance_scale: float = Field(7.5, ge=0.0, le=30.0)
    negative_prompt: str | None = None


class OpenAIError(BaseModel):
    """The same message in OpenAI's error shape, which OpenAI SDKs show to their users."""

    message: str
    type: str
    code: int


class ErrorDetail(BaseModel):
    detail: str
    error: OpenAIError


class InvalidRequest(BaseModel):
    """A limit's message (a string) or the request schema's errors (a list)."""

    detail: str | list[dict[str, Any]]
    error: OpenAIError


ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 503: "service_unavailable"}


def error_body(status: int, detail: Any) -> dict[str, Any]:
    """``{"detail": ..., "error": {"message", "type", "code"}}``: FastAPI's shape for our own
    clients and OpenAI's for theirs (a list of schema errors becomes one message)."""
    if isinstance(detail, list):
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in detail
        )
    else:
        message = str(detail)
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"detail": detail, "error": {"message": message, "type": kind, "code": status}}


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        error_body(exc.status_code, exc.detail), exc.status_code, headers=exc.headers
    )


@api.exception_handler(RequestValidationError)
async def _schema_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(jsonable_encoder(error_body(422, exc.errors())), 422)


ERROR_401 = {"model": ErrorDetail, "description": "Missing or wrong API key."}
ERROR_503 = {
    "model": ErrorDetail,
    "description": "No image replica could answer (one was lost or is starting); "
    "retry after the Retry-After header's seconds.",
}


RUN_Q = (
    "Which of the deployment's runs, by its name in the app's `runs` (or the "
    "serve_multiplexed_model_id header); default: the app's run_dir."
)
RUN_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorDetail,
        "description": "run and its header disagree, or a run of another base model.",
    },
    401: ERROR_401,
    404: {"model": ErrorDetail, "description": "Unknown run; lists the valid names."},
    503: ERROR_503,
}


# Helpers the ingress uses must be defined above it: serve.ingress pickles the FastAPI
# app (and what its routes reference) when the class is decorated.
def authorized(api_key: str, path: str, headers: Any) -> bool:
    """True if no key is configured, the path is open, or the request carries the key."""
    if not api_key or path in OPEN_PATHS:
        return True
    given = headers.get("authorization", "").removeprefix("Bearer ").strip()
    given = given or headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), api_key.encode())


def requested_adapter(req: GenerationRequest) -> str | dict[str, float] | MergeRequest:
    """What a request asks for: ``adapter``, or OpenAI's ``model`` (the same names), or the
    merged adapter. Both given and different is a 400: no silent precedence."""
    if req.response_format != "b64_json":
        raise HTTPException(
            400,
            f"response_format={req.response_format!r} is not served: only 'b64_json' "
            "(images come back inline; nothing is stored to link to)",
        )
    if req.model is not None and req.adapter is not None and req.model != req.adapter:
        raise HTTPException(
            400,
            f"model={req.model!r} and adapter={req.adapter!r} disagree: both name the adapter "
            "to use; send one of them, or the same name in both",
        )
    for chosen in (req.adapter, req.model):
        if chosen is not None:
            return chosen
    return DEFAULT_ADAPTER


def requested_run(chosen: str | None, header: str | None) -> str | None:
    """The run a request names: ``run`` (body field or query parameter), or the
    ``serve_multiplexed_model_id`` header; None for the default run. Both given and
    different is a 400: no silent precedence."""
    chosen, header = chosen or None, header or None
    if chosen is not None and header is not None and chosen != header:
        raise HTTPException(
            400,
            f"run={chosen!r} and the {RUN_HEADER} header ({header!r}) disagree: both name the "
            "run to use; send one of them, or the same name in both",
        )
    return chosen or header


def run_allowlist(runs: Any, storage: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """``build_app``'s ``runs`` (``{name: run_dir_or_uri}``) as run references by name: the
    only runs a client may pick, by name. Names are short plain words (letters, digits,
    ``_.-``), never paths; every run shares ``storage``. Nothing is read here: each run's
    base model is checked when a replica loads it."""
    if runs is None:
        return {}
    if not isinstance(runs, dict):
        raise ValueError(
            f"args.runs must be a mapping of run names to run directories or URIs, got {runs!r}"
        )
    refs = {}
    for name, where in runs.items():
        if not isinstance(name, str) or not RUN_NAME.match(name):
            raise ValueError(
                f"args.runs: run name {name!r} is not allowed; use 1-64 letters, digits, '_', "
                "'.' or '-', starting with a letter or digit"
            )
        if not isinstance(where, str | Path) or not str(where).strip():
            raise ValueError(
                f"args.runs.{name} must be a run directory (a path or URI), got {where!r}"
            )
        refs[name] = run_ref(str(where), storage)
    return refs


def model_list(
    adapters: list[dict[str, Any]], created: int, run: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The adapters in OpenAI's model-list shape (``id`` is what ``model`` accepts);
    ``run`` (``{"run": uri, "run_name": name}``) says which run they belong to."""
    return {
        **(run or {}),
        "object": "list",
        "data": [
            {
                "id": a["name"],
                "object": "model",
                "created": created,
                "owned_by": "selma_ray",
                "kind": a["kind"],
                "skill": a["skill"],
            }
            for a in sorted(adapters, key=lambda a: a["name"])
        ],
    }


def _json(payload: dict[str, Any]) -> bytes:
    import json

    return json.dumps(payload).encode()


def run_ref(run_dir: str, storage: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run a deployment serves, as plain data every replica rebuilds on its own node: a
    URI (``s3://...``) or an absolute local path (a relative one resolves against the working
    directory of the process that builds the app), and how to reach its storage."""
    run = RunDir(str(run_dir), storage)
    return run.spec


def effective_limits(run_limits: ServeSection, overrides: dict[str, Any] | None) -> ServeSection:
    """The run's ``serve`` limits with the deployment's ``limits`` (from serve/config.yaml's
    args or user_config) on top, validated like the run's config."""
    if not overrides:
        return run_limits
    try:
        return ServeSection.model_validate({**run_limits.model_dump(), **overrides})
    except ValueError as e:
        raise ValueError(f"invalid serve limits {overrides}: {e}") from None


async def forward(response: DeploymentResponse, limits: ServeSection) -> Any:
    """Await a call to the diffusion deployment. A replica lost mid-request (its node went
    away), or none free to take the request within ``request_timeout_s`` (Serve still
    replacing it), is a 503 with ``Retry-After``: a client sees a clear answer to retry,
    never a hang or a dropped connection."""
    retry = {"Retry-After": str(limits.retry_after_s)}
    try:
        return await asyncio.wait_for(_result(response), limits.request_timeout_s)
    except TimeoutError:
        response.cancel()
        raise HTTPException(
            503,
            f"no image replica answered within {limits.request_timeout_s:g} s "
            "(replicas are starting or being replaced); retry later",
            headers=retry,
        ) from None
    except (RayActorError, RayServeException) as e:
        log.warning("diffusion replica unavailable: %s", e)
        raise HTTPException(
            503,
            f"the image replica was lost ({type(e).__name__}); Serve is replacing it, retry later",
            headers=retry,
        ) from None


async def _result(response: DeploymentResponse) -> Any:
    return await response


def replica_info() -> dict[str, Any]:
    """Which process answers: lets clients see that a hot reload kept the replica."""
    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (unit tests)
        replica = None
    return {"pid": os.getpid(), "replica_id": replica}


def pass_groups(
    jobs: list[dict[str, Any]],
    negative_group: Callable[[str | None], Hashable],
    mix_adapters: bool = True,
) -> list[list[int]]:
    """Which jobs run together, as lists of their indices, one list per forward pass.

    Jobs of different runs (``run``: the replica's token for a multiplexed run, None for the
    default run) never share a pass: their adapters have the same public names. One
    diffusers call takes one number of steps, one size and one guidance scale (and the
    pipeline's one scheduler, which no request picks), so jobs that differ in those run
    apart. Adapter specs and negative prompts are per image, so with ``mix_adapters`` jobs
    of any adapters share a pass, apart only where ``negative_group`` (the service's
    ``negative_prompt_group``) tells their negative prompts apart; without it (adapters
    that cannot mix) each spec and negative prompt gets its own pass."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        key: tuple = (job.get("run"), job["steps"], job["guidance_scale"])
        key += (job["width"], job["height"])
        if mix_adapters:
            key += (negative_group(job["negative_prompt"]),)
        else:
            key += (job["spec"], job["negative_prompt"])
        groups[key].append(i)
    return list(groups.values())


class LoadedRun:
    """A run of the allowlist loaded into a replica's pipeline by the multiplexed loader.
    Serve calls ``__del__`` when it evicts the run (least recently used); that unloads the
    run's adapters, once its requests in flight are done."""

    def __init__(self, service: DiffusionService, token: int, name: str):
        self.service, self.token, self.name = service, token, name

    def __del__(self) -> None:
        try:
            self.service.drop_run(self.token)
        except Exception:  # noqa: BLE001 - also reached from the garbage collector
            log.exception("unloading run %s failed", self.name)


@serve.deployment
class Diffusion:
    def __init__(
        self,
        run: dict[str, Any],
        limits: dict[str, Any] | None = None,
        runs: dict[str, dict[str, Any]] | None = None,
    ):
        self.run = run
        self.runs = dict(runs or {})  # the allowlist: name -> run reference
        self.service = DiffusionService(run)
        self.reloads = 0
        self.reload_error: str | None = None
        # What batching really did, for clients and tests: how many requests each
        # @serve.batch call received, and how many images each forward pass rendered.
        self.requests_per_batch: Counter[int] = Counter()
        self.images_per_pass: Counter[int] = Counter()
        self.specs_per_pass: Counter[int] = Counter()  # distinct adapter specs in a pass
        self.mix_blocker = self._mix_blocker()
        self._overrides = limits
        self._apply_limits(limits)
        per_replica = effective_limits(self.service.config.serve, limits).max_runs_per_replica
        self._load_run = serve.multiplexed(max_num_models_per_replica=per_replica)(self._loader())

    def _loader(self) -> Callable[[str], Any]:
        """The multiplexed loader: a run of the allowlist by name, loaded beside the default
        run in this replica's pipeline. KeyError for a name not in the allowlist,
        BaseModelMismatch for a run of another base model."""

        async def load_run(name: str) -> LoadedRun:
            if name not in self.runs:
                raise KeyError(f"unknown run {name!r}; valid: {sorted(self.runs)}")
            token = await asyncio.to_thread(self.service.add_run, self.runs[name])
            log.info("run %s loaded for multiplexed requests", name)
            return LoadedRun(self.service, token, name)

        return load_run

    async def _run_token(self) -> int | None:
        """The set of the run this request names (``serve.get_multiplexed_model_id()``),
        loaded if it is not; None for the default run."""
        name = serve.get_multiplexed_model_id()
        if not name:
            return None
        return (await self._load_run(name)).token

    def _mix_blocker(self) -> str | None:
        """Why this replica's adapters cannot share a forward pass (None when they can)."""
        blocker = self.service.mixed_batches()
        if blocker:
            log.warning("one forward pass per adapter spec: %s", blocker)
        return blocker

    def _apply_limits(self, overrides: dict[str, Any] | None) -> None:
        limits = effective_limits(self.service.config.serve, overrides)
        self._batched.set_max_batch_size(limits.max_batch_size)
        self._batched.set_batch_wait_timeout_s(limits.batch_wait_timeout_s)
        self.max_batch_size = limits.max_batch_size
        self.service.merge_cache_size = limits.merge_cache_size

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot reload: ``user_config: {run_dir: ..., storage: {...}, limits: {...}}`` swaps in
        another run's adapters (same base model) in this replica, without a restart. The new
        set loads in full before the old one goes; a reload that fails keeps the old set
        serving and reports why in ``/v1/adapters`` (``replica.reload_error``)."""
        if user_config.get("run_dir"):
            try:
                run = run_ref(user_config["run_dir"], user_config.get("storage"))
                if run != self.run:
                    self.service.reload(run)
                    self.run = run
                    self.mix_blocker = self._mix_blocker()
                    self.reloads += 1
                    log.info("hot reload %d: now serving %s", self.reloads, run["uri"])
                self.reload_error = None
            except Exception as e:
                self.reload_error = f"{type(e).__name__}: {e}"
                log.error("hot reload failed; still serving %s: %s", self.run["uri"], e)
        self._overrides = user_config.get("limits", self._overrides)
        self._apply_limits(self._overrides)

    async def adapters(self) -> list[dict[str, Any]]:
        """The adapters of the requested run (the multiplexed model id), or the default's."""
        token = await self._run_token()
        return self.service.describe(token)

    def status(self) -> dict[str, Any]:
        return {
            **replica_info(),
            "run": self.run["uri"],
            "loaded_runs": sorted(self.service.loaded_runs().values()),
            "reloads": self.reloads,
            "reload_error": self.reload_error,
            "max_batch_size": self.max_batch_size,
            "merges": {
                **self.service.merge_stats,
                "cache_size": self.service.merge_cache_size,
                "cached": self.service.cached_merges(),
            },
            "batching": {
                "requests_per_batch": {
                    str(k): v for k, v in sorted(self.requests_per_batch.items())
                },
                "images_per_forward_pass": {
                    str(k): v for k, v in sorted(self.images_per_pass.items())
                },
                "adapter_specs_per_forward_pass": {
                    str(k): v for k, v in sorted(self.specs_per_pass.items())
                },
                "mixed_adapters": self.mix_blocker is None,
                "mixed_adapters_blocker": self.mix_blocker,
            },
        }

    async def native_size(self) -> int:
        return self.service.run_native_size(await self._run_token())

    async def generate(self, job: dict[str, Any]) -> list[bytes]:
        token = await self._run_token()
        with self.service.holding_run(token):  # until rendered: an eviction waits for it
            if job.get("merge") is None:
                return await self._batched({**job, "run": token})
            merge = MergeSpec(**job["merge"])
            with self.service.holding(merge, token):  # until rendered: no merge evicts it
                spec = await asyncio.to_thread(self.service.merge, merge, token)  # off the loop
                return await self._batched({**job, "spec": spec, "run": token})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, jobs: list[dict[str, Any]]) -> list[list[bytes]]:
        """Run concurrent requests as few forward passes as their settings allow: requests
        for different adapters, mixes and ``base`` share one (``pass_groups``)."""
        self.requests_per_batch[len(jobs)] += 1
        mix = self.mix_blocker is None
        results: list[list[bytes]] = [[] for _ in jobs]
        for members in pass_groups(jobs, self.service.negative_prompt_group, mix):
            specs, prompts, seeds, negatives = [], [], [], []
            for i in members:
                job = jobs[i]
                specs += [job["spec"]] * job["n"]
                prompts += [job["prompt"]] * job["n"]
                seeds += [job["seed"] + k for k in range(job["n"])]
                negatives += [job["negative_prompt"]] * job["n"]
            self.images_per_pass[len(prompts)] += 1
            self.specs_per_pass[len(set(specs))] += 1
            first = jobs[members[0]]
            # Off the event loop, so health checks and new requests are still accepted.
            images = await asyncio.to_thread(
                self.service.generate_mixed,
                specs,
                prompts,
                seeds,
                first["steps"],
                first["guidance_scale"],
                first["width"],
                first["height"],
                negatives,
                first.get("run"),
            )
            for i in members:
                results[i], images = images[: jobs[i]["n"]], images[jobs[i]["n"] :]
        return results


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        diffusion: DeploymentHandle,
        run: dict[str, Any],
        limits: dict[str, Any] | None = None,
        runs: dict[str, dict[str, Any]] | None = None,
    ):
        self.diffusion = diffusion
        self.runs = dict(runs or {})  # the allowlist: name -> run reference
        self._handles: dict[str, DeploymentHandle] = {}
        self._overrides = limits
        self.limits = effective_limits(load_run_config(run).serve, limits)
        # Per run name ("" for the default run): adapter names, native size.
        self._served: dict[str, tuple[set[str], int]] = {}
        self.started = int(time.time())  # the models' ``created`` in /v1/models
        self.run = run
        self.api_key = os.environ.get(self.limits.api_key_env, "")
        if self.api_key:
            log.info("API key required (from $%s)", self.limits.api_key_env)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot reload: follow the diffusion deployment to another run's limits (keeping the
        current ones when that run cannot be read)."""
        overrides = user_config.get("limits", self._overrides)
        try:
            run = self.run
            if user_config.get("run_dir"):
                run = run_ref(user_config["run_dir"], user_config.get("storage"))
            self.limits = effective_limits(load_run_config(run).serve, overrides)
            self.run = run
        except Exception as e:
            log.error("hot reload: keeping %s: %s", self.run["uri"], e)
        self._served = {}

    def _authorize(self, request: Request) -> None:
        if not authorized(self.api_key, request.url.path, request.headers):
            raise HTTPException(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> str:
        """A plain HTML/JS page: prompt, adapter or mix, seed, steps; compare mode."""
        return PLAYGROUND

    def _run(self, name: str | None) -> str:
        """The multiplexed model id of a requested run: "" for the default run (none named),
        the name for a run of the allowlist; a 404 listing the valid names otherwise."""
        if name is None:
            return ""
        if name not in self.runs:
            raise HTTPException(
                404,
                f"unknown run {name!r}; valid: {sorted(self.runs)} (or name none for the "
                "default run)",
            )
        return name

    def _describe_run(self, model_id: str) -> dict[str, Any]:
        """Which run an answer describes: its URI, and its name in the allowlist."""
        ref = self.runs[model_id] if model_id else self.run
        return {"run": ref["uri"], "run_name": model_id or None}

    def _handle(self, model_id: str) -> DeploymentHandle:
        if not model_id:
            return self.diffusion
        if model_id not in self._handles:
            self._handles[model_id] = self.diffusion.options(multiplexed_model_id=model_id)
        return self._handles[model_id]

    async def _ask(self, response: DeploymentResponse) -> Any:
        """``forward``, with a run the replica cannot load as a 4xx: another base model is a
        400 (the message names both), a name the replica does not know a 404."""
        try:
            return await forward(response, self.limits)
        except BaseModelMismatch as e:
            raise HTTPException(400, str(getattr(e, "cause", e))) from None

    async def _served_adapters(self, model_id: str = "") -> tuple[set[str], int]:
        """Adapter names and native size of a run, asked of the diffusion deployment once
        (not per request); a hot reload clears them."""
        if model_id not in self._served:
            handle = self._handle(model_id)
            adapters = await self._ask(handle.adapters.remote())
            self._served[model_id] = (
                {a["name"] for a in adapters},
                await self._ask(handle.native_size.remote()),
            )
        return self._served[model_id]

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/runs")
    async def list_runs(self, request: Request) -> dict[str, Any]:
        """The runs a request may pick (``run`` or the ``serve_multiplexed_model_id``
        header): the default run first (``run_name`` null), then the allowlist by name."""
        self._authorize(request)
        names = ["", *sorted(self.runs)]
        return {"object": "list", "data": [self._describe_run(n) for n in names]}

    @api.get("/v1/adapters", responses=RUN_RESPONSES)
    async def adapters(
        self, request: Request, run: str | None = Query(None, max_length=64, description=RUN_Q)
    ) -> dict[str, Any]:
        """Every adapter a request for this run may name; ``run`` (URI) and ``run_name`` say
        which run (``run_name`` null: the default run); ``replica`` says which diffusion
        replica answered (its pid and id stay the same across a hot reload)."""
        self._authorize(request)
        model_id = self._run(requested_run(run, request.headers.get(RUN_HEADER)))
        handle = self._handle(model_id)
        return {
            **self._describe_run(model_id),
            "adapters": await self._ask(handle.adapters.remote()),
            "replica": await forward(handle.status.remote(), self.limits),
        }

    @api.get("/v1/models", responses=RUN_RESPONSES)
    async def models(
        self, request: Request, run: str | None = Query(None, max_length=64, description=RUN_Q)
    ) -> dict[str, Any]:
        """The run's adapters as OpenAI's model list: each ``id`` is a valid ``model`` (and
        ``adapter``) of a generation request for that run; ``run`` and ``run_name`` say which
        run; ``created`` is when this deployment started."""
        self._authorize(request)
        model_id = self._run(requested_run(run, request.headers.get(RUN_HEADER)))
        adapters = await self._ask(self._handle(model_id).adapters.remote())
        return model_list(adapters, self.started, self._describe_run(model_id))

    def _size(self, size: str | None, native: int) -> tuple[int, int]:
        lim = self.limits
        width, height = (int(v) for v in size.split("x")) if size else (native, native)
        for side in (width, height):
            if side % 8 or not lim.min_size <= side <= lim.max_size:
                raise HTTPException(
                    422,
                    f"size {width}x{height}: each side must be a multiple of 8 in "
                    f"{lim.min_size}..{lim.max_size}",
                )
        return width, height

    @api.post(
        "/v1/images/generations",
        responses={
            200: {"content": {"application/json": {}, "image/png": {}}},
            400: {
                "model": ErrorDetail,
                "description": "The body cannot be read (not UTF-8), model and adapter "
                "disagree, run and its header disagree, a run of another base model, or a "
                "response_format other than b64_json.",
            },
            401: ERROR_401,
            404: {
                "model": ErrorDetail,
                "description": "Unknown adapter or run; lists the valid ones.",
            },
            422: {
                "model": InvalidRequest,
                "description": "Invalid request; the message says what is allowed.",
            },
            503: ERROR_503,
        },
    )
    async def generate(self, req: GenerationRequest, request: Request) -> Response:
        self._authorize(request)
        adapter = requested_adapter(req)
        model_id = self._run(requested_run(req.run, request.headers.get(RUN_HEADER)))
        lim = self.limits
        if len(req.prompt) > lim.max_prompt_chars:
            raise HTTPException(
                422, f"prompt is {len(req.prompt)} characters; the limit is {lim.max_prompt_chars}"
            )
        if req.n > lim.max_n:
            raise HTTPException(422, f"n must be in 1..{lim.max_n}")
        steps = req.num_inference_steps or lim.default_steps
        if steps > lim.max_steps:
            raise HTTPException(422, f"num_inference_steps must be in 1..{lim.max_steps}")
        if req.seed + req.n - 1 > 2**31 - 1:
            raise HTTPException(422, f"seed + n - 1 must be at most {2**31 - 1}")
        names, native = await self._served_adapters(model_id)
        merge = None
        try:
            if isinstance(adapter, MergeRequest):
                merge = adapter.spec()
                spec: tuple = ((merge.name, 1.0),)
            else:
                spec = parse_adapter_spec(adapter, names)
        except KeyError as e:
            raise HTTPException(404, str(e.args[0])) from None
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        width, height = self._size(req.size, native)
        want_png = "image/png" in request.headers.get("accept", "")
        if want_png and req.n != 1:
            raise HTTPException(422, "Accept: image/png returns one image; use n=1 or b64_json")
        job = {
            "spec": spec,
            "prompt": req.prompt,
            "n": req.n,
            "seed": req.seed,
            "steps": steps,
            "guidance_scale": req.guidance_scale,
            "width": width,
            "height": height,
            "negative_prompt": req.negative_prompt,
            "merge": None if merge is None else asdict(merge),
        }
        try:
            images = await self._ask(self._handle(model_id).generate.remote(job))
        except KeyError as e:  # unknown experts, or a hot reload removed the adapter
            self._served.pop(model_id, None)
            cause = getattr(e, "cause", e)  # Ray wraps the replica's exception
            raise HTTPException(404, str(cause.args[0] if cause.args else cause)) from None
        except ValueError as e:  # a merge the replica cannot make (anything else: a 500)
            if merge is None:
                raise
            raise HTTPException(422, str(getattr(e, "cause", e))) from None
        if want_png:
            return Response(
                content=images[0], media_type="image/png", headers={"X-Seed": str(req.seed)}
            )
        data = [
            {"b64_json": base64.b64encode(png).decode(), "seed": req.seed + k}
            for k, png in enumerate(images)
        ]
        return Response(
            content=_json(
                {
                    "created": int(time.time()),
                    "run_name": model_id or None,
                    "adapter": dict(spec) if merge is None else {merge.name: asdict(merge)},
                    "data": data,
                }
            ),
            media_type="application/json",
        )


def build_app(args: dict[str, Any]):
    """Serve application builder. ``args``: ``run_dir`` (a finished run directory: a local
    path or a URI such as ``s3://bucket/runs/x``; the default run), optionally ``runs``
    (``{name: run_dir_or_uri}``: more runs of the same base model that requests may pick by
    name, multiplexed into each replica's pipeline, at most ``max_runs_per_replica`` at a
    time), ``storage`` (``run.storage``: endpoint, region, anonymous; for every run) and
    ``limits`` (overrides of the default run's ``serve`` limits, e.g. ``max_n``; they govern
    requests for every run). Each replica copies the adapters it serves from the run's storage
    to a node-local cache keyed by their content digest.

    Replica resources and autoscaling default to the run's ``resources.serve``, scaling on
    one full batch (``max_batch_size``) per replica; the ``deployments:`` section of a Serve
    config file overrides them."""
    unknown = set(args) - {"run_dir", "runs", "storage", "limits"}
    if unknown:
        raise ValueError(
            f"unknown args {sorted(unknown)} for selma_ray.serving.app:build_app; "
            "it takes run_dir, runs, storage and limits"
        )
    if "run_dir" not in args:
        raise ValueError("the selma_ray Serve app needs args.run_dir (a finished run directory)")
    storage = args.get("storage") or None
    if storage is not None and not isinstance(storage, dict):
        raise ValueError(
            f"args.storage must be a mapping (endpoint, region, anonymous): {storage!r}"
        )
    run = run_ref(str(args["run_dir"]), storage)
    runs = run_allowlist(args.get("runs"), storage)
    cfg = load_run_config(run)
    limits = args.get("limits") or None
    if limits is not None and not isinstance(limits, dict):
        raise ValueError(f"args.limits must be a mapping of serve limits, got {limits!r}")
    lim = effective_limits(cfg.serve, limits)  # fail at deploy time, not in the replicas
    res = cfg.resources.serve
    if res.max_ongoing_requests < lim.max_batch_size:
        raise ValueError(
            f"resources.serve.max_ongoing_requests={res.max_ongoing_requests} is below "
            f"serve.max_batch_size={lim.max_batch_size}: a replica could never fill a batch; "
            "raise max_ongoing_requests or lower max_batch_size"
        )
    diffusion = Diffusion.options(
        ray_actor_options={
            "num_cpus": res.num_cpus,
            "num_gpus": res.num_gpus,
            "resources": res.custom,
        },
        max_ongoing_requests=res.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": res.min_replicas,
            "max_replicas": res.max_replicas,
            # A replica is busy, not overloaded, while it holds one full batch.
            "target_ongoing_requests": lim.max_batch_size,
            "upscale_delay_s": res.upscale_delay_s,
            "downscale_delay_s": res.downscale_delay_s,
        },
    ).bind(run, limits, runs)
    # The ingress only validates and forwards: many requests in flight, so the diffusion
    # replicas' batches can fill.
    return Ingress.options(
        ray_actor_options={"num_cpus": 0, "resources": res.ingress_custom},
        max_ongoing_requests=64,
    ).bind(diffusion, run, limits, runs)
