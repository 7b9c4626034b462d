"""Download a URL list into webdataset shards with img2dataset: only new URLs, only finished batches.

A download folder holds batches, `batch-00000/`, `batch-00001/`..., each one img2dataset run over
at most `download.batch_urls` URLs that no earlier batch attempted, the list read a block at a time
(`url_list.py`; a re-run of the same list adds nothing; a longer list that overlaps the last one
downloads only its new rows). A batch is built in a hidden staging folder
beside its final name (`.batch-00001.partial`), so a crashed run resumes where it stopped
(img2dataset's incremental mode skips shards whose `*_stats.json` exists); when every shard has its
stats, `_SUCCESS` is written last and the folder renamed into place. Later stages read finished
batches only, so they never see a partial shard. A lock keeps two runs out of one folder.

Every batch's `_SUCCESS` records the settings that shape its images (size, resize, format...);
adding to a folder with other settings is refused rather than mixing two kinds of image.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import DownloadConfig
from ..parallel import ray_session, require_shared
from ..sorted_runs import ExactIndex
from ..storage import StorePath, as_path, atomic_output, open_binary, remove_tree, url_folder, write_bytes
from .fetch import FetchPolicy, reason_code
from .url_list import check as check_url_list
from .url_list import read_blocks

SUCCESS_MARKER = "_SUCCESS"
BATCH_PREFIX = "batch-"
BATCH_URL_LIST = "_url_list.parquet"  # the rows a batch was asked for (not *.json: img2dataset reads those)
ATTEMPTED_SPILL = ".attempted_spill"  # the index of what earlier batches attempted, in files while a batch is added
ID_BLOCK = 1 << 16  # ids hashed and looked up at a time
# img2dataset's encode_quality means JPEG/WebP quality (0-100) but PNG zlib level (0-9)
ENCODE_QUALITY = {"jpg": 95, "webp": 95, "png": 6}
# settings that do not shape a batch's images, so batches made with other values mix freely
TRANSIENT_SETTINGS = {"processes_count", "thread_count", "timeout", "retries", "max_retry_after", "distributor",
                      "samples_per_shard", "url_list", "allow_file_urls", "batch_urls"}


@dataclass(frozen=True)
class DownloadResult:
    """What the download folder holds: finished batches, img2dataset's per-shard stats summed up."""

    shards_dir: Path | StorePath  # on an object store where the stage wrote there (ingest)
    successes: int
    failures: int
    failures_by_reason: dict[str, int]
    stats_files: list[Path | StorePath]
    batches: list[Path | StorePath]
    new_urls: int = 0  # URLs this call attempted (0 when the list held nothing new)
    shards_by_node: dict[str, int] = field(default_factory=dict)  # shards each Ray node wrote in this call (ingest)

    @property
    def metrics(self) -> dict[str, float]:
        return {"successes": self.successes, "failures": self.failures, "new_urls": self.new_urls,
                **{f"failed_{reason}": count for reason, count in self.failures_by_reason.items()}}

    def describe(self, verb: str) -> str:
        """One line for the run's log: `verb` is what happened to the images (downloaded, ingested)."""
        return (f"{verb} {self.successes} images ({self.new_urls} items new), {self.failures} failed "
                f"{self.failures_by_reason}")


def run(cfg: DownloadConfig, url_list: str | Path, out_dir: str | Path | StorePath, image_size: int,
        url_col: str = "url", caption_col: str = "caption") -> DownloadResult:
    """Download the URLs of `url_list` (a file, or a folder of them) that no batch of `out_dir` attempted,
    resized to `image_size`, in batches of at most `cfg.batch_urls`.

    The whole list is checked before any download starts (readable, its columns, not empty, URLs are
    strings: `url_list.check`); a bad list raises ValueError naming the file, column and row. It is then
    read again a block at a time (`new_batches`), so the driver never holds the list. A URL that fails to
    download is not an error: it is counted in `failures_by_reason` under its reason code (see
    `fetch.REASONS`), a scheme we do not fetch (ftp://, or file:// unless allowed) included. `out_dir` may be
    on an object store (a URL): img2dataset's processes or tasks put each shard there.
    """
    url_list, out_dir = Path(url_list).resolve(), as_path(out_dir).resolve()
    check_url_list(url_list, url_col, caption_col)
    settings = {"url_col": url_col, "caption_col": caption_col, **batch_settings(cfg, image_size)}
    out_dir.mkdir(parents=True, exist_ok=True)
    if distributor_of(cfg) == "ray":  # img2dataset's shards are written by tasks on every node
        # (into a store, they read img2dataset's shards of the list from there: the list is read here alone)
        require_shared({} if isinstance(out_dir, StorePath) else {"the URL list": url_list}, writes=out_dir)
    new_urls = 0
    with exclusive(out_dir, "download"):
        batches = finished_batches(out_dir)
        check_same_settings(batches, settings)
        with attempted_index(out_dir, batches) as attempted:
            for rows in new_batches(read_blocks(url_list, url_col, caption_col), url_col, attempted,
                                    cfg.batch_urls):
                batch = out_dir / f"{BATCH_PREFIX}{next_batch_number(batches):05d}"
                _download_batch(cfg, rows, batch, image_size, settings, url_col, caption_col)
                batches.append(batch)
                new_urls += rows.num_rows
    return summarise(out_dir, new_urls=new_urls)


