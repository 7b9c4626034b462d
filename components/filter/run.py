"""Keep the downloaded samples a model can learn from, and say why each of the others was dropped.

`filter_report.parquet` has one row per URL the download stage attempted: the download failures
(stage `download`, with the fetch's reason code) and every downloaded sample (stage `filter`),
kept or dropped for exactly one reason, so a user can see what a threshold costs before changing
it. The checks, cheapest first:

- caption: empty, too short or long (after stripping), undecodable bytes (U+FFFD), blocklisted;
- image: undecodable, original shorter side below `min_image_size`, original aspect ratio above
  `max_aspect_ratio` (img2dataset records the size before resizing);
- CLIP: image-caption cosine below `clip_min_score`, when `clip_model` is set;
- duplicates, in corpus order: the same sha256 (of the downloaded bytes) as a kept sample, then
  (when `near_duplicate_distance` is set, which is also when the pHash is computed) a perceptual
  hash within that many bits of a kept one.

A sample that passes is `kept` (trained on) or `held_out`: with `holdout_fraction`, the samples
whose URL (a local source's item id) hashes below that fraction go to `holdout/` instead, the
evaluation set that no stage trains on. The rule is a function of the item alone, so the split
stays put as the corpus grows, and a later copy of a held-out image is a duplicate, not a
training sample.

Work is per download shard: curated shard `<batch>-<shard>.tar`, then its report part in `_parts/`
(the part's presence means the shard is done). Everything a shard needs alone (decoding, checks,
hashes, CLIP) runs as a task on the Ray cluster when the flow connected one (`checks.examine_shard`,
`parallel.ordered_map`), as does writing the curated shards; only the duplicate verdicts are
given here, in corpus order, against sorted hash runs (`dedup.py`), so the answers are those of
one sequential pass; on a cluster of several nodes the runs are split by key over the nodes, each
partition an actor answering for its share (`partitioned.py`), so the lookups use every node too.
A re-run with the same config reuses every part whose source shard is unchanged, reading the kept
hashes back from the parts so duplicates are still caught across runs; new batches (a longer URL
list) are filtered against everything kept before. A changed config redoes everything. The report
is written last, streamed from the parts with its counts and digest (one part in memory at a time).
Either folder may be on an object store (`storage.StorePath`): the tasks read the download shards there and put
each output whole; a part is put after its shards, the report last, as on a disk.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import FilterConfig
from ..download.run import batch_shards, finished_batches
from ..parallel import ordered_map, require_shared, worker_node
from ..shards import HOLDOUT_DIR, holdout_rank, read_shard, shard_paths, write_shard
from ..sorted_runs import digest_keys
from ..storage import StorePath, SummedDigest, as_path, atomic_output, open_binary, remove_tree, write_json
from .checks import HELD_OUT, KEPT, REPORT_SCHEMA, Examined, ShardJob, examine_shard
from .dedup import shard_verdicts
from .partitioned import open_index

REPORT_NAME = "filter_report.parquet"
PARTS_DIR = "_parts"
SPILL_DIR = "_dedup_spill"  # the duplicate indexes' runs on disk while the stage runs
SETTINGS_NAME = "_filter_settings.json"
FILTER_VERSION = 3  # bump when a change to this module changes verdicts: old parts are then redone
DIGEST_KEY = b"data_digest"  # the report's metadata holds its corpus digest
# rows of consecutive shards decided with one lookup of the kept index: 1000 a lookup took 2.2x as long as 16k
# over 250k hashes in this process, 2.6x on four partitions (bench/near_duplicates.py --shard)
LOOKUP_ROWS = 1 << 14


@dataclass(frozen=True)
class FilterResult:
    """Where the curated shards and the per-sample report are, and how many samples went where."""

    curated_dir: Path | StorePath  # on the store where the stage wrote there
    report_path: Path | StorePath
    kept: int
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    held_out: int = 0  # samples that passed and went to `holdout/`, for evaluation only
    data_digest: str = ""  # of the training samples (URL or id, image sha256): names the data a model was trained on
    download_failures_by_reason: dict[str, int] = field(default_factory=dict)
    reused_shards: int = 0
    shards_by_node: dict[str, int] = field(default_factory=dict)  # shards examined on each Ray node this call
    index_partitions_by_node: dict[str, int] = field(default_factory=dict)  # the kept index's (partitioned.py)

    @property
    def metrics(self) -> dict[str, float]:
        return {"kept": self.kept, "held_out": self.held_out,
                **{f"dropped_{reason}": count for reason, count in self.dropped_by_reason.items()}}

    TAGS: ClassVar = ("data_digest",)  # what a stage's run shows of its result (flows/stages.py: show_result)
    ARTIFACTS: ClassVar = ("report_path",)

    def describe(self) -> str:
        return (f"kept {self.kept} samples ({self.held_out} more held out for evaluation), "
                f"dropped {self.dropped_by_reason}")

    def report_rows(self) -> list[dict[str, Any]]:
        """Samples per (stage, reason): kept, held out, each reason the filter dropped for, each download failure."""
        rows = [{"stage": "filter", "reason": KEPT, "samples": self.kept},
                *([{"stage": "filter", "reason": HELD_OUT, "samples": self.held_out}] if self.held_out else [])]
        rows += [{"stage": "filter", "reason": k, "samples": v} for k, v in self.dropped_by_reason.items()]
        return rows + [{"stage": "download", "reason": k, "samples": v}
                       for k, v in self.download_failures_by_reason.items()]


class _Deduplicator:
    """What was kept so far, by sha256 and perceptual hash, across shards, batches and runs (dedup.py), in this
    process or over the cluster's nodes (partitioned.py)."""

    def __init__(self, cfg: FilterConfig, spill_dir: Path, expected_items: int, partitions: int | None) -> None:
        exact = cfg.drop_exact_duplicates is not False  # None: on (the pipeline passes the source's default)
        self.index = open_index(exact, cfg.near_duplicate_distance, expected_items, spill_dir, partitions)
        try:
            self.placed = self.index.nodes()  # where its partitions are, if on the cluster
        except Exception:
            self.index.close()
            raise

    def remember(self, part: pa.Table) -> None:
        """Register a finished shard's kept samples (which may come from an earlier run)."""
        kept = part.filter(part.column("kept"))
        digests = kept.column("sha256").to_pylist() if self.index.exact_duplicates else []
        hashes = kept.column("phash").drop_null().to_numpy() if self.index.max_distance is not None else []
        self.index.add(*digest_keys(digests), np.asarray(hashes, np.uint64))

    def decide(self, shards: list[Examined], holdout_fraction: float) -> list[pa.Table]:
        """Consecutive shards' rows with every candidate's verdict, in order: a duplicate of one kept before (in
        an earlier shard or earlier in these), else kept or held out. One lookup for them all: the verdicts
        are those of one shard after another, at a fraction of the index's (and a cluster's) per-call costs."""
        rows = [shard.rows for shard in shards]
        reasons = [table.column("reason").to_pylist() for table in rows]
        candidates = [(number, i) for number, (table, shard_reasons) in enumerate(zip(rows, reasons))
                      for i, (reason, stage) in enumerate(zip(shard_reasons, table.column("stage").to_pylist()))
                      if reason is None and stage == "filter"]
        column = {name: [table.column(name).to_pylist() for table in rows]
                  for name in ("sha256", "phash", "url", "key")}
        verdicts = shard_verdicts(self.index, [column["sha256"][number][i] for number, i in candidates],
                                  [column["phash"][number][i] for number, i in candidates])
        for (number, i), verdict in zip(candidates, verdicts):
            if verdict is None:
                item = column["url"][number][i] or column["key"][number][i]
                verdict = HELD_OUT if holdout_rank(item) < holdout_fraction else KEPT
            reasons[number][i] = verdict
        decided = []
        for table, shard_reasons in zip(rows, reasons):
            reason_column = pa.array(shard_reasons, pa.string())
            kept = pc.is_in(reason_column, pa.array([KEPT, HELD_OUT]))
            decided.append(table.set_column(table.schema.get_field_index("reason"), "reason", reason_column)
                           .set_column(table.schema.get_field_index("kept"), "kept", kept))
        return decided


