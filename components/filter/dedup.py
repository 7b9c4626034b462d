"""What the filter kept so far, as sorted numpy runs: exact duplicates by sha256, near duplicates by pHash.

Both indexes take a shard's kept samples at once (`add`) and answer a shard's candidates at once
(`contains`, `contains_near`), in numpy, so the filter's cost grows as N log N with the corpus
rather than with N per item in Python. Each keeps its entries as sorted runs merged like a binary
counter (`SortedRuns`): adding k entries costs O(k log N) amortised, and a lookup searches each of
the at most log2(N) runs. Memory is 16 bytes per kept sample for the digests and 16 per band for
the hashes, in arrays, never a Python object per sample.

Near duplicates: 64-bit pHashes within `max_distance` bits. Pigeonhole: split the bits into
max_distance + 1 bands; two hashes that differ in at most max_distance bits agree exactly on at
least one band, so only hashes sharing a band's value are compared (by popcount of their XOR).
Every pair within the distance is found, as by comparing all of them.
"""

from __future__ import annotations

import numpy as np


class SortedRuns:
    """uint64 keys with a uint64 value each, as sorted runs; `ranges` finds every entry of a key."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (keys sorted, values), largest first

    def __len__(self) -> int:
        return sum(len(keys) for keys, _ in self.runs)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        run = (np.asarray(keys, np.uint64)[order], np.asarray(values, np.uint64)[order])
        while self.runs and len(self.runs[-1][0]) <= len(run[0]):  # merge equal-sized runs: log2(N) of them
            keys_before, values_before = self.runs.pop()
            merged_keys = np.concatenate([keys_before, run[0]])
            order = np.argsort(merged_keys, kind="stable")
            run = (merged_keys[order], np.concatenate([values_before, run[1]])[order])
        self.runs.append(run)

    def matches(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query index, stored value) for every stored entry whose key equals a query's."""
        query_index, found = [], []
        for stored_keys, stored_values in self.runs:
            left = np.searchsorted(stored_keys, keys, side="left")
            counts = np.searchsorted(stored_keys, keys, side="right") - left
            total = int(counts.sum())
            if not total:
                continue
            owners = np.repeat(np.arange(len(keys)), counts)
            # positions left[q], left[q] + 1, ... for each query q, without a Python loop
            starts = np.repeat(left - np.cumsum(counts) + counts, counts)
            positions = starts + np.arange(total)
            query_index.append(owners)
            found.append(stored_values[positions])
        if not query_index:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64)
        return np.concatenate(query_index), np.concatenate(found)


def digest_keys(digests: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """sha256 hex digests -> their first and second 64 bits, as uint64 arrays."""
    raw = np.frombuffer(b"".join(bytes.fromhex(digest[:32]) for digest in digests), dtype=">u8").reshape(-1, 2)
    return raw[:, 0].astype(np.uint64), raw[:, 1].astype(np.uint64)


class ExactIndex:
    """The sha256 digests kept so far, by their first 128 bits (a false match is a 2^-128 event)."""

    def __init__(self) -> None:
        self.runs = SortedRuns()

    def __len__(self) -> int:
        return len(self.runs)

    def add(self, digests: list[str]) -> None:
        if digests:
            self.runs.add(*digest_keys(digests))

    def contains(self, digests: list[str]) -> np.ndarray:
        """For each digest, whether it was added before."""
        found = np.zeros(len(digests), bool)
        if digests and len(self.runs):
            high, low = digest_keys(digests)
            owners, stored_low = self.runs.matches(high)
            found[owners[stored_low == low[owners]]] = True
        return found


class NearDuplicateIndex:
    """64-bit pHashes kept so far; which queries lie within `max_distance` bits of one of them."""

    def __init__(self, max_distance: int) -> None:
        self.max_distance = max_distance
        edges = np.linspace(0, 64, max_distance + 2).astype(int)
        self.bands = [(int(lo), int(hi - lo)) for lo, hi in zip(edges[:-1], edges[1:])]
        self.tables = [SortedRuns() for _ in self.bands]

    def __len__(self) -> int:
        return len(self.tables[0])

    def _band(self, hashes: np.ndarray, band: tuple[int, int]) -> np.ndarray:
        shift, width = band
        return (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)

    def add(self, hashes: np.ndarray | list[int]) -> None:
        hashes = np.asarray(hashes, np.uint64)
        for table, band in zip(self.tables, self.bands):
            table.add(self._band(hashes, band), hashes)

    def contains_near(self, hashes: np.ndarray | list[int]) -> np.ndarray:
        """For each hash, whether an added one lies within `max_distance` bits of it."""
        hashes = np.asarray(hashes, np.uint64)
        near = np.zeros(len(hashes), bool)
        for table, band in zip(self.tables, self.bands):
            owners, stored = table.matches(self._band(hashes, band))
            close = np.bitwise_count(hashes[owners] ^ stored) <= self.max_distance
            near[owners[close]] = True
        return near


class ShardDeduplicator:
    """One shard's verdicts against everything kept before it and, in order, against what the shard
    itself keeps (a sample only ever yields to one kept earlier)."""

    def __init__(self, exact: ExactIndex | None, near: NearDuplicateIndex | None, digests: list[str],
                 hashes: list[int | None]) -> None:
        self.exact, self.near = exact, near
        self.seen_before = exact.contains(digests) if exact is not None else np.zeros(len(digests), bool)
        known = [h for h in hashes if h is not None]
        near_before = near.contains_near(known) if near is not None and known else np.zeros(len(known), bool)
        self.near_before = dict(zip(known, near_before.tolist()))
        self.kept_digests: set[str] = set()
        self._kept_hashes, self._kept_count = np.zeros(len(hashes), np.uint64), 0

    def verdict(self, position: int, digest: str, phash: int | None) -> str | None:
        """`duplicate`, `near_duplicate` or None for the candidate at `position` of the shard's list."""
        if self.exact is not None and (self.seen_before[position] or digest in self.kept_digests):
            return "duplicate"
        if self.near is not None and phash is not None:
            if self.near_before[phash]:
                return "near_duplicate"
            kept = self._kept_hashes[: self._kept_count]
            if (np.bitwise_count(kept ^ np.uint64(phash)) <= self.near.max_distance).any():
                return "near_duplicate"
        return None

    def keep(self, digest: str, phash: int | None) -> None:
        self.kept_digests.add(digest)
        if phash is not None:
            self._kept_hashes[self._kept_count] = phash
            self._kept_count += 1

    def finish(self) -> None:
        """The shard's kept samples join the indexes."""
        if self.exact is not None:
            self.exact.add(sorted(self.kept_digests))
        if self.near is not None:
            self.near.add(self._kept_hashes[: self._kept_count])
