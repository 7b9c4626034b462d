"""Download a URL list into webdataset shards with img2dataset, so that only a finished download counts.

img2dataset writes shards straight into its output folder and, in incremental mode, decides what
is done from the `*_stats.json` it writes after each shard. We let it work in a staging folder
beside `out_dir` with a stable name (so a crashed run resumes where it stopped), check that every
shard has its stats, write `_SUCCESS` last and only then rename the staging folder onto `out_dir`.
A run that finds `_SUCCESS` for the same request returns the existing result without downloading.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from ..config import DownloadConfig
from ..storage import file_sha256

SUCCESS_MARKER = "_SUCCESS"
# URL-list file extensions img2dataset reads, by its input_format name
INPUT_FORMATS = ("parquet", "csv", "tsv", "json", "jsonl")
# img2dataset's encode_quality means JPEG/WebP quality (0-100) but PNG zlib level (0-9)
ENCODE_QUALITY = {"jpg": 95, "webp": 95, "png": 6}
# columns img2dataset writes itself and refuses to take from the URL list
RESERVED_COLUMNS = frozenset(
    "key url caption width height original_width original_height status error_message exif md5 sha256 sha512".split()
)


@dataclass(frozen=True)
class DownloadResult:
    """What arrived: shards in `shards_dir`, and img2dataset's per-shard stats summed up."""

    shards_dir: Path
    successes: int
    failures: int
    failures_by_reason: dict[str, int]
    stats_files: list[Path]


def run(
    cfg: DownloadConfig,
    url_list: str | Path,
    out_dir: str | Path,
    image_size: int,
    url_col: str = "url",
    caption_col: str = "caption",
) -> DownloadResult:
    """Download every URL of `url_list` resized to `image_size`, into shards under `out_dir`.

    The list is validated before any download starts (columns, emptiness, URL schemes); a bad
    list raises ValueError naming the column, row and URL. A URL that fails to download is not
    an error: it is counted in `failures_by_reason` under img2dataset's message.
    """
    url_list, out_dir = Path(url_list).resolve(), Path(out_dir).resolve()
    listing = inspect_url_list(url_list, url_col, caption_col, cfg.allow_file_urls)
    request = _request_fingerprint(cfg, url_list, image_size, url_col, caption_col)
    if _finished_request(out_dir) == request:
        return summarise(out_dir)

    staging = out_dir.with_name(f".{out_dir.name}.partial")
    if _finished_request(staging, marker="_REQUEST") != request:
        shutil.rmtree(staging, ignore_errors=True)  # another request's leftovers: start afresh
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "_REQUEST").write_text(request)

    arguments = _img2dataset_arguments(cfg, listing, url_list, staging, image_size, url_col, caption_col)
    _call_img2dataset(arguments)

    expected_shards = math.ceil(listing.num_rows / cfg.samples_per_shard)
    finished_shards = len(list(staging.glob("*_stats.json")))
    if finished_shards != expected_shards:
        raise RuntimeError(
            f"img2dataset finished {finished_shards} of {expected_shards} shards in {staging}; "
            "run again to resume the missing ones"
        )
    (staging / "_REQUEST").unlink()
    (staging / SUCCESS_MARKER).write_text(request)  # last: its presence means complete
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    return summarise(out_dir)


@dataclass(frozen=True)
class UrlListing:
    """What validation learned about a URL list and img2dataset needs to be told."""

    input_format: str
    num_rows: int
    extra_columns: list[str]


def input_format_of(url_list: Path) -> str:
    """img2dataset's input_format from the file name: `x.parquet`, `x.csv`, `x.jsonl.gz`..."""
    suffixes = [suffix.lstrip(".").lower() for suffix in url_list.suffixes]
    if suffixes[-1:] == ["gz"] and len(suffixes) >= 2 and suffixes[-2] in INPUT_FORMATS[1:]:
        return f"{suffixes[-2]}.gz"
    if suffixes and suffixes[-1] in INPUT_FORMATS:
        return suffixes[-1]
    raise ValueError(f"{url_list}: cannot tell the URL list's format; name it *.{{{','.join(INPUT_FORMATS)}}}")


def _read_table(url_list: Path, input_format: str) -> pa.Table:
    kind = input_format.removesuffix(".gz")
    try:
        if kind == "parquet":
            return pq.read_table(url_list)
        if kind in ("csv", "tsv"):
            delimiter = "\t" if kind == "tsv" else ","
            return pa_csv.read_csv(url_list, parse_options=pa_csv.ParseOptions(delimiter=delimiter))
        if kind == "jsonl":
            return pa_json.read_json(url_list)
        import pandas  # what img2dataset reads a JSON array with

        return pa.Table.from_pandas(pandas.read_json(url_list), preserve_index=False)
    except (pa.ArrowException, ValueError, OSError) as err:
        raise ValueError(f"{url_list}: cannot read it as {input_format}: {err}") from err


