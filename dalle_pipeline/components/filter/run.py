"""Keep the downloaded samples a model can learn from, and say why each of the others was dropped.

Every sample gets exactly one reason in `filter_report.parquet`, so a user can see what a
threshold costs before changing it. Curated shards keep their input names (a curated shard
maps to one download shard); the report is written last, so its presence means the stage is done.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..config import FilterConfig
from ..shards import Sample, read_shard, shard_paths, write_shard
from ..storage import atomic_path

REPORT_NAME = "filter_report.parquet"
KEPT = "kept"
REPORT_SCHEMA = pa.schema([("key", pa.string()), ("kept", pa.bool_()), ("reason", pa.string())])


@dataclass(frozen=True)
class FilterResult:
    """Where the curated shards and the per-sample report are, and how many samples went where."""

    curated_dir: Path
    report_path: Path
    kept: int
    dropped_by_reason: dict[str, int] = field(default_factory=dict)


def caption_problem(caption: str, cfg: FilterConfig) -> str | None:
    """Why a caption is unusable, or None. Length is counted after stripping whitespace."""
    text = caption.strip()
    if not text:
        return "empty_caption"
    if len(text) < cfg.min_caption_chars:
        return "caption_too_short"
    if len(text) > cfg.max_caption_chars:
        return "caption_too_long"
    return None


def image_problem(image_bytes: bytes, cfg: FilterConfig) -> str | None:
    """Why an image is unusable, or None. Decodes fully: a truncated file fails here, not in training."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()
            width, height = image.size
    except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        return "undecodable"
    if min(width, height) < cfg.min_image_size:
        return "too_small"
    return None


def verdict(sample: Sample, cfg: FilterConfig) -> str:
    """`kept`, or the first reason to drop the sample (caption checks first: they are cheap)."""
    return caption_problem(sample.caption, cfg) or image_problem(sample.image_bytes, cfg) or KEPT


def run(cfg: FilterConfig, shards_dir: str | Path, out_dir: str | Path) -> FilterResult:
    """Filter every `*.tar` shard of `shards_dir` into `out_dir` and write the report last.

    Re-running redoes the work: the old report goes first (so a crash never leaves a report that
    describes other shards), and curated shards without a counterpart in `shards_dir` are removed.
    """
    shards_dir, out_dir = Path(shards_dir), Path(out_dir)
    inputs = shard_paths(shards_dir)
    if not inputs:
        raise FileNotFoundError(f"no *.tar shards in {shards_dir}")
    if out_dir.resolve() == shards_dir.resolve():
        raise ValueError(f"out_dir must differ from shards_dir ({shards_dir}): shards keep their names")
    report_path = out_dir / REPORT_NAME
    report_path.unlink(missing_ok=True)
    _remove_stale_shards(out_dir, {path.name for path in inputs})

    rows: list[dict[str, object]] = []
    for shard in inputs:
        write_shard(out_dir / shard.name, _kept_samples(read_shard(shard), cfg, rows))

    with atomic_path(report_path) as staging:
        pq.write_table(pa.Table.from_pylist(rows, schema=REPORT_SCHEMA), staging, compression="zstd")
    reasons = Counter(str(row["reason"]) for row in rows)
    kept = reasons.pop(KEPT, 0)
    return FilterResult(
        curated_dir=out_dir,
        report_path=report_path,
        kept=kept,
        dropped_by_reason=dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))),
    )


def _kept_samples(
    samples: Iterable[Sample], cfg: FilterConfig, rows: list[dict[str, object]]
) -> Iterator[Sample]:
    """Yield the samples that pass, recording one report row per sample seen."""
    for sample in samples:
        reason = verdict(sample, cfg)
        rows.append({"key": sample.key, "kept": reason == KEPT, "reason": reason})
        if reason == KEPT:
            yield sample


def _remove_stale_shards(out_dir: Path, wanted: set[str]) -> None:
    for path in shard_paths(out_dir) if out_dir.is_dir() else []:
        if path.name not in wanted:
            path.unlink()


def read_report(report_path: str | Path) -> pa.Table:
    """The report as a table (key, kept, reason)."""
    return pq.read_table(report_path, schema=REPORT_SCHEMA)
