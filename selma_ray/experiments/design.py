"""What each experiment compares: its arms, the data runs they need, the paper's rows.

Pure config logic (no Ray, no models): ``--plan`` uses it before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from selma_ray.config import SelmaConfig
from selma_ray.experiments import NAMES

GENERATED = "generated"  # LLM prompts, rendered by the run's generator
REAL_PAIRS = "real-pairs"  # images.real_data's images and captions
REAL_PROMPTS = "real-prompts"  # images.real_data's captions, rendered by the generator
PAPER_FILE = Path(__file__).with_name("paper_numbers.yaml")
# The paper's column order, and the scorer behind each column.
PAPER_COLUMNS = ("dsg", "tifa", "pick", "image_reward", "hps")
PAPER_MODELS = {  # a base model's hub id (a fragment of it) -> the paper's name for it
    "stable-diffusion-v1-4": "sd14",
    "stable-diffusion-2": "sd2",
    "stable-diffusion-xl": "sdxl",
}
# Assumed seconds per training step (an expert's configured batch) and per rendered image
# (the configured steps, 50 by default) on one L40-class GPU, for --plan's GPU-hours until
# a run has measured its own. The paper states 6 h (SD v1.4, v2) and 12 h (SDXL) per LoRA on
# one L40.
ASSUMED_SECONDS = {"sd": {"step": 1.0, "image": 3.0}, "sdxl": {"step": 2.5, "image": 9.0}}


@dataclass(frozen=True)
class Arm:
    """One row of the results: an adapter (``base``, a skill, a joint LoRA, ``merged`` or
    ``merged-<subset>``) of one data run, and the paper's row for the same setting."""

    name: str
    adapter: str
    data: str = GENERATED
    paper: str | None = None


@dataclass
class Experiment:
    name: str
    title: str
    arms: list[Arm]
    # data source -> the config of the run that makes it (a run directory each)
    runs: dict[str, SelmaConfig] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def paper_numbers() -> dict[str, Any]:
    return _paper_numbers()


@cache
def _paper_numbers() -> dict[str, Any]:
    return yaml.safe_load(PAPER_FILE.read_text())


def paper_row(table: str, key: str | None) -> dict[str, float | None] | None:
    """The paper's published figures for one row, by scorer name, or None."""
    if key is None:
        return None
    row = (paper_numbers()["tables"][table].get("rows") or {}).get(key)
    if row is None:
        return None
    return dict(zip(PAPER_COLUMNS, row, strict=True))


def paper_model(cfg: SelmaConfig) -> str | None:
    """The paper's name for the run's base model, or None for models the paper did not use."""
    return next((name for frag, name in PAPER_MODELS.items() if frag in cfg.models.base), None)


def _with(cfg: SelmaConfig, **sections: dict[str, Any]) -> SelmaConfig:
    """``cfg`` with some settings replaced, validated again."""
    from selma_ray.config import validate

    data = cfg.model_dump(mode="json")
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return validate(data)


def data_dir(cfg: SelmaConfig, source: str) -> str:
    """Where a data run lives: the run itself for generated data, else beside it."""
    return cfg.run.dir if source == GENERATED else f"{cfg.run.dir.rstrip('/')}/data/{source}"


def build(name: str, cfg: SelmaConfig) -> Experiment:
    """The arms and data runs of experiment ``name`` on the run that ``cfg`` describes."""
    if name not in NAMES:
        raise ValueError(f"unknown experiment {name!r}; choose one of {list(NAMES)}")
    return {"table1": _table1, "table2": _table2, "table4": _table4, "figure1": _figure1}[name](cfg)


def _table1(cfg: SelmaConfig) -> Experiment:
    model = paper_model(cfg)
    notes = [] if model else [f"the paper has no Table 1 row for {cfg.models.base}"]
    arms = [
        Arm("base", "base", paper=f"{model}/base" if model else None),
        Arm("SELMA (merged)", "merged", paper=f"{model}/selma" if model else None),
    ]
    return Experiment("table1", _title("table1"), arms, {GENERATED: cfg}, notes)