def lookup_groups(examined: Iterator[Examined], candidates: int) -> Iterator[list[Examined]]:
    """Consecutive examined shards, grouped until they hold `candidates` rows (or the shards end)."""
    group: list[Examined] = []
    for shard in examined:
        group.append(shard)
        if sum(len(member.rows) for member in group) >= candidates:
            yield group
            group = []
    if group:
        yield group


@dataclass(frozen=True)
class OutputsJob:
    """Write one shard's curated outputs from its download shard, then its report part (last: done)."""

    tar: Path | StorePath
    prefix: str
    part: pa.Table
    part_path: Path
    curated: Path
    held_out: Path
    signature: str


def write_shard_outputs(job: OutputsJob) -> str:
    """The curated (and held-out) shard of `job`'s verdicts, then its part; the node it ran on."""
    verdicts = dict(zip(job.part.column("key").to_pylist(), job.part.column("reason").to_pylist()))
    samples = sorted(read_shard(job.tar), key=lambda sample: sample.key)
    for sample in samples:
        sample.key = job.prefix + sample.key  # batches number their keys from 0 each
    write_shard(job.curated, (sample for sample in samples if verdicts.get(sample.key) == KEPT))
    if HELD_OUT in verdicts.values():  # a held-out shard only where there are held-out samples
        write_shard(job.held_out, (sample for sample in samples if verdicts.get(sample.key) == HELD_OUT))
    with atomic_output(job.part_path) as staging:
        pq.write_table(job.part.replace_schema_metadata({"source": job.signature}), staging)
    return worker_node()


