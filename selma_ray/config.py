"""One validated config tree for the whole pipeline.

Presets are YAML files chosen by name (``tiny``, ``sd14``, ``sd2``, ``sdxl``, ``weak_to_strong``)
or by path; ``a.b=c`` overrides are applied on top before validation, so a typo in a key or a
bad value fails at once with a message naming the key and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "tiny"
PAPER_SKILLS = [
    "dense_detail",
    "counting",
    "user_prompts",
    "commonsense_defying",
    "everyday_scenes",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message says what to fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    name: str = "tiny"
    dir: str = Field("runs/tiny", description="Run directory: a local path (cloud URIs later).")
    seed: int = Field(0, ge=0)


class ModelsSection(_Section):
    llm: str = Field("smollm2-135m-instruct", description="Instruct LLM writing skill prompts.")
    generator: str = Field("tiny-sd", description="Diffusion model rendering training images.")
    base: str = Field("tiny-sd", description="Diffusion model that gets the experts and is served.")


class PromptsSection(_Section):
    skills: list[str] = Field(default_factory=lambda: list(PAPER_SKILLS), min_length=1)
    per_skill: int = Field(1000, ge=1, description="Target number of new prompts per skill.")
    in_context_examples: int = Field(3, ge=1)
    new_per_request: int = Field(5, ge=1, description="Descriptions asked of the LLM per request.")
    requests_per_round: int = Field(64, ge=1, description="Requests per skill per round.")
    max_rounds: int = Field(50, ge=1)
    rouge_threshold: float = Field(0.8, gt=0.0, le=1.0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=8)
    batch_size: int = Field(64, ge=1)
    max_model_len: int = Field(2048, ge=256)
    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=0.95, description="vLLM memory share; on CPU, the KV-cache share of RAM."
    )

    @field_validator("skills")
    @classmethod
    def _unique_skills(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"skills must be unique, got {v}")
        return v


class ImagesSection(_Section):
    steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0)
    resolution: int | None = Field(None, description="Square size in pixels; null = native.")
    images_per_prompt: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and (v < 8 or v % 8):
            raise ValueError(f"resolution must be a positive multiple of 8, got {v}")
        return v


class ExpertsSection(_Section):
    rank: int = Field(128, ge=1)
    alpha: float = Field(128.0, gt=0.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1
    )
    learning_rate: float = Field(3e-4, gt=0.0)
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    batch_size: int = Field(64, ge=1)
    max_steps: int = Field(5000, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    max_grad_norm: float = Field(1.0, gt=0.0)
    resolution: int | None = Field(None, description="Training resolution; null = native.")
    checkpoint_every: int = Field(500, ge=1)


class MergeSection(_Section):
    method: Literal["paper"] = Field("paper", description="paper = mean of A's and of B's.")
    weights: dict[str, float] | None = Field(None, description="Per-skill weights; null = 1/N.")


class ServeSection(_Section):
    deploy: bool = Field(True, description="Deploy Serve at the end of the pipeline job.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "selma"
    default_steps: int = Field(30, ge=1)
    max_steps: int = Field(100, ge=1)
    max_prompt_chars: int = Field(1000, ge=1)
    max_size: int = Field(1024, ge=8, description="Largest image side a request may ask for.")

    @model_validator(mode="after")
    def _default_within_limit(self) -> ServeSection:
        if self.default_steps > self.max_steps:
            raise ValueError(
                f"default_steps ({self.default_steps}) must be <= max_steps ({self.max_steps})"
            )
        return self


class ActorPool(_Section):
    num_gpus: float = Field(0.0, ge=0.0)
    num_cpus: float = Field(1.0, gt=0.0)
    min_size: int = Field(1, ge=1)
    max_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _min_le_max(self) -> ActorPool:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must be <= max_size ({self.max_size})")
        return self


class ExpertResources(_Section):
    workers_per_expert: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    max_concurrent: int = Field(5, ge=1, description="Experts training at once; the rest queue.")


class TaskResources(_Section):
    num_gpus: float = Field(0.0, ge=0.0)
    num_cpus: float = Field(1.0, gt=0.0)


class ServeResources(TaskResources):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _min_le_max(self) -> ServeResources:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        return self


class ResourcesSection(_Section):
    prompts: ActorPool = Field(default_factory=ActorPool)
    images: ActorPool = Field(default_factory=ActorPool)
    experts: ExpertResources = Field(default_factory=ExpertResources)
    merge: TaskResources = Field(default_factory=TaskResources)
    serve: ServeResources = Field(default_factory=ServeResources)


class SelmaConfig(_Section):
    run: RunSection = Field(default_factory=RunSection)
    models: ModelsSection = Field(default_factory=ModelsSection)
    prompts: PromptsSection = Field(default_factory=PromptsSection)
    images: ImagesSection = Field(default_factory=ImagesSection)
    experts: ExpertsSection = Field(default_factory=ExpertsSection)
    merge: MergeSection = Field(default_factory=MergeSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)

    @model_validator(mode="after")
    def _merge_weights_name_skills(self) -> SelmaConfig:
        weights = self.merge.weights
        if weights is not None and set(weights) != set(self.prompts.skills):
            raise ValueError(
                f"merge.weights must give one weight per skill in prompts.skills "
                f"{self.prompts.skills}; got {sorted(weights)}"
            )
        return self

    def fingerprint(self, *sections: str, extra: Any = None) -> str:
        """A stable hash of the named sections (and ``extra``), for stage manifests."""
        data = {name: getattr(self, name).model_dump(mode="json") for name in sections}
        data["__extra__"] = extra
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_preset(preset: str) -> dict[str, Any]:
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown preset {preset!r}; choose one of {list_presets()} or a path"
            )
    elif not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b=c`` override in place; the value is parsed as YAML (numbers, lists...)."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {e}") from e
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = SelmaConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key; allowed here: {', '.join(_allowed_keys(e['loc']))}")
        else:
            got = e.get("input")
            shown = (
                "" if isinstance(got, dict | list) and len(repr(got)) > 80 else f" (got {got!r})"
            )
            lines.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}{shown}")
    return "invalid config:\n  " + "\n  ".join(lines)


def validate(data: dict[str, Any]) -> SelmaConfig:
    try:
        return SelmaConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def load_config(preset: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> SelmaConfig:
    """Load a preset by name or path, apply ``a.b=c`` overrides and validate."""
    data = _read_preset(preset)
    for override in overrides or []:
        apply_override(data, override)
    return validate(data)
