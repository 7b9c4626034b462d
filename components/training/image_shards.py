"""The curated image shards as row groups for `StreamedBatches`: the dVAE and CLIP read their images streamed.

A group is a shard, a row a sample in the shard's order (`read_shard`'s); reading a group's rows
reads their captions and just their image members, decodes them and fits them to the image size,
so a worker holds its shuffle buffer of images, never the corpus. Whether a stage streams or
decodes the whole corpus into memory (faster for a small one: no decoding after the first
epoch) is `image_data`: 'auto' streams once the decoded corpus passes `IN_MEMORY_MAX_BYTES`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..shards import fitted_pixels, read_captions, read_images, shard_paths
from ..storage import StorePath, as_path

IN_MEMORY_MAX_BYTES = 1 << 30  # 'auto' decodes a corpus of up to this many bytes of pixels into memory
IMAGE_BUFFER_ROWS = 1024  # images in a rank's shuffle buffer (at 256 px, 200 MB besides a shard read ahead)


class ImageShards:
    """Curated shards as `RowGroups`: (pixels uint8 (H, W, 3)[, caption tokens]) per row.

    `tokenize` (CLIP's tokenizer: captions -> (n, context) integer tokens) adds the tokens of each
    row's caption."""

    def __init__(self, shards_dir: str | Path | StorePath, image_size: int,
                 tokenize: Callable[[list[str]], torch.Tensor | np.ndarray] | None = None) -> None:
        self.dataset_dir = as_path(shards_dir)
        self.paths = shard_paths(shards_dir)
        if not self.paths:
            raise FileNotFoundError(f"no curated shards (*.tar) in {shards_dir}")
        counts = [sum(1 for _ in read_captions(path)) for path in self.paths]  # headers and captions only
        self.group_start = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.num_rows = int(self.group_start[-1])
        self.image_size = image_size
        self.tokenize = tokenize
        self._token_shape = () if tokenize is None else tuple(np.asarray(tokenize([""])).shape[1:])

    @property
    def max_group_rows(self) -> int:
        return int(np.diff(self.group_start).max(initial=0))

    @property
    def decoded_bytes(self) -> int:
        return self.num_rows * self.image_size**2 * 3

    @property
    def row_fields(self) -> tuple[tuple[tuple[int, ...], np.dtype], ...]:
        pixels = ((self.image_size, self.image_size, 3), np.dtype(np.uint8))
        return (pixels,) if self.tokenize is None else (pixels, (self._token_shape, np.dtype(np.int64)))

    def read_group(self, group: int, local_rows: np.ndarray) -> tuple[np.ndarray, ...]:
        path = self.paths[group]
        texts = list(read_captions(path))
        chosen = [texts[row] for row in local_rows]
        images = read_images(path, chosen)
        pixels = np.stack([fitted_pixels(images[text.key], self.image_size) for text in chosen])
        if self.tokenize is None:
            return (pixels,)
        return pixels, np.asarray(self.tokenize([text.caption for text in chosen]), np.int64)

    def to_batch(self, arrays: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(array) for array in arrays)


def streams(image_data: str, shards: ImageShards) -> bool:
    """Whether a stage reads `shards` streamed (`image_data`: 'stream', 'memory' or 'auto' by size)."""
    if image_data == "auto":
        return shards.decoded_bytes > IN_MEMORY_MAX_BYTES
    return image_data == "stream"
