"""What a folder source's `captions.csv` costs ingest's driver, as the file grows (#29).

For each size N (default 250k and 4M rows, 16x apart) the benchmark writes a `captions.csv` of N rows
(`photo-<index>.jpg`, a caption of about 50 characters), then, each in a fresh child process, reads it and
looks up every name's caption, as the folder source does for each image:

- `arrays` (the source now): `sources.captions_file.read_captions_file`, the rows streamed into a sorted
  numpy array of names (StringDType) and an Arrow array of captions, found by binary search;
- `dict` (the baseline, how it was read before): the file decoded whole, a list of every row's dict
  (`csv.DictReader`), then a dict of name to caption.

    python bench/captions_file.py --rows 250000 4000000 --out bench/results/captions-file.json

Prints one JSON object: per mode and size the seconds (reading, and looking every name up), the child's
peak anonymous memory (RssAnon sampled) and VmHWM, and per mode the ratios of the largest size to the
smallest.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import source_tree  # noqa: F401  (dalle_pipeline without an install)
from child_memory import AnonymousPeak, child_result, emit_runs, peak_rss_mb

MODES = ("dict", "arrays")


def write_captions(work: Path, rows: int) -> Path:
    """A folder holding only a `captions.csv` of `rows` rows; cached by size."""
    target = work / f"captions-{rows}"
    if (target / "captions.csv").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    partial = target / ".captions.csv.partial"
    with partial.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["file_name", "caption"])
        for index in range(rows):
            writer.writerow([f"photo-{index:08d}.jpg", f"a photograph of thing number {index}, on a table"])
    partial.rename(target / "captions.csv")
    return target


def read_as_dict(root: Path) -> dict[str, str]:
    """The baseline: the file decoded whole, every row's dict, then a dict of them."""
    text = (root / "captions.csv").read_bytes().decode("utf-8", errors="replace")
    rows = list(csv.DictReader(io.StringIO(text)))
    return {str(row["file_name"]): str(row["caption"]) for row in rows if row.get("caption") is not None}


def measure(mode: str, root: Path, rows: int) -> dict:
    from dalle_pipeline.components.sources.captions_file import read_captions_file

    sampler = AnonymousPeak()
    started = time.perf_counter()
    if mode == "arrays":
        captions = read_captions_file(root, "caption")
        read = time.perf_counter() - started
        found = sum(captions.get(f"sub/photo-{index:08d}.jpg", f"photo-{index:08d}.jpg") is not None
                    for index in range(rows))
    else:
        captions = read_as_dict(root)
        read = time.perf_counter() - started
        found = sum(captions.get(f"sub/photo-{index:08d}.jpg", captions.get(f"photo-{index:08d}.jpg")) is not None
                    for index in range(rows))
    return {"seconds": time.perf_counter() - started, "read_seconds": read, "rows": rows, "found": found,
            "peak_anonymous_mb": sampler.stop(), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[250_000, 4_000_000])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dalle-bench-captions-file")
    parser.add_argument("--out")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "FOLDER", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]), int(args.child[2]))))
        return

    runs: dict[str, dict[int, dict]] = {mode: {} for mode in args.modes}
    for rows in args.rows:
        folder = write_captions(args.work, rows)
        for mode in args.modes:
            measured = child_result(__file__, mode, str(folder), str(rows))
            if measured["found"] != rows:
                raise SystemExit(f"{mode} at {rows}: {measured['found']} of {rows} captions found")
            runs[mode][rows] = measured
            print(f"{mode} {rows}: {measured}", file=sys.stderr)
    emit_runs("captions_file", runs, "rows", args.out)


if __name__ == "__main__":
    main()
