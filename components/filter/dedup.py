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

Either index may hold one share of the whole (`share`: partition p of P): the band entries and digests
whose key `partition_of` names p, and a lookup answers for the probes and digests of that share alone.
P such partitions, each an actor on its own node (`partitioned.py`), answer together what one index
holding everything answers: equal keys always fall in the same partition.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from math import comb
from pathlib import Path

import numpy as np

from ..sorted_runs import ExactIndex, SortedRuns, digest_keys


# the relative cost of one probe (a key searched in every sorted run: cache misses in a large index) and of
# one candidate met there (its full hash gathered and XOR-popcounted), fitted to the filter's path with 16k rows
# a lookup (`bench/near_duplicates.py --bands 5 3`, bench/RESULTS.md): 5 exact bands 9.2 s and 3 bands 10.9 s
# over 1M hashes at distance 4, 112.6 s and 59.1 s over 4M; 20 puts the change at 1.8M (150 fitted a lookup a
# shard of 1000 rows, whose fixed costs weighed on every probe: 14M)
PROBE_COST, CANDIDATE_COST = 20.0, 1.0
MAX_PROBES = 1024  # a band layout probing more keys than this per query is never chosen
WHOLE = (0, 1)  # an index's share of the keys: partition 0 of 1, all of them
SHARD_BANDS_MAX = 8  # a shard's own pairs are found by exact bands of at least 8 bits (distance 7), else all compared
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: a band's value (not uniform in its low bits) mixed


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """The partition (0 .. partitions - 1) each uint64 key belongs to."""
    return (np.asarray(keys, np.uint64) * _MIX >> np.uint64(32)) % np.uint64(partitions)


