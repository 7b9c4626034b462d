"""What the ingest driver costs to list a folder source (images with sidecar captions), as the folder grows.

For each size N (default 40k and 160k images, 4x apart) the benchmark writes a flat folder of N tiny image
files, each with its `.txt` caption (one folder is the worst case: its names are held at once), then, each in
a fresh child process, goes through the source's items as ingest's driver does (ids, captions; the images
are read by Ray tasks, not here):

- `walked` (the source now): `sources.kinds.items`, a folder at a time, its names as Arrow strings;
- `sorted` (the baseline, how the source was listed before): `sorted(root.rglob("*"))` and a set of every
  image's stem, then the same items;
- `listing` (the walk alone, `listing.walk_folder`, no items: what grows with one folder's size) and its baseline
  `listing-per-piece`, the walk as it was before 2026-12-06: each piece of FOLDER_BLOCK names probed against a
  set of the whole folder's image stems built anew for that piece (N / FOLDER_BLOCK sets of N: the square of N).

    python bench/folder_source.py --images 40000 160000 --out bench/results/folder-source.json

Prints one JSON object: per mode and size the seconds, items a second and the child's peak anonymous memory
(RssAnon sampled, and VmHWM), and per mode the ratios of the largest size to the smallest.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import source_tree  # noqa: E402,F401  (dalle_pipeline without an install)
from child_memory import AnonymousPeak, child_result, emit_runs, peak_rss_mb

MODES = ("sorted", "walked", "listing", "listing-per-piece")


def write_folder(work: Path, images: int) -> Path:
    """A flat folder of `images` image files with their captions; cached by size."""
    target = work / f"folder-{images}"
    if (target.parent / f".{target.name}.done").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for index in range(images):
        (target / f"photo-{index:08d}.jpg").write_bytes(b"\xff\xd8\xff")  # never decoded here
        (target / f"photo-{index:08d}.txt").write_text(f"a photograph of thing number {index} on a table")
    (target.parent / f".{target.name}.done").write_text("")
    return target


def sorted_items(root: Path, data):
    """The baseline: the folder source's items as listed before it was walked a folder at a time."""
    from dalle_pipeline.components.sources import kinds

    files = sorted(p for p in root.rglob("*") if not p.is_dir() and not kinds._hidden(p, root))
    images = {p.with_suffix("") for p in files if p.suffix.lower() in kinds.IMAGE_SUFFIXES}
    for path in files:
        yield from kinds._folder_item(root, path, None, data.caption_col, path.with_suffix("") in images)


def walked_names(root: Path, per_piece: bool):
    """(name, an image of its stem beside it) of every file, as `listing.walk_folder` gives them; `per_piece`: the
    second found as before, a set of the folder's image stems (taken once a folder) probed by each piece."""
    import os

    import pyarrow as pa
    import pyarrow.compute as pc

    from dalle_pipeline.components.sources import kinds, listing

    stems_of: dict[Path, pa.Array] = {}
    for piece in listing.walk_folder(root, kinds.IMAGE_SUFFIXES):
        beside = piece.has_image
        if per_piece:
            if piece.folder not in stems_of:
                with os.scandir(piece.folder) as entries:
                    names = pa.array([entry.name for entry in entries if not entry.is_dir()], pa.string())
                stems_of[piece.folder] = pc.unique(listing.stems(pc.filter(names, listing.has_suffix(
                    names, kinds.IMAGE_SUFFIXES))))
            beside = pc.is_in(listing.stems(piece.names), value_set=stems_of[piece.folder])
        yield from zip(piece.names.to_pylist(), beside.to_pylist())


def list_items(mode: str, root: Path) -> dict:
    from dalle_pipeline.components.config import DataConfig
    from dalle_pipeline.components.sources import kinds

    sampler = AnonymousPeak()
    started = time.perf_counter()
    data = DataConfig(source=str(root))
    count = captioned = 0
    if mode.startswith("listing"):  # files, and caption files with their image: every file here
        for _, beside_image in walked_names(root, per_piece=mode == "listing-per-piece"):
            count, captioned = count + 1, captioned + beside_image
        count //= 2
        captioned //= 2
        return {"seconds": time.perf_counter() - started, "items": count, "captioned": captioned,
                "peak_anonymous_mb": sampler.stop(), "peak_rss_mb": peak_rss_mb()}
    items = kinds.items("folder", data) if mode == "walked" else sorted_items(root, data)
    for item in items:
        count, captioned = count + 1, captioned + (item.caption is not None)
    return {"seconds": time.perf_counter() - started, "items": count, "captioned": captioned,
            "peak_anonymous_mb": sampler.stop(), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[40_000, 160_000])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dalle-bench-folder-source")
    parser.add_argument("--out")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(list_items(args.child[0], Path(args.child[1]))))
        return

    runs: dict[str, dict[int, dict]] = {mode: {} for mode in args.modes}
    for images in args.images:
        folder = write_folder(args.work, images)
        for mode in args.modes:
            measured = child_result(__file__, mode, str(folder))
            if measured["items"] != images or measured["captioned"] != images:
                raise SystemExit(f"{mode} at {images}: {measured['items']} items, {measured['captioned']} captioned")
            measured["items_per_s"] = images / measured["seconds"]
            runs[mode][images] = measured
            print(f"{mode} {images}: {measured}", file=sys.stderr)
    emit_runs("folder_source", runs, "images", args.out)


if __name__ == "__main__":
    main()
