"""What a filter on an object-store root costs, read and written in place or through the local cache (#29);
with `--stage ingest`, what ingesting a webdataset source on the store costs, read in place or mirrored.

For each size N (default 2k and 8k samples, 4x apart) the benchmark lays out a download folder of N
synthetic captioned 256 px JPEGs (bench/scale.py's corpus: 1,000 a shard, each with img2dataset's per-URL
Parquet, one finished batch), puts it on S3 (moto's standalone server on loopback, as the tests run it),
then filters it, each mode in a fresh child process, no Ray:

- `fetched` (how every stage on an object-store root ran before, and the stages other than the filter still
  run): the download folder fetched whole into a local cache (`storage.copy_from_store`), filtered there,
  the curated folder put back on the store file by file (as `StageCache` publishes a stage);
- `in-place` (the filter now): `filter.run` from the store's URL into a URL on the store, each shard read in
  16 MiB ranges and each output put whole, nothing written to local disk.

    python bench/object_store.py --sizes 2000 8000 --out bench/results/object-store.json

`--stage ingest`: the source is the corpus's webdataset shards on S3 (1,000 samples a shard), ingested into a
local folder (256 px, JPEG kept) either from a mirror fetched whole first (`fetched`: how the flow reads a source
on the store of another kind) or from the store where it lies (`in-place`: each image read by the task that
fits it, a tar's members through one open file); the local disk counted is the mirror's, the output left out.

Prints one JSON object: per mode and size the seconds, the child's peak anonymous memory (RssAnon sampled)
and VmHWM, the bytes it left on local disk, and what it kept and dropped (the same in both modes, checked);
per mode the ratios of the largest size to the smallest. moto is a Python server on this machine: its
throughput, not S3's, bounds both modes alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import source_tree  # noqa: F401  (dalle_pipeline without an install)
from child_memory import AnonymousPeak, child_result, emit_runs, peak_rss_mb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # moto's server, as the tests start it

MODES = ("fetched", "in-place")
FILTER = {"near_duplicate_distance": 4, "min_image_size": 64}


def download_folder(size: int, work: Path) -> Path:
    """A download folder of `size` samples of bench/scale.py's corpus: one finished batch, a per-URL Parquet a
    shard (the shards linked from the corpus's cache)."""
    import scale

    shards, _ = scale.corpus(size, scale.parse_args(["--sizes", str(size)]))
    batch = work / f"download-{size}" / "batch-00000"
    shutil.rmtree(batch.parent, ignore_errors=True)
    batch.mkdir(parents=True)
    from dalle_pipeline.components.shards import read_captions

    for tar in sorted(shards.glob("*.tar")):
        os.link(tar, batch / tar.name)
        keys = [text.key for text in read_captions(tar)]
        pq.write_table(pa.table({"key": keys, "url": [f"https://example.com/{key}.jpg" for key in keys],
                                 "status": ["success"] * len(keys), "error_message": [None] * len(keys)},
                                schema=pa.schema([("key", pa.string()), ("url", pa.string()),
                                                  ("status", pa.string()), ("error_message", pa.string())])),
                       batch / tar.with_suffix(".parquet").name)
    (batch / "_SUCCESS").write_text("{}")
    return batch.parent


def measure_ingest(mode: str, source_url: str, size: int) -> dict:
    import fsspec

    from dalle_pipeline.components.config import DataConfig, DownloadConfig
    from dalle_pipeline.components.sources import run as ingest
    from dalle_pipeline.components.storage import copy_from_store

    sampler = AnonymousPeak()
    local, out = (Path(tempfile.mkdtemp(prefix=f"dalle-bench-ingest-{name}-")) for name in ("mirror", "out"))
    started = time.perf_counter()
    source = source_url
    if mode == "fetched":
        fs, path = fsspec.core.url_to_fs(source_url)
        source = str(copy_from_store(fs, path, local / "shards"))
    result = ingest(DataConfig(source=source), DownloadConfig(), out / "ingested", 256)
    seconds = time.perf_counter() - started
    on_disk = sum(path.stat().st_size for path in local.rglob("*") if path.is_file())
    shutil.rmtree(local)
    shutil.rmtree(out)
    return {"seconds": seconds, "samples": size, "samples_per_second": size / seconds,
            "kept": result.successes, "dropped": result.failures, "local_disk_bytes": on_disk,
            "peak_anonymous_mb": sampler.stop(), "peak_rss_mb": peak_rss_mb()}


def measure(mode: str, source_url: str, out_url: str, size: int) -> dict:
    import fsspec

    from dalle_pipeline.components.config import FilterConfig
    from dalle_pipeline.components.filter import run as filter_run
    from dalle_pipeline.components.storage import copy_from_store

    cfg = FilterConfig(**FILTER)
    sampler = AnonymousPeak()
    local = Path(tempfile.mkdtemp(prefix="dalle-bench-object-store-"))
    started = time.perf_counter()
    if mode == "in-place":
        result = filter_run(cfg, source_url, out_url, holdout_fraction=0.01)
    else:
        fs, source = fsspec.core.url_to_fs(source_url)
        copy = copy_from_store(fs, source, local / "download")
        result = filter_run(cfg, copy, local / "curated", holdout_fraction=0.01)
        target = fsspec.core.url_to_fs(out_url)[1]
        for path in sorted((local / "curated").rglob("*")):  # as StageCache._publish puts a stage: file by file
            if path.is_file():
                fs.put_file(str(path), f"{target}/{path.relative_to(local / 'curated').as_posix()}")
    seconds = time.perf_counter() - started
    on_disk = sum(path.stat().st_size for path in local.rglob("*") if path.is_file())
    shutil.rmtree(local)
    return {"seconds": seconds, "samples": size, "samples_per_second": size / seconds,
            "kept": result.kept, "dropped": result.dropped_by_reason, "local_disk_bytes": on_disk,
            "peak_anonymous_mb": sampler.stop(), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 8_000])
    parser.add_argument("--stage", choices=("filter", "ingest"), default="filter")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dalle-bench-object-store")
    parser.add_argument("--out")
    parser.add_argument("--child", nargs=5, metavar=("STAGE", "MODE", "SOURCE", "OUT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stage, mode, source, out, size = args.child
        print(json.dumps(measure_ingest(mode, source, int(size)) if stage == "ingest"
                         else measure(mode, source, out, int(size))))
        return

    import fsspec
    from local_processes import S3Endpoint

    s3 = S3Endpoint()
    os.environ.update(s3.env)  # the children reach it through the usual boto configuration
    runs: dict[str, dict[int, dict]] = {mode: {} for mode in args.modes}
    try:
        fs, _ = fsspec.core.url_to_fs(f"s3://{s3.bucket}")
        for size in args.sizes:
            if args.stage == "ingest":
                import scale

                shards, _ = scale.corpus(size, scale.parse_args(["--sizes", str(size)]))
                fs.put(str(shards), f"{s3.bucket}/source-{size}", recursive=True)
                source = f"s3://{s3.bucket}/source-{size}"
            else:
                fs.put(str(download_folder(size, args.work)), f"{s3.bucket}/download-{size}", recursive=True)
                source = f"s3://{s3.bucket}/download-{size}"
            for mode in args.modes:
                measured = child_result(__file__, args.stage, mode, source, f"s3://{s3.bucket}/curated-{size}-{mode}",
                                        str(size))
                runs[mode][size] = measured
                print(f"{mode} {size}: {measured}", file=sys.stderr)
            verdicts = {json.dumps([runs[mode][size]["kept"], runs[mode][size]["dropped"]]) for mode in args.modes}
            if len(verdicts) != 1:
                raise SystemExit(f"the modes filtered {size} samples differently: {verdicts}")
    finally:
        s3.stop()
    emit_runs("object_store" if args.stage == "filter" else "object_store_ingest", runs, "samples", args.out)


if __name__ == "__main__":
    main()
