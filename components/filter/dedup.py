"""What the filter kept so far, as sorted numpy runs: exact duplicates by sha256, near duplicates by pHash.

Both indexes take a shard's kept samples at once (`add`) and answer a shard's candidates at once
(`contains`, `contains_near`), in numpy, so the filter's cost grows as N log N with the corpus
rather than with N per item in Python. Each keeps its entries as sorted runs merged like a binary
counter (`SortedRuns`): adding k entries costs O(k log N) amortised, and a lookup searches each of
the at most log2(N) runs. Entries are 16 bytes per kept sample for the digests and 16 per band for
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

from itertools import combinations
from math import comb
from pathlib import Path

import numpy as np


Run = tuple[np.ndarray, np.ndarray]  # (keys sorted, values), in memory
SPILL_ENTRIES = 1 << 16  # a run longer than this goes to a file (1 MiB of keys and values)
MERGE_CHUNK = 1 << 16  # entries of each run in memory at once while two files merge


class SortedRuns:
    """uint64 keys with a uint64 value each, as sorted runs; `matches` finds every entry of a key.

    Runs merge like a binary counter (at most log2(N) of them). Given `spill_dir`, a run longer than
    `spill_entries` lives in two .npy files there, merged file to file `merge_chunk` entries at a time and
    mapped only while a lookup reads it: the process holds a bounded amount however many entries the index
    has (the pages a lookup touched stay in the kernel's page cache, reclaimable, not in the process)."""

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
        while self.runs and self.lengths[-1] <= length:  # merge equal-sized runs: log2(N) of them
            run, length = self._merge(self.runs.pop(), run), self.lengths.pop() + length
        if self.spill_dir is not None and length > self.spill_entries and not isinstance(run, Path):
            run = self._write(*run)
        self.runs.append(run)
        self.lengths.append(length)

    def matches(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query index, stored value) for every stored entry whose key equals a query's."""
        query_index, found = [], []
        order = np.argsort(keys, kind="stable")  # searched in key order: each search starts near the last
        keys = keys[order]
        for run in self.runs:
            stored_keys, stored_values = _read(run)
            left = np.searchsorted(stored_keys, keys, side="left")
            counts = np.searchsorted(stored_keys, keys, side="right") - left
            total = int(counts.sum())
            if not total:
                continue
            owners = np.repeat(order, counts)
            # positions left[q], left[q] + 1, ... for each query q, without a Python loop
            starts = np.repeat(left - np.cumsum(counts) + counts, counts)
            positions = starts + np.arange(total)
            query_index.append(owners)
            found.append(np.asarray(stored_values[positions]))
        if not query_index:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64)
        return np.concatenate(query_index), np.concatenate(found)

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
            self.runs.add(*digest_keys(digests))

    def contains(self, digests: list[str]) -> np.ndarray:
        """For each digest, whether it was added before."""
        found = np.zeros(len(digests), bool)
        if digests and len(self.runs):
            high, low = digest_keys(digests)
            owners, stored_low = self.runs.matches(high)
            found[owners[stored_low == low[owners]]] = True
        return found


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


class NearDuplicateIndex:
    """64-bit pHashes kept so far; which queries lie within `max_distance` bits of one of them.

    The hashes are split into `bands` bands (by default as many as suit `expected_items`:
    `choose_bands`); each band's table keys every stored hash by its value on that band, and a query
    probes each table with its band value and every value within `radius` bits of it, then keeps the
    stored hashes truly within `max_distance` (the answer is the same for any band count)."""

    def __init__(self, max_distance: int, expected_items: int = 0, bands: int | None = None,
                 spill_dir: Path | None = None) -> None:
        if not 0 <= max_distance < 64:
            raise ValueError(f"near_duplicate_distance must be in [0, 63], not {max_distance}")
        self.max_distance = max_distance
        self.band_count = bands or choose_bands(max_distance, expected_items)
        self.bands, self.radius = band_layout(max_distance, self.band_count)
        self.masks = [neighbour_masks(width, self.radius) for _, width in self.bands]
        self.tables = [SortedRuns(spill_dir / f"band-{number}" if spill_dir else None)
                       for number in range(len(self.bands))]

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
        for table, band, masks in zip(self.tables, self.bands, self.masks):
            probes = (self._band(hashes, band)[:, None] ^ masks[None, :]).ravel()  # query-major
            owners, stored = table.matches(probes)
            owners = owners // len(masks)
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
