"""uint64 keys with a value each, as sorted runs merged in levels, in memory or in files.

The filter's duplicate indexes (`filter.dedup`) and the index of what a download folder's batches
attempted (`download.run.attempted_index`) are built on it: adding k entries costs O(k log N) amortised,
a lookup searches each of the O(log N) runs, and, given a spill folder, runs past 64k entries live in
files there, so the process holds about the same memory at any N.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np


Run = tuple[np.ndarray, np.ndarray]  # (keys sorted, values), in memory
SPILL_ENTRIES = 1 << 16  # a run longer than this goes to a file (1 MiB of keys and values)
# a new run merges into the newest while that one is at most GROWTH times its size: 1 merges like a binary counter
# (log2(N/k) runs of k-entry adds); 4 keeps each run over 4 times the next, so a lookup searches a third as many
# runs at 100M, for each entry rewritten about twice as often (the filter's path: 156 -> 123 s over 4M hashes)
GROWTH = 4
MERGE_CHUNK = 1 << 16  # entries of each run in memory at once while two files merge
MATCH_CHUNK = 1 << 18  # entries a lookup gathers at once (about 12 MB with their query indexes and positions)


class SortedRuns:
    """uint64 keys with a uint64 value each, as sorted runs; `matches` finds every entry of a key.

    Runs merge in levels (`GROWTH`: O(log N) of them, each over GROWTH times the size of the next). Given
    `spill_dir`, a run longer than `spill_entries` lives in two .npy files there, merged file to file
    `merge_chunk` entries at a time and mapped only while a lookup reads it: the process holds a bounded
    amount however many entries the index has (the pages a lookup touched stay in the kernel's page cache,
    reclaimable, not in the process)."""

    def __init__(self, spill_dir: Path | None = None, spill_entries: int | None = None,
                 merge_chunk: int | None = None) -> None:
        self.runs: list[Run | Path] = []  # largest first; a Path: the run's files, <path>.keys.npy and .values.npy
        self.lengths: list[int] = []
        self.spill_dir = spill_dir
        self.spill_entries = SPILL_ENTRIES if spill_entries is None else spill_entries
        self.merge_chunk = MERGE_CHUNK if merge_chunk is None else merge_chunk
        self._files = 0

    def __len__(self) -> int:
        return sum(self.lengths)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        run: Run | Path = (np.asarray(keys, np.uint64)[order], np.asarray(values, np.uint64)[order])
        length = len(keys)
        while self.runs and self.lengths[-1] <= GROWTH * length:
            run, length = self._merge(self.runs.pop(), run), self.lengths.pop() + length
        if self.spill_dir is not None and length > self.spill_entries and not isinstance(run, Path):
            run = self._write(*run)
        self.runs.append(run)
        self.lengths.append(length)

    def matches(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query index, stored value) for every stored entry whose key equals a query's."""
        chunks = list(self.matches_in_chunks(keys))
        if not chunks:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64)
        return np.concatenate([owners for owners, _ in chunks]), np.concatenate([found for _, found in chunks])

    def matches_in_chunks(self, keys: np.ndarray, chunk: int = MATCH_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`matches` a piece at a time, each of about `chunk` entries (more only for one query matching more):
        a caller that keeps few of them holds a bounded amount however many a lookup meets (16k queries of 67
        probes against 100M hashes meet about 50M)."""
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")  # searched in key order: each search starts near the last
        keys = keys[order]
        for run in self.runs:
            stored_keys, stored_values = _read(run)
            left = np.searchsorted(stored_keys, keys, side="left")
            counts = np.searchsorted(stored_keys, keys, side="right") - left
            ends = np.cumsum(counts)
            start = before = 0  # the queries before `start` have their `before` matches given
            while before < ends[-1]:
                end = max(int(np.searchsorted(ends, before + chunk, side="right")), start + 1)
                piece = counts[start:end]
                total = int(ends[end - 1] - before)
                if total:
                    # positions left[q], left[q] + 1, ... for each query q, without a Python loop
                    starts = np.repeat(left[start:end] - np.cumsum(piece) + piece, piece)
                    yield np.repeat(order[start:end], piece), np.asarray(stored_values[starts + np.arange(total)])
                start, before = end, ends[end - 1]

    def _merge(self, first: Run | Path, second: Run | Path) -> Run | Path:
        if self.spill_dir is None or not (isinstance(first, Path) or isinstance(second, Path)):
            merged_keys = np.concatenate([first[0], second[0]])
            order = np.argsort(merged_keys, kind="stable")
            return merged_keys[order], np.concatenate([first[1], second[1]])[order]
        path = self._new_path()
        (a_keys, a_values), (b_keys, b_values) = _read(first), _read(second)
        total = len(a_keys) + len(b_keys)
        out_keys = np.lib.format.open_memmap(f"{path}.keys.npy", "w+", np.uint64, (total,))
        out_values = np.lib.format.open_memmap(f"{path}.values.npy", "w+", np.uint64, (total,))
        i = j = written = 0
        while i < len(a_keys) or j < len(b_keys):
            # a chunk of each run up to a bound key: every entry taken <= bound <= every entry left
            if i < len(a_keys):
                i_end = min(i + self.merge_chunk, len(a_keys))
                j_end = len(b_keys) if i_end == len(a_keys) else \
                    int(np.searchsorted(b_keys, a_keys[i_end - 1], "right"))
                if j_end - j > self.merge_chunk:
                    j_end = j + self.merge_chunk
                    i_end = int(np.searchsorted(a_keys, b_keys[j_end - 1], "right"))
            else:
                i_end, j_end = i, min(j + self.merge_chunk, len(b_keys))
            keys = np.concatenate([a_keys[i:i_end], b_keys[j:j_end]])
            order = np.argsort(keys, kind="stable")
            out_keys[written : written + len(keys)] = keys[order]
            out_values[written : written + len(keys)] = np.concatenate([a_values[i:i_end], b_values[j:j_end]])[order]
            written, i, j = written + len(keys), i_end, j_end
        out_keys.flush()
        out_values.flush()
        del out_keys, out_values, a_keys, a_values, b_keys, b_values
        for run in (first, second):
            if isinstance(run, Path):
                _remove(run)
        return path

    def _write(self, keys: np.ndarray, values: np.ndarray) -> Path:
        path = self._new_path()
        np.save(f"{path}.keys.npy", keys)
        np.save(f"{path}.values.npy", values)
        return path

    def _new_path(self) -> Path:
        self._files += 1
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        return self.spill_dir / f"run-{id(self):x}-{self._files:06d}"


def _read(run: Run | Path) -> Run:
    """A run's arrays: its own, or its files mapped read-only (unmapped once the arrays are dropped)."""
    if isinstance(run, Path):
        return np.load(f"{run}.keys.npy", mmap_mode="r"), np.load(f"{run}.values.npy", mmap_mode="r")
    return run


def _remove(run: Path) -> None:
    for suffix in (".keys.npy", ".values.npy"):
        Path(f"{run}{suffix}").unlink(missing_ok=True)


def digest_keys(digests: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """sha256 hex digests -> their first and second 64 bits, as uint64 arrays."""
    raw = np.frombuffer(b"".join(bytes.fromhex(digest[:32]) for digest in digests), dtype=">u8").reshape(-1, 2)
    return raw[:, 0].astype(np.uint64), raw[:, 1].astype(np.uint64)


class ExactIndex:
    """The sha256 digests kept so far, by their first 128 bits (a false match is a 2^-128 event)."""

    def __init__(self, spill_dir: Path | None = None) -> None:
        self.runs = SortedRuns(spill_dir)

    def __len__(self) -> int:
        return len(self.runs)

    def add(self, digests: list[str]) -> None:
        if digests:
            self.add_keys(*digest_keys(digests))

    def add_keys(self, high: np.ndarray, low: np.ndarray) -> None:
        """Digests as `digest_keys` gives them."""
        self.runs.add(high, low)

    def contains(self, digests: list[str]) -> np.ndarray:
        """For each digest, whether it was added before."""
        return self.contains_keys(*digest_keys(digests)) if digests else np.zeros(0, bool)

    def contains_keys(self, high: np.ndarray, low: np.ndarray) -> np.ndarray:
        found = np.zeros(len(high), bool)
        if len(high) and len(self.runs):
            owners, stored_low = self.runs.matches(high)
            found[owners[stored_low == low[owners]]] = True
        return found
