"""Bring a local source (a folder, webdataset shards, Parquet with images, COCO) into a download folder.

The result is laid out as the download stage lays out a URL list's images (see `download.run`):
`batch-NNNNN/` folders of webdataset shards, each with img2dataset's per-item parquet (key, url,
status, error_message; `url` holds the item's id) and `*_stats.json`, and `_SUCCESS` written
last, so the filter and everything after it read every source the same way. Only items that no
finished batch attempted are read (a folder that grows adds its new files), a crashed ingest
resumes at its first unfinished shard, and a lock keeps two writers out of one folder. The source
is streamed (a shard's items at a time), and each shard is read, fitted and written by a task on
the Ray cluster when the flow connected one (`parallel.ordered_map`): every core of every node.
A folder source must then lie where every node can read it (shared storage). The download folder may
be on an object store: each task puts its files there whole, into the batch's own folder, whose
`_SUCCESS` (written last) finishes it, as the rename of a staging folder does on a disk.

Each image is read, checked as a download is (`fetch.damaged_image_reason`), turned upright by
its EXIF orientation, made RGB (transparency over white, 16-bit scaled to 8), fitted to the
image size by `download.resize_mode`, and encoded as `download.encode_format`; its original size
and the sha256 of its file go into the sample's metadata, as img2dataset records them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from ..config import DataConfig, DownloadConfig
from ..images import as_rgb, resized
from ..download.fetch import damaged_image_reason
from ..download.run import (BATCH_PREFIX, SUCCESS_MARKER, DownloadResult, attempted_index, batch_settings,
                            check_same_settings, encode_quality, exclusive, finished_batches, id_digests,
                            next_batch_number, staging_folder, summarise)
from ..parallel import ordered_map, require_shared, worker_node
from ..shards import Sample, release_store_files, write_shard
from ..sorted_runs import ExactIndex
from ..storage import StorePath, as_path, atomic_output, open_binary, remove_tree, write_bytes, write_json
from .kinds import Item, items, release_parquet_cursor, source_kind

ITEM_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("status", pa.string()),
                         ("error_message", pa.string()), ("caption", pa.string())])
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class Fitted:
    data: bytes
    original_size: tuple[int, int]
    sha256: str  # of the source file, as img2dataset hashes a download


def run(data: DataConfig, cfg: DownloadConfig, out_dir: str | Path | StorePath, image_size: int) -> DownloadResult:
    """Add the items of the source `data.source` that no batch of `out_dir` holds, as a new batch. The source
    may be webdataset shards or Parquet with images on an object store (`kinds.store_kind`), read there by each
    task; `out_dir` may be on an object store (a URL): every task puts its shard's files there."""
    kind = source_kind(data)
    out_dir = as_path(out_dir).resolve()
    settings = {"source_kind": kind, **batch_settings(cfg, image_size)}
    out_dir.mkdir(parents=True, exist_ok=True)
    require_shared({"data.source": as_path(data.source)}, writes=out_dir)  # every node's tasks read and write them
    with exclusive(out_dir, "ingest"):
        batches = finished_batches(out_dir)
        check_same_settings(batches, settings)
        batch = out_dir / f"{BATCH_PREFIX}{next_batch_number(batches):05d}"
        with attempted_index(out_dir, batches) as attempted:
            result = _ingest_batch(_unattempted(items(kind, data), attempted), batch, cfg, image_size, settings)
    return replace(summarise(out_dir, new_urls=result.items), shards_by_node=result.shards_by_node)


def _unattempted(source: Iterable[Item], attempted: ExactIndex, block: int = 4096) -> Iterator[Item]:
    """The items of `source` whose ids are not in `attempted`, in source order."""
    for chunk in _chunks(source, block):
        seen = attempted.contains(id_digests([item.item_id for item in chunk])) if len(attempted) else None
        yield from (item for index, item in enumerate(chunk) if seen is None or not seen[index])


