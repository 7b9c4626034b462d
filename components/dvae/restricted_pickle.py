"""Read a pickled torch file (OpenAI's `encoder.pkl`, a Lightning `.ckpt`, a `.pt`) without running code from it.

`torch.load` of a whole pickled module imports and calls whatever the file names. `load` reads the
same files through an unpickler whose `find_class` hands out only what cannot run a file's code:
torch's tensor rebuilders, `OrderedDict`, `set`, `torch.device`, `torch.Size`. Every other class a
file names is answered by `admit`: an inert stand-in (`Layer`: a plain object that keeps its pickled
`__dict__`, for module trees whose tensors are then read by path), or nothing, and the file is refused
naming the class. Stand-ins never call anything, so a file cannot execute code, on any torch.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# what a tensor, a parameter and their containers rebuild with (what torch's own weights_only admits)
SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "device"): torch.device,
    ("torch", "Size"): torch.Size,
}


class RefusedFile(ValueError):
    """A file that names a class its reader does not admit; the message names the file and the class."""


class Layer:
    """An inert stand-in for a pickled class: instantiating it calls nothing, `__setstate__` keeps the
    pickled attributes. `qualified_name` says which class the file named."""

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Layer:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ state)
            state = state[0]
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __call__(self, *args: Any, **kwargs: Any) -> Layer:  # a pickled callable stays inert
        return type(self)()


_stand_ins: dict[tuple[str, str], type[Layer]] = {}


def stand_in(module: str, name: str) -> type[Layer]:
    """The one `Layer` subclass standing in for `module.name` (one per name: a class can be a dict key)."""
    key = (module, name)
    if key not in _stand_ins:
        _stand_ins[key] = type(name, (Layer,), {"qualified_name": f"{module}.{name}"})
    return _stand_ins[key]


def _restricted_module(path: Path, admit: Callable[[str, str], type[Layer] | None]) -> types.ModuleType:
    """A `pickle_module` for `torch.load` whose unpickler admits only SAFE_GLOBALS and `admit`'s classes."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            # protocol-2 pickles name Python 2's modules (`__builtin__.set`); read them as Python 3's
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            if (module, name) in SAFE_GLOBALS:
                return SAFE_GLOBALS[(module, name)]
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            admitted = admit(module, name)
            if admitted is None:
                raise RefusedFile(f"{path}: refused: it names {module}.{name}, which is not a tensor nor a class "
                                  "this reader admits (nothing from the file was run)")
            return admitted

    restricted = types.ModuleType("restricted_pickle")
    restricted.Unpickler = RestrictedUnpickler
    restricted.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()
    restricted.__name__ = "restricted_pickle"
    return restricted


def load(path: str | Path, admit: Callable[[str, str], type[Layer] | None]) -> Any:
    """The object pickled in `path` (a torch zip or legacy file), tensors on the CPU, other classes as
    `admit` says. RefusedFile for a class `admit` refuses; ValueError for a file torch cannot read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                          pickle_module=_restricted_module(path, admit))
    except RefusedFile:
        raise
    except Exception as error:  # truncated, not a torch file, a pickle of another protocol
        raise ValueError(f"{path}: not a readable torch file ({type(error).__name__}: {error})") from error


def admit_as_layers(prefixes: tuple[str, ...]) -> Callable[[str, str], type[Layer] | None]:
    """`admit` for module trees: every class in a module under one of `prefixes` becomes a stand-in."""
    def admit(module: str, name: str) -> type[Layer] | None:
        return stand_in(module, name) if module.startswith(prefixes) else None
    return admit


def admit_anything_inert(module: str, name: str) -> type[Layer]:
    """`admit` for a checkpoint whose tensors are read from a dict (a Lightning `.ckpt`): the classes
    of its other entries (callbacks, hyperparameters) become stand-ins, never imported or called."""
    return stand_in(module, name)


def module_tensors(layer: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) of every parameter and buffer of a stand-in module tree, in the module's own
    order (a module's parameters, then its buffers, then its children's, as `state_dict` has them)."""
    state = getattr(layer, "__dict__", {})
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if isinstance(value, torch.Tensor):
                yield prefix + name, value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            yield from module_tensors(child, f"{prefix}{name}.")
