"""Self-describing checkpoints: `model.safetensors` + `config.json`, written as one atomic folder.

`config.json` holds the model's config (enough to rebuild it with no other file), its `kind`,
and free-form metadata (hashes of what it was trained on, the step, the MLflow run). `save` takes
the weights as one state dict; `save_streamed` writes the same file a tensor at a time, for
weights no process holds whole (a prior trained under FSDP).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

from .storage import StorePath, as_path, atomic_path, file_sha256

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


# safetensors' names for the dtypes a checkpoint holds
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def save(directory: str | Path, kind: str, state_dict: dict[str, torch.Tensor], config: dict[str, Any],
         meta: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        tensors = {name: value.detach().contiguous().cpu() for name, value in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS))
        _write_config(tmp, kind, config, meta)
    return directory


def save_streamed(directory: str | Path, kind: str, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                  tensors: Iterable[tuple[str, torch.Tensor]], config: dict[str, Any],
                  meta: dict[str, Any] | None = None) -> Path:
    """`save` for weights never held whole: `layout` (name -> (dtype, shape)) makes the safetensors
    header, then each tensor's bytes are appended as `tensors` yields them, in `layout`'s order. Every
    safetensors reader (`load`) reads the tensors `save` would have written; memory holds one yielded
    tensor at a time."""
    directory = Path(directory)
    header, offset = {}, 0
    for name, (dtype, shape) in layout.items():
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned, as safetensors writes them
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        with open(tmp / WEIGHTS, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)) + encoded)
            expected = iter(layout.items())
            for name, tensor in tensors:
                want_name, (dtype, shape) = next(expected, (None, (None, None)))
                if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"save_streamed got {name} {tensor.dtype} {tuple(tensor.shape)} where the "
                                     f"layout has {want_name} {dtype} {shape}")
                file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            if (missing := next(expected, None)) is not None:
                raise ValueError(f"save_streamed: no tensor given for {missing[0]} (and any after it)")
        _write_config(tmp, kind, config, meta)
    return directory


def _write_config(directory: Path, kind: str, config: dict[str, Any], meta: dict[str, Any] | None) -> None:
    document = {"kind": kind, "config": config, "meta": meta or {}}
    (directory / CONFIG).write_text(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")


def read_config(directory: str | Path | StorePath, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, meta) without the weights; refuses a checkpoint of another kind. The folder may be on an object
    store (a URL), as `load` and `weights_hash` read it too."""
    directory = as_path(directory)
    config_path = directory / CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint: {CONFIG} is missing")
    document = json.loads(config_path.read_text())
    if document.get("kind") != kind:
        raise ValueError(f"{directory} holds a {document.get('kind')!r} checkpoint, expected {kind!r}")
    return document["config"], document.get("meta", {})


def load(directory: str | Path | StorePath, kind: str,
         device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Returns (state_dict on `device`, config, meta); refuses a checkpoint of another kind."""
    config, meta = read_config(directory, kind)
    weights = as_path(directory) / WEIGHTS
    if isinstance(weights, StorePath):  # read whole into memory, as load_file maps the local file
        return {name: tensor.to(device) for name, tensor in load_bytes(weights.read_bytes()).items()}, config, meta
    return load_file(str(weights), device=str(device)), config, meta


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


def weights_hash(directory: str | Path | StorePath) -> str:
    return file_sha256(as_path(directory) / WEIGHTS)
