"""`dalle-pipeline check-data SOURCE`: the dry run of the data stages, with no training and no servers.

It reads the whole source as a training run would (a URL list is downloaded, a local source
ingested), filters it, writes `filter_report.parquet`, and summarises it: items by reason, with a
few examples of each. Its folder is kept, so a training run with the same settings could be
pointed at it, and a second check of a grown source reads only what is new.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..cluster import connect, disconnect
from ..config import PipelineConfig
from ..download.run import run as download
from ..filter.run import FilterResult
from ..filter.run import run as filter_corpus
from .ingest import run as ingest
from .kinds import source_kind


@dataclass(frozen=True)
class DataCheck:
    kind: str
    result: FilterResult
    counts: dict[str, int]  # items by reason, `kept` included
    examples: dict[str, list[str]]  # reason -> the first few item ids (URLs for a URL list)

    @property
    def usable(self) -> bool:
        return self.result.kept > 0

    def lines(self) -> list[str]:
        total = sum(self.counts.values())
        out = [f"{self.kind} source: {total} items, {self.result.kept} usable"]
        for reason, count in self.counts.items():
            shown = ", ".join(self.examples.get(reason, []))
            out.append(f"  {reason:24s} {count:8d}   {shown}")
        out.append(f"report: {self.result.report_path}")
        return out


def check_data(cfg: PipelineConfig, out_dir: str | Path | None = None, examples: int = 3) -> DataCheck:
    """Download or ingest `cfg.data.source` into `out_dir` (default: under `<root>/check-data/`),
    filter it and count the report's reasons."""
    if cfg.shapes_corpus:
        raise ValueError("check-data needs a source (data.source): the embedded shapes corpus needs no check")
    kind = source_kind(cfg.data)
    source = Path(cfg.data.source).expanduser().resolve()
    if out_dir is None:
        from ..tracking import default_root

        out_dir = default_root().local / "check-data" / f"{source.name}-{hashlib.sha256(str(source).encode()).hexdigest()[:8]}"
    out_dir = Path(out_dir)
    connect()  # every core (of the cluster at RAY_ADDRESS, if set) reads, fits and checks the images
    try:
        if kind == "url_list":
            download(cfg.download_settings(), source, out_dir / "download", cfg.corpus.image_size,
                     url_col=cfg.data.url_col, caption_col=cfg.data.caption_col)
        else:
            ingest(cfg.data.model_copy(update={"source": str(source)}), cfg.download_settings(), out_dir / "download",
                   cfg.corpus.image_size)
        result = filter_corpus(cfg.filter_settings(), out_dir / "download", out_dir / "curated")
    finally:
        disconnect()
    counts: Counter[str] = Counter()
    found: dict[str, list[str]] = {}
    for batch in pq.ParquetFile(result.report_path).iter_batches(columns=["reason", "url"]):  # a batch at a time
        counts.update({row["values"]: row["counts"] for row in pc.value_counts(batch.column("reason")).to_pylist()})
        for reason, url in zip(batch.column("reason").to_pylist(), batch.column("url").to_pylist()):
            if len(found.setdefault(reason, [])) < examples:
                found[reason].append(str(url))
    ordered = dict(sorted(counts.items(), key=lambda kv: (kv[0] != "kept", -kv[1], kv[0])))
    return DataCheck(kind=kind, result=result, counts=ordered, examples=found)
