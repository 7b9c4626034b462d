"""What the filter decides about one sample on its own, and one download shard's worth of it as a task.

`examine_shard` is the per-shard work that needs no other shard: it reads a download shard,
decodes every image, checks captions and images, hashes them (sha256, and the pHash when near
duplicates are searched) and scores them with CLIP when asked. It runs as a Ray task on any node
(`parallel.ordered_map`) and returns the shard's report rows, image bytes left behind: duplicates
are then decided on the driver in corpus order (`run.py`), and `write_shard_outputs` writes the
curated shards of the samples kept.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..config import FilterConfig
from ..download.fetch import reason_code
from ..parallel import worker_node
from ..shards import Sample, read_shard
from ..storage import StorePath, open_binary

KEPT = "kept"
HELD_OUT = "held_out"
REPORT_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("url", pa.string()),
    ("stage", pa.string()),
    ("kept", pa.bool_()),
    ("reason", pa.string()),
    ("sha256", pa.string()),
    ("phash", pa.uint64()),
    ("clip_score", pa.float32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
])


CLIP_BATCH = 256  # candidates scored at once, their decoded images in memory until then


def caption_problem(caption: str, cfg: FilterConfig, blocklist: re.Pattern[str] | None = None) -> str | None:
    """Why a caption is unusable, or None. Length is counted after stripping whitespace."""
    text = caption.strip()
    if not text:
        return "empty_caption"
    if len(text) < cfg.min_caption_chars:
        return "caption_too_short"
    if len(text) > cfg.max_caption_chars:
        return "caption_too_long"
    if "\ufffd" in text:
        return "caption_not_utf8"
    if blocklist is not None and blocklist.search(text):
        return "blocked_caption"
    return None


def blocklist_pattern(words: Iterable[str]) -> re.Pattern[str] | None:
    """One case-insensitive pattern matching any listed word or phrase as whole words."""
    words = [word.strip() for word in words if word.strip()]
    if not words:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(word) for word in words) + r")(?!\w)", re.IGNORECASE)


def image_problem(image: Image.Image | None, original_size: tuple[int, int], cfg: FilterConfig) -> str | None:
    """Why an image is unusable, or None; `image` None means it did not decode."""
    if image is None:
        return "undecodable"
    width, height = original_size
    if min(width, height) < cfg.min_image_size:
        return "too_small"
    if max(width, height) / max(1, min(width, height)) > cfg.max_aspect_ratio:
        return "aspect_ratio"
    return None


def decode(image_bytes: bytes) -> Image.Image | None:
    """The image, fully decoded (a truncated file fails here, not in training), or None."""
    try:
        image = Image.open(io.BytesIO(image_bytes))
        image.load()
        return image
    except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        return None


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT32 = _dct_matrix(32)


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash: the signs of the 8x8 lowest DCT frequencies of a 32x32 grey image about their median."""
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8].ravel()
    bits = low > np.median(low)
    return int(np.packbits(bits).view(">u8")[0])


@dataclass(frozen=True)
class ShardJob:
    """One download shard to examine: `prefix` (its batch's number) goes before each key."""

    tar: Path | StorePath  # read where it lies: a local path, or on an object store
    parquet: Path | StorePath | None
    prefix: str
    cfg: FilterConfig
    near_duplicates: bool  # compute the pHash


@dataclass(frozen=True)
class Examined:
    """A shard's report rows in key order (download failures first); `reason` null marks a candidate,
    whose verdict the driver gives (duplicate, kept or held out)."""

    job: ShardJob
    rows: pa.Table
    node: str


def examine_shard(job: ShardJob) -> Examined:
    """Every check of one download shard that needs no other shard (see the module's docstring)."""
    cfg = job.cfg
    blocklist = blocklist_pattern(cfg.caption_blocklist)
    rows = _download_failures(job.parquet, job.prefix) if job.parquet is not None else []
    candidates = []
    # in key order, not the tar's: img2dataset's threads write a shard's samples as their downloads
    # finish, and the trainers' batches follow the curated order (the same key must train the same
    # weights: seed 0 drew recon oracle shape 0.996, 0.953 and 0.88 from three download orders)
    for sample in sorted(read_shard(job.tar), key=lambda sample: sample.key):
        image = decode(sample.image_bytes)
        original = _original_size(sample, image)
        row = {
            "key": job.prefix + sample.key, "url": sample.meta.get("url"), "stage": "filter",
            "sha256": sample.meta.get("sha256") or hashlib.sha256(sample.image_bytes).hexdigest(),
            "phash": None if image is None or not job.near_duplicates else perceptual_hash(image),
            "original_width": original[0], "original_height": original[1], "clip_score": None,
            "reason": caption_problem(sample.caption, cfg, blocklist) or image_problem(image, original, cfg),
        }
        rows.append(row)
        if row["reason"] is None and cfg.clip_model is not None:  # decoded images kept only to score them,
            candidates.append((row, sample.caption, image))     # a batch at a time (1000 of 256 px: 197 MB)
            if len(candidates) == CLIP_BATCH:
                _score_with_clip(candidates, cfg)
                candidates.clear()
    _score_with_clip(candidates, cfg)
    return Examined(job, pa.Table.from_pylist(rows, schema=REPORT_SCHEMA), worker_node())


_scorers: dict[tuple[str, str | None], object] = {}  # per process: a Ray worker loads CLIP once for all its tasks


def _score_with_clip(candidates: list[tuple[dict, str, Image.Image]], cfg: FilterConfig,
                     batch_size: int = CLIP_BATCH) -> None:
    if cfg.clip_model is None or not candidates:
        return
    import torch

    from ..clip.model import ClipScorer

    spec = (cfg.clip_model, cfg.clip_pretrained)
    if spec not in _scorers:
        device = "cuda" if torch.cuda.is_available() else "cpu"  # scores come back to the CPU either way
        _scorers[spec] = ClipScorer.from_spec(*spec).to(device)
    scorer = _scorers[spec]
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start : start + batch_size]
        size = scorer.image_size
        pixels = np.stack([np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
                           for _, _, image in chunk])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        scores = scorer.scores(images, [caption for _, caption, _ in chunk]).tolist()
        for (row, _, _), score in zip(chunk, scores):
            row["clip_score"] = score
            if score < cfg.clip_min_score:
                row["reason"] = "low_clip_score"


def _download_failures(parquet: Path | StorePath, prefix: str) -> list[dict]:
    """Report rows for the URLs img2dataset could not turn into a sample."""
    with open_binary(parquet) as file:
        table = pq.ParquetFile(file).read(columns=["key", "url", "status", "error_message"])
    return [
        {"key": prefix + row["key"], "url": row["url"], "stage": "download", "reason": reason_code(row["error_message"])}
        for row in table.to_pylist()
        if row["status"] != "success"
    ]


def _original_size(sample: Sample, image: Image.Image | None) -> tuple[int, int]:
    """The size before img2dataset resized it, as it recorded; else the stored size."""
    width, height = sample.meta.get("original_width"), sample.meta.get("original_height")
    if width and height:
        return int(width), int(height)
    return image.size if image is not None else (0, 0)