def new_batches(blocks: Iterable[pa.Table], url_col: str, attempted: ExactIndex, batch_urls: int) -> Iterator[pa.Table]:
    """The rows of `blocks` whose URL no finished batch attempted, each URL once (its first row), in list order,
    as tables of `batch_urls` rows (the last one shorter). What a block adds joins `attempted` as it is read,
    so the driver holds one block, the batch being filled and the index, never the list."""
    pending: list[pa.Table] = []
    waiting = 0
    for block in blocks:
        block = _unattempted(block, url_col, attempted)
        pending.append(block)
        waiting += block.num_rows
        while waiting >= batch_urls:
            rows = pa.concat_tables(pending)
            yield rows.slice(0, batch_urls)
            pending, waiting = [rows.slice(batch_urls)], waiting - batch_urls
    if waiting:
        yield pa.concat_tables(pending)


def finished_batches(out_dir: str | Path | StorePath) -> list[Path | StorePath]:
    """The batches of a download folder (local, or on an object store) that finished, oldest first."""
    return sorted(path for path in as_path(out_dir).glob(f"{BATCH_PREFIX}*")
                  if (path / SUCCESS_MARKER).is_file())


def batch_shards(batch: Path | StorePath) -> list[tuple[Path | StorePath, Path | StorePath | None]]:
    """(shard tar, img2dataset's per-URL parquet of that shard) for each shard of a batch: the batch listed once."""
    listed = {path.name: path for path in batch.glob("[0-9]*")}
    return [(tar, listed.get(f"{tar.stem}.parquet")) for name, tar in sorted(listed.items()) if name.endswith(".tar")]


def _download_batch(cfg: DownloadConfig, rows: pa.Table, batch: Path | StorePath, image_size: int, settings: dict,
                    url_col: str, caption_col: str) -> None:
    """img2dataset downloads `rows` into a staging folder renamed into `batch` when whole; on an object store,
    which cannot rename, into the batch's own folder, finished when its `_SUCCESS` is written, last (as ingest)."""
    staging = staging_folder(batch)
    request = hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + _table_digest(rows)).hexdigest()
    if _read_marker(staging, "_REQUEST") != request:
        remove_tree(staging)  # another request's leftovers: start afresh
    staging.mkdir(parents=True, exist_ok=True)
    batch_list = staging / BATCH_URL_LIST
    if not batch_list.is_file():
        with atomic_output(batch_list) as path:
            pq.write_table(rows, path)
    write_bytes(staging / "_REQUEST", request.encode())

    arguments = _img2dataset_arguments(cfg, rows, batch_list, staging, image_size, url_col, caption_col)
    _call_img2dataset(arguments, _fetch_policy(cfg), ray_address=_session_address(arguments["distributor"]))

    expected_shards = math.ceil(rows.num_rows / cfg.samples_per_shard)
    finished_shards = len(list(staging.glob("*_stats.json")))
    if finished_shards != expected_shards:
        raise RuntimeError(
            f"img2dataset finished {finished_shards} of {expected_shards} shards in {staging}; "
            "run again to resume the missing ones"
        )
    (staging / "_REQUEST").unlink()
    write_bytes(staging / SUCCESS_MARKER, json.dumps({"settings": settings, "urls": rows.num_rows}, sort_keys=True
                                                     ).encode())
    if staging != batch:
        os.replace(staging, batch)


def staging_folder(batch: Path | StorePath) -> Path | StorePath:
    """Where a batch is built: a hidden folder beside it, renamed onto it when whole; on an object store, which
    cannot rename, the batch's own folder, finished when its `_SUCCESS` is written, last."""
    return batch if isinstance(batch, StorePath) else batch.with_name(f".{batch.name}.partial")


