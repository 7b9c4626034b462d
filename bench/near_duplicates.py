"""Near-duplicate and exact-duplicate search as the filter runs it, as the corpus grows (#29).

Random 64-bit pHashes and sha256 digests, a share of them planted near copies (1-3 bits flipped)
and exact copies, go shard by shard through `filter.dedup.shard_verdicts` (the filter's own
path) at N, 4N and 16N; the same hashes through the per-item band index the filter used before
(a Python dict of lists per band, every query scanning its bands' lists) at the smaller sizes as
the baseline, with its verdicts checked equal. Reports seconds, items/s and the process's peak RSS.

At each size the index is timed with every band count of `--bands` (auto: the filter's own choice for
that many items), their verdicts checked equal.

    python bench/near_duplicates.py --sizes 62500 250000 1000000 --baseline-sizes 62500 250000
    python bench/near_duplicates.py --sizes 250000 --baseline-sizes --bands 5 3 --query-cost 1000000 4000000 16000000
    python bench/near_duplicates.py --sizes 1000000 --baseline-sizes --bands 3 --threads 1 auto --query-cost 16000000

With `--partitions`, the filter's path is also timed with its index split over that many Ray actors
(`filter.partitioned`, as on a cluster of that many nodes; here all on one local Ray), verdicts checked
equal: the wall time, and the CPU time of the driver (the serial part, bounding the search at any number
of nodes) and of the partitions (the part that divides over nodes).

    python bench/near_duplicates.py --sizes 250000 1000000 4000000 --baseline-sizes --also-shard 1000 --partitions 1 2 4
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from common import device_name, emit

import torch  # noqa: F401  (device_name's import path; nothing runs on it)
from dalle_pipeline.components.filter.dedup import (KeptIndex, NearDuplicateIndex, band_threads,
                                                    choose_bands, probes_per_query, shard_verdicts)
from dalle_pipeline.components import sorted_runs
from dalle_pipeline.components.filter.run import LOOKUP_ROWS


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
    return shard_by_shard(KeptIndex(True, max_distance, len(hashes), bands, spill), digests, hashes, shard)


def shard_by_shard(index, digests: list[str], hashes: list[int], shard: int) -> list[str | None]:
    return [verdict for start in range(0, len(hashes), shard)
            for verdict in shard_verdicts(index, digests[start : start + shard], hashes[start : start + shard])]


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
               thread_counts: list[int | None], partition_counts: list[int], queries: int = 20_000) -> list[dict]:
    """Microseconds a query against an index already holding N random hashes (added in large batches),
    for each band count: the probe and candidate costs `choose_bands` weighs, isolated from the rest;
    with each of `thread_counts` searching the band tables (None: the index's own choice); for each of
    `partition_counts` P > 1, of one partition's share of such an index (what one node of P does for
    every query, `filter.partitioned`)."""
    rows = []
    for size in index_sizes:
        for partitions in partition_counts:
            rng = np.random.default_rng(size)
            asked = rng.integers(0, 2**64, queries, dtype=np.uint64)
            row: dict = {"index_items": size, "partitions": partitions, "queries": queries,
                         "chosen_bands": choose_bands(max_distance, size)}
            for bands in band_counts:
                index = NearDuplicateIndex(max_distance, bands=bands, share=(0, partitions))
                for start in range(0, size, 1 << 20):  # the same hashes whatever the band count or share
                    index.add(np.random.default_rng([size, start]).integers(0, 2**64, min(1 << 20, size - start),
                                                                            dtype=np.uint64))
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


def partitioned(digests: list[str], hashes: list[int], max_distance: int, shard: int, partitions: int) -> dict:
    """The filter's path with its index split over `partitions` actors of the Ray session open here: seconds,
    the driver's CPU seconds, the partitions' CPU seconds (their processes', read before they end), verdicts."""
    import psutil

    from dalle_pipeline.components.filter.partitioned import PartitionedIndex

    index = PartitionedIndex(True, max_distance, len(hashes), partitions)
    try:
        index.nodes()  # the actors started before the clock does
        actors = [process for process in psutil.Process().children(recursive=True)
                  if "ray::IndexPartition" in " ".join(process.cmdline())]
        before_cpu = [sum(process.cpu_times()[:2]) for process in actors]
        started, driver_cpu = time.perf_counter(), time.process_time()
        verdicts = shard_by_shard(index, digests, hashes, shard)
        index.nodes()  # the last adds done
        seconds, driver_cpu = time.perf_counter() - started, time.process_time() - driver_cpu
        actor_cpu = sum(sum(process.cpu_times()[:2]) - cpu for process, cpu in zip(actors, before_cpu))
    finally:
        index.close()
    return {"partitions": partitions, "actors_seen": len(actors), "seconds": seconds, "driver_cpu_seconds": driver_cpu,
            "partitions_cpu_seconds": actor_cpu, "verdicts": verdicts}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[62_500, 250_000, 1_000_000])
    parser.add_argument("--baseline-sizes", nargs="*", type=int, default=[62_500, 250_000])
    parser.add_argument("--max-distance", type=int, default=4, help="the filter's near_duplicate_distance")
    parser.add_argument("--shard", type=int, default=LOOKUP_ROWS,
                        help="samples decided with one lookup (the filter's LOOKUP_ROWS: shards grouped)")
    parser.add_argument("--also-shard", nargs="*", type=int, default=[],
                        help="also time the first layout in this process with these samples a lookup, verdicts "
                             "checked equal (1000: one shard a lookup, as the filter did before grouping them)")
    parser.add_argument("--bands", nargs="*", default=["auto"],
                        help="band counts to time at each size (auto: the filter's choice for that size, "
                             "choose_bands); the verdicts of every layout are checked equal")
    parser.add_argument("--query-cost", nargs="*", type=int, default=[],
                        help="also time queries alone against indexes of these sizes, for each of --bands")
    parser.add_argument("--query-cost-partitions", nargs="*", type=int, default=[1],
                        help="--query-cost of one partition's share of the index split this many ways (1: whole)")
    parser.add_argument("--threads", nargs="*", default=["auto"],
                        help="threads searching the band tables in --query-cost (auto: the index's choice, "
                             "as many as bands and cores allow)")
    parser.add_argument("--growth", nargs="*", type=int, default=[],
                        help="also time the filter's path with the index's runs merged by each of these growths "
                             "(sorted_runs.GROWTH; 1 is a binary counter), verdicts checked equal")
    parser.add_argument("--partitions", nargs="*", type=int, default=[],
                        help="also time the filter's path with its index split over this many Ray actors")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.partitions:
        import ray

        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
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
            for shard in args.also_shard:
                started = time.perf_counter()
                same = ours(digests, hashes, args.max_distance, shard, layouts[str(args.bands[0])]["bands"]) == verdicts
                row.setdefault("shard_seconds", {})[str(shard)] = time.perf_counter() - started
                row["shards_agree"] = row.get("shards_agree", True) and same
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
            for count in args.partitions:
                split = partitioned(digests, hashes, args.max_distance, args.shard, count)
                split["same_verdicts"] = split.pop("verdicts") == verdicts
                split["us_per_item_driver_cpu"] = split["driver_cpu_seconds"] / size * 1e6
                split["us_per_item_partitions_cpu"] = split["partitions_cpu_seconds"] / size * 1e6
                row.setdefault("partitioned", []).append(split)
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
                       [None if t == "auto" else int(t) for t in args.threads],
                       args.query_cost_partitions) if args.query_cost else []
    return emit({"bench": "near_duplicates", "settings": vars(args), "device": device_name(torch.device("cpu")),
                 "runs": runs, "growth": growth, "query_cost": costs}, args.out)


if __name__ == "__main__":
    main()
