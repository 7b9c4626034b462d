"""Near-duplicate and exact-duplicate search as the filter runs it, as the corpus grows (#29).

Random 64-bit pHashes and sha256 digests, a share of them planted near copies (1-3 bits flipped)
and exact copies, go shard by shard through `filter.dedup.ShardDeduplicator` (the filter's own
path) at N, 4N and 16N; the same hashes through the per-item band index the filter used before
(a Python dict of lists per band, every query scanning its bands' lists) at the smaller sizes as
the baseline, with its verdicts checked equal. Reports seconds, items/s and the process's peak RSS.

At each size the index is timed with every band count of `--bands` (auto: the filter's own choice for
that many items), their verdicts checked equal.

    python bench/near_duplicates.py --sizes 62500 250000 1000000 --baseline-sizes 62500 250000
    python bench/near_duplicates.py --sizes 250000 --baseline-sizes --bands 5 3 --query-cost 1000000 4000000 16000000
    python bench/near_duplicates.py --sizes 1000000 --baseline-sizes --bands 3 --threads 1 auto --query-cost 16000000
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from common import device_name, emit

import torch  # noqa: F401  (device_name's import path; nothing runs on it)
from dalle_pipeline.components.filter.dedup import (NearDuplicateIndex, ShardDeduplicator, band_threads, choose_bands,
                                                    probes_per_query)
from dalle_pipeline.components import sorted_runs
from dalle_pipeline.components.sorted_runs import ExactIndex


def corpus(size: int, seed: int, near_share: float = 0.02, exact_share: float = 0.01) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size, dtype=np.uint64)
    sources = rng.integers(0, size, size)
    near = rng.random(size) < near_share
    flips = np.zeros(size, np.uint64)
    for _ in range(3):
        flips ^= np.uint64(1) << rng.integers(0, 64, size).astype(np.uint64)
    hashes[near] = hashes[sources[near]] ^ flips[near]
    exact = (rng.random(size) < exact_share) & ~near
    hashes[exact] = hashes[sources[exact]]
    digests = [hashlib.sha256(int(value).to_bytes(8, "big")).hexdigest() for value in hashes]
    return digests, [int(value) for value in hashes]


def ours(digests: list[str], hashes: list[int], max_distance: int, shard: int,
         bands: int | None = None, growth: int | None = None) -> list[str | None]:
    """The filter's path: its indexes spilled to files past 64k entries, runs merged by `growth`."""
    with tempfile.TemporaryDirectory(prefix="near-duplicates-") as spill, _growth(growth):
        return _ours(digests, hashes, max_distance, shard, bands, Path(spill))


@contextlib.contextmanager
def _growth(growth: int | None):
    saved = sorted_runs.GROWTH
    sorted_runs.GROWTH = saved if growth is None else growth
    try:
        yield
    finally:
        sorted_runs.GROWTH = saved


def _ours(digests: list[str], hashes: list[int], max_distance: int, shard: int, bands: int | None,
          spill: Path) -> list[str | None]:
    exact = ExactIndex(spill / "exact")
    near, verdicts = NearDuplicateIndex(max_distance, len(hashes), bands, spill_dir=spill / "near"), []
    for start in range(0, len(hashes), shard):
        shard_digests, shard_hashes = digests[start : start + shard], hashes[start : start + shard]
        dedup = ShardDeduplicator(exact, near, shard_digests, shard_hashes)
        for position, (digest, phash) in enumerate(zip(shard_digests, shard_hashes)):
            verdicts.append(dedup.verdict(position, digest, phash))
            if verdicts[-1] is None:
                dedup.keep(digest, phash)
        dedup.finish()
    return verdicts


def before(digests: list[str], hashes: list[int], max_distance: int) -> list[str | None]:
    """The filter's index before #29: a set of digests, and per band a dict of lists scanned per query."""
    edges = np.linspace(0, 64, max_distance + 2).astype(int)
    bands = [(int(lo), int(hi - lo)) for lo, hi in zip(edges[:-1], edges[1:])]
    tables: list[dict[int, list[int]]] = [{} for _ in bands]
    seen: set[str] = set()
    verdicts = []
    for digest, phash in zip(digests, hashes):
        keys = [(phash >> shift) & ((1 << width) - 1) for shift, width in bands]
        if digest in seen:
            verdicts.append("duplicate")
        elif any((phash ^ other).bit_count() <= max_distance for table, key in zip(tables, keys)
                 for other in table.get(key, ())):
            verdicts.append("near_duplicate")
        else:
            verdicts.append(None)
            seen.add(digest)
            for table, key in zip(tables, keys):
                table.setdefault(key, []).append(phash)
    return verdicts


