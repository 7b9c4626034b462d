"""What data a run read, as MLflow datasets: a name, where the data lies, a digest of what it holds.

Stages log these as inputs of their runs (`Tracker.log_input_dataset`), so a run page says which
corpus a model was trained and evaluated on, and two runs that read the same data show the same
digest. Every digest is cheap: the curated corpus's is the filter stage's `data_digest` (computed
from its report, which lies in the curated folder), the same digest the registered model version
is tagged with; the token dataset's comes from the part checksums its manifest lists; a folder
without either gets one from its files' names and sizes. A stage's folder is read where it lies: a local
path, or the store's URL for a stage reused from an object store whose files this machine never fetched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .shards import HOLDOUT_DIR
from .storage import SummedDigest, is_object_store, local_path, object_store, walked_files

DIGEST_CHARS = 16  # the filter stage's data_digest length; MLflow stores at most 36

CURATED_CORPUS = "curated-corpus"
HELD_OUT_CORPUS = "held-out-corpus"
TOKEN_DATASET = "token-dataset"
DATA_SOURCE = "data-source"


@dataclass(frozen=True)
class DatasetRef:
    """One dataset as MLflow records it: `source_uri` is a local path or URL, `profile` a few counts."""

    name: str
    source_uri: str
    digest: str
    profile: dict[str, Any] = field(default_factory=dict)


def listing_digest(files: Iterable[tuple[str, int]]) -> str:
    """A digest of files' (relative path, size): another file, one fewer or one rewritten to another size gives
    another digest, without reading any file."""
    digest = hashlib.sha256()
    for relative, size in sorted(files):
        digest.update(f"{relative}\0{size}\n".encode())
    return digest.hexdigest()[:DIGEST_CHARS]


def _where(location: str | Path):
    """The file system `location` (a local path, or a URL on an object store) lies in, that path in it, and its
    URI: a finished stage the cache holds only the record of is read where it lies, on the store."""
    if is_object_store(location):
        fs, path = object_store(str(location), "dataset")
        return fs, path.rstrip("/"), str(location).rstrip("/")
    import fsspec

    path = local_path(location, "dataset")
    return fsspec.filesystem("file"), str(path), path.as_uri()


def _shards(fs, folder: str) -> list[tuple[str, int]]:
    """(name, size) of the `*.tar` shards directly in `folder`."""
    found = fs.glob(f"{folder}/*.tar", detail=True)
    return sorted((name.rsplit("/", 1)[-1], info["size"]) for name, info in found.items() if info["type"] == "file")


def _shard_profile(shards: list[tuple[str, int]], digest_of: str) -> dict[str, Any]:
    return {"shards": len(shards), "bytes": sum(size for _, size in shards), "digest_of": digest_of}


def curated_corpus(curated_dir: str | Path) -> DatasetRef:
    """The curated training shards of `curated_dir`, digested as the filter stage's `data_digest` where its
    report is there (the URL and image hash of every training sample), else by the shards' names and sizes."""
    from .filter.run import REPORT_NAME, report_digest

    fs, folder, uri = _where(curated_dir)
    shards = _shards(fs, folder)
    if not shards:
        raise FileNotFoundError(f"no curated shards (*.tar) in {curated_dir}")
    report = f"{folder}/{REPORT_NAME}"
    if fs.isfile(report):
        with fs.open(report, "rb") as opened:
            digest, digest_of = report_digest(opened), f"training samples in {REPORT_NAME}"
    else:
        digest, digest_of = listing_digest(shards), "shard names and sizes"
    return DatasetRef(CURATED_CORPUS, uri, digest, _shard_profile(shards, digest_of))


def held_out_corpus(curated_dir: str | Path) -> DatasetRef | None:
    """The held-out shards the filter stage set apart in `curated_dir` (None when it set none apart):
    what stages evaluate on, never train on."""
    fs, folder, uri = _where(f"{str(curated_dir).rstrip('/')}/{HOLDOUT_DIR}")
    shards = _shards(fs, folder)
    if not shards:
        return None
    return DatasetRef(HELD_OUT_CORPUS, uri, listing_digest(shards), _shard_profile(shards, "shard names and sizes"))


def token_dataset(dataset_dir: str | Path) -> DatasetRef:
    """The token Parquet at `dataset_dir`, digested by its parts' sha256 as its manifest lists them (by the
    parts' names and sizes for a manifest without checksums); FileNotFoundError for an unfinished one."""
    from .token_parquet import MANIFEST

    fs, folder, uri = _where(dataset_dir)
    try:
        manifest = json.loads(fs.cat_file(f"{folder}/{MANIFEST}"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{dataset_dir} has no {MANIFEST}: the tokenization did not finish") from None
    parts = manifest["parts"]
    if all("sha256" in part for part in parts):
        listed = json.dumps([[part["file"], part["sha256"]] for part in parts])
        digest, digest_of = hashlib.sha256(listed.encode()).hexdigest()[:DIGEST_CHARS], f"part sha256s in {MANIFEST}"
    else:
        digest = listing_digest((part["file"], fs.size(f"{folder}/{part['file']}")) for part in parts)
        digest_of = "part names and sizes"
    profile = {"rows": int(manifest.get("rows", sum(part["rows"] for part in parts))), "parts": len(parts),
               "digest_of": digest_of,
               **{key: manifest[key] for key in ("dvae_hash", "tokenizer_hash", "grid_size", "text_len")
                  if key in manifest}}
    return DatasetRef(TOKEN_DATASET, uri, digest, profile)


def data_source(source: str) -> DatasetRef:
    """The data source a pipeline downloads or ingests (`data.source`): a URL is digested by itself (what
    lies behind it is the download stage's to find out), a local file or folder by its files' names and sizes."""
    if "://" in source and not source.startswith("file://"):
        return DatasetRef(DATA_SOURCE, source, hashlib.sha256(source.encode()).hexdigest()[:DIGEST_CHARS])
    path = Path(source.removeprefix("file://")).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist")
    walked = [(path.name, path.stat())] if path.is_file() else walked_files(path)
    digest, size = SummedDigest(), 0
    for relative, stat in walked:  # a folder of millions walked, not listed
        digest.add(f"{relative}\0{stat.st_size}\n".encode())
        size += stat.st_size
    return DatasetRef(DATA_SOURCE, path.as_uri(), digest.hexdigest()[:DIGEST_CHARS],
                      {"files": digest.count, "bytes": size, "digest_of": "file names and sizes"})
