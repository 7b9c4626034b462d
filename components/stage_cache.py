"""Stage caching: a stage whose inputs are unchanged is not run again.

A stage is one call of a component function, and its key is derived from that call: the
arguments it is actually given (bound to the function's signature, defaults included), and the
source of the component's module and of every module of `dalle_pipeline.components` it imports,
directly or not, at the top or inside a function (`stage_code.py`). So a value passed to a component always reaches
its key, and a change to any code it runs re-runs it. Arguments are reduced to plain data
(`stage_value`): pydantic configs to their values; a path inside the stage root (or a string
holding one, such as `local-dir:/...`) to the stage and key of the finished stage it lies in, so a
change upstream reaches everything downstream and moving the root changes nothing; a file outside
the root to its path and sha256 (a user's URL list or weights), a folder outside it to a digest of
its listing (a folder source); an object with `stage_key()` to
what that returns (the MLflow store of a tracker, the digest of an evaluation set).

A stage works in a folder under `<root>/stages/<stage>/` (a crashed run, re-run, finds its own
checkpoints and partial shards in the same place) and writes `_stage.json` last, atomically: its
key and the component's result (a dataclass, the type its function returns: paths and ids, never
tensors, its summary `metrics` among them), read back into that type. The folder is named by the
key, except for stages that accumulate (ingest, download, filter, tokenization): theirs is named by the call with paths as they are
(its settings and where its inputs live, not what they hold), so a longer URL list lands in the
same folder and only its new rows are downloaded, filtered and tokenized; paths under the root are named
relative to it there too, so the folder is the same wherever the root is.

Where the run's root is an object store (`storage.RunRoot`), `root` is its local cache and `remote` the
store's stages folder: a committed stage is published there, its files first (those the store holds as they
are here not put again) and its record last (the store has no atomic rename: a stage without its record is
unfinished), with the local root in
the record's paths written as `STAGES_PLACEHOLDER`. A stage finished on the store but not in the
cache is taken as finished from its record alone (a copy kept in `<cache>/stage-records/`): its files are
fetched (into a temporary folder, renamed when whole) only when a stage that runs is given a path into
it (`fetch_inputs`), unless that stage reads it in place (`in_place`: it is given the store's URL; the filter,
the text tokenizer and tokenization; on a cluster of several nodes, even where the cache holds it), and the
flow reads what it reads itself from copies of just those files (`readable`) or from the store (`location`).
So a run on a fresh machine whose stages are all finished fetches no shards. A stage that writes in place (ingest,
the filter, the text tokenizer) is built on the store itself (`open_on_store`), its record written there last (`commit(on_store=True)`),
the cache keeping the record's copy alone (`in_cache`: its paths the cache's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import shutil
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from pydantic import BaseModel, TypeAdapter

from .stage_code import code_version
from .storage import (StorePath, SummedDigest, atomic_path, copy_from_store, file_sha256, is_object_store, modified_ns,
                      object_store, remove_tree, store_listing_digest, url_protocol, walked_files, write_bytes,
                      write_json)

RECORD = "_stage.json"
STAGES_PLACEHOLDER = "${DALLE_STAGES}"  # the stages root in a record published to an object store
# beside the stages in a store's cache: the records of stages finished on the store whose files were not fetched,
# and the copies of the files of theirs that the flow reads itself
STORED_RECORDS, READ_COPIES = "stage-records", "read-copies"
PUBLISHED = "published"  # and what of each stage folder is on the store as this cache holds it
# the parameters a stage's runner fills in: its folder, its MLflow run, where its training checkpoints go on a store
OUTPUT_DIR, TRACKER, CHECKPOINT_STORE = "out_dir", "tracker", "checkpoint_store"

Outputs = TypeVar("Outputs")


@cache
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:  # keyed by the file's stat: hashed once per version
    return file_sha256(path)


def folder_listing_digest(folder: Path) -> str:
    """A digest of every file below `folder` by relative path, size and modification time (a folder source that
    gains, loses or changes a file gets another), summed as the folder is walked: no list, any order."""
    digest = SummedDigest()
    for relative, stat in walked_files(folder):
        digest.add(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def result_type(function: Callable) -> type:
    """The result a stage's component function returns: its return annotation (evaluated in its module,
    where it is a string: the components use `from __future__ import annotations`)."""
    annotation = function.__annotations__["return"]
    return eval(annotation, function.__globals__) if isinstance(annotation, str) else annotation  # noqa: S307


@dataclass(frozen=True)
class StageRecord(Generic[Outputs]):
    """A finished stage: its key, folder, its component's result (`outputs`) with that result's summary
    metrics, and the MLflow run that built it."""

    stage: str
    key: str
    folder: Path
    outputs: Outputs
    metrics: dict[str, float]
    mlflow_run_id: str
    build_seconds: float
    reused: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class StageCache:
    root: Path
    remote: str | None = None  # the stages folder on an object store, where finished stages are published

    def stage_value(self, value: Any, content: bool = True) -> Any:
        """`value` as plain data for a key: with `content`, what it holds (paths into finished stages
        by their keys, outside files by their sha256); without, where it is (paths as they are)."""
        if isinstance(value, BaseModel):
            return self.stage_value(value.model_dump(mode="json"), content)
        if hasattr(value, "stage_key"):
            return value.stage_key()
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return self.stage_value({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, content)
        if isinstance(value, Mapping):
            return {str(k): self.stage_value(v, content) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.stage_value(v, content) for v in value]
        if isinstance(value, np.ndarray):
            return {"array": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest(),
                    "shape": list(value.shape), "dtype": str(value.dtype)}
        if isinstance(value, (str, Path)):
            return self._path_value(str(value)) if content else str(value)
        if value is None or isinstance(value, (bool, int, float)):
            return value
        raise TypeError(f"a stage argument of type {type(value).__name__} has no stage key: pass paths or plain "
                        f"data, or give it a stage_key() method")

    def _path_value(self, text: str) -> str:
        root = re.escape(str(self.root))

        def finished(match: re.Match) -> str:
            stage, folder = match.group(1), match.group(2)
            record = self._finished_record(self.root / stage / folder)
            return f"<{stage}@{record['key'] if record else folder}>"

        if (is_object_store(text) and url_protocol(text) not in ("http", "https")
                and not (self.remote and f"{text}/".startswith(f"{self.remote}/"))):
            return f"{text}#listing={store_listing_digest(text, 'a stage input')}"  # a source read on the store
        replaced = re.sub(rf"{root}/([^/]+)/([^/]+)", finished, text)
        if replaced == text and text.startswith("/") and Path(text).is_file():
            stat = Path(text).stat()
            return f"{text}#sha256={_file_digest(Path(text), stat.st_size, stat.st_mtime_ns)}"
        if replaced == text and text.startswith("/") and Path(text).is_dir():
            return f"{text}#listing={folder_listing_digest(Path(text))}"
        return replaced

    def call_key(self, stage: str, function: Callable, arguments: Mapping[str, Any], content: bool = True) -> str:
        document = json.dumps({"stage": stage, "function": f"{function.__module__}.{function.__qualname__}",
                               "arguments": self.stage_value(arguments, content),
                               "code": code_version(function.__module__)}, sort_keys=True)
        if not content:  # paths under the root named relative to it: the same folder wherever the root is
            document = document.replace(str(self.root), "<stages>")
            if self.remote:  # and a store's cache (a source mirrored into it), wherever a machine keeps it
                document = document.replace(f"{self.root.parent}/", "<cache>/")
        return hashlib.sha256(document.encode()).hexdigest()[:24]

    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, folder: Path, key: str, outputs_type: type[Outputs]) -> StageRecord[Outputs] | None:
        """The record of the stage finished in `folder` with this key (in the cache, or else on the store: its
        record alone, the files left there), or None."""
        record = self._finished_record(folder, from_store=True)
        if record is None or record.get("key") != key:
            return None
        outputs = TypeAdapter(outputs_type).validate_python(record["outputs"])
        return StageRecord(stage=record["stage"], key=key, folder=folder, outputs=outputs,
                           metrics=record["metrics"], mlflow_run_id=record["mlflow_run_id"],
                           build_seconds=record["build_seconds"])

    def _finished_record(self, folder: Path, from_store: bool = False) -> dict | None:
        """The record of the build finished in `folder`: the cache's, else (on a store) the store's, read afresh
        `from_store`, else as last read from it; None where there is none."""
        local = folder / RECORD
        if local.is_file():
            return json.loads(local.read_text())
        if not self.remote:
            return None
        copy = self._record_copy(folder)
        if from_store:
            fs, source = self._remote_folder(folder)
            try:
                published = fs.cat_file(f"{source}/{RECORD}").decode()
            except FileNotFoundError:
                copy.unlink(missing_ok=True)
                return None
            write_bytes(copy, published.replace(STAGES_PLACEHOLDER, str(self.root)).encode())
        return json.loads(copy.read_text()) if copy.is_file() else None

    def _record_copy(self, folder: Path) -> Path:
        return self.root.parent / STORED_RECORDS / f"{folder.relative_to(self.root).as_posix()}.json"

    def _stage_folder(self, path: str | Path) -> Path | None:
        """The stage folder (`<root>/<stage>/<folder>`) `path` lies in, where the root is an object store; else
        None (no store, or a path outside the stages)."""
        match = re.match(rf"{re.escape(str(self.root))}/([^/]+)/([^/]+)(/|$)", str(path)) if self.remote else None
        return None if match is None else self.root / match.group(1) / match.group(2)

    def checkpoint_store(self, folder: Path) -> StorePath | None:
        """On an object-store root, where the training stage building `folder` keeps its Ray Train checkpoints: its
        folder's place on the store, `ray/` in it (every node reaches it; a build killed on one machine resumes
        there on any other). Publishing the finished stage removes them, as files its local folder lacks. None
        under a local root (the checkpoints stay in the stage's folder)."""
        return StorePath(f"{self._url(folder)}/ray") if self.remote else None

    def _url(self, path: str | Path) -> str:
        """The store's URL of a path under the cache's stages."""
        return f"{self.remote}/{Path(path).relative_to(self.root).as_posix()}"

    def _held_on_store_only(self, path: str | Path) -> Path | None:
        """The stage folder `path` lies in, where that stage finished on the store and the cache holds its record
        alone; else None (a path outside the stages, or a stage the cache holds)."""
        folder = self._stage_folder(path)
        if folder is None:
            return None
        return None if (folder / RECORD).is_file() or not self._record_copy(folder).is_file() else folder

    def fetch_inputs(self, arguments: Any) -> None:
        """Before a stage runs: every stage folder its arguments name (paths, a `local-dir:` CLIP, a config's
        `init_from`; as given, or as `stage_value(content=False)` made them) that finished on the store and that
        the cache holds the record of alone, fetched whole."""
        document = json.dumps(self.stage_value(arguments, content=False))
        for named in sorted(set(re.findall(rf"{re.escape(str(self.root))}/[^/\"]+/[^/\"]+", document))):
            if (folder := self._held_on_store_only(named)) is not None:
                self._fetch(folder, json.loads(self._record_copy(folder).read_text())["key"])

    def in_place(self, arguments: Mapping[str, Any], names: Collection[str], prefer_store: bool = False
                 ) -> dict[str, Any]:
        """A stage's arguments with each path among those `names` (str or Path) into a stage finished on the
        store whose folder the cache does not hold made that path's URL on the store: for a component that reads
        them from the store where they lie instead of having them fetched whole. `prefer_store` (a cluster of
        several nodes, whose tasks need not see this cache): a path into any stage finished on the store (every
        finished stage is published there), held here too or not."""
        def in_place(value: Any) -> Any:
            if not isinstance(value, (str, Path)):
                return value
            folder = self._stage_folder(value)
            if folder is not None and (self._held_on_store_only(value) or
                                       (prefer_store and self._finished_record(folder) is not None)):
                return self._url(value)
            return value

        return {name: in_place(value) if name in names else value for name, value in arguments.items()}

    def readable(self, path: str | Path) -> Path:
        """`path` where this process can read it: itself, or for a path into a stage finished on the store whose
        folder the cache does not hold, a copy of that file or folder alone (under `<cache>/read-copies/`)."""
        folder = self._held_on_store_only(path)
        if folder is None:
            return Path(path)
        fs, source = self._remote_folder(folder)
        relative = Path(path).relative_to(folder).as_posix()
        return copy_from_store(fs, source if relative == "." else f"{source}/{relative}",
                               self.root.parent / READ_COPIES / Path(path).relative_to(self.root))

    def location(self, path: str | Path) -> str:
        """Where the file or folder `path` is read from without fetching it: the store's URL for a path into a
        stage finished there that the cache does not hold, else the local path."""
        folder = self._held_on_store_only(path)
        if folder is None:
            return str(path)
        return self._url(path)

    def commit(self, record: StageRecord, on_store: bool = False) -> None:
        """A finished stage's record written last: in its folder (published to the store, where the root is one),
        or, for a stage built `on_store` (`open_on_store`), on the store, the cache keeping a copy alone."""
        outputs = TypeAdapter(type(record.outputs)).dump_python(record.outputs, mode="json")
        document = {"stage": record.stage, "key": record.key, "outputs": outputs,
                    "metrics": record.metrics, "mlflow_run_id": record.mlflow_run_id,
                    "build_seconds": record.build_seconds}
        if on_store:
            fs, target = self._remote_folder(record.folder)
            text = json.dumps(document)
            fs.pipe_file(f"{target}/{RECORD}", text.replace(str(self.root), STAGES_PLACEHOLDER).encode())
            write_bytes(self._record_copy(record.folder), text.encode())
            return
        write_json(record.folder / RECORD, document)
        if self.remote:
            self._publish(record.folder)

    def open_on_store(self, folder: Path, clear: bool = False) -> StorePath:
        """`folder`'s place on the store, for a stage to build there: the record of the build there removed first
        (until its new one is written, every reader takes the folder as unfinished; `clear`: all of it), and
        what the cache held of that folder dropped (a build of its own, its copy of the record)."""
        fs, target = self._remote_folder(folder)
        if clear:
            remove_tree(StorePath(self._url(folder)))
        try:
            fs.rm_file(f"{target}/{RECORD}")
        except FileNotFoundError:
            pass
        shutil.rmtree(folder, ignore_errors=True)
        for path in (self._record_copy(folder), self._published_path(folder)):
            path.unlink(missing_ok=True)
        return StorePath(self._url(folder))

    def in_cache(self, outputs: Outputs) -> Outputs:
        """A result of a stage built on the store with each path there (a field of its own, or in a list of one: a
        `StorePath`, or its URL) made the cache's path for it, as every record names its files: held on the store
        alone."""
        def cached(value: Any) -> Any:
            if isinstance(value, list):
                return [cached(item) for item in value]
            text = str(value)
            if isinstance(value, (str, StorePath)) and (text + "/").startswith(f"{self.remote}/"):
                return self.root / text[len(self.remote) + 1:]
            return value

        return dataclasses.replace(outputs, **{field.name: cached(getattr(outputs, field.name))
                                               for field in dataclasses.fields(outputs) if field.init})

    def _remote_folder(self, folder: Path) -> tuple[Any, str]:
        fs, stages = object_store(self.remote, "the stage store")
        return fs, f"{stages}/{folder.relative_to(self.root).as_posix()}"

    def _publish(self, folder: Path) -> None:
        """Copy a finished stage folder to the store: the record of the build there goes first, then the files the
        store lacks or holds otherwise, then those of the last build this one lacks are removed, then the record
        goes last, the local root in its paths made a placeholder. A file this cache published or fetched, and
        left as it was (size, modification time), is not put again while the store still holds that build: a
        stage that accumulates (a URL list grown by a day) puts its new files alone. Each file here is given the
        store's modification time, as a copy fetched from it has (`copy_from_store`): a stage after it that
        signs its inputs by size and time (the filter's parts) reads them alike here, on the store, and from a
        copy elsewhere (with its own times, a grown corpus filtered on another machine was filtered anew)."""
        fs, target = self._remote_folder(folder)
        try:
            stored = _build_of(json.loads(fs.cat_file(f"{target}/{RECORD}")))
            fs.rm_file(f"{target}/{RECORD}")
        except FileNotFoundError:
            stored = None
        sent = self._published_files(folder, stored)
        on_store = {found[len(target) + 1:] for found in fs.find(target)} - {RECORD}
        files = self._folder_files(folder)
        for relative, state in sorted(files.items()):
            if sent.get(relative) != state or relative not in on_store:
                fs.put_file(str(folder / relative), f"{target}/{relative}")
        for relative in sorted(on_store - files.keys()):
            fs.rm_file(f"{target}/{relative}")
        for found, info in fs.find(target, detail=True).items():  # the record is not there yet
            local = folder / found[len(target) + 1:]
            stored_ns = modified_ns(info)
            if stored_ns is not None and local.is_file() and local.stat().st_mtime_ns != stored_ns:
                os.utime(local, ns=(stored_ns, stored_ns))
        files = self._folder_files(folder)
        document = json.loads((folder / RECORD).read_text())
        fs.pipe_file(f"{target}/{RECORD}", json.dumps(document).replace(str(self.root), STAGES_PLACEHOLDER).encode())
        write_json(self._published_path(folder), {"build": _build_of(document), "files": files})

    @staticmethod
    def _folder_files(folder: Path) -> dict[str, list[int]]:
        """[size, modification time in ns] of each file of a stage folder but its record, by relative path."""
        return {relative: [stat.st_size, stat.st_mtime_ns] for relative, stat in walked_files(folder)
                if relative != RECORD}

    def _published_path(self, folder: Path) -> Path:
        return self.root.parent / PUBLISHED / f"{folder.relative_to(self.root).as_posix()}.json"

    def _published_files(self, folder: Path, stored: list[str] | None) -> dict[str, list[int]]:
        """The files of `folder` as they were when this cache last published or fetched it, where the store still
        holds that build (`stored`, `_build_of` its record), else nothing: another build is put over whole."""
        path = self._published_path(folder)
        if stored is None or not path.is_file():
            return {}
        published = json.loads(path.read_text())
        return published["files"] if published.get("build") == stored else {}

    def _fetch(self, folder: Path, key: str | None) -> bool:
        """Fetch the stage finished on the store in `folder`'s place with this key (any key: None) into `folder`
        (replacing an unfinished local one); False when the store has none."""
        if not self.remote:
            return False
        fs, source = self._remote_folder(folder)
        try:
            record = json.loads(fs.cat_file(f"{source}/{RECORD}"))
        except FileNotFoundError:
            return False
        if key is not None and record.get("key") != key:
            return False
        with atomic_path(folder) as tmp:
            copy_from_store(fs, source, tmp)
            (tmp / RECORD).write_text(json.dumps(record).replace(STAGES_PLACEHOLDER, str(self.root)))
        self._record_copy(folder).unlink(missing_ok=True)
        write_json(self._published_path(folder), {"build": _build_of(record), "files": self._folder_files(folder)})
        return True

    def fetch_to_accumulate(self, folder: Path) -> bool:
        """For a stage that accumulates (its folder named by where its inputs lie, not what they hold), about to
        run where the cache has nothing of it: the build the store holds in its place, whatever key it finished
        with (a shorter URL list's), fetched, so the stage adds to it rather than starting over (a longer list
        downloads only its new rows on any machine). False when the cache has work there, or the store nothing."""
        if folder.is_dir() and any(folder.iterdir()):
            return False
        return self._fetch(folder, None)


def _build_of(record: Mapping[str, Any]) -> list[str]:
    """Which build a record is of: its key and the MLflow run that built it (two builds of one key differ by it)."""
    return [record.get("key"), record.get("mlflow_run_id")]


def bind_call(function: Callable, args: tuple, kwargs: Mapping[str, Any]) -> inspect.BoundArguments:
    """`function(*args, **kwargs)` bound to its signature with its defaults, less the runner's
    parameters (out_dir, tracker, checkpoint_store), which the runner fills in."""
    signature = inspect.signature(function)
    if OUTPUT_DIR not in signature.parameters:
        raise TypeError(f"{function.__module__}.{function.__qualname__} takes no {OUTPUT_DIR!r}: it is no stage")
    partial = inspect.Signature([p for name, p in signature.parameters.items()
                                 if name not in (OUTPUT_DIR, TRACKER, CHECKPOINT_STORE)])
    bound = partial.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound
