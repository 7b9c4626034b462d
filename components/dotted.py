"""Config trees as nested dicts addressed by dotted fields (`prior.optim.lr`), as the CLI's `--set`,
the presets and the flow's overrides give them; `config.resolve` builds a validated config from them."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError


class ConfigError(ValueError):
    """A preset name or an override that cannot be applied; the message names the field."""


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`prior.layers=8` -> ("prior.layers", 8). Values are read as JSON when they parse, else as strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form field.path=value")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def merge_trees(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


def dotted_overrides(overrides: Any) -> dict[str, Any]:
    """Any form of overrides as a dict of dotted fields: a `PipelineOverrides` (its fields that are
    not None), a dict (as it is: dotted or nested keys, where None sets the field to None) or `k=v`
    strings (values read as JSON)."""
    if overrides is None:
        return {}
    if hasattr(overrides, "dotted"):  # a PipelineOverrides (overrides.py builds it from these configs)
        return overrides.dotted()
    if isinstance(overrides, list):
        return dict(parse_override(item) for item in overrides)
    if isinstance(overrides, dict):
        return dict(overrides)
    raise ConfigError(f"overrides must be a PipelineOverrides, a dict or a list of field=value strings, "
                      f"not {type(overrides).__name__}")


def validation_problems(err: ValidationError, root: str = "config") -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or root}: {e['msg']}" for e in err.errors())
