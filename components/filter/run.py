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
(the part's presence means the shard is done). A re-run with the same config reuses every part
whose source shard is unchanged, reading the kept hashes back from the parts so duplicates are
still caught across runs; new batches (a longer URL list) are filtered against everything kept
before. A changed config redoes everything. The whole report is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from ..config import FilterConfig
from ..download.fetch import reason_code
from ..download.run import batch_shards, finished_batches
from ..shards import HOLDOUT_DIR, Sample, holdout_rank, read_shard, shard_paths, write_shard
from ..storage import atomic_path, write_json
from .dedup import ExactIndex, NearDuplicateIndex, ShardDeduplicator

REPORT_NAME = "filter_report.parquet"
PARTS_DIR = "_parts"
SETTINGS_NAME = "_filter_settings.json"
FILTER_VERSION = 3  # bump when a change to this module changes verdicts: old parts are then redone
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


@dataclass(frozen=True)
class FilterResult:
    """Where the curated shards and the per-sample report are, and how many samples went where."""

    curated_dir: Path
    report_path: Path
    kept: int
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    held_out: int = 0  # samples that passed and went to `holdout/`, for evaluation only
    data_digest: str = ""  # of the training samples (URL or id, image sha256): names the data a model was trained on
    download_failures_by_reason: dict[str, int] = field(default_factory=dict)
    reused_shards: int = 0

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


class _Deduplicator:
    """What was kept so far, by sha256 and perceptual hash, across shards, batches and runs (dedup.py)."""

    def __init__(self, cfg: FilterConfig) -> None:
        exact = cfg.drop_exact_duplicates is not False  # None: on (the pipeline passes the source's default)
        self.exact = ExactIndex() if exact else None
        self.near = None if cfg.near_duplicate_distance is None else NearDuplicateIndex(cfg.near_duplicate_distance)

    def shard(self, digests: list[str], hashes: list[int | None]) -> ShardDeduplicator:
        return ShardDeduplicator(self.exact, self.near, digests, hashes)

    def remember(self, digests: list[str], hashes: list[int | None]) -> None:
        if self.exact is not None:
            self.exact.add(digests)
        if self.near is not None:
            self.near.add([h for h in hashes if h is not None])


def run(cfg: FilterConfig, shards_dir: str | Path, out_dir: str | Path, holdout_fraction: float = 0.0) -> FilterResult:
    """Filter every finished batch of the download folder `shards_dir` into `out_dir` (held-out samples into
    `out_dir/holdout/`); report last."""
    shards_dir, out_dir = Path(shards_dir), Path(out_dir)
    sources = [(batch, tar, parquet) for batch in finished_batches(shards_dir) for tar, parquet in batch_shards(batch)]
    if not sources:
        raise FileNotFoundError(f"no finished download batch with *.tar shards in {shards_dir}")
    if out_dir.resolve() == shards_dir.resolve():
        raise ValueError(f"out_dir must differ from shards_dir ({shards_dir})")
    report_path = out_dir / REPORT_NAME
    report_path.unlink(missing_ok=True)  # a crash must never leave a report describing other shards
    parts_dir = out_dir / PARTS_DIR
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in [0, 1), not {holdout_fraction}")
    settings = {"version": FILTER_VERSION, "holdout_fraction": holdout_fraction, **cfg.model_dump(mode="json")}
    if (out_dir / SETTINGS_NAME).is_file() and json.loads((out_dir / SETTINGS_NAME).read_text()) != settings:
        shutil.rmtree(parts_dir, ignore_errors=True)  # other thresholds: every verdict may change
    write_json(out_dir / SETTINGS_NAME, settings)
    _remove_stale_outputs(out_dir, {_curated_name(batch, tar) for batch, tar, _ in sources})

    checker = _Checker(cfg, holdout_fraction)
    parts, reused, reusable = [], 0, True
    for batch, tar, parquet in sources:
        name = _curated_name(batch, tar)
        part_path, signature = parts_dir / f"{name}.parquet", _signature(tar, parquet)
        outputs = (out_dir / f"{name}.tar", out_dir / HOLDOUT_DIR / f"{name}.tar")
        part = _reusable_part(part_path, outputs, signature) if reusable else None
        if part is None:
            reusable = False  # verdicts depend on what was kept before: redo everything after
            part = checker.filter_shard(batch, tar, parquet, *outputs)
            _write_part(part_path, part, signature)
        else:
            reused += 1
            checker.remember(part)
        parts.append(part)

    report = pa.concat_tables(parts)
    with atomic_path(report_path) as staging:
        pq.write_table(report, staging, compression="zstd")
    return _result(out_dir, report_path, report, reused)


class _Checker:
    def __init__(self, cfg: FilterConfig, holdout_fraction: float) -> None:
        self.cfg = cfg
        self.holdout_fraction = holdout_fraction
        self.blocklist = blocklist_pattern(cfg.caption_blocklist)
        self.dedupe = _Deduplicator(cfg)
        self._clip = None

    def remember(self, part: pa.Table) -> None:
        """Register a finished shard's kept samples (which may come from an earlier run)."""
        kept = part.filter(part.column("kept"))
        self.dedupe.remember(kept.column("sha256").to_pylist(), kept.column("phash").to_pylist())

    def filter_shard(self, batch: Path, tar: Path, parquet: Path | None, curated: Path, held_out: Path) -> pa.Table:
        prefix = batch.name.removeprefix("batch-")
        rows = _download_failures(parquet, prefix) if parquet is not None else []
        samples, candidates = [], []
        # in key order, not the tar's: img2dataset's threads write a shard's samples as their downloads
        # finish, and the trainers' batches follow the curated order (the same key must train the same
        # weights: seed 0 drew recon oracle shape 0.996, 0.953 and 0.88 from three download orders)
        for sample in sorted(read_shard(tar), key=lambda sample: sample.key):
            sample.key = prefix + sample.key  # batches number their keys from 0 each
            image = decode(sample.image_bytes)
            original = _original_size(sample, image)
            row = {
                "key": sample.key, "url": sample.meta.get("url"), "stage": "filter",
                "sha256": sample.meta.get("sha256") or hashlib.sha256(sample.image_bytes).hexdigest(),
                "phash": None if image is None or self.dedupe.near is None else perceptual_hash(image),
                "original_width": original[0], "original_height": original[1], "clip_score": None,
                "reason": caption_problem(sample.caption, self.cfg, self.blocklist)
                or image_problem(image, original, self.cfg),
            }
            rows.append(row)
            samples.append(sample)
            if row["reason"] is None:
                candidates.append((row, sample, image))
        self._score_with_clip(candidates)
        verdicts = {}
        shard = self.dedupe.shard([row["sha256"] for row, _, _ in candidates], [row["phash"] for row, _, _ in candidates])
        for position, (row, _, _) in enumerate(candidates):
            row["reason"] = row["reason"] or shard.verdict(position, row["sha256"], row["phash"]) or self._split(row)
            if row["reason"] in (KEPT, HELD_OUT):
                shard.keep(row["sha256"], row["phash"])
                verdicts[row["key"]] = row["reason"]
        shard.finish()
        for row in rows:
            row["kept"] = row["reason"] in (KEPT, HELD_OUT)
        write_shard(curated, (sample for sample in samples if verdicts.get(sample.key) == KEPT))
        if HELD_OUT in verdicts.values():  # a held-out shard only where there are held-out samples
            write_shard(held_out, (sample for sample in samples if verdicts.get(sample.key) == HELD_OUT))
        return pa.Table.from_pylist(rows, schema=REPORT_SCHEMA)

    def _split(self, row: dict) -> str:
        return HELD_OUT if holdout_rank(row["url"] or row["key"]) < self.holdout_fraction else KEPT

    def _score_with_clip(self, candidates: list[tuple[dict, Sample, Image.Image]], batch_size: int = 256) -> None:
        if self.cfg.clip_model is None or not candidates:
            return
        import torch

        from ..clip.model import ClipScorer

        if self._clip is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"  # scores come back to the CPU either way
            self._clip = ClipScorer.from_spec(self.cfg.clip_model, self.cfg.clip_pretrained).to(device)
        for start in range(0, len(candidates), batch_size):
            chunk = candidates[start : start + batch_size]
            size = self._clip.image_size
            pixels = np.stack([np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
                               for _, _, image in chunk])
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
            scores = self._clip.scores(images, [sample.caption for _, sample, _ in chunk]).tolist()
            for (row, _, _), score in zip(chunk, scores):
                row["clip_score"] = score
                if score < self.cfg.clip_min_score:
                    row["reason"] = "low_clip_score"


def _download_failures(parquet: Path, prefix: str) -> list[dict]:
    """Report rows for the URLs img2dataset could not turn into a sample."""
    table = pq.ParquetFile(parquet).read(columns=["key", "url", "status", "error_message"])
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


def _curated_name(batch: Path, tar: Path) -> str:
    return f"{batch.name}-{tar.stem}"


def _signature(tar: Path, parquet: Path | None) -> str:
    """What identifies a source shard's content cheaply: its files' sizes and modification times."""
    stats = [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in (tar, parquet) if path is not None]
    return json.dumps(stats)


def _reusable_part(part_path: Path, outputs: tuple[Path, Path], signature: str) -> pa.Table | None:
    curated, held_out = outputs
    if not (part_path.is_file() and curated.is_file()):
        return None
    part = pq.read_table(part_path)
    if HELD_OUT in part.column("reason").to_pylist() and not held_out.is_file():
        return None
    if (part.schema.metadata or {}).get(b"source") != signature.encode():
        return None
    return part.replace_schema_metadata(None).cast(REPORT_SCHEMA)


def _write_part(part_path: Path, part: pa.Table, signature: str) -> None:
    with atomic_path(part_path) as staging:
        pq.write_table(part.replace_schema_metadata({"source": signature}), staging)


def _remove_stale_outputs(out_dir: Path, wanted: set[str]) -> None:
    """Curated shards and parts whose download shard is gone (a download folder started anew)."""
    for path in [*shard_paths(out_dir), *shard_paths(out_dir / HOLDOUT_DIR),
                 *sorted((out_dir / PARTS_DIR).glob("*.parquet"))]:
        if path.stem not in wanted:
            path.unlink()


def _result(out_dir: Path, report_path: Path, report: pa.Table, reused: int) -> FilterResult:
    def counts(stage: str) -> dict[str, int]:
        reasons = Counter(r for r, s in zip(report.column("reason").to_pylist(), report.column("stage").to_pylist())
                          if s == stage and r not in (KEPT, HELD_OUT))
        return dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0])))

    reasons = Counter(report.column("reason").to_pylist())
    return FilterResult(
        curated_dir=out_dir,
        report_path=report_path,
        kept=reasons[KEPT],
        held_out=reasons[HELD_OUT],
        data_digest=corpus_digest(report),
        dropped_by_reason=counts("filter"),
        download_failures_by_reason=counts("download"),
        reused_shards=reused,
    )


def corpus_digest(report: pa.Table) -> str:
    """A digest of the training samples of a report: their URLs (ids) and image hashes, in sorted order."""
    kept = report.filter(pc.equal(report.column("reason"), KEPT))
    pairs = sorted(zip(kept.column("url").to_pylist(), kept.column("sha256").to_pylist()), key=str)
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]


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