def _table2(cfg: SelmaConfig) -> Experiment:
    notes = [f"images by {cfg.models.generator}, experts on {cfg.models.base}"]
    if cfg.models.generator == cfg.models.base:
        notes.append(
            "generator and base are the same model: this is not weak-to-strong; use "
            "--config weak_to_strong (SD v2 images, SDXL experts)"
        )
    arms = [
        Arm("base", "base", paper="sdxl/base"),
        Arm(f"SELMA ({_short(cfg.models.generator)} images)", "merged", paper=None),
    ]
    return Experiment("table2", _title("table2"), arms, {GENERATED: cfg}, notes)


def _table4(cfg: SelmaConfig) -> Experiment:
    skills = list(cfg.prompts.skills)
    if len(skills) < 2:
        raise ValueError(
            "table4 compares experts with their joint LoRA and merge: give at least 2 skills"
        )
    groups = {"all": skills}
    if len(skills) > 3:  # the paper's "3 of 5" arms; with 3 skills or fewer they are "all"
        groups = {"3": skills[:3], **groups}
    joint = {f"joint-{k}": v for k, v in groups.items()}
    subsets = {f"{k}-skills": v for k, v in groups.items() if k != "all"}
    run = _with(
        cfg,
        experts={"joint": {**cfg.experts.joint, **joint}},
        merge={"subsets": {**cfg.merge.subsets, **subsets}},
    )
    arms = [Arm("base", "base", paper="base")]
    arms += [Arm(f"expert: {s}", s, paper=f"expert/{s}") for s in skills]
    arms += [Arm(f"multi-skill LoRA ({k})", n, paper=n) for n, k in zip(joint, groups, strict=True)]
    arms += [
        Arm(f"merge ({n.split('-')[0]})", f"merged-{n}", paper=f"merge-{n.split('-')[0]}")
        for n in subsets
    ]
    arms.append(Arm("merge (all)", "merged", paper="merge-all"))
    notes = [f"{len(skills)} skills: {', '.join(skills)}"]
    return Experiment("table4", _title("table4"), arms, {GENERATED: run}, notes)


def _figure1(cfg: SelmaConfig) -> Experiment:
    real = cfg.images.real_data
    if not real:
        raise ValueError(
            "figure1 compares real and generated data: set images.real_data={skill: [path]} "
            "for the skills to compare (an image folder, Parquet or WebDataset tars)"
        )
    # The real-data runs train only the skills compared (their merge is not an arm).
    only = {
        "prompts": {"skills": list(real)},
        "experts": {"joint": {}},
        "merge": {"weights": None, "subsets": {}},
    }
    runs = {
        GENERATED: _with(cfg, images={"real_data": {}, "real_data_use": "pairs"}),
        REAL_PROMPTS: _with(
            cfg,
            run={"dir": data_dir(cfg, REAL_PROMPTS)},
            images={"real_data_use": "prompts"},
            **only,
        ),
        REAL_PAIRS: _with(
            cfg, run={"dir": data_dir(cfg, REAL_PAIRS)}, images={"real_data_use": "pairs"}, **only
        ),
    }
    arms = [Arm("base", "base")]
    labels = {
        REAL_PAIRS: "real prompt + real image",
        REAL_PROMPTS: "real prompt + generated image",
        GENERATED: "LLM prompt + generated image",
    }
    for skill in real:
        arms += [
            Arm(f"{skill}: {label}", skill, data=source, paper=f"{skill}/{source}")
            for source, label in labels.items()
        ]
    return Experiment("figure1", _title("figure1"), arms, runs)


def _title(table: str) -> str:
    return str(paper_numbers()["tables"][table]["title"])


def _short(model: str) -> str:
    return model.rsplit("/", 1)[-1]


