"""Tokenize the curated corpus with Ray Data: dVAE codes for images, BPE ids for captions, one Parquet part per shard.

The format (schema, metadata, manifest, readers) is `token_parquet`'s; this module writes it.

The pipeline: Ray Data tasks read the shards still to do, decode their images and BPE-encode their
captions (`read_shard_rows`); a pool of `ImageEncoder` actors (a GPU each where the cluster has
GPUs, else one on the CPUs) turns pixels into codes; the driver gathers each shard's rows and
writes its part atomically as soon as the last one arrives. A re-run skips parts already written
for the same dVAE and tokenizer, so a killed run resumes at shard granularity and never leaves a
half part. An image that does not decode is counted (`skipped` per part) and left out, never fatal.
Last, a decode check: the dVAE decodes the stored tokens of a sample of rows, which must match
their original images with the PSNR the dVAE's training reported and, on the shapes corpus (rows
whose metadata holds their shapes), the oracle's reading of its reconstructions (`recon_oracle_*`);
`_manifest.json`, written after it, marks the dataset complete.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow.parquet as pq
import torch

from .. import checkpoint
from ..cluster import connect
from ..corpus import oracle
from ..corpus.shapes import specs_from_json
from ..dvae.model import load as load_dvae
from ..images import psnr, to_float, to_uint8
from ..lineage import curated_corpus
from ..parallel import require_shared
from ..shards import read_shard, shard_paths
from ..storage import StorePath, as_path, file_sha256, open_binary, write_json
from ..text.tokenizer import TextTokenizer
from ..token_parquet import MANIFEST, part_metadata, write_part
from ..tracking import Tracker

READ_BATCH_ROWS = 256  # rows per block leaving a reader task: bounded memory whatever the shard size
DECODE_CHECK_ROWS = 64
DECODE_CHECK_TOLERANCE_DB = 2.0
# the oracle on the decoded rows may fall this far below what the dVAE stage read from its own
# reconstructions (256 scenes) before the check fails: 64 rows are a coarse sample, wrong tokens
# (another dVAE, another order) read near chance
DECODE_CHECK_ORACLE_TOLERANCE = 0.2


@dataclass(frozen=True)
class TokenizedCorpus:
    dataset_dir: Path | StorePath
    manifest: dict
    rows: int

    ARTIFACTS: ClassVar = ("manifest_path",)  # what a stage's run shows of its result (flows/stages.py: show_result)

    @property
    def metrics(self) -> dict[str, float]:
        return {"rows": self.rows}

    @property
    def manifest_path(self) -> Path | StorePath:
        return self.dataset_dir / MANIFEST


# a written part is reused when these match (its rows would otherwise come out different)
REUSE_KEYS = ("dvae_hash", "tokenizer_hash", "bpe_dropout")


def read_shard_rows(batch: dict[str, np.ndarray], image_size: int, tokenizer_path: str, text_len: int,
                    bpe_dropout: float) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data reader: each shard named in `batch` as blocks of decoded pixels and BPE ids.

    Every sample gives a row, an undecodable image one with `ok` False and black pixels, so the
    driver knows from `shard_rows` when it holds a whole shard; an empty shard gives one row with
    `shard_rows` 0.
    """
    tokenizer = TextTokenizer.load(tokenizer_path, text_len)
    if bpe_dropout:
        tokenizer = tokenizer.with_dropout(bpe_dropout)
    for shard in batch["shard"]:
        samples = list(read_shard(shard))
        if not samples:
            yield _rows(shard, 0, 0, [], [], [], np.zeros((1, image_size, image_size, 3), np.uint8), tokenizer,
                        placeholder=True)
            continue
        for start in range(0, len(samples), READ_BATCH_ROWS):
            chunk = samples[start : start + READ_BATCH_ROWS]
            pixels = np.zeros((len(chunk), image_size, image_size, 3), np.uint8)
            ok = []
            for row, sample in enumerate(chunk):
                try:
                    image = sample.pixels()
                except Exception:  # a corrupt image is skipped, never fatal
                    ok.append(False)
                    continue
                if image.shape[:2] != (image_size, image_size):
                    raise ValueError(f"{Path(shard).name}:{sample.key} is {image.shape[1]}x{image.shape[0]}, "
                                     f"the dVAE expects {image_size}px")
                pixels[row] = image
                ok.append(True)
            yield _rows(shard, len(samples), start, [s.key for s in chunk], [s.caption for s in chunk], ok, pixels,
                        tokenizer)