def _unattempted(table: pa.Table, url_col: str, attempted: ExactIndex) -> pa.Table:
    """The rows whose URL is not in `attempted`, each URL once (its first row); their URLs join `attempted`."""
    numbered = table.append_column("__row", pa.array(np.arange(table.num_rows)))
    first_rows = numbered.group_by(url_col, use_threads=False).aggregate([("__row", "min")]).column("__row_min")
    if len(first_rows) < table.num_rows:
        table = table.take(np.sort(first_rows.to_numpy()))
    digests = id_digests(table.column(url_col).to_pylist())
    if len(attempted):
        seen = attempted.contains(digests)
        table = table.filter(pa.array(~seen))
        digests = [digest for digest, old in zip(digests, seen.tolist()) if not old]
    attempted.add(digests)
    return table


@contextmanager
def attempted_index(out_dir: Path | StorePath, batches: list[Path | StorePath]) -> Iterator[ExactIndex]:
    """What the finished `batches` attempted (their per-item parquets' `url`: a URL, or a local source's item id),
    as sorted 128-bit hashes: 16 bytes an id, in files under `out_dir` (a local temporary folder where it is on
    an object store) past 64k of them, removed on the way out. A download or ingest that adds to a large folder
    never holds the ids it already has."""
    spill_dir = out_dir / ATTEMPTED_SPILL if isinstance(out_dir, Path) else \
        Path(tempfile.mkdtemp(prefix="dalle-attempted-"))
    shutil.rmtree(spill_dir, ignore_errors=True)  # a killed run's leftovers
    try:
        index = ExactIndex(spill_dir)
        for batch in batches:
            for path in sorted(batch.glob("[0-9]*.parquet")):
                with open_binary(path) as file:
                    for block in pq.ParquetFile(file).iter_batches(batch_size=ID_BLOCK, columns=["url"]):
                        index.add(id_digests(block.column(0).to_pylist()))
        yield index
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)


def id_digests(ids: list[str]) -> list[str]:
    """The sha256 of each id (a URL, an item id), as the attempted index keys it."""
    return [hashlib.sha256(item_id.encode("utf-8")).hexdigest() for item_id in ids]


def _table_digest(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).digest()


def batch_settings(cfg: DownloadConfig, image_size: int) -> dict[str, Any]:
    """The settings that shape a batch's images, recorded in its `_SUCCESS` (the image format resolved)."""
    return {"image_size": image_size, **cfg.model_dump(mode="json", exclude=TRANSIENT_SETTINGS),
            "encode_format": cfg.image_format(image_size)}


def encode_quality(cfg: DownloadConfig, image_size: int) -> int:
    """`encode_quality`, or the default of the image format: JPEG/WebP quality or PNG zlib level."""
    return ENCODE_QUALITY[cfg.image_format(image_size)] if cfg.encode_quality is None else cfg.encode_quality


def check_same_settings(batches: list[Path | StorePath], settings: dict[str, Any]) -> None:
    for batch in batches:
        recorded = json.loads((batch / SUCCESS_MARKER).read_text())["settings"]
        differing = sorted(key for key in settings.keys() | recorded.keys() if settings.get(key) != recorded.get(key))
        if differing:
            changes = ", ".join(f"{key}: {recorded.get(key)!r} -> {settings.get(key)!r}" for key in differing)
            raise ValueError(
                f"{batch.parent} holds downloads made with other settings ({changes}); "
                "download into a new folder, or delete this one to start again"
            )


def next_batch_number(batches: list[Path | StorePath]) -> int:
    return 1 + max((int(batch.name.removeprefix(BATCH_PREFIX)) for batch in batches), default=-1)


@contextmanager
def exclusive(out_dir: Path | StorePath, what: str) -> Iterator[None]:
    """Hold `out_dir`'s lock (its holder's pid inside) while adding a batch; a second writer is refused. A
    folder on an object store, which has no locks, is locked on this machine alone (a file in the temporary
    folder named by its URL): two machines must not add to one such folder at once.

    A worker process that img2dataset spawned and that re-ran the caller's script (a script without
    an `if __name__ == "__main__":` guard) finds the lock held by its own parent: it is told so.
    """
    lock = out_dir / ".lock" if isinstance(out_dir, Path) else \
        Path(tempfile.gettempdir()) / f"dalle-lock-{url_folder(str(out_dir))}"
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder, parent = handle.read().strip(), multiprocessing.parent_process()
            if parent is not None and holder == str(parent.pid):
                raise RuntimeError(
                    f"this process is a worker that the {what} into {out_dir} started, and it is running the "
                    f"{what} again: your script was imported anew by the worker. Put the call under "
                    f"`if __name__ == \"__main__\":`") from None
            raise RuntimeError(f"another {what} (pid {holder or 'unknown'}) is writing to {out_dir}; "
                               "wait for it to finish") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_marker(folder: Path | StorePath, marker: str) -> str | None:
    path = folder / marker
    return path.read_text() if path.is_file() else None


