"""Download + filter throughput: our download and filter stages against bare img2dataset.

Both fetch the same URL list from a loopback HTTP server in this process, with the same
img2dataset settings, into fresh folders; no network beyond 127.0.0.1 is needed:

    python bench/download.py --images 5000 --image-size 32 --processes 2 --threads 16 --repeats 1

Prints one JSON object: images/s of bare img2dataset and of ours (download + filter, and each part
alone), their ratio against the 0.85 goal, the settings and the machine. Exits non-zero when either
side does not end with every image.
"""

from __future__ import annotations

# img2dataset starts its workers with spawn, and a spawned worker imports this module again:
# keep the top level light (no torch, no img2dataset) and do the work under `__main__`.
import argparse
import contextlib
import http.server
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import source_tree  # noqa: E402,F401  (dalle_pipeline without an install)

GOAL_RATIO = 0.85
WARMUP_IMAGES = 200
# our download stage's PNG zlib level (img2dataset's encode_quality means that for png); the
# baseline uses the same, and img2dataset's own default (95) is no valid PNG level
PNG_LEVEL = 6
WORDS = "red green blue yellow purple orange circle square triangle ring dot stripe small big on under".split()


def make_images(folder: Path, count: int, size: int, seed: int) -> list[tuple[str, str]]:
    """Write `count` distinct JPEGs of random coloured shapes on noise; return (file name, caption)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // 4 + rng.integers(0, 192, 3, dtype=np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = rng.integers(0, size - 8, 2)
            x1, y1 = x0 + rng.integers(8, size // 2), y0 + rng.integers(8, size // 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((int(x0), int(y0), int(x1), int(y1)), fill=colour)
        name = f"{index:06d}.jpg"
        image.save(folder / name, quality=90)
        caption = " ".join(rng.choice(WORDS, int(rng.integers(3, 8)))) + f" #{index}"
        items.append((name, caption))
    return items


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 (a free port) from a background thread; yield the base URL."""
    handler = lambda *args, **kwargs: QuietHandler(*args, directory=str(folder), **kwargs)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="bench-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def write_url_list(path: Path, base_url: str, items: list[tuple[str, str]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"url": [f"{base_url}/{name}" for name, _ in items], "caption": [c for _, c in items]})
    pq.write_table(table, path)
    return path


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send fd 1 to stderr (img2dataset and its spawned workers print), so stdout holds only the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_baseline(args: argparse.Namespace, url_list: Path, out_dir: Path) -> dict:
    """Bare img2dataset.download with our download stage's settings; successes from its stats files."""
    import signal

    from img2dataset import download

    previous_handler = signal.getsignal(signal.SIGINT)  # img2dataset installs its own and leaves it
    start = time.perf_counter()
    try:
        download(url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
                 output_format="webdataset", output_folder=str(out_dir), image_size=args.image_size,
                 resize_mode="center_crop", encode_format="png", encode_quality=PNG_LEVEL,
                 processes_count=args.processes, thread_count=args.threads,
                 number_sample_per_shard=args.samples_per_shard, timeout=10, retries=0,
                 enable_wandb=False, distributor="multiprocessing")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    seconds = time.perf_counter() - start
    successes = sum(json.loads(path.read_text())["successes"] for path in out_dir.glob("*_stats.json"))
    return {"seconds": seconds, "successes": successes}


def run_ours(args: argparse.Namespace, url_list: Path, out_dir: Path) -> dict:
    """Our download stage then our filter stage, timed together and apart."""
    from dalle_pipeline.components.config import DownloadConfig, FilterConfig
    from dalle_pipeline.components.download.run import run as download
    from dalle_pipeline.components.filter.run import run as filter_run

    cfg = DownloadConfig(processes_count=args.processes, thread_count=args.threads,
                         samples_per_shard=args.samples_per_shard, encode_format="png", resize_mode="center_crop")
    start = time.perf_counter()
    downloaded = download(cfg, url_list, out_dir / "shards", args.image_size)
    middle = time.perf_counter()
    filtered = filter_run(FilterConfig(), downloaded.shards_dir, out_dir / "curated")
    end = time.perf_counter()
    return {"seconds": end - start, "download_seconds": middle - start, "filter_seconds": end - middle,
            "successes": downloaded.successes, "failures": downloaded.failures,
            "failures_by_reason": downloaded.failures_by_reason, "kept": filtered.kept,
            "dropped_by_reason": filtered.dropped_by_reason}


