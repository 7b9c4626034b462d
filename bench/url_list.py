"""What the download stage's driver costs to turn a long URL list into batches, as the list grows.

For each list size N (default 1M and 4M rows, 4x apart, in parts of 1M rows) the benchmark writes a synthetic URL list (Parquet,
in part files as LAION ships it) and a download folder whose one finished batch attempted the first
`--attempted` of it, then, each in a fresh child process, plans the batches of the new rows without
downloading them:

- `streamed` (the stage): the list checked whole, a block at a time (`url_list.check`), then read again a block
  at a time into batches of new URLs (`download.run.new_batches`), against the index of what was attempted;
- `whole` (the baseline, how the stage read a list before): every file read whole into one table, then its new
  rows found at once.

    python bench/url_list.py --rows 1000000 4000000 --out bench/results/url-list.json

Prints one JSON object: per mode and size the seconds, rows a second, the child's peak RSS (the process is the
whole tree: no Ray here) and its peak anonymous memory (RSS less the index files it maps), and per mode the
ratios of the largest size to the smallest.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import source_tree  # noqa: E402,F401  (dalle_pipeline without an install)
from child_memory import AnonymousPeak, growth, peak_rss_mb

MODES = ("whole", "streamed")
PART_ROWS = 1_000_000  # rows a part file of the list holds, as LAION's parts do (about 1M rows each)


def write_list(folder: Path, rows: int) -> Path:
    """A list of `rows` distinct URLs with captions, in part files; cached by size."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    target = folder / f"list-{rows}"
    if (target / "_SUCCESS").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, rows, PART_ROWS)):
        numbers = pa.array(range(start, min(rows, start + PART_ROWS)), pa.int64()).cast(pa.string())
        urls = pc.binary_join_element_wise("https://img", pc.utf8_slice_codeunits(numbers, -2), ".example.com/photos/",
                                           numbers, "/large.jpg", "")
        captions = pc.binary_join_element_wise("a photograph of thing number ", numbers, " on a table", "")
        pq.write_table(pa.table({"URL": urls, "TEXT": captions}), target / f"part-{part:05d}.parquet")
    (target / "_SUCCESS").write_text("")
    return target


def attempted_folder(folder: Path, url_list: Path, fraction: float) -> Path:
    """A download folder whose one finished batch attempted the list's first `fraction` of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dalle_pipeline.components.download.run import BATCH_PREFIX, SUCCESS_MARKER

    target = folder / f"download-{url_list.name}-{fraction}"
    batch = target / f"{BATCH_PREFIX}00000"
    if (batch / SUCCESS_MARKER).is_file():
        return target
    batch.mkdir(parents=True, exist_ok=True)
    total = sum(pq.read_metadata(path).num_rows for path in url_list.glob("part-*.parquet"))
    wanted, shard = int(total * fraction), 0
    for path in sorted(url_list.glob("part-*.parquet")):
        for block in pq.ParquetFile(path).iter_batches(batch_size=100_000, columns=["URL"]):
            if wanted <= 0:
                break
            urls = block.column(0).slice(0, wanted)
            pq.write_table(pa.table({"url": urls}), batch / f"{shard:05d}.parquet")
            shard, wanted = shard + 1, wanted - len(urls)
    (batch / SUCCESS_MARKER).write_text(json.dumps({"settings": {}, "urls": int(total * fraction)}))
    return target


def plan(mode: str, url_list: Path, out_dir: Path, batch_urls: int) -> dict:
    """In the child: the batches of new rows, by `mode`; what it took."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dalle_pipeline.components.download import url_list as url_lists
    from dalle_pipeline.components.download.run import attempted_index, finished_batches, new_batches

    sampler = AnonymousPeak()
    started = time.perf_counter()
    batches, new_rows = 0, 0
    with attempted_index(out_dir, finished_batches(out_dir)) as attempted:
        indexed = time.perf_counter() - started
        if mode == "streamed":
            url_lists.check(url_list)
            planned = new_batches(url_lists.read_blocks(url_list), "url", attempted, batch_urls)
        else:
            table = pa.concat_tables([pq.read_table(path) for path in url_lists.list_files(url_list)])
            table = table.rename_columns(["url", "caption"])
            new = whole_unattempted(table, attempted)
            planned = (new.slice(start, batch_urls) for start in range(0, new.num_rows, batch_urls))
        for rows in planned:
            batches, new_rows = batches + 1, new_rows + rows.num_rows
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "index_seconds": indexed, "batches": batches, "new_rows": new_rows,
            "peak_rss_mb": peak_rss_mb(), "peak_anonymous_mb": sampler.stop()}


def whole_unattempted(table, attempted):
    """The baseline's new rows: the stage's code before lists were read in blocks (each URL's first row, then
    the attempted index asked 64k URLs at a time)."""
    import numpy as np
    import pyarrow as pa

    from dalle_pipeline.components.download.run import ID_BLOCK, id_digests

    numbered = table.append_column("__row", pa.array(np.arange(table.num_rows)))
    first_rows = numbered.group_by("url", use_threads=False).aggregate([("__row", "min")]).column("__row_min")
    if len(first_rows) < table.num_rows:
        table = table.take(np.sort(first_rows.to_numpy()))
    urls = table.column("url")
    seen = np.concatenate([attempted.contains(id_digests(urls.slice(start, ID_BLOCK).to_pylist()))
                           for start in range(0, len(urls), ID_BLOCK)])
    return table.filter(pa.array(~seen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--attempted", type=float, default=0.5, help="fraction of the list an earlier batch attempted")
    parser.add_argument("--batch-urls", type=int, default=1_000_000)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dalle-bench-url-list")
    parser.add_argument("--out")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "LIST", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, url_list, out_dir = args.child
        print(json.dumps(plan(mode, Path(url_list), Path(out_dir), args.batch_urls)))
        return

    from common import device_name, emit

    runs: dict[str, dict[int, dict]] = {mode: {} for mode in args.modes}
    for rows in args.rows:
        url_list = write_list(args.work, rows)
        out_dir = attempted_folder(args.work, url_list, args.attempted)
        for mode in args.modes:
            done = subprocess.run([sys.executable, __file__, "--batch-urls", str(args.batch_urls), "--child", mode,
                                   str(url_list), str(out_dir)], capture_output=True, text=True, check=True)
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            measured["rows_per_s"] = rows / measured["seconds"]
            runs[mode][rows] = measured
            print(f"{mode} {rows}: {measured}", file=sys.stderr)
    emit({"benchmark": "url_list", "cpu": device_name(__import__("torch").device("cpu")),
          "machine": platform.machine(), "attempted_fraction": args.attempted, "batch_urls": args.batch_urls,
          "runs": {mode: {str(rows): run for rows, run in by_size.items()} for mode, by_size in runs.items()},
          "ratios_largest_to_smallest": growth(runs, "rows")}, args.out)


if __name__ == "__main__":
    main()
