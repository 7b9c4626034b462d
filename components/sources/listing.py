"""A folder source's files, walked a folder at a time in the order of their sorted paths, never listed whole.

Each folder's names are read with `os.scandir` and sorted as Arrow strings (about 20 bytes a name, not a
Python path object each), its sub-folders entered in their place, so the files come in the order
`sorted(root.rglob("*"))` gave (paths compared part by part: `a/x` before `a-b/y` before `a.png`) while the
driver holds the names of one folder and of the folders above it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini"})  # what file managers leave beside pictures
FOLDER_BLOCK = 4096  # names read into Arrow, and handed on, at a time


@dataclass(frozen=True)
class Piece:
    """Up to FOLDER_BLOCK files of one folder, in order: their `names`; for each, whether an image of its stem
    lies in the folder (`has_image`: `x.txt` beside `x.png` or `x.JPG`, which tells a caption file from one
    whose image is missing); whether the folder holds any image (`folder_has_images`); the folder's files
    whose names are not UTF-8 (`unreadable`, U+FFFD for their bytes, given with its first piece: no Arrow
    string or item id holds them)."""

    folder: Path
    names: pa.Array
    has_image: pa.Array
    folder_has_images: bool
    unreadable: list[str] = field(default_factory=list)


def walk_folder(folder: Path, image_suffixes: frozenset[str]) -> Iterator[Piece]:
    """The files below `folder` in the order of their sorted paths, as pieces of one folder each. Hidden
    entries and what file managers leave are skipped; symlinked folders are not entered (as `rglob`)."""
    chunks, files, folders, unreadable = [], [], [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if hidden(entry.name):
                continue
            if not _is_utf8(entry.name):
                if not entry.is_dir():
                    unreadable.append(os.fsencode(entry.name).decode("utf-8", errors="replace"))
                continue
            if not entry.is_dir():
                files.append(entry.name)
                if len(files) == FOLDER_BLOCK:  # a folder of millions: its names as Arrow strings, not Python's
                    chunks.append(pa.array(files, pa.string()))
                    files = []
            elif not entry.is_symlink():
                folders.append(entry.name)
    names = pa.concat_arrays([*chunks, pa.array(files, pa.string())])
    # once a folder, not a piece: a set of the folder's image stems probed by every piece of a flat folder of
    # N files was built N / FOLDER_BLOCK times, a cost that grew as the square of N
    name_stems = stems(names)
    image_stems = pc.unique(pc.filter(name_stems, has_suffix(names, image_suffixes)))
    beside_image, has_images = pc.is_in(name_stems, value_set=image_stems), len(image_stems) > 0
    del name_stems, image_stems
    order = pc.sort_indices(pa.concat_arrays([names, pa.array(folders, pa.string())])).to_numpy()
    unreadable.sort()

    def pieces(indices: np.ndarray) -> Iterator[Piece]:
        nonlocal unreadable
        for start in range(0, max(len(indices), 1 if unreadable else 0), FOLDER_BLOCK):
            chosen = indices[start : start + FOLDER_BLOCK]
            yield Piece(folder, pc.take(names, chosen), pc.take(beside_image, chosen), has_images, unreadable)
            unreadable = []

    start = 0
    for position in np.flatnonzero(order >= len(names)):  # the sub-folders, in order
        yield from pieces(order[start:position])
        yield from walk_folder(folder / folders[order[position] - len(names)], image_suffixes)
        start = position + 1
    yield from pieces(order[start:])


def hidden(name: str) -> bool:
    """Whether a file or folder of a source is no part of it: hidden, or what a file manager leaves."""
    return name.startswith(".") or name in IGNORED_NAMES


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a name of bytes that are not UTF-8, held by Python as surrogates
        return False
    return True


def stems(names: pa.Array) -> pa.Array:
    """Each name less its last suffix (`a.b.png` -> `a.b`), as `Path.with_suffix("")`."""
    return pc.replace_substring_regex(names, pattern=r"(.)\.[^.]*$", replacement=r"\1")


def has_suffix(names: pa.Array, suffixes: frozenset[str]) -> pa.Array:
    """Whether each name ends in one of `suffixes`, in any case (`x.PNG` is an image)."""
    lowered = pc.utf8_lower(names)
    first, *others = sorted(suffixes)
    found = pc.ends_with(lowered, first)
    for suffix in others:
        found = pc.or_(found, pc.ends_with(lowered, suffix))
    return found