def summarise(shards_dir: str | Path | StorePath, new_urls: int = 0) -> DownloadResult:
    """Sum the `*_stats.json` of every finished batch (local, or on an object store); failure reasons are reason
    codes."""
    shards_dir = as_path(shards_dir)
    batches = finished_batches(shards_dir)
    stats_files = [path for batch in batches for path in sorted(batch.glob("*_stats.json"))]
    successes = failures = 0
    reasons: dict[str, int] = {}
    for path in stats_files:
        stats = json.loads(path.read_text())
        successes += stats["successes"]
        failures += stats["failed_to_download"] + stats["failed_to_resize"]
        for message, count in stats["status_dict"].items():
            if message != "success":
                reasons[reason_code(message)] = reasons.get(reason_code(message), 0) + count
    return DownloadResult(
        shards_dir=shards_dir,
        successes=successes,
        failures=failures,
        failures_by_reason=dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))),
        stats_files=stats_files,
        batches=batches,
        new_urls=new_urls,
    )


def _fetch_policy(cfg: DownloadConfig) -> FetchPolicy:
    return FetchPolicy(timeout=cfg.timeout, retries=cfg.retries, max_bytes=cfg.max_image_bytes,
                       max_pixels=cfg.max_image_pixels, max_retry_after=cfg.max_retry_after,
                       allow_file_urls=bool(cfg.allow_file_urls))


def _img2dataset_arguments(cfg: DownloadConfig, rows: pa.Table, batch_list: Path | StorePath,
                           output_folder: Path | StorePath,
                           image_size: int, url_col: str, caption_col: str) -> dict[str, Any]:
    extra_columns = [name for name in rows.column_names if name not in (url_col, caption_col)]
    return dict(
        url_list=str(batch_list),
        input_format="parquet",
        url_col=url_col,
        caption_col=caption_col,
        save_additional_columns=extra_columns or None,
        output_folder=str(output_folder),
        output_format="webdataset",
        image_size=image_size,
        resize_mode=cfg.resize_mode,
        encode_format=cfg.image_format(image_size),
        encode_quality=encode_quality(cfg, image_size),
        min_image_size=cfg.min_image_size,
        max_aspect_ratio=float("inf") if cfg.max_aspect_ratio is None else cfg.max_aspect_ratio,
        compute_hash=cfg.compute_hash,
        processes_count=cfg.processes_count,
        thread_count=cfg.thread_count,
        number_sample_per_shard=cfg.samples_per_shard,
        timeout=cfg.timeout,
        retries=cfg.retries,  # unused by our fetch, which reads them from the policy
        distributor=distributor_of(cfg),
        incremental_mode="incremental",
        enable_wandb=False,
        user_agent_token=cfg.user_agent_token,
        # img2dataset reads an empty list as "ignore the header" and None as its default list
        disallowed_header_directives=list(cfg.disallowed_header_directives),
    )


def distributor_of(cfg: DownloadConfig) -> str:
    """`cfg.distributor`, 'auto' resolved: Ray tasks on every node where this process has a Ray session open
    on a cluster of several nodes, else img2dataset's processes on this machine."""
    if cfg.distributor != "auto":
        return cfg.distributor
    if not ray_session():
        return "multiprocessing"
    import ray

    return "ray" if sum(node["Alive"] for node in ray.nodes()) > 1 else "multiprocessing"


def _session_address(distributor: str) -> str | None:
    """The Ray session img2dataset's tasks join: this process's own (a child process it spawns must find it)."""
    if distributor != "ray" or not ray_session():
        return None
    import ray

    return ray.get_runtime_context().gcs_address


def _call_img2dataset(arguments: dict[str, Any], policy: FetchPolicy, ray_address: str | None = None) -> None:
    """Run img2dataset with our fetch, in a child process when we are not on the main thread.

    img2dataset installs a SIGINT handler, which Python allows only on the main thread (Prefect
    runs submitted tasks on worker threads).
    """
    if threading.current_thread() is not threading.main_thread():
        child = multiprocessing.get_context("spawn").Process(target=_download, args=(arguments, policy, ray_address))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"img2dataset child process exited with code {child.exitcode}")
        return
    _download(arguments, policy, ray_address)


def _download(arguments: dict[str, Any], policy: FetchPolicy, ray_address: str | None = None) -> None:
    # else albumentations asks PyPI for updates at import; img2dataset's spawned workers inherit it
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from .adapter import download  # slow import (~4 s): only when a download happens

    download(arguments, policy, ray_address)
