"""The token Parquet format, written by `tokenize_corpus` and read by the prior's training.

One part per curated shard: `key: string`, `caption: string`, `text_tokens: list<uint16>`
(unpadded BPE ids), `image_tokens: fixed_size_list<uint16>[grid*grid]` (row-major codes), zstd,
row groups of ROW_GROUP_SIZE rows, file metadata naming the dVAE and tokenizer hashes, the grid,
both vocab sizes, the BPE dropout and the rows `skipped`. `_manifest.json` (MANIFEST), written
last, lists the parts and marks the dataset complete; every reader refuses a dataset without it.
A global row index is a row's position in manifest order (parts as the manifest lists them, rows
in file order): `read` returns that order, `TokenParquet.read_rows` reads by it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .storage import StorePath, as_path, atomic_output, open_binary

MANIFEST = "_manifest.json"
ROW_GROUP_SIZE = 4096
COLUMNS = ["text_tokens", "image_tokens"]


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


def part_metadata(path: Path | StorePath) -> dict[str, str]:
    """A part's file metadata as strings (dvae_hash, tokenizer_hash, grid_size, ..., skipped)."""
    with open_binary(path) as file:
        return {k.decode(): v.decode() for k, v in (pq.read_schema(file).metadata or {}).items()}


def write_part(path: Path | StorePath, keys: list[str], captions: list[str], text: np.ndarray, lengths: np.ndarray,
               image_tokens: np.ndarray, grid: int, metadata: dict[str, str]) -> None:
    """Write one part atomically (on a store, put whole): `text` [n, >= max length] padded ids cut to `lengths`, `image_tokens` [n, grid²]."""
    lengths = lengths.astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat_text = text[np.arange(text.shape[1]) < lengths[:, None]]
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "text_tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_text, pa.uint16())),
            "image_tokens": pa.FixedSizeListArray.from_arrays(pa.array(image_tokens.reshape(-1), pa.uint16()),
                                                              grid * grid),
        },
        schema=schema(grid, metadata),
    )
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_SIZE)


def read_manifest(dataset_dir: str | Path | StorePath) -> dict:
    path = as_path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{dataset_dir} has no {MANIFEST}: the tokenization did not finish")
    return json.loads(path.read_text())