def run(cfg: FilterConfig, shards_dir: str | Path | StorePath, out_dir: str | Path | StorePath,
        holdout_fraction: float = 0.0, index_partitions: int | None = None) -> FilterResult:
    """Filter every finished batch of the download folder `shards_dir` into `out_dir` (held-out samples into
    `out_dir/holdout/`); report last. The kept index is split into `index_partitions` on the Ray cluster's
    nodes (None: one a node on a cluster of several; 0: in this process; the verdicts are the same). Either
    folder may be on an object store (a URL, `storage.StorePath`): read and written there, by every task."""
    shards_dir, out_dir = as_path(shards_dir), as_path(out_dir)
    sources = [(batch, tar, parquet) for batch in finished_batches(shards_dir) for tar, parquet in batch_shards(batch)]
    if not sources:
        raise FileNotFoundError(f"no finished download batch with *.tar shards in {shards_dir}")
    if out_dir.resolve() == shards_dir.resolve():
        raise ValueError(f"out_dir must differ from shards_dir ({shards_dir})")
    require_shared({"the download folder": shards_dir}, writes=out_dir)  # every node's tasks read and write them
    report_path = out_dir / REPORT_NAME
    report_path.unlink(missing_ok=True)  # a crash must never leave a report describing other shards
    parts_dir = out_dir / PARTS_DIR
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in [0, 1), not {holdout_fraction}")
    settings = {"version": FILTER_VERSION, "holdout_fraction": holdout_fraction, **cfg.model_dump(mode="json")}
    if (out_dir / SETTINGS_NAME).is_file() and json.loads((out_dir / SETTINGS_NAME).read_text()) != settings:
        remove_tree(parts_dir)  # other thresholds: every verdict may change
    write_json(out_dir / SETTINGS_NAME, settings)
    present = _remove_stale_outputs(out_dir, {_curated_name(batch, tar) for batch, tar, _ in sources})

    # the indexes' runs past 64k entries: scratch, gone when the stage ends (on this disk, whatever out_dir is)
    spill_dir = out_dir / SPILL_DIR if isinstance(out_dir, Path) else Path(tempfile.mkdtemp(prefix="dalle-filter-"))
    shutil.rmtree(spill_dir, ignore_errors=True)
    dedupe = _Deduplicator(cfg, spill_dir, _expected_items(sources), index_partitions)
    try:
        return _filter(cfg, sources, out_dir, report_path, holdout_fraction, dedupe, present)
    finally:
        dedupe.index.close()
        shutil.rmtree(spill_dir, ignore_errors=True)


