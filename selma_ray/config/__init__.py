"""One validated config tree for the whole pipeline.

Presets are YAML files chosen by name (``tiny``, ``sd14``, ``sd2``, ``sdxl``, ``weak_to_strong``)
or by path; ``a.b=c`` overrides are applied on top before validation, so a typo in a key or a
bad value fails at once with a message naming the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from selma_ray.config.sections import (
    PAPER_SKILLS,
    SKILL_NAME,
    ConfigError,
    MergeSection,
    SelmaConfig,
    ServeSection,
    _format_errors,
    _load_yaml,
)

__all__ = [
    "DEFAULT_PRESET",
    "PAPER_SKILLS",
    "PRESET_DIR",
    "SKILL_NAME",
    "ConfigError",
    "MergeSection",
    "SelmaConfig",
    "ServeSection",
    "apply_override",
    "config_sources",
    "list_presets",
    "load_config",
    "validate",
]
PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "tiny"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_preset(preset: str, depth: int = 0) -> tuple[dict[str, Any], list[str]]:
    """(the config tree, the presets and files it came from, lowest first).

    A shipped preset is complete. A config file of your own is layered on its ``base:`` (a
    preset name or another file, relative to it; the ``tiny`` preset when absent, the
    schema's defaults when ``base: null``): its sections are merged key by key over the
    base's. Unless it sets them, ``run.name`` is the file's stem and ``run.dir``
    ``runs/<name>``, so a run of your file never reuses the base preset's run."""
    path = Path(preset)
    own = path.suffix in (".yaml", ".yml")
    if not own:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown preset {preset!r}; choose one of {list_presets()} or a path"
            )
    elif not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    data = _load_yaml(path, ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    if not own:
        return data, [preset]
    base = data.pop("base", DEFAULT_PRESET)
    run = data.get("run") or {}
    if not isinstance(run, dict):
        raise ConfigError(f"{path}: run must be a mapping")
    sources: list[str] = []
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: base must be a preset name or a config file, got {base!r}")
        if depth >= 8:
            raise ConfigError(f"{path}: base files nest more than 8 deep (a loop?)")
        if Path(base).suffix in (".yaml", ".yml"):
            base = str(path.parent / base)
        below, sources = _read_preset(base, depth + 1)
        data = _layer(below, data)
    name = run.get("name") or path.stem
    data["run"] = {**(data.get("run") or {}), "name": name, "dir": run.get("dir", f"runs/{name}")}
    return data, [*sources, str(path)]


def _layer(base: dict[str, Any], top: dict[str, Any], model: type = SelmaConfig) -> dict[str, Any]:
    """``top`` over ``base``: sections and sub-sections merged key by key, every other value
    (a mapping setting such as ``merge.weights`` too) replaced whole."""
    out = dict(base)
    for key, value in top.items():
        field = model.model_fields.get(key)
        kind = field.annotation if field is not None else None
        below = out.get(key)
        section = isinstance(kind, type) and issubclass(kind, BaseModel)
        if section and isinstance(below, dict) and isinstance(value, dict):
            out[key] = _layer(below, value, kind)
        else:
            out[key] = value
    return out


def config_sources(preset: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> str:
    """Where a config comes from, as ``--plan`` prints it: presets and files, lowest first."""
    chain = " < ".join(_read_preset(preset)[1])
    return chain + (f" + {len(overrides)} override(s)" if overrides else "")


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


def validate(data: dict[str, Any]) -> SelmaConfig:
    try:
        return SelmaConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def load_config(preset: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> SelmaConfig:
    """Load a preset by name or path, apply ``a.b=c`` overrides and validate."""
    data, _ = _read_preset(preset)
    for override in overrides or []:
        apply_override(data, override)
    return validate(data)
