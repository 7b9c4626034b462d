"""Every stage of the `train-dalle` flow, named once: the name is its Prefect task's, its MLflow run's, its
folder's under `stages/` and what `rerun` takes; beside it, how the stage runs.

- compute: it keeps every core (or the GPU) busy, so it takes a slot of the `training` limit while it works
  (flows/concurrency.py): two runs on one machine take turns instead of sharing the cores;
- trains: its training loop logs `progress` (training/loop.py), which the flow run page follows
  (`stages.stage_progress`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class StageKind:
    compute: bool = False
    trains: bool = False


COMPUTES, TRAINS = StageKind(compute=True), StageKind(compute=True, trains=True)
STAGES: dict[str, StageKind] = {
    "corpus": StageKind(), "download": StageKind(), "ingest": StageKind(), "filter": StageKind(),
    "text-tokenizer": StageKind(), "dvae": TRAINS, "tokenize-corpus": COMPUTES, "prior": TRAINS, "clip": TRAINS,
    "sample": COMPUTES, "evaluate": COMPUTES, "register": StageKind(), "base-model": StageKind(),
}
EVERY_STAGE = "all"  # `rerun=["all"]` forces every stage
StageName = Literal[(*STAGES, EVERY_STAGE)]  # the flow's `rerun` parameter: a drop-down of these in the UI
COMPUTE_STAGES = frozenset(name for name, kind in STAGES.items() if kind.compute)
TRAINING_STAGES = frozenset(name for name, kind in STAGES.items() if kind.trains)
