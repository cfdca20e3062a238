"""The stage graph: which stage feeds which, what each depends on, and running it in order.

Each stage declares its upstream stages, the slice of the config it depends on, the files
that slice names (their content counts, not their path), and its units (one expert per
skill). The pipeline computes every fingerprint from those and from the output digests the
upstream manifests recorded (``selma_ray.core.lineage``), so a stage never reaches into
another: changing a config key redoes the stages that read it, and changing or deleting an
output redoes exactly what was made from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from selma_ray.config import SelmaConfig
from selma_ray.core import layout
from selma_ray.core.lineage import Lineage, content_digest, digest, output_digest
from selma_ray.core.preflight import check_shared_run_dir
from selma_ray.core.rundir import RunDir
from selma_ray.core.skills import get_skills
from selma_ray.core.storage import is_local

log = logging.getLogger(__name__)

# How a stage runs, not what it makes: changing these never re-runs it.
NOT_LINEAGE = {
    "experts": {
        "max_failures",
        "max_nonfinite_steps",
        "feed_buffer_rows",
        "feed_prefetch_batches",
    }
}


def _section(cfg: SelmaConfig, name: str, drop: set[str] = frozenset()) -> dict[str, Any]:
    data = getattr(cfg, name).model_dump(mode="json")
    return {k: v for k, v in data.items() if k not in drop | NOT_LINEAGE.get(name, set())}


def _skill_defs(cfg: SelmaConfig) -> dict[str, dict[str, Any]]:
    skills = get_skills(cfg.prompts.skills, cfg.prompts.all_custom_skills())
    return {s.name: asdict(s) for s in skills}


def _prompts_config(cfg: SelmaConfig, skill: str) -> dict[str, Any]:
    # A skill's definition by content (a skill file's path does not count, its text does).
    common = _section(cfg, "prompts", {"skills", "custom_skills", "skill_files"})
    return {**common, "llm": cfg.models.llm, "seed": cfg.run.seed, "skill": _skill_defs(cfg)[skill]}


def _images_config(cfg: SelmaConfig) -> dict[str, Any]:
    real = {k: [content_digest(s) for s in v] for k, v in sorted(cfg.images.real_data.items())}
    use = {"real_data_use": "prompts"} if cfg.images.real_data_use == "prompts" else {}
    return {
        **_section(cfg, "images", {"real_data", "real_data_use"}),
        **use,  # only when set: a run from before the setting keeps its fingerprint
        "real_data": real,
        "generator": cfg.models.generator,
        "seed": cfg.run.seed,
    }


def _experts_config(cfg: SelmaConfig, unit: str) -> dict[str, Any]:
    vae = {"vae": cfg.models.vae} if cfg.models.vae else {}  # the VAE the latents come from
    # A joint LoRA by its skills; an expert's slice is as it was before joint LoRAs existed
    # (and without the joint LoRAs, which another expert's training does not depend on).
    joint = {"skills": cfg.experts.joint[unit]} if unit in cfg.experts.joint else {}
    section = _section(cfg, "experts", {"joint"})
    return {**section, "base": cfg.models.base, "seed": cfg.run.seed, **vae, **joint}


def _merge_config(cfg: SelmaConfig) -> dict[str, Any]:
    subsets = {"subsets": cfg.merge.subsets} if cfg.merge.subsets else {}  # as for real_data_use
    section = _section(cfg, "merge", {"subsets"})
    return {**section, **subsets, "skills": cfg.prompts.skills, "base": cfg.models.base}


def _eval_config(cfg: SelmaConfig) -> dict[str, Any]:
    ec = cfg.eval
    files = {
        f: content_digest(p)
        for f, p in (
            ("prompts_file", ec.prompts_file),
            ("questions_file", ec.questions_file),
            ("dsg_file", ec.dsg_file),
            ("tifa_file", ec.tifa_file),
        )
        if p and ":" not in p and p != "generated"  # builtin:NAME ships with the package
    }
    render = cfg.images.model_dump(include={"steps", "guidance_scale", "resolution"})
    return {
        **_section(cfg, "eval"),
        "files": files,
        "models": cfg.models.model_dump(mode="json"),
        "render": render,
        "seed": cfg.run.seed,
        "skills": cfg.prompts.skills,
    }


def _run(module: str, func: str) -> Callable[..., dict[str, Any]]:
    """Stages are imported when they run, so planning imports none of them."""

    def call(*args: Any, **kwargs: Any) -> dict[str, Any]:
        import importlib

        return getattr(importlib.import_module(module), func)(*args, **kwargs)

    call.__qualname__ = f"{module}.{func}"
    return call


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: tuple[str, ...]
    config: Callable[..., dict[str, Any]]  # (cfg) or, for per-unit stages, (cfg, unit)
    run: Callable[..., dict[str, Any]]  # (cfg, run, lineage, **kwargs) -> summary
    per_skill: bool = False  # one unit (and manifest) per skill

    def manifest_parts(self, unit: str | None = None) -> tuple[str, ...]:
        folder = layout.MERGED if self.name == "merge" else self.name
        return (folder, unit) if unit else (folder,)


GRAPH: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("prompts", (), _prompts_config, _run("selma_ray.prompts.stage", "run_prompts"), True),
        Stage("images", ("prompts",), _images_config, _run("selma_ray.images.stage", "run_images")),
        Stage(
            "experts",
            ("images",),
            _experts_config,
            _run("selma_ray.experts.stage", "run_experts"),
            True,
        ),
        Stage(
            "merge",
            ("experts", "images"),
            _merge_config,
            _run("selma_ray.merge.stage", "run_merge"),
        ),
        Stage(
            "eval",
            ("merge", "experts", "prompts"),
            _eval_config,
            _run("selma_ray.eval.stage", "run_eval"),
        ),
    ]
}
ORDER = list(GRAPH)


def stage_units(name: str, cfg: SelmaConfig) -> list[str]:
    """The units of a per-skill stage: the skills, and for experts also the joint LoRAs."""
    return list(cfg.expert_units()) if name == "experts" else list(cfg.prompts.skills)


def upstream_digest(
    run: RunDir, stage: Stage, cfg: SelmaConfig, unit: str | None, consumer: str = ""
) -> str | None:
    """The digest ``stage``'s outputs recorded: for one unit where both sides split by skill,
    else for all of it. Per-skill stages that keep one manifest per unit (experts) are
    combined over their units: the merge reads only the skills' experts, the others every
    unit. A joint LoRA's images are those of its skills."""
    if stage.name == "experts":
        units = [unit] if unit else stage_units("experts", cfg)
        if consumer == "merge":
            units = [u for u in units if u in cfg.prompts.skills]
        digests = {u: output_digest(run.read_manifest(*stage.manifest_parts(u))) for u in units}
        return digests[unit] if unit else digest(digests)
    manifest = run.read_manifest(*stage.manifest_parts())
    if unit in cfg.experts.joint:
        return digest({s: output_digest(manifest, s) for s in cfg.experts.joint[unit]})
    return output_digest(manifest, unit)


