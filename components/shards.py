"""Webdataset shards: read samples from `*.tar`, write them atomically.

A shard is a plain tar whose members are `<key>.<ext>`; the members sharing a key form one
sample (`png`/`jpg`/`webp` image, `txt` caption, `json` metadata), as img2dataset writes them.
A curated corpus is a folder of shards, its held-out samples (your corpus's evaluation set) in
the shards of its `holdout/` subfolder, which no training stage reads. Shards are streamed member
by member; `read_captions` gives a shard's samples without reading their images. The readers take a
local path or an object store's (`storage.StorePath`, or its URL): a shard on the store is read where it lies.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image

from .storage import StorePath, as_path, atomic_output, is_object_store, open_binary

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
TEXT_EXTENSIONS = ("txt", "json")
HOLDOUT_DIR = "holdout"  # the curated corpus's held-out shards
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


class SampleText(NamedTuple):
    """A sample without its image: what reading captions at scale needs (`image_ext` says which member holds it)."""

    key: str
    caption: str
    meta: dict
    image_ext: str


def holdout_rank(url: str) -> float:
    """Where an item falls in [0, 1), from a hash of its URL or id: below the holdout fraction it is held out."""
    return int.from_bytes(hashlib.sha256(url.encode("utf-8")).digest()[:8], "big") / 2**64


def shard_paths(shards_dir: str | Path | StorePath) -> list[Path | StorePath]:
    return sorted(as_path(shards_dir).glob("*.tar"))


def read_shard(path: str | Path) -> Iterator[Sample]:
    """Samples of one shard in file order; members without an image are skipped."""
    for key, parts in _sample_parts(path).items():
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in parts), None)
        if image_ext is not None:
            caption, meta = _caption_and_meta(parts)
            yield Sample(key=key, image_bytes=parts[image_ext], image_ext=image_ext, caption=caption, meta=meta)


def read_captions(path: str | Path) -> Iterator[SampleText]:
    """The samples `read_shard` yields, in the same order, reading only their `txt` and `json` members:
    image bodies are skipped on disk, so memory holds one shard's captions, never its images."""
    for key, parts in _sample_parts(path, TEXT_EXTENSIONS).items():
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in parts), None)
        if image_ext is not None:
            yield SampleText(key, *_caption_and_meta(parts), image_ext)


def iter_captions(shards_dir: str | Path) -> Iterator[SampleText]:
    for path in shard_paths(shards_dir):
        yield from read_captions(path)


def read_images(path: str | Path, samples: Iterable[SampleText]) -> dict[str, bytes]:
    """The image bytes of these samples of the shard at `path` (from its `read_captions`), by key: no
    other member's body is read."""
    wanted = {(sample.key, sample.image_ext) for sample in samples}

    def asked(name: str) -> bool:
        key, _, ext = name.rpartition(".")
        return (key, ext.lower()) in wanted

    images = {name.rpartition(".")[0]: data for name, data in tar_members(path, wanted=asked)}
    if missing := sorted({key for key, _ in wanted} - images.keys()):
        raise ValueError(f"{path}: no image member for samples {missing[:3]}: was the shard rewritten meanwhile?")
    return images


def fitted_pixels(image_bytes: bytes, image_size: int) -> np.ndarray:
    """An encoded image as (image_size, image_size, 3) uint8 RGB, resized (bicubic) where it is another size."""
    with Image.open(io.BytesIO(image_bytes)) as opened:
        image = opened.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(image)


def _sample_parts(path: str | Path, read_extensions: Collection[str] | None = None) -> dict[str, dict[str, bytes]]:
    """The members of a shard grouped by key in file order, `{key: {ext: content}}`; a member whose (lower-case)
    extension is not in `read_extensions` (None: all) is listed with empty content, its body never read."""
    groups: dict[str, dict[str, bytes]] = {}

    def listed(name: str) -> bool:
        key, _, ext = name.rpartition(".")
        if not key:
            return False
        check_key(key, path)
        groups.setdefault(key, {})[ext.lower()] = b""
        return read_extensions is None or ext.lower() in read_extensions

    for name, data in tar_members(path, wanted=listed):
        key, _, ext = name.rpartition(".")
        groups[key][ext.lower()] = data
    return groups  # dicts keep insertion order: file order


def _caption_and_meta(parts: dict[str, bytes]) -> tuple[str, dict]:
    caption = parts.get("txt", b"").decode("utf-8", errors="replace")
    meta = json.loads(parts["json"]) if "json" in parts else {}
    return caption, meta


_BLOCK = 512


