"""Stage 1: a URL list (parquet/csv/tsv/json/jsonl) into webdataset shards, through img2dataset."""

from .run import DownloadResult, inspect_url_list, run, summarise

__all__ = ["DownloadResult", "inspect_url_list", "run", "summarise"]
