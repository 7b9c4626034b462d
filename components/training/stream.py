"""Streaming batches of a dataset in row groups: groups sharded by rank, a seeded shuffle buffer, step-exact resume.

`TensorBatches` needs the whole corpus in memory; `StreamedBatches` holds one shuffle buffer per
rank and reads row groups as it goes, the next few read ahead in background threads (decoding
overlaps the training step). A dataset is anything with `RowGroups`' members: the token Parquet
(`TokenParquet`, its row groups; the prior) and the curated image shards (`ImageShards`, one group
per shard; the dVAE and CLIP). A global row index is a row's position in the dataset's order (for
the token Parquet, parts as the manifest lists them, rows in file order; see `token_parquet`), so
a validation split drawn over its rows keeps its meaning here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..storage import StorePath
from ..token_parquet import TokenParquet, as_row_indices


class RowGroups(Protocol):
    """A dataset read a row group at a time (rows [group_start[g], group_start[g + 1]) are group g's)."""

    dataset_dir: Path | StorePath
    group_start: np.ndarray
    num_rows: int

    @property
    def max_group_rows(self) -> int: ...

    @property
    def row_fields(self) -> tuple[tuple[tuple[int, ...], np.dtype], ...]:
        """Each array a row has: its shape and dtype (what `read_group` returns, with the rows first)."""

    def read_group(self, group: int, local_rows: np.ndarray) -> tuple[np.ndarray, ...]: ...

    def to_batch(self, arrays: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, ...]:
        """Drawn rows as the tensors a batch holds."""


class _ShuffleBuffer:
    """Rows waiting to be drawn: their global indices and, once materialised, their tokens.

    Drawing removes rows by moving the buffer's last rows into the holes, so a draw costs O(batch)
    and the random draws depend only on the buffer's size, never on its contents: the index-only
    replay of `from_step` makes exactly the draws the data-carrying run makes.
    """

    def __init__(self, capacity: int, fields: tuple[tuple[tuple[int, ...], np.dtype], ...], with_data: bool) -> None:
        self.rows = np.empty(capacity, np.int64)
        self.size = 0
        self.fields = fields
        self.data: tuple[np.ndarray, ...] | None = None
        if with_data:
            self.allocate()

    def allocate(self) -> None:
        self.data = tuple(np.zeros((len(self.rows), *shape), dtype) for shape, dtype in self.fields)

    def append(self, rows: np.ndarray, data: tuple[np.ndarray, ...] | None) -> None:
        end = self.size + len(rows)
        self.rows[self.size : end] = rows
        if data is not None:
            for array, values in zip(self.data, data):
                array[self.size : end] = values
        self.size = end

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, ...] | None:
        """The data at `positions` (None before materialising), which then leave the buffer."""
        taken = tuple(array[positions] for array in self.data) if self.data is not None else None
        tail = self.size - len(positions)
        holes = positions[positions < tail]
        taken_from_tail = np.zeros(len(positions), bool)
        taken_from_tail[positions[positions >= tail] - tail] = True
        fillers = tail + np.flatnonzero(~taken_from_tail)
        for array in (self.rows, *(self.data or ())):
            array[holes] = array[fillers]
        self.size = tail
        return taken


