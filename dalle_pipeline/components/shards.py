"""Webdataset shards: read samples from `*.tar`, write them atomically.

A shard is a plain tar whose members are `<key>.<ext>`; the members sharing a key form one
sample (`png`/`jpg`/`webp` image, `txt` caption, `json` metadata), as img2dataset writes them.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# keys become tar member names (and file names wherever a shard is unpacked): plain names only
SAFE_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}")


def check_key(key: str, where: str | Path) -> str:
    """`key` if it is a plain name (no separator, no dot, no leading dash), else ValueError."""
    if not SAFE_KEY.fullmatch(key):
        raise ValueError(f"{where}: sample key {key!r} is not a plain name ([A-Za-z0-9_-], at most 128)")
    return key


@dataclass
class Sample:
    key: str
    image_bytes: bytes
    image_ext: str
    caption: str
    meta: dict = field(default_factory=dict)

    def image(self) -> Image.Image:
        with Image.open(io.BytesIO(self.image_bytes)) as img:
            return img.convert("RGB")

    def pixels(self) -> np.ndarray:
        """HxWx3 uint8."""
        return np.asarray(self.image())


def shard_paths(shards_dir: str | Path) -> list[Path]:
    return sorted(Path(shards_dir).glob("*.tar"))


def read_shard(path: str | Path) -> Iterator[Sample]:
    """Samples of one shard in file order; members without an image are skipped."""
    groups: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition(".")
            if not key:
                continue
            check_key(key, path)
            if key not in groups:
                groups[key] = {}
                order.append(key)
            groups[key][ext.lower()] = tar.extractfile(member).read()
    for key in order:
        parts = groups[key]
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in parts), None)
        if image_ext is None:
            continue
        caption = parts.get("txt", b"").decode("utf-8", errors="replace")
        meta = json.loads(parts["json"]) if "json" in parts else {}
        yield Sample(key=key, image_bytes=parts[image_ext], image_ext=image_ext, caption=caption, meta=meta)


def iter_samples(shards_dir: str | Path) -> Iterator[Sample]:
    for path in shard_paths(shards_dir):
        yield from read_shard(path)


def write_shard(path: str | Path, samples: Iterable[Sample]) -> int:
    """Write samples to `path` atomically (temp file in the same folder, then rename). Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
            for sample in samples:
                check_key(sample.key, path)
                members = {
                    sample.image_ext: sample.image_bytes,
                    "txt": sample.caption.encode("utf-8"),
                    "json": json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{sample.key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                count += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


@dataclass
class Corpus:
    """A curated corpus held in memory: small presets train from RAM."""

    keys: list[str]
    captions: list[str]
    images: np.ndarray  # (N, H, W, 3) uint8

    def __len__(self) -> int:
        return len(self.keys)


def load_corpus(shards_dir: str | Path, image_size: int, limit: int | None = None) -> Corpus:
    """Every sample of the shards, images resized to `image_size` square if they are not already."""
    keys, captions, images = [], [], []
    for sample in iter_samples(shards_dir):
        image = sample.image()
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        keys.append(sample.key)
        captions.append(sample.caption)
        images.append(np.asarray(image))
        if limit is not None and len(keys) >= limit:
            break
    if not keys:
        raise ValueError(f"no samples found in {shards_dir}")
    return Corpus(keys=keys, captions=captions, images=np.stack(images))