def _rows(shard: str, shard_rows: int, start: int, keys: list[str], captions: list[str], ok: list[bool],
          pixels: np.ndarray, tokenizer: TextTokenizer, placeholder: bool = False) -> dict[str, np.ndarray]:
    count = 1 if placeholder else len(keys)
    text = np.zeros((count, tokenizer.text_len), np.uint16)
    lengths = np.zeros(count, np.int32)
    for row, ids in enumerate(tokenizer.encode(captions)):
        text[row, : len(ids)], lengths[row] = ids, len(ids)
    return {
        "shard": np.array([shard] * count),
        "shard_rows": np.full(count, shard_rows, np.int64),
        "index": np.arange(start, start + count, dtype=np.int64),
        "key": np.array(keys or [""], dtype=object),
        "caption": np.array(captions or [""], dtype=object),
        "ok": np.array(ok or [False], dtype=bool),
        "pixels": pixels,
        "text": text,
        "text_length": lengths,
    }


class ImageEncoder:
    """Ray Data actor: the dVAE encoder (argmax codes) on this actor's GPU, or on `threads` CPU threads."""

    def __init__(self, dvae_dir: str, threads: int) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.model = load_dvae(dvae_dir).to(self.device)
        self.grid_len = self.model.cfg.grid_size**2

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch.pop("pixels")
        tokens = np.zeros((len(pixels), self.grid_len), np.uint16)
        ok = batch["ok"]
        if ok.any():
            images = to_float(torch.from_numpy(np.ascontiguousarray(pixels[ok]))).to(self.device)
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    codes = self.model.encode(images.contiguous(memory_format=torch.channels_last))
            else:
                codes = self.model.encode(images)
            tokens[ok] = codes.cpu().numpy().astype(np.uint16)
        batch["image_tokens"] = tokens
        return batch


def run(curated_dir: str | Path | StorePath, dvae_dir: str | Path | StorePath, tokenizer_path: str | Path | StorePath,
        out_dir: str | Path | StorePath, text_len: int, batch_size: int = 256, bpe_dropout: float = 0.0,
        ray_address: str | None = None, tracker: Tracker | None = None) -> TokenizedCorpus:
    """Tokenize the curated shards of `curated_dir` into `out_dir`, a folder or an object store's URL (the
    driver puts each part whole, the manifest last), resuming at shard granularity; `tracker` records the
    curated corpus as the run's input."""
    out_dir = as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_dvae(dvae_dir)
    tokenizer = TextTokenizer.load(tokenizer_path, text_len)
    grid = model.cfg.grid_size
    metadata = {
        "dvae_hash": checkpoint.weights_hash(dvae_dir),
        "tokenizer_hash": file_sha256(tokenizer_path),
        "grid_size": str(grid),
        "image_vocab": str(model.cfg.codebook_size),
        "text_vocab": str(tokenizer.vocab_size),
        "bpe_dropout": str(bpe_dropout),
    }
    shards = shard_paths(curated_dir)
    if not shards:
        raise FileNotFoundError(f"no curated shards (*.tar) in {curated_dir}")
    if tracker is not None:
        tracker.log_input_dataset(curated_corpus(curated_dir), "training")
    written = {part.name for part in out_dir.glob("*.parquet")}  # listed once: on a store, one listing
    pending = [shard for shard in shards if not _reusable(out_dir / f"{shard.stem}.parquet", written, metadata)]
    if pending:
        _tokenize(pending, out_dir, metadata, as_path(dvae_dir), as_path(tokenizer_path), text_len,
                  model.cfg.image_size, batch_size, bpe_dropout, ray_address)
    parts, total = [], 0
    for shard in shards:
        part = out_dir / f"{shard.stem}.parquet"
        with open_binary(part) as file:
            rows = pq.read_metadata(file).num_rows
        parts.append({"file": part.name, "rows": rows, "skipped": int(part_metadata(part).get("skipped", 0)),
                      "sha256": file_sha256(part), "source_shard": shard.name})
        total += rows
    if total == 0:
        raise ValueError(f"no samples to tokenize in {curated_dir}")
    check = decode_check(model, out_dir, parts, as_path(curated_dir), checkpoint.read_config(dvae_dir, "dvae")[1])
    manifest = {**metadata, "rows": total, "skipped": sum(p["skipped"] for p in parts), "parts": parts,
                "text_len": text_len, "decode_check": check}
    write_json(out_dir / MANIFEST, manifest)
    return TokenizedCorpus(dataset_dir=out_dir, manifest=manifest, rows=total)


