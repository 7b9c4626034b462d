"""A folder source's `captions.csv` / `captions.jsonl`: each file's caption, held as arrays, read as a stream.

The file is read a row at a time (text decoded as UTF-8, undecodable bytes as U+FFFD, which the filter reports
as `caption_not_utf8`), its rows gathered a block at a time into Arrow arrays of names and captions and a numpy
array of a 64-bit hash of each name, then sorted by hash once; a caption is found by binary search on the
hash, the name compared to tell the rare equal hashes apart. A file of millions of rows is no dict of millions
of Python strings. (numpy's own variable-width strings, StringDType, were tried first: a binary search for a
Python string in them crashed the process, numpy 2.4.6.)
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .. import columns

CAPTION_FILES = ("captions.csv", "captions.jsonl")
FILE_NAME_COLUMNS = ("file_name", "file", "image", "path", "filename")
ROWS_BLOCK = 1 << 16  # rows gathered as Python values at a time


@dataclass(frozen=True)
class CaptionsFile:
    """Captions by file name (a path relative to the folder, or a bare name for a file anywhere in it): `keys`
    (`name_key` of each name) sorted, `names` and `captions` in their order. Where a name has several rows the
    last one counts, as a dict built from the file top to bottom would have it."""

    keys: np.ndarray
    names: pa.Array
    captions: pa.Array

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, relative: str, name: str) -> str | None:
        """The caption of the file at `relative` (its path in the folder), else of its bare `name`, else None."""
        for wanted in (relative, name) if relative != name else (name,):
            key = np.uint64(name_key(wanted))  # a Python int below 2^63 made numpy search a converted copy: O(N)
            first = end = int(np.searchsorted(self.keys, key))
            while end < len(self.keys) and self.keys[end] == key:
                end += 1
            # rows of one hash keep the file's order: the last row of the name is the last of them that matches
            for position in range(end - 1, first - 1, -1):
                if self.names[position].as_py() == wanted:
                    return self.captions[position].as_py()
        return None


def name_key(name: str) -> int:
    """A 64-bit hash of a file name (blake2b: the same on every machine and run)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", errors="surrogatepass"), digest_size=8).digest(),
                          "little")


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
    keys, names, captions, block_names, block_captions = [], [], [], [], []

    def flush() -> None:
        keys.append(np.fromiter((name_key(name) for name in block_names), np.uint64, len(block_names)))
        names.append(pa.array(block_names, pa.string()))
        captions.append(pa.array(block_captions, pa.string()))
        block_names.clear()
        block_captions.clear()

    for row in itertools.chain((first,), rows):
        if row.get(caption_col) is None or row.get(name_col) is None:
            continue
        block_names.append(str(row[name_col]))
        block_captions.append(str(row[caption_col]))
        if len(block_names) == ROWS_BLOCK:
            flush()
    flush()
    all_keys = np.concatenate(keys)
    order = np.argsort(all_keys, kind="stable")  # equal names keep the file's order: the last row is last
    return CaptionsFile(all_keys[order], pa.chunked_array(names, pa.string()).combine_chunks().take(order),
                        pa.chunked_array(captions, pa.string()).combine_chunks().take(order))


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
