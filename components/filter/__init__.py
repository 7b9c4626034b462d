"""Stage 2: download batches into curated shards plus `filter_report.parquet` (one reason per URL)."""

from .checks import caption_problem, perceptual_hash
from .dedup import NearDuplicateIndex
from .run import FilterResult, read_report, run

__all__ = ["FilterResult", "NearDuplicateIndex", "caption_problem", "perceptual_hash", "read_report", "run"]
