"""What the filter kept so far, as sorted numpy runs: exact duplicates by sha256, near duplicates by pHash.

Both indexes take a shard's kept samples at once (`add`) and answer a shard's candidates at once
(`contains`, `contains_near`), in numpy, so the filter's cost grows as N log N with the corpus
rather than with N per item in Python. Each keeps its entries as sorted runs merged in levels
(`sorted_runs.SortedRuns`): adding k entries costs O(k log N) amortised, and a lookup searches each of
the O(log N) runs. Entries are 16 bytes per kept sample for the digests and 16 per band for
the hashes, in arrays, never a Python object per sample; given a spill folder (the filter gives one),
runs past 64k entries live in files there, so the process holds about the same memory at any N.

Near duplicates: 64-bit pHashes within `max_distance` bits (d), by multi-index hashing. Pigeonhole:
split the bits into m bands; two hashes that differ in at most d bits differ in at most d // m bits
on at least one band, so a query probes each band's table with its band value and every value within
d // m bits of it, and only the stored hashes found there are compared (by popcount of their XOR).
Every pair within the distance is found, as by comparing all of them. With m = d + 1 (exact bands,
one probe each) a query meets about N / 2^(64 / m) stored hashes per band: 7e4 at 100M items and
d = 4, so the search grows as N^2. Fewer, wider bands cost more probes (3 bands of 21 bits probed
with their 22 one-bit neighbours) and meet 2^8 times fewer stored hashes: `choose_bands` picks m by
the number of items the index will hold, so the candidates a query meets stay few as N grows (what
grows then is the probes' binary searches, in cache misses: bench/RESULTS.md).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from math import comb
from pathlib import Path

import numpy as np

from ..sorted_runs import ExactIndex, SortedRuns


# the relative cost of one probe (a key searched in every sorted run: cache misses in a large index) and of
# one candidate met there (its full hash gathered and XOR-popcounted), fitted to `bench/near_duplicates.py
# --query-cost` (bench/RESULTS.md): 5 exact bands are quicker up to about 14M hashes at distance 4, 3 past it
PROBE_COST, CANDIDATE_COST = 150.0, 1.0
MAX_PROBES = 1024  # a band layout probing more keys than this per query is never chosen


def band_layout(max_distance: int, bands: int) -> tuple[list[tuple[int, int]], int]:
    """`bands` bands over the 64 bits, as (shift, width), and the radius each is probed within: two hashes
    within `max_distance` bits differ in at most max_distance // bands bits on at least one band."""
    edges = np.linspace(0, 64, bands + 1).astype(int)
    return [(int(lo), int(hi - lo)) for lo, hi in zip(edges[:-1], edges[1:])], max_distance // bands


def neighbour_masks(width: int, radius: int) -> np.ndarray:
    """Every `width`-bit mask with at most `radius` bits set (0 first): XORed into a band's value, the
    values within `radius` bits of it."""
    masks = [0]
    for count in range(1, radius + 1):
        masks += [sum(1 << bit for bit in bits) for bits in combinations(range(width), count)]
    return np.array(masks, np.uint64)


def _band_probes(width: int, radius: int) -> int:
    """How many values lie within `radius` bits of a `width`-bit value (itself included)."""
    return sum(comb(width, k) for k in range(radius + 1))


def probes_per_query(max_distance: int, bands: int) -> int:
    layout, radius = band_layout(max_distance, bands)
    return sum(_band_probes(width, radius) for _, width in layout)


def choose_bands(max_distance: int, expected_items: int) -> int:
    """The band count whose expected cost per query is least for an index of `expected_items` hashes:
    each probe costs PROBE_COST, each stored hash sharing a probed band value CANDIDATE_COST (a uniform
    hash meets items / 2^width of them per probe). Few items: max_distance + 1 exact bands (one probe
    each); many: fewer, wider bands probed with their near values, so the candidates stay few."""
    def cost(bands: int) -> float:
        layout, radius = band_layout(max_distance, bands)
        return sum(_band_probes(width, radius) * (PROBE_COST + CANDIDATE_COST * expected_items / 2**width)
                   for _, width in layout)

    layouts = [bands for bands in range(1, max_distance + 2) if probes_per_query(max_distance, bands) <= MAX_PROBES]
    return min(layouts, key=lambda bands: (cost(bands), -bands))


def band_threads(bands: int, threads: int | None = None) -> int:
    """Threads searching the band tables side by side (numpy's sorts and binary searches let go of the GIL): as
    many as `threads` (None: the cores) and bands allow."""
    return max(1, min(bands, threads or os.cpu_count() or 1))


class NearDuplicateIndex:
    """64-bit pHashes kept so far; which queries lie within `max_distance` bits of one of them.

    The hashes are split into `bands` bands (by default as many as suit `expected_items`:
    `choose_bands`); each band's table keys every stored hash by its value on that band, and a query
    probes each table with its band value and every value within `radius` bits of it, then keeps the
    stored hashes truly within `max_distance` (the answer is the same for any band count)."""

    def __init__(self, max_distance: int, expected_items: int = 0, bands: int | None = None,
                 spill_dir: Path | None = None, threads: int | None = None) -> None:
        if not 0 <= max_distance < 64:
            raise ValueError(f"near_duplicate_distance must be in [0, 63], not {max_distance}")
        self.max_distance = max_distance
        self.band_count = bands or choose_bands(max_distance, expected_items)
        self.bands, self.radius = band_layout(max_distance, self.band_count)
        self.masks = [neighbour_masks(width, self.radius) for _, width in self.bands]
        self.tables = [SortedRuns(spill_dir / f"band-{number}" if spill_dir else None)
                       for number in range(len(self.bands))]
        self.threads = band_threads(self.band_count, threads)

    def __len__(self) -> int:
        return len(self.tables[0])

    def _band(self, hashes: np.ndarray, band: tuple[int, int]) -> np.ndarray:
        shift, width = band
        return (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)

    def add(self, hashes: np.ndarray | list[int]) -> None:
        hashes = np.asarray(hashes, np.uint64)
        self._each_band(lambda number: self.tables[number].add(self._band(hashes, self.bands[number]), hashes))

    def contains_near(self, hashes: np.ndarray | list[int]) -> np.ndarray:
        """For each hash, whether an added one lies within `max_distance` bits of it."""
        hashes = np.asarray(hashes, np.uint64)

        def near_on_band(number: int) -> np.ndarray:
            masks = self.masks[number]
            probes = (self._band(hashes, self.bands[number])[:, None] ^ masks[None, :]).ravel()  # query-major
            owners, stored = self.tables[number].matches(probes)
            owners = owners // len(masks)
            close = np.bitwise_count(hashes[owners] ^ stored) <= self.max_distance
            return np.unique(owners[close])

        near = np.zeros(len(hashes), bool)
        for owners in self._each_band(near_on_band):
            near[owners] = True
        return near

    def _each_band(self, call):
        """`call(band number)` for every band, on `threads` threads; the results in band order."""
        if self.threads == 1:
            return [call(number) for number in range(len(self.bands))]
        with ThreadPoolExecutor(self.threads, thread_name_prefix="near-duplicate-band") as pool:
            return list(pool.map(call, range(len(self.bands))))


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