def query_cost(index_sizes: list[int], band_counts: list[int], max_distance: int, shard: int,
               thread_counts: list[int | None], queries: int = 20_000) -> list[dict]:
    """Microseconds a query against an index already holding N random hashes (added in large batches),
    for each band count: the probe and candidate costs `choose_bands` weighs, isolated from the rest;
    with each of `thread_counts` searching the band tables (None: the index's own choice)."""
    rows = []
    for size in index_sizes:
        rng = np.random.default_rng(size)
        stored = rng.integers(0, 2**64, size, dtype=np.uint64)
        asked = rng.integers(0, 2**64, queries, dtype=np.uint64)
        row: dict = {"index_items": size, "queries": queries, "chosen_bands": choose_bands(max_distance, size)}
        for bands in band_counts:
            index = NearDuplicateIndex(max_distance, bands=bands)
            for start in range(0, size, 1 << 20):
                index.add(stored[start : start + (1 << 20)])
            answers = []
            for threads in thread_counts:
                index.threads = band_threads(bands, threads)
                started = time.perf_counter()
                answers.append(np.concatenate([index.contains_near(asked[start : start + shard])
                                               for start in range(0, queries, shard)]))
                row[f"us_per_query_{bands}_bands_{index.threads}_threads"] = \
                    (time.perf_counter() - started) / queries * 1e6
            row[f"threads_agree_{bands}_bands"] = all(np.array_equal(answer, answers[0]) for answer in answers)
            del index
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[62_500, 250_000, 1_000_000])
    parser.add_argument("--baseline-sizes", nargs="*", type=int, default=[62_500, 250_000])
    parser.add_argument("--max-distance", type=int, default=4, help="the filter's near_duplicate_distance")
    parser.add_argument("--shard", type=int, default=1000, help="samples per shard")
    parser.add_argument("--bands", nargs="*", default=["auto"],
                        help="band counts to time at each size (auto: the filter's choice for that size, "
                             "choose_bands); the verdicts of every layout are checked equal")
    parser.add_argument("--query-cost", nargs="*", type=int, default=[],
                        help="also time queries alone against indexes of these sizes, for each of --bands")
    parser.add_argument("--threads", nargs="*", default=["auto"],
                        help="threads searching the band tables in --query-cost (auto: the index's choice, "
                             "as many as bands and cores allow)")
    parser.add_argument("--growth", nargs="*", type=int, default=[],
                        help="also time the filter's path with the index's runs merged by each of these growths "
                             "(sorted_runs.GROWTH; 1 is a binary counter), verdicts checked equal")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    runs = []
    for size in sorted(set(args.sizes) | set(args.baseline_sizes)):
        digests, hashes = corpus(size, seed=size)
        row: dict = {"items": size}
        if size in args.sizes:
            layouts, verdicts = {}, None
            for bands in args.bands:
                count = choose_bands(args.max_distance, size) if bands == "auto" else int(bands)
                started = time.perf_counter()
                layout_verdicts = ours(digests, hashes, args.max_distance, args.shard, count)
                layouts[str(bands)] = {"bands": count, "probes_per_query": probes_per_query(args.max_distance, count),
                                       "seconds": time.perf_counter() - started}
                if verdicts is None:
                    verdicts = layout_verdicts
                else:
                    row["layouts_agree"] = row.get("layouts_agree", True) and layout_verdicts == verdicts
            for growth in args.growth:  # the first layout ran with the default growth
                started = time.perf_counter()
                same = growth == sorted_runs.GROWTH or ours(digests, hashes, args.max_distance, args.shard,
                                                            layouts[str(args.bands[0])]["bands"], growth) == verdicts
                row.setdefault("growth_seconds", {})[str(growth)] = layouts[str(args.bands[0])]["seconds"] \
                    if growth == sorted_runs.GROWTH else time.perf_counter() - started
                row["growths_agree"] = row.get("growths_agree", True) and same
            first = layouts[str(args.bands[0])]
            row["bands"], row["seconds"] = first["bands"], first["seconds"]
            row["items_per_s"] = size / row["seconds"]
            row["layouts"] = layouts
            row["dropped"] = {reason: verdicts.count(reason) for reason in ("duplicate", "near_duplicate")}
        if size in args.baseline_sizes:
            started = time.perf_counter()
            reference = before(digests, hashes, args.max_distance)
            row["baseline_seconds"] = time.perf_counter() - started
            row["baseline_items_per_s"] = size / row["baseline_seconds"]
            if size in args.sizes:
                row["same_verdicts"] = reference == verdicts
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(row, flush=True)
        runs.append(row)
    timed = [row for row in runs if "seconds" in row]
    growth = {"items": timed[-1]["items"] / timed[0]["items"],
              "seconds": timed[-1]["seconds"] / timed[0]["seconds"]} if len(timed) > 1 else {}
    costs = query_cost(args.query_cost, [choose_bands(args.max_distance, 0) if b == "auto" else int(b)
                                         for b in args.bands], args.max_distance, args.shard,
                       [None if t == "auto" else int(t) for t in args.threads]) if args.query_cost else []
    return emit({"bench": "near_duplicates", "settings": vars(args), "device": device_name(torch.device("cpu")),
                 "runs": runs, "growth": growth, "query_cost": costs}, args.out)


if __name__ == "__main__":
    main()
