"""Self-describing checkpoints: `model.safetensors` + `config.json`, written as one atomic folder.

`config.json` holds the model's config (enough to rebuild it with no other file), its `kind`,
and free-form metadata (hashes of what it was trained on, the step, the MLflow run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .storage import atomic_path, file_sha256

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save(directory: str | Path, kind: str, state_dict: dict[str, torch.Tensor], config: dict[str, Any],
         meta: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        tensors = {name: value.detach().contiguous().cpu() for name, value in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS))
        document = {"kind": kind, "config": config, "meta": meta or {}}
        (tmp / CONFIG).write_text(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")
    return directory


def read_config(directory: str | Path, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, meta) without the weights; refuses a checkpoint of another kind."""
    directory = Path(directory)
    config_path = directory / CONFIG
    if not config_path.exists():
        raise FileNotFoundError(f"{directory} is not a checkpoint: {CONFIG} is missing")
    document = json.loads(config_path.read_text())
    if document.get("kind") != kind:
        raise ValueError(f"{directory} holds a {document.get('kind')!r} checkpoint, expected {kind!r}")
    return document["config"], document.get("meta", {})


def load(directory: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Returns (state_dict, config, meta); refuses a checkpoint of another kind."""
    config, meta = read_config(directory, kind)
    return load_file(str(Path(directory) / WEIGHTS)), config, meta


def check_same_model(directory: str | Path, kind: str, config: dict[str, Any], setting: str,
                     ignore: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """ValueError unless the checkpoint at `directory` is a `kind` built with `config` (but `ignore`);
    `setting` names the config field that pointed there, for the message. `defaults` stand in for the
    fields a checkpoint written before they existed lacks."""
    theirs, _ = read_config(directory, kind)
    theirs = {**(defaults or {}), **theirs}
    differing = sorted(key for key in config if key not in ignore and theirs.get(key) != config[key])
    if differing:
        raise ValueError(f"{setting} {directory}: its model differs in {differing}; fine-tuning needs the same "
                         "architecture and vocabularies")


def weights_hash(directory: str | Path) -> str:
    return file_sha256(Path(directory) / WEIGHTS)
