"""What a data source looks like from the outside, cheaply: the watcher compares it between looks.

A fingerprint covers every file of the source (a URL list, a Parquet file, a folder of images or
shards) by relative path, size and modification time, never by content: a watcher looks every
few minutes, and a source of millions of images should not be read each time. A new or longer
file, a new image in a folder, a file rewritten in place: each changes it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def source_fingerprint(source: str | Path) -> str:
    """sha256 over (relative path, size, mtime) of each file of `source`; FileNotFoundError when nothing is there."""
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data source {root} does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        name = path.name if path == root else path.relative_to(root).as_posix()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def source_id(source: str | Path) -> str:
    """A short stable name for a source's location (its resolved path), for event resources and variables."""
    return hashlib.sha256(str(Path(source).expanduser().resolve()).encode()).hexdigest()[:12]
