"""Stage 1: a URL list (parquet/csv/tsv/json/jsonl, optionally .gz; a file or a folder of them) into batches of
webdataset shards."""

from .fetch import REASONS
from .run import DownloadResult, batch_shards, finished_batches, run, summarise
from .url_list import read_url_list

__all__ = ["REASONS", "DownloadResult", "batch_shards", "finished_batches", "read_url_list", "run", "summarise"]