def inspect_url_list(url_list: Path, url_col: str, caption_col: str, allow_file_urls: bool) -> UrlListing:
    """Refuse a URL list img2dataset would choke on or that asks for what we do not allow.

    Checks: readable, the url and caption columns exist, at least one row, no column name that
    img2dataset reserves, and every URL http(s) (or file:// when `allow_file_urls`).
    """
    if not url_list.is_file():
        raise FileNotFoundError(f"URL list {url_list} does not exist")
    input_format = input_format_of(url_list)
    table = _read_table(url_list, input_format)
    for role, column in (("url", url_col), ("caption", caption_col)):
        if column not in table.column_names:
            raise ValueError(f"{url_list}: no {role} column {column!r}; columns are {table.column_names}")
    if table.num_rows == 0:
        raise ValueError(f"{url_list}: the URL list is empty")
    extra_columns = [name for name in table.column_names if name not in (url_col, caption_col)]
    reserved = sorted(RESERVED_COLUMNS.intersection(extra_columns))
    if reserved:
        raise ValueError(f"{url_list}: columns {reserved} are reserved by img2dataset; rename them")
    _check_url_schemes(url_list, table.column(url_col), url_col, allow_file_urls)
    return UrlListing(input_format=input_format, num_rows=table.num_rows, extra_columns=extra_columns)


def _check_url_schemes(url_list: Path, urls: pa.ChunkedArray, url_col: str, allow_file_urls: bool) -> None:
    pattern = "^(https?|file)://" if allow_file_urls else "^https?://"
    if not pa.types.is_string(urls.type) and not pa.types.is_large_string(urls.type):
        raise ValueError(f"{url_list}: column {url_col!r} holds {urls.type}, not URL strings")
    accepted = pc.fill_null(pc.match_substring_regex(urls, pattern, ignore_case=True), False)
    if pc.all(accepted).as_py():
        return
    bad_rows = pc.indices_nonzero(pc.invert(accepted))
    first = bad_rows[0].as_py()
    allowed = "http(s) or file://" if allow_file_urls else "http(s) (set allow_file_urls to accept file://)"
    raise ValueError(
        f"{url_list}: column {url_col!r} row {first}: {urls[first].as_py()!r} is not an {allowed} URL "
        f"({len(bad_rows)} such rows in all)"
    )


def summarise(shards_dir: str | Path) -> DownloadResult:
    """Sum img2dataset's `*_stats.json` of a download folder; failure reasons are its messages."""
    shards_dir = Path(shards_dir)
    stats_files = sorted(shards_dir.glob("*_stats.json"))
    successes = failures = 0
    reasons: dict[str, int] = {}
    for path in stats_files:
        stats = json.loads(path.read_text())
        successes += stats["successes"]
        failures += stats["failed_to_download"] + stats["failed_to_resize"]
        for reason, count in stats["status_dict"].items():
            if reason != "success":
                reasons[reason] = reasons.get(reason, 0) + count
    return DownloadResult(
        shards_dir=shards_dir,
        successes=successes,
        failures=failures,
        failures_by_reason=dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))),
        stats_files=stats_files,
    )


def _finished_request(folder: Path, marker: str = SUCCESS_MARKER) -> str | None:
    path = folder / marker
    return path.read_text() if path.is_file() else None


def _request_fingerprint(
    cfg: DownloadConfig, url_list: Path, image_size: int, url_col: str, caption_col: str
) -> str:
    """What decides the shards' content; parallelism, timeouts and retries do not count."""
    settings = cfg.model_dump(exclude={"processes_count", "thread_count", "timeout", "retries"})
    request = {
        "url_list_sha256": file_sha256(url_list),
        "image_size": image_size,
        "url_col": url_col,
        "caption_col": caption_col,
        **settings,
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def _img2dataset_arguments(
    cfg: DownloadConfig,
    listing: UrlListing,
    url_list: Path,
    output_folder: Path,
    image_size: int,
    url_col: str,
    caption_col: str,
) -> dict[str, Any]:
    return dict(
        url_list=str(url_list),
        input_format=listing.input_format,
        url_col=url_col,
        caption_col=caption_col,
        save_additional_columns=listing.extra_columns or None,
        output_folder=str(output_folder),
        output_format="webdataset",
        image_size=image_size,
        resize_mode=cfg.resize_mode,
        encode_format=cfg.encode_format,
        encode_quality=ENCODE_QUALITY[cfg.encode_format],
        processes_count=cfg.processes_count,
        thread_count=cfg.thread_count,
        number_sample_per_shard=cfg.samples_per_shard,
        timeout=cfg.timeout,
        retries=cfg.retries,
        distributor="multiprocessing",
        incremental_mode="incremental",
        enable_wandb=False,
        # None keeps img2dataset's default: honour X-Robots-Tag noai/noimageai/noindex/noimageindex
        disallowed_header_directives=None,
    )


def _call_img2dataset(arguments: dict[str, Any]) -> None:
    """Run img2dataset.download, in a child process when we are not on the main thread.

    img2dataset installs a SIGINT handler, which Python allows only on the main thread (Prefect
    runs submitted tasks on worker threads), and leaves it installed: on the main thread we put
    the previous handler back afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        child = multiprocessing.get_context("spawn").Process(target=_download, args=(arguments,))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"img2dataset child process exited with code {child.exitcode}")
        return
    previous_handler = signal.getsignal(signal.SIGINT)
    try:
        _download(arguments)
    finally:
        signal.signal(signal.SIGINT, previous_handler)


def _download(arguments: dict[str, Any]) -> None:
    # else albumentations asks PyPI for updates at import; img2dataset's spawned workers inherit it
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download  # slow import (~4 s): only when a download happens

    download(**arguments)
