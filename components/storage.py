"""Where a run's files live, and atomic writes: a reader sees the old file or the whole new one, never half of it.

A run's root (`DALLE_HOME`, `--root`) is a local folder or an object store (`s3://bucket/dalle`, any
protocol fsspec knows and has installed). On an object store the stages work in a local cache of
it (`RunRoot.local`: `DALLE_CACHE`, else a folder under ~/.cache named by the URL) and a finished
stage is published to the store, its record last (`components/stage_cache.py`): an object store
has no atomic rename, so a reader takes a stage as finished only when its record is there. A stage
that reads in place is given the store's URL of a finished stage the cache does not hold, and reads
it as a `StorePath` (`as_path`): from the store, range by range, nothing fetched to disk; one that
writes in place (the filter) puts each of its files whole (`atomic_output`), its record last.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import IO, Any

CACHE_ENV = "DALLE_CACHE"
READ_BLOCK = 16 << 20  # bytes a read from an object store asks for at once (and keeps, read ahead)


def url_protocol(value: str | Path) -> str | None:
    """The protocol of a URL (`s3` of `s3://bucket/x`), or None for a plain path."""
    scheme, separator, _ = str(value).partition("://")
    return scheme if separator and scheme.isidentifier() else None


def local_path(value: str | Path, what: str) -> Path:
    """`value` (a path, `~` expanded, or a file:// URL) as an absolute local path. Any other URL is refused
    naming its protocol and `what` it was given as: a URL taken as a path would be a local folder named `s3:`."""
    text = str(value)
    protocol = url_protocol(text)
    if protocol is not None:
        if protocol != "file":
            raise ValueError(f"{what} {text!r}: the {protocol}:// protocol is not supported here; give a local or "
                             "shared-file-system path (or a file:// URL)")
        text = text.partition("://")[2]
    return Path(text).expanduser().resolve()


def object_store(url: str, what: str):
    """The fsspec file system of `url` and the path in it. An unknown protocol, or one whose package is not
    installed (gcsfs for gs://), is refused naming it and `what` the URL was given as, before any work. Its
    listings are not cached: tasks elsewhere write the folders this process lists (s3fs opened a report part
    by a listing's ETag after a task had put it again, and failed: FileExpired)."""
    import fsspec

    protocol = url_protocol(url)
    if protocol not in fsspec.available_protocols():
        raise ValueError(f"{what} {url!r}: unknown protocol {protocol}://; give a local path or an object store "
                         "URL fsspec knows (s3://, gs://, ...)")
    try:
        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    except ImportError as error:  # fsspec names the package to install
        raise ValueError(f"{what} {url!r}: {error}") from None


@dataclass(frozen=True)
class RunRoot:
    """A run's root: `local` is where its stages work and its files are read; `remote`, where the root is an
    object store, the store's URL (stages are published there, MLflow's artifacts written there)."""

    local: Path
    remote: str | None = None

    @property
    def stages_url(self) -> str | None:
        return f"{self.remote}/stages" if self.remote else None

    @property
    def artifact_uri(self) -> str:
        """Where MLflow writes the runs' artifacts: on the store, or `<root>/mlartifacts`."""
        return f"{self.remote}/mlartifacts" if self.remote else (self.local / "mlartifacts").as_uri()

    @property
    def stages_location(self) -> str:
        """Where finished stages are found: the store's stages folder, or `<root>/stages`."""
        return self.stages_url or str(self.local / "stages")


def run_root(value: str | Path, what: str) -> RunRoot:
    """`value` as a run's root: a local path (or file:// URL), or an object store URL, checked before any
    work, with its local cache (`DALLE_CACHE`, else ~/.cache/dalle-pipeline/<protocol>-<digest of the URL>)."""
    if not is_object_store(value):
        return RunRoot(local_path(value, what))
    url = str(value).rstrip("/")
    object_store(url, what)
    cache = os.environ.get(CACHE_ENV) or Path("~/.cache/dalle-pipeline").expanduser() / url_folder(url)
    return RunRoot(local_path(cache, CACHE_ENV), url)


def url_folder(url: str) -> str:
    """A local folder's name for what lies at `url`: its protocol and a digest of the URL."""
    return f"{url_protocol(url)}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def is_object_store(value: str | Path) -> bool:
    return url_protocol(value) not in (None, "file")


def existing(url: str, what: str):
    """`object_store(url)`, FileNotFoundError naming `what` when nothing is at `url`."""
    fs, path = object_store(url, what)
    path = path.rstrip("/")
    if not fs.exists(path):
        raise FileNotFoundError(f"{what} {url} does not exist")
    return fs, path


def mirror(url: str, into: Path, what: str) -> Path:
    """A local copy of the file or folder at the object store `url`, kept under `into` in a folder named by the
    URL (`copy_from_store`); returns the copy's path. FileNotFoundError naming `what` when nothing is at `url`."""
    fs, path = existing(url, what)
    return copy_from_store(fs, path, into / url_folder(url) / (path.rsplit("/", 1)[-1] or "source"))


def store_listing(fs, path: str) -> dict[str, dict[str, Any]]:
    """The listing entry of each file at `path` of the store `fs`, by path relative to it: the file itself (as
    ""), or every file below the folder there (one recursive listing)."""
    if fs.isfile(path):
        return {"": fs.info(path)}
    return {found[len(path) + 1:]: info for found, info in fs.find(path, detail=True).items()}


def copy_from_store(fs, path: str, target: Path) -> Path:
    """`target` made a copy of the file or folder at `path` of the store `fs`, and returned. A file the copy
    lacks, or holds at another size or modification time, is fetched (through a temporary name, so a copy cut
    short is never taken for whole) and given the store's modification time, so copies on any machine list
    alike (a stage keyed by the listing is reused); one gone from the store is removed from the copy."""
    listing = store_listing(fs, path)
    single = "" in listing
    wanted = set()
    for relative, info in sorted(listing.items()):
        local = target / relative if relative else target
        wanted.add(local)
        stored = modified_ns(info)
        if local.is_file() and local.stat().st_size == info["size"] and stored in (None, local.stat().st_mtime_ns):
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(local) as tmp:
            fs.get_file(info["name"], str(tmp))
            if stored is not None:
                os.utime(tmp, ns=(stored, stored))
    if not single:
        for stale in [p for p in target.rglob("*") if p.is_file() and p not in wanted]:
            stale.unlink()
    return target


class StorePath:
    """A file or folder on an object store, named by its URL, with the part of `pathlib.Path` that the stages
    use (`/`, name, stem, suffix, parent, with_suffix, glob, rglob, relative_to, is_file, is_dir, stat, open,
    read_bytes, unlink, mkdir): code written for local paths reads from the store where the objects lie, and
    writes there through `atomic_output` (an object put whole). A path found by `glob` keeps the listing's size
    and modification time, so `stat` asks the store nothing. It holds no file system: a Ray task on any node
    opens the store where it runs, with that node's configuration. In a pydantic model or a stage's record it is
    its URL."""

    def __init__(self, url: str, info: dict[str, Any] | None = None) -> None:
        self.url = str(url).rstrip("/")
        self._info = info

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"StorePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorePath) and other.url == self.url

    def __lt__(self, other: StorePath) -> bool:
        return self.url < other.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, relative: str) -> StorePath:
        return StorePath(f"{self.url}/{relative}")

    @property
    def _store(self) -> tuple[Any, str]:
        return object_store(self.url, "a path on the store")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> StorePath:
        return StorePath(self.url.rsplit("/", 1)[0])

    def with_suffix(self, suffix: str) -> StorePath:
        return self.parent / f"{self.stem}{suffix}"

    def glob(self, pattern: str) -> list[StorePath]:
        """The objects below this folder that `pattern` matches (one listing), sorted."""
        fs, path = self._store
        found = fs.glob(f"{path}/{pattern}", detail=True)
        protocol = self.url.partition("://")[0]
        return sorted(StorePath(f"{protocol}://{name}", info) for name, info in found.items())

    def rglob(self, pattern: str) -> list[StorePath]:
        """The objects at any depth below this folder whose names `pattern` matches (one recursive listing), sorted."""
        fs, path = self._store
        protocol = self.url.partition("://")[0]
        return sorted(StorePath(f"{protocol}://{name}", info) for name, info in fs.find(path, detail=True).items()
                      if fnmatch.fnmatchcase(name.rsplit("/", 1)[-1], pattern))

    def relative_to(self, folder: StorePath) -> PurePosixPath:
        if not self.url.startswith(f"{folder.url}/"):
            raise ValueError(f"{self.url} is not below {folder.url}")
        return PurePosixPath(self.url[len(folder.url) + 1:])

    def is_file(self) -> bool:
        fs, path = self._store
        return fs.isfile(path)

    def is_dir(self) -> bool:
        fs, path = self._store
        return fs.isdir(path)

    def stat(self) -> SimpleNamespace:
        """st_size and st_mtime_ns (the store's modification time: a copy fetched by `copy_from_store` has the
        same), from the listing that found this path, else asked of the store."""
        if self._info is None:
            fs, path = self._store
            self._info = fs.info(path)
        return SimpleNamespace(st_size=self._info["size"], st_mtime_ns=modified_ns(self._info) or 0)

    def open(self, mode: str = "rb") -> IO[bytes]:
        if mode != "rb":
            raise ValueError(f"{self.url}: a StorePath is read, not written (mode {mode!r})")
        fs, path = self._store
        return fs.open(path, "rb", block_size=READ_BLOCK)

    def read_bytes(self) -> bytes:
        fs, path = self._store
        return fs.cat_file(path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def unlink(self, missing_ok: bool = False) -> None:
        fs, path = self._store
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing: a store has no folders, the objects in one name it."""

    def resolve(self) -> StorePath:
        return self

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        def validate(value: Any) -> StorePath:
            if isinstance(value, StorePath):
                return value
            if isinstance(value, str) and is_object_store(value):
                return StorePath(value)
            raise ValueError(f"{value!r} is no object store URL")

        return core_schema.no_info_plain_validator_function(validate,
                                                            serialization=core_schema.to_string_ser_schema())


def as_path(value: str | Path | StorePath) -> Path | StorePath:
    """`value` as a path: a `StorePath` for an object store's URL, else a local `Path` (of a file:// URL too)."""
    if isinstance(value, (Path, StorePath)):
        return value
    if is_object_store(value):
        return StorePath(value)
    return local_path(value, "a path") if url_protocol(value) == "file" else Path(value)


def open_binary(path: str | Path | StorePath) -> IO[bytes]:
    """A local file, or an object on a store (`StorePath`, or its URL), opened to read, seekable."""
    path = as_path(path)
    return path.open("rb")


def modified_ns(info: dict[str, Any]) -> int | None:
    """When the store last wrote an object, from its listing entry (S3's `LastModified`, a local or other file
    system's `mtime`), in nanoseconds since the epoch; None where the entry says nothing of it."""
    for key in ("LastModified", "mtime", "updated", "last_modified"):
        value = info.get(key)
        if isinstance(value, str):
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, datetime):
            value = value.replace(tzinfo=value.tzinfo or timezone.utc).timestamp()
        if isinstance(value, (int, float)):
            return round(value * 1e6) * 1000  # to the microsecond: a float of seconds holds no more
    return None


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


@contextmanager
def atomic_output(path: str | Path | StorePath) -> Iterator[Path]:
    """Yield a local temporary path; on success what was written there becomes `path`: renamed into place
    (`atomic_path`), or on an object store put whole (a PUT is atomic per object: a reader sees the old
    object or the new, never part of one). On error nothing is written."""
    path = as_path(path)
    if isinstance(path, Path):
        with atomic_path(path) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="dalle-put-") as folder:
        yield Path(folder) / path.name
        fs, key = path._store
        fs.put_file(str(Path(folder) / path.name), key)


def remove_tree(path: str | Path | StorePath) -> None:
    """A folder and everything below it gone, local or on a store; nothing there is no error."""
    path = as_path(path)
    if isinstance(path, Path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, key = path._store
    if fs.exists(key):
        fs.rm(key, recursive=True)


def write_bytes(path: str | Path | StorePath, data: bytes) -> Path | StorePath:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return as_path(path)


def write_json(path: str | Path | StorePath, obj: Any) -> Path | StorePath:
    return write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def arrow_filesystem(url: str, what: str) -> tuple[Any, str]:
    """The object store of `url` as a pyarrow file system (fsspec's, wrapped: the same configuration as every
    other read and write) and the path in it, for what takes one (Ray Train's checkpoint storage)."""
    import pyarrow.fs

    fs, path = object_store(url, what)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path.rstrip("/")


def store_listing_digest(url: str, what: str) -> str:
    """A digest of what lies at the object store `url` by relative path, size and modification time, as
    `stage_cache.folder_listing_digest` of a local folder: one listing, no object read."""
    fs, path = existing(url, what)
    digest = SummedDigest()
    for relative, info in store_listing(fs, path).items():
        digest.add(f"{relative}\0{info['size']}\0{modified_ns(info)}\0".encode())
    return digest.hexdigest()


def walked_files(folder: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to `folder`, stat) of every file below it, as the file system lists them: walked, never
    gathered, so a folder of millions costs no memory. Symlinked folders are not entered; a link to a file is
    the file; a broken link, or a file gone while walking, is not there."""
    for directory, _, names in os.walk(folder):
        for name in names:
            path = Path(directory, name)
            try:
                yield path.relative_to(folder).as_posix(), path.stat()
            except FileNotFoundError:
                continue


class SummedDigest:
    """A digest of entries that no order changes: each entry's sha256 summed modulo 2^128, with their count
    (what a walk's entries need, where the file system gives no order)."""

    def __init__(self) -> None:
        self.total = self.count = 0

    def add(self, entry: bytes) -> None:
        self.total = (self.total + int.from_bytes(hashlib.sha256(entry).digest()[:16], "big")) % 2**128
        self.count += 1

    def hexdigest(self) -> str:
        return hashlib.sha256(f"{self.count}:{self.total:032x}".encode()).hexdigest()


def file_sha256(path: str | Path | StorePath, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open_binary(path) as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