class StreamedBatches:
    """Yields batches of `per_rank_batch` rows of a `RowGroups` dataset forever (the token Parquet's:
    (text, lengths, image) int64; the image shards': uint8 pixels, and CLIP's caption tokens).

    Every epoch, a permutation seeded by (seed, epoch), the same on every rank, orders the row
    groups; their kept rows, concatenated, are cut into `world_size` equal shares, and this rank
    reads its share group by group (a group straddling two shares is read by both, each keeping
    its own rows), `prefetch` groups ahead in background threads. Rows pass through a shuffle
    buffer of `buffer_rows` rows drawn by a generator
    seeded by (seed, epoch, rank). Each rank yields `steps_per_epoch` batches per epoch, the same
    number on every rank (DDP would hang otherwise): up to world_size - 1 rows of the epoch and
    up to per_rank_batch - 1 of each share are left out, different ones each epoch.

    The shuffle only mixes rows within `buffer_rows`: keep it at several row groups (4096 rows
    each as `tokenize_corpus` writes them) for a well-mixed order. `exclude_rows` (global row
    indices, e.g. a validation split) are never yielded.
    """

    def __init__(
        self,
        dataset: RowGroups | str | Path | StorePath,
        per_rank_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        buffer_rows: int = 16384,
        exclude_rows: Iterable[int] | np.ndarray | torch.Tensor | None = None,
        device: torch.device | str | None = None,
        prefetch: int = 2,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if per_rank_batch < 1 or buffer_rows < 0:
            raise ValueError(f"per_rank_batch must be >= 1 and buffer_rows >= 0, got {per_rank_batch}, {buffer_rows}")
        self.dataset = TokenParquet(dataset) if isinstance(dataset, (str, Path, StorePath)) else dataset
        self.per_rank_batch, self.buffer_rows, self.prefetch = per_rank_batch, buffer_rows, prefetch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device) if device is not None else None
        self._excluded = np.unique(as_row_indices(exclude_rows if exclude_rows is not None else [], self.dataset.num_rows))
        starts = self.dataset.group_start
        # per row group, how many rows are kept and where its excluded rows begin in self._excluded
        self._excluded_from = np.searchsorted(self._excluded, starts)
        kept = np.diff(starts) - np.diff(self._excluded_from)
        self._groups = np.flatnonzero(kept)  # groups left with no row never enter a permutation
        self._group_kept = kept[self._groups]
        self.num_rows = int(kept.sum())
        if self.num_rows < per_rank_batch * world_size:
            raise ValueError(f"{self.num_rows} rows of {self.dataset.dataset_dir} (after {len(self._excluded)} "
                             f"excluded) cannot fill one batch of {per_rank_batch} x {world_size} ranks")
        self._share_rows = self.num_rows // world_size
        self._seed = seed % 2**64  # numpy seeds must be non-negative; this keeps every int64 seed distinct

    @property
    def steps_per_epoch(self) -> int:
        return self._share_rows // self.per_rank_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self.from_step(0)

    def from_step(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Resume mid-epoch: the batch yielded first is the one step `step` would have seen.

        The epoch's draws up to `step` are replayed on row indices only (no Parquet read); then
        only the row groups still represented in the shuffle buffer are read.
        """
        epoch, offset = divmod(step, self.steps_per_epoch)
        while True:
            yield from self._epoch(epoch, offset)
            epoch, offset = epoch + 1, 0

    def share(self, epoch: int) -> Iterator[tuple[int, np.ndarray]]:
        """This rank's (row group, local row indices) of `epoch`, in reading order."""
        permutation = np.random.default_rng([self._seed, epoch]).permutation(len(self._groups))
        order, ends = self._groups[permutation], np.cumsum(self._group_kept[permutation])
        low, high = self.rank * self._share_rows, (self.rank + 1) * self._share_rows
        for position in range(np.searchsorted(ends, low, side="right"), len(order)):
            group, end = int(order[position]), int(ends[position])
            rows = self._kept_rows(group)
            begin = end - len(rows)
            if begin >= high:
                break
            yield group, rows[max(low - begin, 0) : min(high, end) - begin]

    def _kept_rows(self, group: int) -> np.ndarray:
        """Local indices of the rows of `group` not excluded."""
        start, end = self.dataset.group_start[group : group + 2]
        excluded = self._excluded[self._excluded_from[group] : self._excluded_from[group + 1]]
        if not len(excluded):
            return np.arange(end - start)
        return np.setdiff1d(np.arange(end - start), excluded - start, assume_unique=True)

    def _epoch(self, epoch: int, offset: int) -> Iterator[tuple[torch.Tensor, ...]]:
        rng = np.random.default_rng([self._seed, epoch, self.rank])
        batch = self.per_rank_batch
        threshold = max(self.buffer_rows, batch)  # draw once the buffer holds this many rows
        starts = self.dataset.group_start
        buffer = _ShuffleBuffer(threshold + self.dataset.max_group_rows, self.dataset.row_fields,
                                with_data=offset == 0)
        step = 0

        def draw(final: bool) -> Iterator[tuple[torch.Tensor, ...]]:
            nonlocal step
            while buffer.size >= (batch if final else threshold):
                positions = rng.choice(buffer.size, batch, replace=False)
                if step >= offset and buffer.data is None:
                    self._materialise(buffer)
                taken = buffer.take(positions)
                step += 1
                if taken is not None:
                    yield self._to_device(self.dataset.to_batch(taken))

        share = list(self.share(epoch))  # (group, rows) of this rank's share: one entry a group
        ahead: dict[int, Future] = {}
        with ThreadPoolExecutor(max_workers=max(1, self.prefetch)) as reader:
            for position, (group, rows) in enumerate(share):
                data = None
                if buffer.data is not None:  # a replay reads nothing until it reaches the resumed step
                    for later in range(position, min(len(share), position + 1 + self.prefetch)):
                        if later not in ahead:
                            ahead[later] = reader.submit(self.dataset.read_group, *share[later])
                    data = ahead.pop(position).result()
                buffer.append(starts[group] + rows, data)
                yield from draw(final=False)
            for pending in ahead.values():
                pending.cancel()
        yield from draw(final=True)

    def _materialise(self, buffer: _ShuffleBuffer) -> None:
        """Read the tokens of the rows a replay left in the buffer: one read per row group they come from."""
        buffer.allocate()
        rows = buffer.rows[: buffer.size]
        starts = self.dataset.group_start
        groups = np.searchsorted(starts, rows, side="right") - 1
        for group in np.unique(groups):
            where = np.flatnonzero(groups == group)
            for array, values in zip(buffer.data, self.dataset.read_group(int(group), rows[where] - starts[group])):
                array[where] = values

    def _to_device(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if self.device is None:
            return batch
        return tuple(t.to(self.device, non_blocking=True) for t in batch)


ParquetBatches = StreamedBatches  # the prior's name for it, over the token Parquet