def check(name: str, run: dict, expected: int) -> None:
    """Every image must arrive (and, for ours, survive the filter); anything else is a failed bench."""
    got = {key: run[key] for key in ("successes", "kept") if key in run}
    if any(value != expected for value in got.values()):
        raise SystemExit(f"bench/download.py: {name} ended with {got} of {expected} images; run: {run}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="distinct images in the URL list")
    parser.add_argument("--source-size", type=int, default=96, help="side of the served JPEGs")
    parser.add_argument("--image-size", type=int, default=32, help="side img2dataset resizes to")
    parser.add_argument("--processes", type=int, default=2, help="img2dataset worker processes")
    parser.add_argument("--threads", type=int, default=16, help="img2dataset download threads per process")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds (baseline, then ours)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    # else albumentations asks PyPI for updates at import; the spawned workers inherit it
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"

    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp, stdout_to_stderr():
        work = Path(tmp)
        started = time.perf_counter()
        items = make_images(work / "images", args.images, args.source_size, args.seed)
        generate_s = time.perf_counter() - started
        with serve(work / "images") as base_url:
            url_list = write_url_list(work / "urls.parquet", base_url, items)
            warmup_list = write_url_list(work / "warmup.parquet", base_url, items[:WARMUP_IMAGES])
            # warm-up, untimed: imports, the page cache of the images, the server's threads
            run_baseline(args, warmup_list, work / "warmup-baseline")
            run_ours(args, warmup_list, work / "warmup-ours")
            baseline_runs, ours_runs = [], []
            for round_index in range(args.repeats):  # alternate, each into fresh folders
                for name, runner, runs in (("baseline", run_baseline, baseline_runs), ("ours", run_ours, ours_runs)):
                    out_dir = work / f"{name}-{round_index}"
                    runs.append(runner(args, url_list, out_dir))
                    check(name, runs[-1], args.images)
                    shutil.rmtree(out_dir)  # keep the disk use to one round's shards

    from importlib.metadata import version

    best_baseline = min(baseline_runs, key=lambda run: run["seconds"])
    best_ours = min(ours_runs, key=lambda run: run["seconds"])
    result = {
        "bench": "download_filter",
        "images": args.images,
        "source_size": args.source_size,
        "image_size": args.image_size,
        "processes": args.processes,
        "threads": args.threads,
        "samples_per_shard": args.samples_per_shard,
        "repeats": args.repeats,
        "baseline": "bare img2dataset.download, same settings (webdataset, png, center_crop)",
        "baseline_images_per_s": args.images / best_baseline["seconds"],
        "ours_images_per_s": args.images / best_ours["seconds"],
        # the parts of ours' best round
        "ours_download_images_per_s": args.images / best_ours["download_seconds"],
        "ours_filter_images_per_s": args.images / best_ours["filter_seconds"],
        "baseline_seconds": [run["seconds"] for run in baseline_runs],
        "ours_seconds": [run["seconds"] for run in ours_runs],
        "ours_median_seconds": statistics.median(run["seconds"] for run in ours_runs),
        "baseline_median_seconds": statistics.median(run["seconds"] for run in baseline_runs),
        "generate_seconds": generate_s,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "img2dataset": version("img2dataset"),
        },
    }
    result["ratio"] = result["ours_images_per_s"] / result["baseline_images_per_s"]
    result["goal_ratio"] = GOAL_RATIO
    result["meets_goal"] = result["ratio"] >= GOAL_RATIO
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
