"""Config trees as nested dicts addressed by dotted fields (`prior.optim.lr`), as the CLI's `--set`,
the presets and the flow's overrides give them; `config.resolve` builds a validated config from them."""

from __future__ import annotations

import json
from typing import Any


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
