"""Stage 2: download shards into curated shards plus `filter_report.parquet` (key, kept, reason)."""

from .run import FilterResult, caption_problem, image_problem, read_report, run, verdict

__all__ = ["FilterResult", "caption_problem", "image_problem", "read_report", "run", "verdict"]
