"""Local paths, and atomic writes: a reader sees the old file or the whole new one, never half of it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def local_path(value: str | Path, what: str) -> Path:
    """`value` (a path, `~` expanded, or a file:// URL) as an absolute local path. Any other URL is refused
    naming its protocol and `what` it was given as: every path the pipeline writes is local or on a
    shared file system (object storage, s3:// or gs://, is not supported yet), and a URL taken as a
    path would be a local folder named `s3:`."""
    text = str(value)
    scheme, separator, rest = text.partition("://")
    if separator and scheme.isidentifier():
        if scheme != "file":
            raise ValueError(f"{what} {text!r}: the {scheme}:// protocol is not supported; give a local or "
                             "shared-file-system path (or a file:// URL)")
        text = rest
    return Path(text).expanduser().resolve()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    Works for files and folders alike (whatever the caller creates at the yielded path).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
