"""Stage 1: a URL list (parquet/csv/tsv/json/jsonl, optionally .gz) into batches of webdataset shards."""

from .fetch import REASONS
from .run import DownloadResult, batch_shards, finished_batches, read_url_list, run, summarise

__all__ = ["REASONS", "DownloadResult", "batch_shards", "finished_batches", "read_url_list", "run", "summarise"]