def _reusable(part: Path | StorePath, written: set[str], metadata: dict[str, str]) -> bool:
    return part.name in written and all(part_metadata(part).get(k) == metadata[k] for k in REUSE_KEYS)


def _tokenize(pending: list[Path | StorePath], out_dir: Path | StorePath, metadata: dict[str, str], dvae_dir: Path | StorePath,
              tokenizer_path: Path | StorePath, text_len: int, image_size: int, batch_size: int, bpe_dropout: float,
              ray_address: str | None) -> None:
    """Run the Ray Data pipeline over `pending` shards, writing each part as it completes."""
    resources = connect(ray_address)
    # the shards are read, the tokenizers loaded, by tasks and actors on any node
    require_shared({"the curated shards": pending[0].parent, "the image tokenizer": dvae_dir,
                    "the text tokenizer": tokenizer_path})
    quiet_ray_data()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    rows = _pipeline(pending, image_size, tokenizer_path, text_len, bpe_dropout, batch_size, dvae_dir, gpus, cpus)
    waiting: dict[str, list[dict[str, np.ndarray]]] = {}
    received: dict[str, int] = {}
    progress = ProgressLine("tokenize-corpus", len(pending), "shards")
    for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
        for shard in np.unique(batch["shard"]):
            mine = batch["shard"] == shard
            waiting.setdefault(shard, []).append({name: column[mine] for name, column in batch.items()})
            received[shard] = received.get(shard, 0) + int(mine.sum())
            expected = max(1, int(batch["shard_rows"][mine][0]))
            if received[shard] == expected:
                _write_shard_part(waiting.pop(shard), out_dir / f"{Path(shard).stem}.parquet", metadata,
                                  math.isqrt(len(batch["image_tokens"][0])))
                progress.advance(expected)
    if waiting:
        raise RuntimeError(f"the tokenization ended with shards incomplete: {sorted(waiting)}")