def _chunks(source: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in source:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass(frozen=True)
class _Ingested:
    items: int
    shards_by_node: dict[str, int]


def _ingest_batch(new_items: Iterable[Item], batch: Path | StorePath, cfg: DownloadConfig, image_size: int,
                  settings: dict) -> _Ingested:
    """The new items as shards of a staging folder, each a task on the Ray cluster when one is connected;
    renamed into `batch` when all are done (on an object store, which cannot rename, the batch's own folder,
    finished when its `_SUCCESS` is written, last). A shard finished before a crash is kept when it holds the
    same items (its parquet's ids), so an ingest resumes where it stopped."""
    staging = staging_folder(batch)
    recorded = staging / "_SETTINGS"
    wanted = json.dumps(settings, sort_keys=True)
    if not recorded.is_file() or recorded.read_text() != wanted:
        remove_tree(staging)  # another request's leftovers: start afresh
    staging.mkdir(parents=True, exist_ok=True)
    write_bytes(recorded, wanted.encode())
    finished = {path.name for path in staging.glob("[0-9]*_stats.json")}  # listed once, not asked shard by shard
    per_shard = cfg.samples_per_shard
    digits = max(4, len(str(per_shard - 1)))
    counted = {"items": 0, "shards": 0}

    def jobs() -> Iterator[ShardOfItems]:
        for shard, chunk in enumerate(_chunks(new_items, per_shard)):
            counted["items"] += len(chunk)
            counted["shards"] = shard + 1
            if not _finished(staging, finished, shard, [item.item_id for item in chunk]):
                yield ShardOfItems(chunk, staging, shard, digits, cfg, image_size)

    nodes = Counter(ordered_map(ingest_shard, jobs()))
    if not counted["items"]:
        remove_tree(staging)
        return _Ingested(0, {})
    for path in staging.glob("[0-9]*"):  # shards of an earlier, longer request
        if int(path.name[:5]) >= counted["shards"]:
            path.unlink()
    recorded.unlink()
    write_json(staging / SUCCESS_MARKER, {"settings": settings, "urls": counted["items"]})
    if staging != batch:
        os.replace(staging, batch)
    return _Ingested(counted["items"], dict(sorted(nodes.items())))


def _finished(staging: Path | StorePath, finished: set[str], shard: int, ids: list[str]) -> bool:
    if f"{shard:05d}_stats.json" not in finished:
        return False
    with open_binary(staging / f"{shard:05d}.parquet") as file:
        return pq.read_table(file, columns=["url"]).column("url").to_pylist() == ids


@dataclass(frozen=True)
class ShardOfItems:
    """One shard's items to read, fit and write (a Ray task's job: `ingest_shard`)."""

    items: list[Item]
    staging: Path | StorePath
    shard: int
    digits: int
    cfg: DownloadConfig
    image_size: int


def ingest_shard(job: ShardOfItems) -> str:
    """Write one shard (tar, per-item parquet, then its stats: the shard is done); the node it ran on."""
    rows, samples = [], []
    try:
        read = [_read(item, job.cfg, job.image_size) for item in job.items]
    finally:  # nothing this task opened outlives it: a file put again later is read afresh
        release_store_files()
        release_parquet_cursor()
    for index, (item, (reason, fitted)) in enumerate(zip(job.items, read)):
        key = f"{job.shard:05d}{index:0{job.digits}d}"
        rows.append({"key": key, "url": item.item_id, "status": "success" if reason is None else "failed_to_download",
                     "error_message": reason, "caption": item.caption})
        if fitted is not None:
            width, height = fitted.original_size
            meta = {**item.meta, "url": item.item_id, "key": key, "caption": item.caption,
                    "original_width": width, "original_height": height, "sha256": fitted.sha256}
            samples.append(Sample(key=key, image_bytes=fitted.data, image_ext=job.cfg.image_format(job.image_size),
                                  caption=item.caption or "", meta=meta))
    status = Counter(row["error_message"] or "success" for row in rows)
    name = f"{job.shard:05d}"
    write_shard(job.staging / f"{name}.tar", samples)
    with atomic_output(job.staging / f"{name}.parquet") as path:
        pq.write_table(pa.Table.from_pylist(rows, schema=ITEM_SCHEMA), path)
    write_json(job.staging / f"{name}_stats.json", {  # last: its presence means the shard is done
        "count": len(rows), "successes": len(samples), "failed_to_download": len(rows) - len(samples),
        "failed_to_resize": 0, "status_dict": dict(status)})
    return worker_node()


def _read(item: Item, cfg: DownloadConfig, image_size: int) -> tuple[str | None, Fitted | None]:
    """(None, the fitted image) or (the reason code, None)."""
    if item.problem is not None:
        return item.problem, None
    try:
        data = item.read()
    except OSError:
        return "unreadable_image", None
    if data is None:
        return "missing_image", None
    if not data:
        return "empty_image", None
    if len(data) > cfg.max_image_bytes:
        return "too_large", None
    reason = damaged_image_reason(data, cfg.max_image_pixels)
    if reason is not None:
        return reason, None
    try:
        return fit(data, cfg, image_size)
    except (OSError, ValueError, SyntaxError):
        return "corrupt_image", None


def fit(data: bytes, cfg: DownloadConfig, image_size: int) -> tuple[str | None, Fitted | None]:
    """The image upright, RGB, fitted to `image_size` by `cfg.resize_mode`, encoded; or img2dataset's
    size refusals (`image_too_small`, `aspect_ratio_too_large`)."""
    with Image.open(io.BytesIO(data)) as opened:
        image = ImageOps.exif_transpose(opened)
        width, height = image.size
        if min(width, height) < cfg.min_image_size:
            return "image_too_small", None
        if cfg.max_aspect_ratio is not None and max(width, height) / max(1, min(width, height)) > cfg.max_aspect_ratio:
            return "aspect_ratio_too_large", None
        image = resized(as_rgb(image), image_size, cfg.resize_mode)
    buffer = io.BytesIO()
    image_format, quality = cfg.image_format(image_size), encode_quality(cfg, image_size)
    options = {"compress_level": quality} if image_format == "png" else {"quality": quality}
    image.save(buffer, format=PIL_FORMATS[image_format], **options)
    return None, Fitted(buffer.getvalue(), (width, height), hashlib.sha256(data).hexdigest())
