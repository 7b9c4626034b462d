"""Tokenize the curated corpus: dVAE codes for images, BPE ids for captions, one Parquet part per shard.

Schema (DESIGN.md): key string, caption string, text_tokens list<uint16> (unpadded BPE ids),
image_tokens fixed_size_list<uint16>[grid*grid] (row-major argmax codes), with file metadata naming
the dVAE checkpoint and tokenizer hashes, the grid and both vocab sizes. Each part is written
atomically and a re-run skips parts already written for the same dVAE and tokenizer; the
`_manifest.json` written last marks the dataset complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import checkpoint
from ..dvae.train import load as load_dvae
from ..images import to_float
from ..shards import read_shard, shard_paths
from ..storage import atomic_path, file_sha256, write_json
from ..text.tokenizer import TextTokenizer
from ..training.stream import decode, to_int64

MANIFEST = "_manifest.json"
ROW_GROUP_SIZE = 4096


def schema(grid_size: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    return pa.schema(
        [
            ("key", pa.string()),
            ("caption", pa.string()),
            ("text_tokens", pa.list_(pa.uint16())),
            ("image_tokens", pa.list_(pa.uint16(), grid_size * grid_size)),
        ],
        metadata=metadata,
    )


@dataclass
class TokenizedCorpus:
    dataset_dir: Path
    manifest: dict
    rows: int


def _encode_images(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    codes = [model.encode(to_float(images[start : start + batch_size])) for start in range(0, len(images), batch_size)]
    return torch.cat(codes).numpy().astype(np.uint16)


# a written part is reused when these match (its rows would otherwise come out different)
REUSE_KEYS = ("dvae_hash", "tokenizer_hash", "bpe_dropout")


def _part_metadata(path: Path) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}


def run(curated_dir: Path, dvae_dir: Path, tokenizer_path: Path, out_dir: Path, text_len: int,
        batch_size: int = 256, bpe_dropout: float = 0.0) -> TokenizedCorpus:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_dvae(dvae_dir)
    tokenizer = TextTokenizer.load(tokenizer_path, text_len)
    if bpe_dropout:
        tokenizer = tokenizer.with_dropout(bpe_dropout)
    grid = model.cfg.grid_size
    metadata = {
        "dvae_hash": checkpoint.weights_hash(dvae_dir),
        "tokenizer_hash": file_sha256(tokenizer_path),
        "grid_size": str(grid),
        "image_vocab": str(model.cfg.codebook_size),
        "text_vocab": str(tokenizer.vocab_size),
        "bpe_dropout": str(bpe_dropout),
    }
    parts, total = [], 0
    for shard in shard_paths(curated_dir):
        part = out_dir / f"{shard.stem}.parquet"
        if part.exists() and all(_part_metadata(part).get(k) == metadata[k] for k in REUSE_KEYS):
            rows = pq.read_metadata(part).num_rows  # already written by an earlier run
        else:
            rows = _tokenize_shard(shard, part, model, tokenizer, grid, metadata, batch_size)
        parts.append({"file": part.name, "rows": rows, "sha256": file_sha256(part), "source_shard": shard.name})
        total += rows
    if total == 0:
        raise ValueError(f"no samples to tokenize in {curated_dir}")
    manifest = {**metadata, "rows": total, "parts": parts, "text_len": text_len}
    write_json(out_dir / MANIFEST, manifest)
    return TokenizedCorpus(dataset_dir=out_dir, manifest=manifest, rows=total)


def _tokenize_shard(shard: Path, part: Path, model, tokenizer: TextTokenizer, grid: int,
                    metadata: dict[str, str], batch_size: int) -> int:
    samples = list(read_shard(shard))
    keys, captions, images = [], [], []
    for sample in samples:
        try:
            pixels = sample.pixels()
        except Exception:  # a corrupt image is skipped, never fatal
            continue
        if pixels.shape[:2] != (model.cfg.image_size, model.cfg.image_size):
            raise ValueError(
                f"{shard.name}:{sample.key} is {pixels.shape[1]}x{pixels.shape[0]}, "
                f"the dVAE expects {model.cfg.image_size}px"
            )
        keys.append(sample.key)
        captions.append(sample.caption)
        images.append(pixels)
    image_tokens = _encode_images(model, np.stack(images), batch_size) if images else np.zeros((0, grid * grid), np.uint16)
    text_tokens = tokenizer.encode(captions)
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "text_tokens": pa.array(text_tokens, pa.list_(pa.uint16())),
            "image_tokens": pa.FixedSizeListArray.from_arrays(
                pa.array(image_tokens.reshape(-1), pa.uint16()), grid * grid
            ),
        },
        schema=schema(grid, metadata),
    )
    with atomic_path(part) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_SIZE)
    return table.num_rows


def read(dataset_dir: str | Path) -> tuple[pa.Table, dict]:
    """The whole token dataset and its manifest; refuses a dataset whose manifest is missing."""
    dataset_dir = Path(dataset_dir)
    manifest_path = dataset_dir / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{dataset_dir} has no {MANIFEST}: the tokenization did not finish")
    manifest = json.loads(manifest_path.read_text())
    tables = [pq.read_table(dataset_dir / part["file"]) for part in manifest["parts"]]
    return pa.concat_tables(tables), manifest


def to_tensors(table: pa.Table, text_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text tokens padded with 0 to text_len, their lengths, image tokens) as int64 tensors."""
    return to_int64(*decode(table, text_len))