def tar_members(path: str | Path, wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file of a tar, in file order, reading headers directly.

    Python's `tarfile` spends most of a shard read in header parsing (img2dataset's shards carry a
    PAX header per member); this reads the same formats (ustar, PAX `path`/`size`, GNU long
    names) with one checksum test per header, about 4x faster. It streams from the file, holding
    one member's content at a time; `wanted(name)` (None: every member) says whose content is
    read, the others are skipped on disk and not yielded. A damaged tar raises ValueError.
    """
    for name, content, _ in tar_entries(path, wanted):
        if content is not None:
            yield name, content


@dataclass(frozen=True)
class TarMember:
    """Where one member's content lies in a tar, to read later wherever the file can be read (a Ray task
    on another node, when the tar is on shared storage or an object store)."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        if is_object_store(self.path):  # a task reads a tar's members in order: one open file, its read-ahead kept
            content = _read_at(_opened_on_store(self.path), self.offset, self.size)
        else:
            with open(self.path, "rb") as file:
                content = _read_at(file, self.offset, self.size)
        if len(content) != self.size:
            raise OSError(f"{self.path}: the member at byte {self.offset} is cut short (the tar changed)")
        return content


_open_on_store: tuple[str, BinaryIO] | None = None  # this process's: the tar on a store whose members it reads


def _opened_on_store(url: str) -> BinaryIO:
    """`url` opened on its store, the file kept open for the next member (`storage.READ_BLOCK` read ahead: a
    shard's members read in order cost a request per block, not one per member) until `release_store_files`."""
    global _open_on_store
    if _open_on_store is None or _open_on_store[0] != url:
        release_store_files()
        _open_on_store = (url, open_binary(url))
    return _open_on_store[1]


def release_store_files() -> None:
    """Close the tar `TarMember.read` keeps open on a store: a task that read members calls this when done, so no
    block it read ahead outlives it (an object put again later would be read from that stale block)."""
    global _open_on_store
    if _open_on_store is not None:
        _open_on_store[1].close()
        _open_on_store = None


def _read_at(file: BinaryIO, offset: int, size: int) -> bytes:
    file.seek(offset)
    return file.read(size)


def tar_entries(path: str | Path, wanted: Callable[[str], bool] | None = None
                ) -> Iterator[tuple[str, bytes | None, TarMember]]:
    """(name, content, where) of each regular file of a tar, in file order (see `tar_members`): the content
    only where `wanted(name)` (None: every member), else None and the member left on disk, at `where`."""
    with open_binary(path) as file:
        end = file.seek(0, os.SEEK_END)
        offset, extended = 0, {}
        while offset + _BLOCK <= end:
            file.seek(offset)
            header = file.read(_BLOCK)
            if not any(header):
                break  # the end-of-archive blocks
            stored = _octal(header[148:156], path, offset)
            if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
                raise ValueError(f"{path}: damaged tar header at byte {offset}")
            size = int(extended.get("size", 0)) or _octal(header[124:136], path, offset)
            kind = header[156:157]
            if offset + _BLOCK + size > end:
                raise ValueError(f"{path}: tar member at byte {offset} runs past the end of the file")
            member_offset, offset = offset, offset + _BLOCK + -(-size // _BLOCK) * _BLOCK
            if kind in (b"x", b"g"):  # PAX: "<len> <key>=<value>\n" records for the next member (x) or all (g)
                body = _read_body(file, size, path, member_offset)
                if kind == b"x":
                    extended = _pax_records(body)
                continue
            if kind == b"L":  # GNU long name for the next member
                body = _read_body(file, size, path, member_offset)
                extended = {"path": body.rstrip(b"\0").decode("utf-8", "surrogateescape")}
                continue
            if kind in (b"0", b"\0", b"7"):
                name = extended.get("path") or _header_name(header)
                content = _read_body(file, size, path, member_offset) if wanted is None or wanted(name) else None
                yield name, content, TarMember(str(path), member_offset + _BLOCK, size)
            extended = {}


def _read_body(file: BinaryIO, size: int, path: str | Path, offset: int) -> bytes:
    body = file.read(size)
    if len(body) != size:  # the file shrank while read
        raise ValueError(f"{path}: tar member at byte {offset} runs past the end of the file")
    return body


def _octal(field: bytes, path: str | Path, offset: int) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for values past the octal range
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise ValueError(f"{path}: damaged tar header at byte {offset}") from None


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(body: bytes) -> dict[str, str]:
    records, position = {}, 0
    while position < len(body):
        length_text, _, rest = body[position:].partition(b" ")
        if not length_text.isdigit():
            break
        length = int(length_text)
        key, _, value = body[position + len(length_text) + 1 : position + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def iter_samples(shards_dir: str | Path) -> Iterator[Sample]:
    for path in shard_paths(shards_dir):
        yield from read_shard(path)


def write_shard(path: str | Path | StorePath, samples: Iterable[Sample]) -> int:
    """Write samples to `path` atomically (`storage.atomic_output`: a local file renamed into place, or an object
    put whole on a store). Returns the count."""
    count = 0
    with atomic_output(path) as tmp, open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
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
        keys.append(sample.key)
        captions.append(sample.caption)
        images.append(fitted_pixels(sample.image_bytes, image_size))
        if limit is not None and len(keys) >= limit:
            break
    if not keys:
        raise ValueError(f"no samples found in {shards_dir}")
    return Corpus(keys=keys, captions=captions, images=np.stack(images))
