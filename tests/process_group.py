"""Run a test's function on the ranks of a real gloo process group on this machine (FSDP and DDP need
one): spawned processes, a file rendezvous, one CPU thread each, each rank's return value back."""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def on_ranks(fn: Callable[..., Any], world_size: int, workdir: Path, *args: Any) -> list[Any]:
    """[fn(rank, *args) for every rank], each run in a process of its own in one gloo group; `fn` is a
    module-level function (the children import it by name). A rank's exception fails the call."""
    import torch.multiprocessing as mp

    workdir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_run_rank, args=(fn, world_size, str(workdir), args), nprocs=world_size)
    return [pickle.loads((workdir / f"rank{rank}.pickle").read_bytes()) for rank in range(world_size)]


def _run_rank(rank: int, fn: Callable[..., Any], world_size: int, workdir: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world_size)
    try:
        result = fn(rank, *args)
        (Path(workdir) / f"rank{rank}.pickle").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()
    # the result is written and the group gone; a plain interpreter exit sometimes aborts after FSDP on
    # gloo ("terminate called without an active exception", one run in four here), failing a passed rank
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
