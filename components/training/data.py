"""In-memory batches: seeded shuffles per epoch, sharded by rank, endless."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class TensorBatches:
    """Yields tuples of row-aligned tensor batches forever, reshuffling every epoch.

    The order depends only on (seed, epoch), so every rank draws the same permutation and takes
    its own stride of it: ranks never see the same row within an epoch. `per_rank_batch` rows are
    yielded per step; a short tail of an epoch is dropped so every step has the same shape.
    """

    def __init__(
        self,
        tensors: tuple[torch.Tensor, ...],
        per_rank_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        rows = {len(t) for t in tensors}
        if len(rows) != 1:
            raise ValueError(f"tensors have different row counts: {sorted(rows)}")
        self.tensors = tensors
        self.num_rows = rows.pop()
        if self.num_rows < per_rank_batch * world_size:
            raise ValueError(
                f"{self.num_rows} rows cannot fill one batch of {per_rank_batch} x {world_size} ranks"
            )
        self.per_rank_batch = per_rank_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // (self.per_rank_batch * self.world_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self.from_step(0)

    def from_step(self, step: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Resume mid-epoch: the batch yielded first is the one step `step` would have seen."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        while True:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_rows, generator=generator)
            mine = order[self.rank :: self.world_size]
            for index in range(offset, self.steps_per_epoch):
                rows = mine[index * self.per_rank_batch : (index + 1) * self.per_rank_batch]
                yield tuple(t[rows] for t in self.tensors)
            epoch, offset = epoch + 1, 0