def _pipeline(pending: list[Path], image_size: int, tokenizer_path: Path, text_len: int, bpe_dropout: float,
              batch_size: int, dvae_dir: Path, gpus: int, cpus: int):
    """The Ray Data pipeline: shards read into rows (captions tokenized), images encoded by a pool of actors."""
    import ray.data

    actors = max(1, gpus)
    with warnings.catch_warnings():  # max_restarts is a Ray remote argument, whose keyword Ray 2.60 calls deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        shards = ray.data.from_items([{"shard": str(shard)} for shard in pending], override_num_blocks=len(pending))
        rows = shards.map_batches(read_shard_rows, batch_size=1, num_cpus=1, fn_kwargs={
            "image_size": image_size, "tokenizer_path": str(tokenizer_path), "text_len": text_len,
            "bpe_dropout": bpe_dropout})
        return rows.map_batches(
            ImageEncoder, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={"dvae_dir": str(dvae_dir), "threads": max(1, cpus // actors)},
            # an encoder that dies fails the stage, which resumes at its first unwritten part: Ray's restart of an
            # actor whose constructor arguments live in the object store is unreliable (it says so on stderr for
            # every actor otherwise)
            max_restarts=0, **({"num_gpus": 1} if gpus else {"num_cpus": 1}))

def quiet_ray_data() -> None:
    """Ray Data's own output kept to warnings: its progress block (eight lines a dataset, every few seconds)
    and execution plans go to its log file only; the stage prints its `ProgressLine`."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # nor its warning that the progress bars are off, nor its advice on memory every 30 s (an encoder actor
    # holds its model and a batch's activations: several GiB at 256 px, which Ray takes for a leak)
    for chatty in ("ray.data._internal.progress", "ray.data._internal.issue_detection"):
        logging.getLogger(chatty).setLevel(logging.ERROR)


class ProgressLine:
    """One line of progress for a stage, at most every `every_s` seconds and at the end."""

    def __init__(self, stage: str, total: int, unit: str, every_s: float = 10.0) -> None:
        self.stage, self.total, self.unit, self.every_s = stage, total, unit, every_s
        self.done, self.rows, self.started = 0, 0, time.perf_counter()
        self.shown = self.started

    def advance(self, rows: int) -> None:
        self.done, self.rows = self.done + 1, self.rows + rows
        now = time.perf_counter()
        if self.done == self.total or now - self.shown >= self.every_s:
            self.shown = now
            print(f"{self.stage}: {self.done}/{self.total} {self.unit}, {self.rows} rows, "
                  f"{self.rows / max(now - self.started, 1e-9):.0f} rows/s", flush=True)


def _write_shard_part(chunks: list[dict[str, np.ndarray]], part: Path | StorePath, metadata: dict[str, str], grid: int) -> None:
    """Write one shard's rows in shard order; undecodable images are left out and counted (`skipped`)."""
    columns = {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}
    order = np.argsort(columns["index"], kind="stable")
    real = columns["shard_rows"][0] > 0
    keep = order[columns["ok"][order]] if real else order[:0]
    left_out = int(real) * int((~columns["ok"]).sum())
    write_part(part, columns["key"][keep].tolist(), columns["caption"][keep].tolist(), columns["text"][keep],
               columns["text_length"][keep], columns["image_tokens"][keep], grid, {**metadata, "skipped": str(left_out)})


@torch.no_grad()
def decode_check(model, dataset_dir: Path | StorePath, parts: list[dict[str, Any]], curated_dir: Path | StorePath,
                 reported: dict[str, Any], rows: int = DECODE_CHECK_ROWS, seed: int = 0) -> dict[str, Any]:
    """Decode the stored tokens of a seeded sample of rows and compare them with their original images.

    `reported` is what the dVAE's training measured (its checkpoint's metadata). The PSNR must come
    within DECODE_CHECK_TOLERANCE_DB of its `eval_psnr`, and where the rows carry their shapes (the
    shapes corpus: `objects` in their metadata) the oracle's reading of the decoded images within
    DECODE_CHECK_ORACLE_TOLERANCE of its `recon_oracle_<attribute>`: tokens stored out of order,
    from another dVAE or damaged, decode to something else and fail here, before the prior trains
    on them.
    """
    reported_psnr = reported.get("eval_psnr")
    generator = np.random.default_rng(seed)
    candidates = [part for part in parts if part["rows"]]
    chosen = generator.choice(len(candidates), size=min(len(candidates), 4), replace=False)
    originals, tokens, specs = [], [], []
    for index in sorted(chosen):
        part = candidates[index]
        with open_binary(dataset_dir / part["file"]) as file:
            table = pq.read_table(file, columns=["key", "image_tokens"])
        picks = np.sort(generator.choice(table.num_rows, size=min(table.num_rows, rows // len(chosen) or 1),
                                         replace=False))
        keys = [table.column("key")[int(i)].as_py() for i in picks]
        wanted = set(keys)
        samples = {s.key: s for s in read_shard(curated_dir / part["source_shard"]) if s.key in wanted}
        originals += [samples[key].pixels() for key in keys]
        specs += [samples[key].meta.get("objects") for key in keys]
        column = table.column("image_tokens").combine_chunks()
        flat = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
        tokens.append(torch.from_numpy(flat[picks].astype(np.int64)))
    target = to_float(np.stack(originals))
    decoded = model.eval().decode(torch.cat(tokens))
    mse = float(torch.nn.functional.mse_loss(decoded, target))
    result = {"rows": len(originals), "psnr": psnr(mse), "dvae_eval_psnr": reported_psnr}
    problem = None
    if reported_psnr is not None and result["psnr"] < reported_psnr - DECODE_CHECK_TOLERANCE_DB:
        problem = (f"decode to their images at {result['psnr']:.2f} dB PSNR, the dVAE's training reported "
                   f"{reported_psnr:.2f} dB")
    shaped = [row for row, objects in enumerate(specs) if objects]
    if shaped:
        pixels = to_uint8(decoded[shaped])
        read = oracle.mean_scores([oracle.score(image, specs_from_json(specs[row]))
                                   for image, row in zip(pixels, shaped)])
        result["oracle_rows"] = len(shaped)
        for attribute in oracle.ATTRIBUTES:
            result[f"oracle_{attribute}"] = read[attribute]
            expected = reported.get(f"recon_oracle_{attribute}")
            short = expected is not None and read[attribute] < expected - DECODE_CHECK_ORACLE_TOLERANCE
            if short and problem is None:
                problem = (f"decode to images whose {attribute} the oracle reads right in {read[attribute]:.2f} of "
                           f"{len(shaped)}, where the dVAE's own reconstructions read {expected:.2f}")
    if problem is not None:
        raise ValueError(f"decode check failed in {dataset_dir}: the stored tokens of {len(originals)} rows "
                         f"{problem}; the tokens do not belong to these images (another dVAE, wrong order or "
                         "damaged parts)")
    return result
