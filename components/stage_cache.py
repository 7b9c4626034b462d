"""Stage caching: a stage whose inputs are unchanged is not run again.

A stage's key hashes what decides its output: its config values, the keys of the stages it reads
from (so a change upstream reaches everything downstream) and the source code of the components
it runs. It works in a folder under `<root>/stages/<stage>/` (a crashed run, re-run, finds its own
checkpoints and partial shards in the same place) and writes `_stage.json` last, atomically: the
key it finished with, and the outputs and summary metrics the next stages and MLflow need. The
folder is named by the key, except for stages that accumulate (download, filter, tokenization):
their folder is named by their settings and source alone, so a longer URL list lands in the same
folder and only its new rows are downloaded, filtered and tokenized.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .storage import write_json

RECORD = "_stage.json"
COMPONENTS = Path(__file__).resolve().parent
# modules every stage leans on; a change to one of them re-runs everything
COMMON_CODE = ("storage.py", "shards.py", "checkpoint.py", "images.py")


@cache
def _module_digest(module: str) -> str:
    path = COMPONENTS / module
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    if not files or not all(file.is_file() for file in files):
        raise FileNotFoundError(f"no component module {module!r} under {COMPONENTS}")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(COMPONENTS).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def code_version(modules: Iterable[str]) -> str:
    """A hash of the source of `modules` (component packages or files) and the common ones."""
    names = sorted(set(modules) | set(COMMON_CODE))
    return hashlib.sha256("".join(_module_digest(name) for name in names).encode()).hexdigest()


@dataclass(frozen=True)
class StageCache:
    root: Path

    def key(self, stage: str, config: Any, inputs: Mapping[str, str], code: Iterable[str]) -> str:
        document = {"stage": stage, "config": config, "inputs": dict(inputs), "code": code_version(code)}
        return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    @staticmethod
    def lookup(folder: Path, key: str) -> dict[str, Any] | None:
        """The record of the stage finished in `folder` with this key, or None."""
        path = folder / RECORD
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        return record if record.get("key") == key else None

    @staticmethod
    def commit(folder: Path, stage: str, key: str, record: Mapping[str, Any]) -> dict[str, Any]:
        record = {"stage": stage, "key": key, **record}
        write_json(folder / RECORD, record)
        return record
