"""A folder source's `captions.csv` / `captions.jsonl`: each file's caption, held as arrays, read as a stream.

The file is read a row at a time (text decoded as UTF-8, undecodable bytes as U+FFFD, which the filter reports
as `caption_not_utf8`), its rows gathered a block at a time into a numpy array of names (StringDType: a short
name is 16 bytes, no Python object each) and an Arrow array of captions, then sorted by name once; a
caption is found by binary search. A file of millions of rows is no dict of millions of Python strings.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from numpy.dtypes import StringDType

from .. import columns

CAPTION_FILES = ("captions.csv", "captions.jsonl")
FILE_NAME_COLUMNS = ("file_name", "file", "image", "path", "filename")
ROWS_BLOCK = 1 << 16  # rows gathered as Python values at a time


@dataclass(frozen=True)
class CaptionsFile:
    """Captions by file name (a path relative to the folder, or a bare name for a file anywhere in it): `names`
    sorted, `captions` in their order. Where a name has several rows the last one counts, as a dict built from
    the file top to bottom would have it."""

    names: np.ndarray
    captions: pa.Array

    def __len__(self) -> int:
        return len(self.names)

    def get(self, relative: str, name: str) -> str | None:
        """The caption of the file at `relative` (its path in the folder), else of its bare `name`, else None."""
        for key in (relative, name):
            position = int(np.searchsorted(self.names, key, side="right")) - 1  # the last row of an equal name
            if position >= 0 and self.names[position] == key:
                return self.captions[position].as_py()
        return None


def read_captions_file(root: Path, caption_col: str) -> CaptionsFile | None:
    """The captions file at the top of the folder `root` (`captions.csv`, else `captions.jsonl`), or None where
    there is none or it has no rows. ValueError naming the file when it has no file name column."""
    path = next((root / name for name in CAPTION_FILES if (root / name).is_file()), None)
    if path is None:
        return None
    rows = _rows(path)
    first = next(rows, None)
    if first is None:
        return None
    name_col = next((col for col in FILE_NAME_COLUMNS if col in first), None)
    if name_col is None:
        raise ValueError(f"{path}: the captions file needs a file name column (one of {list(FILE_NAME_COLUMNS)}); "
                         f"it has {sorted(first)}")
    caption_col = columns.pick(list(first), caption_col, "caption", path)
    names, captions, block_names, block_captions = [], [], [], []

    def flush() -> None:
        names.append(np.array(block_names, dtype=StringDType()))
        captions.append(pa.array(block_captions, pa.string()))
        block_names.clear()
        block_captions.clear()

    for row in _with_first(first, rows):
        if row.get(caption_col) is None or row.get(name_col) is None:
            continue
        block_names.append(str(row[name_col]))
        block_captions.append(str(row[caption_col]))
        if len(block_names) == ROWS_BLOCK:
            flush()
    flush()
    all_names = np.concatenate(names)
    order = np.argsort(all_names, kind="stable")  # equal names keep the file's order: the last row is last
    return CaptionsFile(all_names[order], pa.chunked_array(captions, pa.string()).combine_chunks().take(order))


def _with_first(first: dict, rows: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rows


def _rows(path: Path) -> Iterator[dict]:
    """The rows of a captions file as dicts, streamed (a CSV's header names their keys; JSON Lines are objects)."""
    with path.open(encoding="utf-8", errors="replace", newline="") as text:
        if path.suffix == ".csv":
            yield from csv.DictReader(text)
            return
        for line in text:
            if line.strip():
                row = json.loads(line)
                if isinstance(row, dict):
                    yield row