class TokenParquet:
    """The token dataset's row groups, checked against its manifest; reads rows by global index."""

    def __init__(self, dataset_dir: str | Path | StorePath, text_len: int | None = None) -> None:
        self.dataset_dir = as_path(dataset_dir)
        self.manifest = read_manifest(self.dataset_dir)
        self.text_len = int(text_len if text_len is not None else self.manifest["text_len"])
        self.image_len = int(self.manifest["grid_size"]) ** 2
        self.paths: list[Path | StorePath] = []
        self.metadata: list[pq.FileMetaData] = []
        group_part, group_index, group_rows = [], [], []
        for part_number, part in enumerate(self.manifest["parts"]):
            path = self.dataset_dir / part["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {MANIFEST} but missing")
            with open_binary(path) as file:
                metadata = pq.read_metadata(file)
            if metadata.num_rows != part["rows"]:
                raise ValueError(f"{path} has {metadata.num_rows} rows, {MANIFEST} says {part['rows']}")
            image_type = metadata.schema.to_arrow_schema().field("image_tokens").type
            if image_type.list_size != self.image_len:
                raise ValueError(f"{path} has {image_type.list_size} image tokens per row, "
                                 f"the manifest's grid_size {self.manifest['grid_size']} needs {self.image_len}")
            self.paths.append(path)
            self.metadata.append(metadata)
            for index in range(metadata.num_row_groups):
                group_part.append(part_number)
                group_index.append(index)
                group_rows.append(metadata.row_group(index).num_rows)
        # row group g is part group_part[g]'s row group group_index[g], rows [group_start[g], group_start[g + 1])
        self.group_part = np.array(group_part, dtype=np.int64)
        self.group_index = np.array(group_index, dtype=np.int64)
        self.group_start = np.concatenate([[0], np.cumsum(group_rows, dtype=np.int64)])
        self.num_rows = int(self.group_start[-1])

    @property
    def num_groups(self) -> int:
        return len(self.group_part)

    @property
    def max_group_rows(self) -> int:
        return int(np.diff(self.group_start).max(initial=0))

    @property
    def row_fields(self) -> tuple[tuple[tuple[int, ...], np.dtype], ...]:
        """What `read_group` gives per row: text (text_len,) uint16, length int64, image (grid²,) uint16."""
        return ((self.text_len,), np.dtype(np.uint16)), ((), np.dtype(np.int64)), ((self.image_len,), np.dtype(np.uint16))

    def to_batch(self, arrays: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return to_int64(*arrays)

    def group_table(self, group: int, columns: list[str]) -> pa.Table:
        """Some columns of row group `group` (a part's row group: its file opened where it lies, on a store too)."""
        part = int(self.group_part[group])
        with open_binary(self.paths[part]) as file, pq.ParquetFile(file, metadata=self.metadata[part]) as parquet:
            return parquet.read_row_group(int(self.group_index[group]), columns=columns)

    def read_group(self, group: int, local_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(text uint16 [n, text_len] padded with 0, lengths int64 [n], image uint16 [n, grid²]) of some rows of a group."""
        text, lengths, image = decode(self.group_table(group, COLUMNS), self.text_len)
        return text[local_rows], lengths[local_rows], image[local_rows]

    def read_rows(self, rows: Iterable[int] | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text, lengths, image) int64 tensors of these global rows, in the order given (e.g. a validation set)."""
        rows = as_row_indices(rows, self.num_rows)
        text = np.zeros((len(rows), self.text_len), np.uint16)
        lengths = np.zeros(len(rows), np.int64)
        image = np.zeros((len(rows), self.image_len), np.uint16)
        groups = np.searchsorted(self.group_start, rows, side="right") - 1
        for group in np.unique(groups):
            where = np.flatnonzero(groups == group)
            text[where], lengths[where], image[where] = self.read_group(group, rows[where] - self.group_start[group])
        return to_int64(text, lengths, image)


def decode(table: pa.Table, text_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A token table's text padded with 0 (truncated to text_len), lengths and image tokens, as `to_tensors` has them."""
    text_column = table.column("text_tokens").combine_chunks()
    offsets = text_column.offsets.to_numpy().astype(np.int64)  # into .values, whatever the array's slice offset
    values = text_column.values.to_numpy(zero_copy_only=False)
    lengths = np.minimum(np.diff(offsets), text_len)
    positions = np.arange(text_len)
    filled = positions < lengths[:, None]
    text = np.zeros((len(lengths), text_len), np.uint16)
    text[filled] = values[(offsets[:-1, None] + positions)[filled]]
    image_column = table.column("image_tokens").combine_chunks()
    image = image_column.flatten().to_numpy(zero_copy_only=False).reshape(-1, image_column.type.list_size)
    return text, lengths, image


def to_int64(text: np.ndarray, lengths: np.ndarray, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(text.astype(np.int64)), torch.from_numpy(lengths.astype(np.int64)),
            torch.from_numpy(image.astype(np.int64)))


def as_row_indices(rows: Iterable[int] | np.ndarray | torch.Tensor, num_rows: int) -> np.ndarray:
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu().numpy()
    elif isinstance(rows, (set, frozenset)):
        rows = np.fromiter(rows, np.int64, len(rows))
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= num_rows):
        raise ValueError(f"row indices must lie in [0, {num_rows}), got {rows.min()}..{rows.max()}")
    return rows


def read(dataset_dir: str | Path | StorePath) -> tuple[pa.Table, dict]:
    """The whole token dataset and its manifest; refuses a dataset whose manifest is missing."""
    dataset_dir = as_path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    tables = []
    for part in manifest["parts"]:
        with open_binary(dataset_dir / part["file"]) as file:
            tables.append(pq.read_table(file))
    return pa.concat_tables(tables), manifest


def to_tensors(table: pa.Table, text_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text tokens padded with 0 to text_len, their lengths, image tokens) as int64 tensors."""
    return to_int64(*decode(table, text_len))
