"""One validated config tree for the whole pipeline.

Presets are YAML files chosen by name (``tiny``, ``sd14``, ``sd2``, ``sdxl``, ``weak_to_strong``)
or by path; ``a.b=c`` overrides are applied on top before validation, so a typo in a key or a
bad value fails at once with a message naming the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

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
    "list_presets",
    "load_config",
    "validate",
]
PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "tiny"


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
    data = _load_yaml(path, ConfigError)
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