def _expected_items(sources: list[tuple[Path, Path, Path | None]]) -> int:
    """About how many samples the shards hold, the first shard's rows (its Parquet's; 1000 without one) times
    the shards: the near-duplicate index's band count is chosen for it (any count gives the same verdicts)."""
    first = sources[0][2]
    if first is None:
        return len(sources) * 1000
    with open_binary(first) as file:
        return len(sources) * pq.read_metadata(file).num_rows


def _filter(cfg: FilterConfig, sources: list[tuple[Path, Path, Path | None]], out_dir: Path, report_path: Path,
            holdout_fraction: float, dedupe: _Deduplicator, present: set[str]) -> FilterResult:
    outputs = [_outputs_of(out_dir, batch, tar) for batch, tar, _ in sources]
    reused = 0
    for (_, tar, parquet), (part_path, curated, held_out) in zip(sources, outputs):
        part = _reusable_part(part_path, (curated, held_out), _signature(tar, parquet), present)
        if part is None:
            break  # verdicts depend on what was kept before: redo everything after
        dedupe.remember(part)
        reused += 1
    jobs = (ShardJob(tar, parquet, batch.name.removeprefix("batch-"), cfg, dedupe.index.max_distance is not None)
            for batch, tar, parquet in sources[reused:])
    nodes: Counter[str] = Counter()

    def decided(examined: Iterator[Examined]) -> Iterator[OutputsJob]:
        shard_outputs = iter(outputs[reused:])
        for group in lookup_groups(examined, LOOKUP_ROWS):
            for shard, part, (part_path, curated, held_out) in zip(group, dedupe.decide(group, holdout_fraction),
                                                                    shard_outputs):
                nodes[shard.node] += 1
                yield OutputsJob(shard.job.tar, shard.job.prefix, part, part_path, curated, held_out,
                                 _signature(shard.job.tar, shard.job.parquet))

    for node in ordered_map(write_shard_outputs, decided(ordered_map(examine_shard, jobs))):
        nodes[node] += 0  # a node that only wrote is named too
    summary = _write_report(report_path, [part_path for part_path, _, _ in outputs])
    return FilterResult(curated_dir=out_dir, report_path=report_path, reused_shards=reused,
                        shards_by_node=dict(sorted(nodes.items())), index_partitions_by_node=dedupe.placed,
                        **summary)


def _outputs_of(out_dir: Path, batch: Path, tar: Path) -> tuple[Path, Path, Path]:
    name = _curated_name(batch, tar)
    return out_dir / PARTS_DIR / f"{name}.parquet", out_dir / f"{name}.tar", out_dir / HOLDOUT_DIR / f"{name}.tar"


def _curated_name(batch: Path, tar: Path) -> str:
    return f"{batch.name}-{tar.stem}"


def _signature(tar: Path | StorePath, parquet: Path | StorePath | None) -> str:
    """What identifies a source shard's content cheaply: its files' sizes and modification times (a store's, or
    a copy's fetched from it, which has the store's: the same signature, read in place or from the copy)."""
    stats = [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in (tar, parquet) if path is not None]
    return json.dumps(stats)


def _reusable_part(part_path: Path, outputs: tuple[Path, Path], signature: str, present: set[str]) -> pa.Table | None:
    """A finished shard's part, where its outputs are all `present` and its source is as it was."""
    curated, held_out = outputs
    if not (str(part_path) in present and str(curated) in present):
        return None
    with open_binary(part_path) as file:
        part = pq.read_table(file)
    if HELD_OUT in part.column("reason").to_pylist() and str(held_out) not in present:
        return None
    if (part.schema.metadata or {}).get(b"source") != signature.encode():
        return None
    return part.replace_schema_metadata(None).cast(REPORT_SCHEMA)