def _mine(keys: np.ndarray, share: tuple[int, int]) -> np.ndarray | slice:
    """Which of `keys` fall in `share`: a mask, or every one for the whole."""
    part, partitions = share
    return slice(None) if partitions == 1 else partition_of(keys, partitions) == np.uint64(part)


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
                 spill_dir: Path | None = None, threads: int | None = None, share: tuple[int, int] = WHOLE) -> None:
        if not 0 <= max_distance < 64:
            raise ValueError(f"near_duplicate_distance must be in [0, 63], not {max_distance}")
        self.max_distance = max_distance
        self.band_count = bands or choose_bands(max_distance, expected_items)
        self.bands, self.radius = band_layout(max_distance, self.band_count)
        self.masks = [neighbour_masks(width, self.radius) for _, width in self.bands]
        self.tables = [SortedRuns(spill_dir / f"band-{number}" if spill_dir else None)
                       for number in range(len(self.bands))]
        self.threads = band_threads(self.band_count, threads)
        self.share = share
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        """The hashes added (of a partition: the entries of its first band's share)."""
        return len(self.tables[0])

    def _band(self, hashes: np.ndarray, band: tuple[int, int]) -> np.ndarray:
        shift, width = band
        return (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)

    def add(self, hashes: np.ndarray | list[int]) -> None:
        hashes = np.asarray(hashes, np.uint64)

        def add_to_band(number: int) -> None:
            keys = self._band(hashes, self.bands[number])
            mine = _mine(keys, self.share)
            self.tables[number].add(keys[mine], hashes[mine])

        self._each_band(add_to_band)

    def contains_near(self, hashes: np.ndarray | list[int]) -> np.ndarray:
        """For each hash, whether an added one lies within `max_distance` bits of it."""
        hashes = np.asarray(hashes, np.uint64)

        def near_on_band(number: int) -> np.ndarray:
            masks = self.masks[number]
            probes = (self._band(hashes, self.bands[number])[:, None] ^ masks[None, :]).ravel()  # query-major
            asking = np.arange(len(probes)) // len(masks)  # the query each probe is for
            mine = _mine(probes, self.share)
            asking, near = asking[mine], []
            for found, stored in self.tables[number].matches_in_chunks(probes[mine]):  # bounded, however many met
                owners = asking[found]
                near.append(owners[np.bitwise_count(hashes[owners] ^ stored) <= self.max_distance])
            return np.unique(np.concatenate(near)) if near else np.zeros(0, np.int64)

        near = np.zeros(len(hashes), bool)
        for owners in self._each_band(near_on_band):
            near[owners] = True
        return near

    def _each_band(self, call):
        """`call(band number)` for every band, on `threads` threads; the results in band order. The threads
        last as long as the index: a pool made for each call gave each call new threads, whose malloc arenas
        kept what the band searches had freed (the filter's driver grew 40 MB over 160k samples; 0 with one
        arena, or threads kept)."""
        if self.threads == 1:
            return [call(number) for number in range(len(self.bands))]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="near-duplicate-band")
        return list(self._pool.map(call, range(len(self.bands))))

    def close(self) -> None:
        """End the band threads (a closed index still answers, on new ones)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class KeptIndex:
    """What the filter kept so far (or a partition's `share` of it): sha256 digests, by their first 128 bits
    as `high` and `low` uint64 keys, when `exact`; pHashes, when `max_distance` is set."""

    def __init__(self, exact: bool, max_distance: int | None, expected_items: int = 0, bands: int | None = None,
                 spill_dir: Path | None = None, share: tuple[int, int] = WHOLE) -> None:
        self.share = share
        self.exact = ExactIndex(spill_dir / "exact" if spill_dir else None) if exact else None
        self.near = None if max_distance is None else NearDuplicateIndex(
            max_distance, expected_items, bands, spill_dir / "near" if spill_dir else None, share=share)

    @property
    def exact_duplicates(self) -> bool:
        return self.exact is not None

    @property
    def max_distance(self) -> int | None:
        return None if self.near is None else self.near.max_distance

    def lookup(self, high: np.ndarray, low: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each digest, whether it was kept before; for each hash, whether a kept one lies within
        `max_distance` bits of it (a partition: only for the digests and probes of its share)."""
        seen, near = np.zeros(len(high), bool), np.zeros(len(hashes), bool)
        if self.exact is not None and len(high):
            mine = _mine(high, self.share)
            seen[mine] = self.exact.contains_keys(high[mine], low[mine])
        if self.near is not None and len(hashes):
            near = self.near.contains_near(hashes)
        return seen, near

    def add(self, high: np.ndarray, low: np.ndarray, hashes: np.ndarray) -> None:
        """Kept digests (as keys) and kept hashes, each list on its own (a sample may have no pHash)."""
        if self.exact is not None and len(high):
            mine = _mine(high, self.share)
            self.exact.add_keys(high[mine], low[mine])
        if self.near is not None and len(hashes):
            self.near.add(hashes)

    def nodes(self) -> dict[str, int]:
        """The Ray nodes holding a partition of this index: none, it is in this process."""
        return {}

    def close(self) -> None:
        """End the band threads; the runs' files are in the spill folder its caller gave and removes."""
        if self.near is not None:
            self.near.close()


def earlier_neighbours(hashes: np.ndarray, max_distance: int) -> dict[int, list[int]]:
    """For each position that has them, the earlier positions whose hash lies within `max_distance` bits of its
    own. Pigeonhole again: such a pair agrees on one of max_distance + 1 exact bands, so only the pairs sharing
    a band's value are compared (a shard of 1000 random hashes has about 70 a band at distance 4), not all."""
    if max_distance + 1 > SHARD_BANDS_MAX:  # bands too narrow to sort out anything: every pair, at once
        later, earlier = np.tril_indices(len(hashes), -1)
    else:
        laters, earliers = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for shift, width in band_layout(max_distance, max_distance + 1)[0]:
            keys = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            order = np.argsort(keys, kind="stable")  # equal keys stay in position order
            ordered, offset = keys[order], 1
            while offset < len(ordered):  # pairs `offset` apart in a run of equal keys, until no run is that long
                same = np.flatnonzero(ordered[offset:] == ordered[:-offset])
                if not len(same):
                    break
                laters.append(order[same + offset])
                earliers.append(order[same])
                offset += 1
        later, earlier = np.concatenate(laters), np.concatenate(earliers)
    close = np.bitwise_count(hashes[later] ^ hashes[earlier]) <= max_distance
    neighbours: dict[int, list[int]] = {}
    for position, other in set(zip(later[close].tolist(), earlier[close].tolist())):
        neighbours.setdefault(position, []).append(other)
    return neighbours


def shard_verdicts(index: KeptIndex, digests: list[str], hashes: list[int | None]) -> list[str | None]:
    """One shard's candidates' verdicts, in order: `duplicate` (a sha256 kept before), `near_duplicate` (a pHash
    within `max_distance` bits of a kept one) or None (kept), against everything kept before the shard and
    what the shard itself keeps earlier (a sample only ever yields to one kept before it); the kept join the
    index. `index` is a `KeptIndex` or the cluster's partitions of one (`partitioned.PartitionedIndex`):
    anything with its `lookup`, `add`, `exact_duplicates` and `max_distance`.

    The index is asked once for the whole shard; the shard's own pairs within the distance are found at once
    (`earlier_neighbours`), so the loop in order is a few Python lookups a sample."""
    exact, max_distance = index.exact_duplicates, index.max_distance
    if max_distance is None:
        hashes = [None] * len(hashes)
    known = [position for position, phash in enumerate(hashes) if phash is not None]
    known_hashes = np.array([hashes[position] for position in known], np.uint64)
    seen_before, near_before = index.lookup(*digest_keys(digests if exact else []), known_hashes)
    seen_before = seen_before.tolist() if exact else [False] * len(digests)
    near_before = dict(zip(known, near_before.tolist()))
    neighbours = _earlier_neighbours_of(known, known_hashes, max_distance) if known else {}
    verdicts: list[str | None] = []
    kept, kept_digests = [False] * len(digests), set()
    for position, digest in enumerate(digests):
        if exact and (seen_before[position] or digest in kept_digests):
            verdicts.append("duplicate")
        elif near_before.get(position) or any(kept[other] for other in neighbours.get(position, ())):
            verdicts.append("near_duplicate")
        else:
            verdicts.append(None)
            kept[position] = True
            kept_digests.add(digest)
    index.add(*digest_keys(sorted(kept_digests) if exact else []),
              np.array([hashes[position] for position in known if kept[position]], np.uint64))
    return verdicts


def _earlier_neighbours_of(positions: list[int], hashes: np.ndarray, max_distance: int) -> dict[int, list[int]]:
    """`earlier_neighbours` of the hashes at `positions`, searched among their distinct values: a repeat of a
    hash (a placeholder image a thousand times) yields to its first occurrence and to what that one yields to
    (it is never kept: its first occurrence is kept, or dropped for a kept sample the repeat is as near to), so
    a lookup's pairs stay few however often one image recurs."""
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    firsts = np.sort(first)  # the distinct hashes, in the order they first occur
    neighbours = {positions[firsts[later]]: [positions[firsts[earlier]] for earlier in earliers]
                  for later, earliers in earlier_neighbours(hashes[firsts], max_distance).items()}
    first_of = first[inverse.ravel()]
    for repeat in np.flatnonzero(first_of != np.arange(len(hashes))).tolist():
        original = positions[first_of[repeat]]
        neighbours[positions[repeat]] = [original, *neighbours.get(original, ())]
    return neighbours
