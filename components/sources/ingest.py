"""Bring a local source (a folder, webdataset shards, Parquet with images, COCO) into a download folder.

The result is laid out as the download stage lays out a URL list's images (see `download.run`):
`batch-NNNNN/` folders of webdataset shards, each with img2dataset's per-item parquet (key, url,
status, error_message; `url` holds the item's id) and `*_stats.json`, and `_SUCCESS` written
last, so the filter and everything after it read every source the same way. Only items that no
finished batch attempted are read (a folder that grows adds its new files), a crashed ingest
resumes at its first unfinished shard, and a lock keeps two writers out of one folder.

Each image is read, checked as a download is (`fetch.damaged_image_reason`), turned upright by
its EXIF orientation, made RGB (transparency over white, 16-bit scaled to 8), fitted to the
image size by `download.resize_mode`, and encoded as `download.encode_format`; its original size
and the sha256 of its file go into the sample's metadata, as img2dataset records them.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from ..config import DataConfig, DownloadConfig
from ..images import as_rgb, resized
from ..download.fetch import damaged_image_reason
from ..download.run import (BATCH_PREFIX, ENCODE_QUALITY, SUCCESS_MARKER, DownloadResult, batch_settings,
                            check_same_settings, exclusive, finished_batches, next_batch_number, summarise)
from ..shards import Sample, write_shard
from ..storage import atomic_path, write_json
from .kinds import Item, items, source_kind

ITEM_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("status", pa.string()),
                         ("error_message", pa.string()), ("caption", pa.string())])
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class Fitted:
    data: bytes
    original_size: tuple[int, int]
    sha256: str  # of the source file, as img2dataset hashes a download


def run(data: DataConfig, cfg: DownloadConfig, out_dir: str | Path, image_size: int) -> DownloadResult:
    """Add the items of the local source `data.source` that no batch of `out_dir` holds, as a new batch."""
    kind = source_kind(data)
    out_dir = Path(out_dir).resolve()
    settings = {"source_kind": kind, **batch_settings(cfg, image_size)}
    out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(out_dir, "ingest"):
        batches = finished_batches(out_dir)
        check_same_settings(batches, settings)
        attempted = {url for batch in batches for path in sorted(batch.glob("[0-9]*.parquet"))
                     for url in pq.read_table(path, columns=["url"]).column("url").to_pylist()}
        new_items = [item for item in items(kind, data) if item.item_id not in attempted]
        if new_items:
            batch = out_dir / f"{BATCH_PREFIX}{next_batch_number(batches):05d}"
            _ingest_batch(new_items, batch, cfg, image_size, settings)
    return summarise(out_dir, new_urls=len(new_items))


def _ingest_batch(new_items: list[Item], batch: Path, cfg: DownloadConfig, image_size: int, settings: dict) -> None:
    staging = batch.with_name(f".{batch.name}.partial")
    ids = json.dumps([item.item_id for item in new_items])
    request = hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + ids.encode()).hexdigest()
    request_file = staging / "_REQUEST"
    if not request_file.is_file() or request_file.read_text() != request:
        shutil.rmtree(staging, ignore_errors=True)  # another request's leftovers: start afresh
    staging.mkdir(parents=True, exist_ok=True)
    request_file.write_text(request)
    per_shard = cfg.samples_per_shard
    digits = max(4, len(str(per_shard - 1)))
    for shard in range(math.ceil(len(new_items) / per_shard)):
        if (staging / f"{shard:05d}_stats.json").is_file():
            continue  # finished before a crash
        _ingest_shard(new_items[shard * per_shard : (shard + 1) * per_shard], staging, shard, digits, cfg,
                      image_size)
    request_file.unlink()
    write_json(staging / SUCCESS_MARKER, {"settings": settings, "urls": len(new_items)})
    os.replace(staging, batch)


def _ingest_shard(chunk: list[Item], staging: Path, shard: int, digits: int, cfg: DownloadConfig,
                  image_size: int) -> None:
    rows, samples = [], []
    for index, item in enumerate(chunk):
        key = f"{shard:05d}{index:0{digits}d}"
        reason, fitted = _read(item, cfg, image_size)
        rows.append({"key": key, "url": item.item_id, "status": "success" if reason is None else "failed_to_download",
                     "error_message": reason, "caption": item.caption})
        if fitted is not None:
            width, height = fitted.original_size
            meta = {**item.meta, "url": item.item_id, "key": key, "caption": item.caption,
                    "original_width": width, "original_height": height, "sha256": fitted.sha256}
            samples.append(Sample(key=key, image_bytes=fitted.data, image_ext=cfg.encode_format,
                                  caption=item.caption or "", meta=meta))
    status: dict[str, int] = {}
    for row in rows:
        status[row["error_message"] or "success"] = status.get(row["error_message"] or "success", 0) + 1
    write_shard(staging / f"{shard:05d}.tar", samples)
    with atomic_path(staging / f"{shard:05d}.parquet") as path:
        pq.write_table(pa.Table.from_pylist(rows, schema=ITEM_SCHEMA), path)
    write_json(staging / f"{shard:05d}_stats.json", {  # last: its presence means the shard is done
        "count": len(rows), "successes": len(samples), "failed_to_download": len(rows) - len(samples),
        "failed_to_resize": 0, "status_dict": status})


def _read(item: Item, cfg: DownloadConfig, image_size: int) -> tuple[str | None, Fitted | None]:
    """(None, the fitted image) or (the reason code, None)."""
    if item.problem is not None:
        return item.problem, None
    try:
        data = item.read()
    except OSError:
        return "unreadable_image", None
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
    quality = ENCODE_QUALITY[cfg.encode_format] if cfg.encode_quality is None else cfg.encode_quality
    options = {"compress_level": quality} if cfg.encode_format == "png" else {"quality": quality}
    image.save(buffer, format=PIL_FORMATS[cfg.encode_format], **options)
    return None, Fitted(buffer.getvalue(), (width, height), hashlib.sha256(data).hexdigest())