def _remove_stale_outputs(out_dir: Path, wanted: set[str]) -> set[str]:
    """Curated shards and parts whose download shard is gone (a download folder started anew) removed; the paths
    of the others, listed once (a store is not asked of each)."""
    present = set()
    for path in [*shard_paths(out_dir), *shard_paths(out_dir / HOLDOUT_DIR),
                 *sorted((out_dir / PARTS_DIR).glob("*.parquet"))]:
        if path.stem not in wanted:
            path.unlink()
        else:
            present.add(str(path))
    return present


class CorpusDigest:
    """A digest of the training samples of a report, their URLs (ids) and image hashes, that does not
    depend on their order (`storage.SummedDigest` of each pair). Fed part by part, so a report of any size
    is digested in the memory of one part."""

    def __init__(self) -> None:
        self.summed = SummedDigest()

    def add(self, report: pa.Table) -> CorpusDigest:
        kept = report.filter(pc.equal(report.column("reason"), KEPT))
        for url, sha256 in zip(kept.column("url").to_pylist(), kept.column("sha256").to_pylist()):
            self.summed.add(json.dumps([url, sha256]).encode())
        return self

    def hexdigest(self) -> str:
        return self.summed.hexdigest()[:16]


def corpus_digest(report: pa.Table) -> str:
    """The `CorpusDigest` of a whole report table."""
    return CorpusDigest().add(report).hexdigest()


def _write_report(report_path: Path, parts: list[Path]) -> dict[str, Any]:
    """The parts, in order, into one report (written last, atomically); its counts and digest, streamed."""
    by_stage: dict[str, Counter[str]] = {"filter": Counter(), "download": Counter()}
    digest = CorpusDigest()
    with atomic_output(report_path) as staging:
        with pq.ParquetWriter(staging, REPORT_SCHEMA, compression="zstd") as writer:
            for path in parts:
                with open_binary(path) as file:
                    part = pq.read_table(file).replace_schema_metadata(None).cast(REPORT_SCHEMA)
                writer.write_table(part)
                digest.add(part)
                counted = part.group_by(["stage", "reason"]).aggregate([("key", "count")]).to_pylist()
                for row in counted:
                    by_stage.setdefault(row["stage"], Counter())[row["reason"]] += row["key_count"]
            writer.add_key_value_metadata({DIGEST_KEY: digest.hexdigest().encode()})

    def dropped(stage: str) -> dict[str, int]:
        reasons = {r: n for r, n in by_stage[stage].items() if r not in (KEPT, HELD_OUT)}
        return dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0])))

    return {"kept": by_stage["filter"][KEPT], "held_out": by_stage["filter"][HELD_OUT],
            "data_digest": digest.hexdigest(), "dropped_by_reason": dropped("filter"),
            "download_failures_by_reason": dropped("download")}


def report_digest(report: str | Path | BinaryIO) -> str:
    """The corpus digest the report (a path or an open file) was written with (its metadata), else computed
    from it."""
    parquet = pq.ParquetFile(report)
    stored = (parquet.metadata.metadata or {}).get(DIGEST_KEY)
    if stored:
        return stored.decode()
    digest = CorpusDigest()
    for batch in parquet.iter_batches(columns=["url", "sha256", "reason"]):
        digest.add(pa.Table.from_batches([batch]))
    return digest.hexdigest()


def require_usable(result: FilterResult) -> FilterResult:
    """`result`, or ValueError with the counts by reason when nothing was kept (nothing to train on)."""
    if result.kept:
        return result
    dropped = {**result.download_failures_by_reason, **result.dropped_by_reason,
               **({HELD_OUT: result.held_out} if result.held_out else {})}
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(dropped.items(), key=lambda kv: -kv[1]))
    raise ValueError(f"no usable image-caption pair in the source: of {sum(dropped.values())} items, "
                     f"{reasons or 'none'} (one row per item in {result.report_path})")


def read_report(report_path: str | Path) -> pa.Table:
    """The report as a table (see REPORT_SCHEMA)."""
    return pq.read_table(report_path, schema=REPORT_SCHEMA)