def lineage(name: str, cfg: SelmaConfig, run: RunDir) -> Lineage:
    """Fingerprints for stage ``name`` from its config slice and its upstream outputs as they
    stand now in ``run``."""
    stage = GRAPH[name]
    units = stage_units(name, cfg) if stage.per_skill else [None]
    inputs: dict[str | None, dict[str, Any]] = {}
    for unit in units:
        config = stage.config(cfg, unit) if stage.per_skill else stage.config(cfg)
        upstream = {
            u: upstream_digest(run, GRAPH[u], cfg, unit if stage.per_skill else None, name)
            for u in stage.upstream
        }
        inputs[unit] = {"unit": unit, "config": digest(config), "upstream": upstream}
    fps = {unit: digest(record) for unit, record in inputs.items()}
    if stage.per_skill:
        return Lineage(
            fingerprint=digest(fps),
            units={u: fps[u] for u in units},
            upstream={u: inputs[u]["upstream"] for u in units},
            inputs={u: inputs[u] for u in units},
        )
    return Lineage(fps[None], upstream=inputs[None]["upstream"], inputs=inputs[None])


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between the lineage a manifest recorded and the one computed now."""
    if "config" not in new:  # one record per unit (prompts): name the units that changed
        return [
            f"{unit} ({', '.join(_changed(old.get(unit) or {}, record))})"
            for unit, record in new.items()
            if old.get(unit) != record
        ] or ["inputs"]
    out = ["config"] if old.get("config") != new["config"] else []
    out += [u for u, d in new["upstream"].items() if (old.get("upstream") or {}).get(u) != d]
    return out or ["inputs"]


def _why(stage: Stage, cfg: SelmaConfig, run: RunDir, lin: Lineage) -> list[str]:
    """Why a stage (or which of its units) would run now; empty when it is done."""
    units = stage_units("experts", cfg) if stage.name == "experts" else [None]  # one each
    reasons = []
    for unit in units:
        manifest = run.read_manifest(*stage.manifest_parts(unit))
        fp, inputs = (lin.units[unit], lin.inputs[unit]) if unit else (lin.fingerprint, lin.inputs)
        where = f"{unit}: " if unit else ""
        if manifest is None:
            reasons.append(f"{where}not run yet")
        elif manifest.get("fingerprint") != fp:
            changed = _changed(manifest.get("lineage") or {}, inputs)
            reasons.append(f"{where}{', '.join(changed)} changed")
        elif not run.is_done(fp, *stage.manifest_parts(unit)):
            reasons.append(f"{where}its outputs were changed or deleted")
    return reasons


def existing_run(cfg: SelmaConfig) -> RunDir | None:
    """The run directory ``cfg`` names, or None for a local one not created yet (so that
    looking does not create it)."""
    if is_local(cfg.run.dir) and not Path(cfg.run.dir).expanduser().is_dir():
        return None
    return open_run(cfg)


def plan_status(cfg: SelmaConfig) -> list[tuple[str, str]]:
    """For the run directory ``cfg`` names: each stage with ``done`` or why it would run.
    A stage downstream of one that runs is marked as following it, since what it sees then
    depends on what the upstream stage writes."""
    run = existing_run(cfg)
    if run is None:
        return [(name, "not run yet") for name in ORDER]
    status: list[tuple[str, str]] = []
    running: set[str] = set()
    for name in ORDER:
        stage = GRAPH[name]
        after = [u for u in stage.upstream if u in running]
        if after:
            running.add(name)
            status.append((name, f"after {', '.join(after)}: redoes what changed there"))
            continue
        reasons = _why(stage, cfg, run, lineage(name, cfg, run))
        if reasons:
            running.add(name)
        status.append((name, "; ".join(reasons) if reasons else "done"))
    return status


def config_drift(cfg: SelmaConfig) -> list[str]:
    """The settings (dotted keys; never their values, which may hold storage secrets) in
    which the run that the run directory holds (its ``config.yaml``) differs from ``cfg``;
    empty when they agree or the directory holds no run yet."""
    run = existing_run(cfg)
    if run is None or not run.exists("config.yaml"):
        return []
    old = _flat(yaml.safe_load(run.read_text("config.yaml")) or {})
    new = _flat(cfg.model_dump(mode="json"))
    return sorted(k for k in old.keys() | new.keys() if old.get(k, _ABSENT) != new.get(k, _ABSENT))


_ABSENT = object()


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def drift_warning(cfg: SelmaConfig, shown: int = 8) -> str | None:
    """A warning when ``run.dir`` holds a run made with another config, or None."""
    keys = config_drift(cfg)
    if not keys:
        return None
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return (
        f"run.dir {cfg.run.dir} holds a run made with a different config (it differs in "
        f"{', '.join(keys[:shown])}{more}): this job redoes, in that run, the stages listed "
        "below as changed. To keep that run, give this one its own run.dir=..."
    )


def format_status(status: list[tuple[str, str]]) -> str:
    return "\n".join(["stages in this run directory:"] + [f"  {n}: {w}" for n, w in status])


def run_stage(name: str, cfg: SelmaConfig, run: RunDir, **kwargs: Any) -> dict[str, Any]:
    """Run one stage with the lineage the graph gives it (skipping it when it is done)."""
    return GRAPH[name].run(cfg, run, lineage(name, cfg, run), **kwargs)


SHARED = {
    "config": "schema per section, presets",
    "core": "run dir, layout, lineage, seeds, skills, LoRA files",
    "models": "model names to loadable models; LLM engines",
    "text": "ROUGE-L and near-duplicate filters, answer parsing",
    "diffusion": "device, pixels, the multi-adapter engine",
    "lora": "LoRA merge rules, reading and merging adapter files",
}


def graph_markdown() -> str:
    """The package tree and the stage graph as one Mermaid picture, generated from ``GRAPH``
    (a test keeps the README's copy equal to it)."""
    lines = ["```mermaid", "flowchart LR"]
    for stage in GRAPH.values():
        unit = "<br/>one per skill" if stage.per_skill else ""
        lines.append(f'  {stage.name}["{stage.name}<br/>selma_ray/{stage.name}/{unit}"]')
    for stage in GRAPH.values():
        lines += [f"  {up} --> {stage.name}" for up in stage.upstream]
    lines.append('  serving["serving<br/>selma_ray/serving/<br/>Ray Serve"]')
    lines += ["  experts -.-> serving", "  merge -.-> serving"]
    lines.append('  subgraph shared["shared by every stage (no stage imports another)"]')
    lines += [f'    {name}["{name}/<br/>{what}"]' for name, what in SHARED.items()]
    lines += ["  end", "```"]
    return "\n".join(lines)


def open_run(cfg: SelmaConfig, check: bool = False) -> RunDir:
    """The run directory ``cfg`` names, on its filesystem; ``check`` writes and deletes a probe
    object first, so bad storage fails before any work."""
    run = RunDir(cfg.run.dir, cfg.run.storage)
    if check:
        run.check()
    return run


def serve_args(run: RunDir) -> dict[str, Any]:
    """The Serve application's args for a run: its URI and how to reach its storage."""
    args: dict[str, Any] = {"run_dir": run.uri}
    if not run.local:
        args["storage"] = run.options.to_dict()
    return args


def deploy_serve(cfg: SelmaConfig, run: RunDir) -> str:
    """Deploy the images API for this run; returns its base URL."""
    from ray import serve

    from selma_ray.serving.app import build_app

    http_options = {"host": cfg.serve.host, "port": cfg.serve.port}
    serve_config = {
        "proxy_location": cfg.serve.proxy_location,
        "http_options": http_options,
        "applications": [
            {
                "name": cfg.serve.app_name,
                "route_prefix": "/",
                "import_path": "selma_ray.serving.app:build_app",
                "args": serve_args(run),
            }
        ],
    }
    run.write_text(yaml.safe_dump(serve_config, sort_keys=False), "serve.yaml")
    serve.start(proxy_location=cfg.serve.proxy_location, http_options=http_options)
    serve.run(
        build_app(serve_args(run)),
        name=cfg.serve.app_name,
        route_prefix="/",
        blocking=False,
    )
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def run_pipeline(
    cfg: SelmaConfig,
    deploy: bool | None = None,
    stage_kwargs: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run every stage (skipping finished ones); returns the run summary. ``stage_kwargs``
    passes keyword arguments to a stage's function (e.g. the prompts stage's ``generate``)."""
    run = open_run(cfg, check=True)
    check_shared_run_dir(run)  # a local run.dir on a multi-node cluster stops here
    run.write_text(cfg.to_yaml(), "config.yaml")
    summary: dict[str, Any] = {"run_dir": run.uri, "stages": {}}
    for name in ORDER:
        log.info("=== stage %s ===", name)
        start = time.perf_counter()
        result = run_stage(name, cfg, run, **(stage_kwargs or {}).get(name, {}))
        seconds = time.perf_counter() - start
        summary["stages"][name] = {
            "seconds": round(seconds, 1),
            "skipped": bool(result.get("skipped")),
            "result": result,
        }
        log.info(
            "=== stage %s %s in %.1fs ===",
            name,
            "skipped" if result.get("skipped") else "done",
            seconds,
        )
    if cfg.serve.deploy if deploy is None else deploy:
        start = time.perf_counter()
        summary["endpoint"] = deploy_serve(cfg, run)
        summary["stages"]["serve"] = {
            "seconds": round(time.perf_counter() - start, 1),
            "skipped": False,
            "result": {"url": summary["endpoint"]},
        }
    run.write_json(summary, "summary.json")
    return summary
