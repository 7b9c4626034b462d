"""Training state that no process holds whole: a model sharded with FSDP2, from its first weights to
the file the next stage loads.

- `materialise`: a model built and sharded on the meta device gets its storage where each shard
  lives, every parameter's shard copied from a full value made one parameter at a time (a seeded
  initialisation, or a checkpoint's tensor), so the whole model is never in one process.
- `save` / `load`: weights and optimizer state in a torch.distributed.checkpoint (DCP) folder, each
  rank writing its own shards into its own file and reading back what its shards need from any of
  them; DCP reshards on load, so a run resumes on another number of workers.
- `saved_weights`: the model's tensors of such a folder, read a group at a time (no process group
  needed), for `checkpoint.save_streamed` to write as one safetensors file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_KEY = "model"  # the weights' prefix in a DCP folder; the optimizer's is "optimizer"
EXPORT_GROUP_BYTES = 1 << 30  # what `saved_weights` reads at once (a larger tensor is read alone)

InitialValue = Callable[[str, torch.Size], torch.Tensor]


def is_sharded_state(state: dict[str, Any]) -> bool:
    """Whether a training state's weights are this rank's shards (DTensors), not whole tensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(value, DTensor) for value in (state.get(MODEL_KEY) or {}).values())


def materialise(model: nn.Module, device: torch.device, initial_value: InitialValue | None) -> None:
    """Give `model`, built on the meta device (whole, or sharded by `fully_shard`), its storage on
    `device`, each parameter (or its local shard) copied from `initial_value(name, shape)`, the full
    tensor made on the CPU one parameter at a time, in `named_parameters` order. None leaves the
    storage uninitialised, for a checkpoint to fill."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if any(True for _ in model.buffers()):
        raise ValueError(f"{type(model).__name__} has buffers; materialise fills parameters only")
    model.to_empty(device=device)
    if initial_value is None:
        return
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = initial_value(name, param.shape).to(device)
            if isinstance(param, DTensor):  # this rank's chunk of the full value, no communication
                full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                full = full.to_local()
                param = param.to_local()
            param.copy_(full)


def save(directory: Path, state: dict[str, Any]) -> None:
    """Every rank together: `state` (nested dicts of sharded and plain tensors) into the DCP folder
    `directory`, each rank's shards in a file of its own, the layout in `.metadata` (rank 0)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(directory))


def load(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """Every rank together: the weights and optimizer state of the DCP folder `directory` into
    `model` (sharded or whole, any number of ranks) and `optimizer`; each rank reads its shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, moments = get_state_dict(model, optimizer)
    state = {MODEL_KEY: weights, "optimizer": moments}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state[MODEL_KEY], optim_state_dict=state["optimizer"])


def state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model", "optimizer"}: this rank's shards of both, by parameter name, nothing gathered."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, moments = get_state_dict(model, optimizer)
    return {MODEL_KEY: weights, "optimizer": moments}


def saved_layout(directory: str | Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of the model's tensors in the DCP folder `directory`, by name."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = MODEL_KEY + "."
    entries = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return {key[len(prefix):]: (entry.properties.dtype, tuple(entry.size))
            for key, entry in sorted(entries.items())
            if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)}


def saved_weights(directory: str | Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                  group_bytes: int = EXPORT_GROUP_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) in `layout`'s order, read from the DCP folder's rank files a group of
    about `group_bytes` at a time, in this process alone: what the driver exports."""
    import torch.distributed.checkpoint as dcp

    def read(names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        group = {name: torch.empty(layout[name][1], dtype=layout[name][0]) for name in names}
        with warnings.catch_warnings():  # that no process group is used is the point
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load({MODEL_KEY: group}, checkpoint_id=str(directory), no_dist=True)
        yield from group.items()

    names: list[str] = []
    size = 0
    for name, (dtype, shape) in layout.items():
        names.append(name)
        size += torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if size >= group_bytes:
            yield from read(names)
            names, size = [], 0
    if names:
        yield from read(names)