# ---- the plan ------------------------------------------------------------------------------
def plan(exp: Experiment) -> dict[str, Any]:
    """What the experiment will run: its arms, what they share, GPU-hours (assumed step
    times unless stated) and the peak GPUs any stage asks for."""
    from selma_ray.plan import build_plan

    runs = {}
    total = 0.0
    peak = 0.0
    for source, cfg in exp.runs.items():
        stages = build_plan(cfg)["stages"]
        hours = gpu_hours(cfg, stages)
        total += sum(hours.values())
        peak = max(peak, _peak_gpus(cfg, stages))
        arms = [a.name for a in exp.arms if a.data == source]
        runs[source] = {
            "run_dir": cfg.run.dir,
            "arms": arms,
            "shared": f"prompts, images ({stages['images']['images']} rendered), and "
            f"{len(cfg.expert_units())} LoRAs trained once for {len(arms)} arms",
            "gpu_hours": {k: round(v, 2) for k, v in hours.items()},
        }
    return {
        "experiment": exp.name,
        "title": exp.title,
        "arms": [{"name": a.name, "adapter": a.adapter, "data": a.data} for a in exp.arms],
        "runs": runs,
        "gpu_hours": round(total, 2),
        "peak_gpus": peak,
        "assumed_seconds": "assumed seconds per training step and per image on one L40-class "
        "GPU: "
        + ", ".join(f"{k} {v['step']} / {v['image']}" for k, v in ASSUMED_SECONDS.items())
        + "; eval counts eval.max_prompts prompts (none when unset); "
        "stages already done in a run directory cost nothing more",
        "notes": exp.notes,
    }


def gpu_hours(cfg: SelmaConfig, stages: dict[str, Any]) -> dict[str, float]:
    """GPU-hours per stage of one data run, from its config and the assumed step times; 0 for
    stages that run on CPUs."""
    res = cfg.resources
    family = "sdxl" if stages["experts"]["base"].get("family") == "sdxl" else "sd"
    secs = ASSUMED_SECONDS[family]
    steps_scale = cfg.images.steps / 50
    train = 0.0
    if res.experts.use_gpu:
        units = len(cfg.expert_units())
        train = units * cfg.experts.max_steps * secs["step"] * res.experts.workers_per_expert
    images = stages["images"]["images"] * secs["image"] * steps_scale if res.images.num_gpus else 0
    ev = cfg.eval
    variants = 2 + len(cfg.expert_units()) + len(cfg.merge.subsets)  # base, merged, LoRAs
    renders = variants * (ev.max_prompts or 0) * ev.seeds_per_prompt
    evaluate = renders * secs["image"] * steps_scale if res.eval.num_gpus else 0.0
    return {"images": images / 3600, "experts": train / 3600, "eval": evaluate / 3600}


def _peak_gpus(cfg: SelmaConfig, stages: dict[str, Any]) -> float:
    res = cfg.resources
    from selma_ray.plan import engine_gpus

    return max(
        res.prompts.max_size * engine_gpus(cfg),
        res.images.max_size * res.images.num_gpus,
        float(stages["experts"]["peak_gpus"]),
        res.eval.max_size * res.eval.num_gpus,
    )


def format_plan(p: dict[str, Any]) -> str:
    lines = [f"experiment {p['experiment']}: {p['title']}", "  arms:"]
    lines += [f"    {a['name']:<40} adapter {a['adapter']} ({a['data']} data)" for a in p["arms"]]
    for source, run in p["runs"].items():
        lines.append(f"  data run '{source}' in {run['run_dir']}:")
        lines.append(f"    shared: {run['shared']}")
        hours = ", ".join(f"{k} {v}" for k, v in run["gpu_hours"].items())
        lines.append(f"    GPU-hours: {hours}")
    lines.append(f"  GPU-hours in all: {p['gpu_hours']} ({p['assumed_seconds']})")
    lines.append(f"  peak GPUs: {p['peak_gpus']:g}")
    lines += [f"  note: {n}" for n in p["notes"]]
    return "\n".join(lines)
