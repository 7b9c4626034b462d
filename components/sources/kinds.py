"""The kinds of data a user brings, recognised from the path, and each read as items.

An item is one image-caption pair of the source, named by an id that stays put when the source
grows (its relative path, `shard.tar/key`, `file.parquet#row`, a COCO file name). Reading an
item never raises for the item's own faults: a missing caption, a caption without an image or a
symlink out of the folder is the item's `problem`, a reason code of `download.fetch.REASONS`,
and an image that cannot be read is found when `ingest` reads its bytes.

Kinds (`data.format`, or recognised by `source_kind`):
- `url_list`: parquet/csv/tsv/json/jsonl[.gz] with a URL column, or a folder of such files (LAION's
  `part-*.parquet`), downloaded by img2dataset;
- `folder`: images anywhere below a folder, each captioned by a sidecar `name.txt`, a
  `name.json` with the caption field, or a row of `captions.csv` / `captions.jsonl` at the top
  (a `file_name` column, relative path or bare name, and the caption column);
- `webdataset`: a `.tar` shard or a folder of them, `key.<image>` + `key.txt` / `key.json`
  (an img2dataset output folder is one);
- `parquet`: a `.parquet` file or folder of them with the images inside (binary, or a struct
  with `bytes` as `datasets` exports) and a caption column;
- `coco`: a COCO captions JSON (`images` + `annotations`) and its image folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import columns
from ..config import DataConfig
from ..download.url_list import INPUT_FORMATS, is_list_file, skipped
from ..shards import TarMember, tar_entries
from ..storage import StorePath, as_path, existing, is_object_store, local_path, open_binary
from .captions_file import CAPTION_FILES, CaptionsFile, read_captions_file
from .listing import hidden, walk_folder

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
CAPTION_SUFFIXES = (".txt", ".json")
LOCAL_KINDS = ("folder", "webdataset", "parquet", "coco")
STORE_KINDS = ("webdataset", "parquet")  # read on an object store where they lie; the others from a local copy


@dataclass(frozen=True)
class Item:
    """One image-caption pair of a source; `read` returns the image's bytes (OSError if unreadable, None
    where the source says it has none)."""

    item_id: str
    caption: str | None
    read: Callable[[], bytes | None] | None
    problem: str | None = None
    meta: dict = field(default_factory=dict)


def source_kind(data: DataConfig) -> str:
    """`data.format`, or the kind recognised from `data.source`; a path that is none of them raises
    ValueError saying what was found there (FileNotFoundError when nothing is). A source on an object store
    is one of the kinds read there in place (`store_kind`), or refused: the flow reads it from a local copy."""
    if is_object_store(data.source):
        kind = store_kind(data)
        if kind is None:
            raise ValueError(f"data.source {data.source}: on an object store, {' and '.join(STORE_KINDS)} sources "
                             "are read where they lie; read this one from a local copy (`storage.mirror`, as the flow "
                             "does)")
        return kind
    path = local_path(data.source, "data.source")
    if not path.exists():
        raise FileNotFoundError(f"data.source {path} does not exist")
    kind = data.format if data.format != "auto" else _recognise(path, data)
    wants_folder = kind == "folder"
    if wants_folder and not path.is_dir():
        raise ValueError(f"data.source {path}: format 'folder' needs a folder, not a file")
    if kind == "coco" and not path.is_file():
        raise ValueError(f"data.source {path}: format {kind!r} needs a file, not a folder")
    return kind


def store_kind(data: DataConfig) -> str | None:
    """The kind of the source on an object store `data.source` when it is one read there in place
    (STORE_KINDS: a `.tar` shard or a folder with `.tar` shards at its top, a `.parquet` file with images or a
    folder whose first top-level `.parquet` has them; or `data.format` naming one), else None: listing a
    folder of millions of images to tell its kind would cost what copying it does."""
    if data.format != "auto":
        return data.format if data.format in STORE_KINDS else None
    fs, path = existing(data.source, "data.source")
    root = StorePath(data.source)
    if fs.isfile(path):
        files = [root]
    else:
        names = sorted(info["name"].rsplit("/", 1)[-1] for info in fs.ls(path, detail=True) if info["type"] == "file")
        files = [root / name for name in names if not hidden(name)]
    if any(file.suffix.lower() == ".tar" for file in files):
        return "webdataset"
    first_parquet = next((file for file in files if file.suffix.lower() == ".parquet"), None)
    if first_parquet is not None:
        with open_binary(first_parquet) as file:
            schema = pq.read_schema(file)
        if data.image_col in schema.names and _is_image_column(schema.field(data.image_col).type):
            return "parquet"
    return None


def check_source(data: DataConfig) -> None:
    """Refuse, before any work, a source that is none of the kinds (`source_kind`); one on an object store
    only when nothing is there: its kind is recognised in the flow's local copy of it."""
    if is_object_store(data.source):
        existing(data.source, "data.source")
    else:
        source_kind(data)


def _recognise(path: Path, data: DataConfig) -> str:
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".tar"):
            return "webdataset"
        if name.endswith(".parquet"):
            return _parquet_kind(path, data)
        if name.endswith(".json") and _is_coco(path):
            return "coco"
        if is_list_file(path):
            return "url_list"
        raise ValueError(f"data.source {path}: cannot tell what this file is (a URL list is "
                         f"*.{{{','.join(INPUT_FORMATS)}}}[.gz], webdataset *.tar, Parquet with images *.parquet, "
                         "COCO captions *.json); set data.format")
    if any(p.is_file() and p.suffix.lower() == ".tar" and not _hidden(p, path) for p in path.glob("*")):
        return "webdataset"
    files, first, parquet, listed = 0, [], None, True
    for piece in walk_folder(path, IMAGE_SUFFIXES):
        if piece.folder_has_images:
            return "folder"  # at the first folder with an image: a source of millions is not listed to the end
        folder = piece.folder
        for name in piece.names.to_pylist():
            files += 1
            first += [folder / name][: 5 - len(first)]
            parquet = parquet or (folder / name if name.lower().endswith(".parquet") else None)
            listed = listed and (skipped((folder / name).relative_to(path)) or is_list_file(folder / name))
    if parquet is not None:
        return _parquet_kind(parquet, data)
    if files and listed:
        return "url_list"
    found = ", ".join(str(p.relative_to(path)) for p in first) or "nothing"
    raise ValueError(f"data.source {path}: a folder with no images, .tar shards, .parquet files or URL lists "
                     f"({files} files: {found}{', ...' if files > 5 else ''})")


def _parquet_kind(path: Path, data: DataConfig) -> str:
    with open_binary(path) as file:
        schema = pq.read_schema(file)
    if data.image_col in schema.names and _is_image_column(schema.field(data.image_col).type):
        return "parquet"
    if data.url_col in schema.names:
        return "url_list"
    raise ValueError(f"data.source {path}: a Parquet file with neither images (a column {data.image_col!r} of bytes "
                     f"or a struct with `bytes`) nor URLs (a column {data.url_col!r}); its columns are {schema.names}")


def _is_image_column(kind: pa.DataType) -> bool:
    if pa.types.is_struct(kind):
        return kind.get_field_index("bytes") >= 0
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _is_coco(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(1 << 16).lstrip()
    if not head.startswith(b"{"):
        return False
    try:
        document = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(document, dict) and "images" in document and "annotations" in document


def _hidden(path: Path, root: Path) -> bool:
    return any(hidden(part) for part in path.relative_to(root).parts)


def items(kind: str, data: DataConfig) -> Iterator[Item]:
    """Every item of a source (local, or on an object store: `store_kind`), in a stable order."""
    root = as_path(data.source) if is_object_store(data.source) else Path(data.source).expanduser().resolve()
    readers = {"folder": _folder_items, "webdataset": _webdataset_items, "parquet": _parquet_items,
               "coco": _coco_items}
    if kind not in readers:
        raise ValueError(f"{kind!r} is no local source kind; kinds are {list(readers)}")
    return readers[kind](root, data)


def _decode_caption(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")  # the filter reports U+FFFD as caption_not_utf8


def _file_reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def _folder_items(root: Path, data: DataConfig) -> Iterator[Item]:
    """The folder's files in path order, a folder at a time (`listing.walk_folder`): the driver holds the names
    of one folder (and of the folders above it), as Arrow strings, never a list of the source's paths."""
    mapped = read_captions_file(root, data.caption_col)
    for piece in walk_folder(root, IMAGE_SUFFIXES):
        for name in piece.unreadable:  # not UTF-8: its id (U+FFFD for the bytes) says which file to rename
            yield Item((piece.folder / name).relative_to(root).as_posix(), None, None, problem="unreadable_name")
        for name, caption_has_image in zip(piece.names.to_pylist(), piece.has_image.to_pylist()):
            yield from _folder_item(root, piece.folder / name, mapped, data.caption_col, caption_has_image)


def _folder_item(root: Path, path: Path, mapped: CaptionsFile | None, caption_key: str,
                 has_image: bool) -> Iterator[Item]:
    """The item of one file of a folder source (none for the captions file); `has_image`: an image of the
    file's stem lies beside it (what a caption file needs)."""
    relative = path.relative_to(root).as_posix()
    suffix = path.suffix.lower()
    if path.parent == root and path.name in CAPTION_FILES:
        return
    if suffix in CAPTION_SUFFIXES:
        if not has_image:
            yield Item(relative, None, None, problem="missing_image")
        return
    if suffix not in IMAGE_SUFFIXES:
        yield Item(relative, None, None, problem="unknown_file")
        return
    if path.is_symlink() and not path.resolve().is_relative_to(root):
        yield Item(relative, None, None, problem="outside_source")
        return
    caption = _sidecar_caption(path, caption_key)
    if caption is None and mapped is not None:
        caption = mapped.get(relative, path.name)
    yield Item(relative, caption, _file_reader(path), problem=None if caption is not None else "missing_caption")


def _sidecar_caption(image: Path, caption_key: str) -> str | None:
    text_file, json_file = image.with_suffix(".txt"), image.with_suffix(".json")
    if text_file.is_file():
        return _decode_caption(text_file.read_bytes())
    if json_file.is_file():
        try:
            document = json.loads(json_file.read_bytes())
        except ValueError:
            return None
        value = document.get(caption_key) if isinstance(document, dict) else None
        return value if isinstance(value, str) else None
    return None


def _webdataset_items(root: Path | StorePath, data: DataConfig) -> Iterator[Item]:
    tars = [root] if root.is_file() else sorted(root.rglob("*.tar"))
    for tar in tars:
        name = tar.name if root.is_file() else tar.relative_to(root).as_posix()
        groups: dict[str, dict[str, bytes | TarMember]] = {}
        try:  # captions and metadata read here; an image only where it is fitted (its tar's path and offset)
            for member, content, where in tar_entries(tar, wanted=lambda name: not _is_image(name)):
                directory, _, base = member.rpartition("/")
                key, dot, extension = base.partition(".")
                if dot:
                    groups.setdefault(f"{directory}/{key}" if directory else key, {})[extension.lower()] = \
                        where if content is None else content
        except ValueError:
            yield Item(f"{name}/<after {len(groups)} samples>", None, None, problem="damaged_shard")
        for key, parts in groups.items():
            yield _webdataset_item(f"{name}/{key}", parts, data.caption_col)


def _is_image(member: str) -> bool:
    """Whether a webdataset member is a sample's image (`key.<image suffix>`, as `_webdataset_item` reads it)."""
    return _is_image_extension(member.rpartition("/")[2].partition(".")[2].lower())


def _is_image_extension(extension: str) -> bool:
    return f".{extension}" in IMAGE_SUFFIXES


def _webdataset_item(item_id: str, parts: dict[str, bytes | TarMember], caption_key: str) -> Item:
    meta = {}
    if "json" in parts:
        try:
            document = json.loads(parts["json"])
            meta = document if isinstance(document, dict) else {}
        except ValueError:
            pass
    caption = _decode_caption(parts["txt"]) if "txt" in parts else meta.get(caption_key)
    extension = next((ext for ext in parts if _is_image_extension(ext)), None)
    source_meta = {key: value for key, value in meta.items() if key not in ("key", "caption", "status")}
    if "url" in source_meta:
        source_meta["source_url"] = source_meta.pop("url")
    if extension is None:
        return Item(item_id, caption, None, problem="missing_image", meta=source_meta)
    image = parts[extension]
    read = image.read if isinstance(image, TarMember) else lambda: image
    return Item(item_id, caption if isinstance(caption, str) else None, read,
                problem=None if isinstance(caption, str) else "missing_caption", meta=source_meta)


def _parquet_items(root: Path | StorePath, data: DataConfig) -> Iterator[Item]:
    files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
    for path in files:
        name = path.name if root.is_file() else path.relative_to(root).as_posix()
        with open_binary(path) as file:
            yield from _parquet_file_items(path, name, pq.ParquetFile(file), data)


def _parquet_file_items(path: Path | StorePath, name: str, parquet: pq.ParquetFile, data: DataConfig
                        ) -> Iterator[Item]:
    """The items of one Parquet file with images (opened: `parquet`, named `name` in the source)."""
    names = parquet.schema_arrow.names
    if data.image_col not in names:
        raise ValueError(f"{path}: no column {data.image_col!r} (data.image_col); columns are {names}")
    caption_col = columns.pick(names, data.caption_col, "caption", path,
                               columns.string_columns(parquet.schema_arrow))
    row = 0  # the captions read here, a row group at a time; an image by the task that fits it
    for row_group in range(parquet.num_row_groups):
        captions = parquet.read_row_group(row_group, columns=[caption_col]).column(0).to_pylist()
        for index, caption in enumerate(captions):
            caption = caption if isinstance(caption, str) else None
            image = ParquetImage(str(path), row_group, index, data.image_col)
            yield Item(f"{name}#{row}", caption, image.read,
                       problem=None if caption is not None else "missing_caption")
            row += 1


@dataclass(frozen=True)
class ParquetImage:
    """Where one row's image lies in a Parquet file (the column's bytes, or a datasets export's struct
    of bytes and path), to read later where the file can be read (a Ray task): `read` gives the bytes,
    None where the row has none (a missing image)."""

    path: str
    row_group: int
    row: int  # within the row group
    column: str

    def read(self) -> bytes | None:
        value = _parquet_cell(self)
        return value.get("bytes") if isinstance(value, dict) else value


PARQUET_READ_ROWS = 256


class _RowCursor:
    """Where a process last read a Parquet column: the row group, the reader after the rows read, and those
    rows. A shard's items come in row order, so each batch of `PARQUET_READ_ROWS` rows is read once and memory
    holds one batch of images, whatever the row groups' size."""

    def __init__(self, where: tuple[str, int, str]) -> None:
        path, row_group, column = self.where = where
        self.file = open_binary(path)  # on a store too: kept open while the cursor reads on
        self.batches = pq.ParquetFile(self.file).iter_batches(batch_size=PARQUET_READ_ROWS, row_groups=[row_group],
                                                              columns=[column])
        self.start, self.rows = 0, None

    def cell(self, row: int) -> object:
        while self.rows is None or row >= self.start + len(self.rows):
            if self.rows is not None:
                self.start += len(self.rows)
            batch = next(self.batches, None)
            if batch is None:
                raise OSError(f"{self.where[0]}: row group {self.where[1]} has no row {row} (the file changed)")
            self.rows = batch.column(0)
        return self.rows[row - self.start].as_py()


_cursor: _RowCursor | None = None  # this process's


def release_parquet_cursor() -> None:
    """Close this process's Parquet cursor (a task that read images calls this when done)."""
    global _cursor
    if _cursor is not None:
        _cursor.file.close()
        _cursor = None


def _parquet_cell(image: ParquetImage) -> object:
    """The cell of `image`, through this process's cursor (a new one for another row group, or a row behind it)."""
    global _cursor
    where = (image.path, image.row_group, image.column)
    if _cursor is None or _cursor.where != where or image.row < _cursor.start:
        release_parquet_cursor()
        _cursor = _RowCursor(where)
    try:
        return _cursor.cell(image.row)
    except OSError:
        release_parquet_cursor()
        raise


def _coco_items(root: Path, data: DataConfig) -> Iterator[Item]:
    document = json.loads(root.read_bytes())
    images = {image["id"]: image for image in document["images"]}
    captions: dict[object, list[str]] = {}
    for annotation in sorted(document["annotations"], key=lambda a: a.get("id", 0)):
        if annotation.get("image_id") not in images:
            yield Item(f"annotation:{annotation.get('id')}", annotation.get("caption"), None, problem="missing_image")
            continue
        captions.setdefault(annotation["image_id"], []).append(annotation.get("caption") or "")
    folder = coco_images_dir(root, data, [image["file_name"] for image in images.values()])
    for image_id, image in sorted(images.items(), key=lambda item: str(item[1]["file_name"])):
        path = folder / image["file_name"]
        own = captions.get(image_id, [])
        meta = {"coco_id": image_id, "captions": own}
        if not path.is_file():
            yield Item(image["file_name"], own[0] if own else None, None, problem="missing_image", meta=meta)
            continue
        yield Item(image["file_name"], own[0] if own else None, _file_reader(path),
                   problem=None if own else "missing_caption", meta=meta)


def coco_images_dir(annotations: Path, data: DataConfig, file_names: list[str]) -> Path:
    """`data.images_dir`, else the folder beside the JSON that holds its first image: `images/`, the
    split named in `captions_<split>.json` (beside it or one up, as COCO ships it), or the JSON's own."""
    if data.images_dir is not None:
        folder = Path(data.images_dir).expanduser().resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"data.images_dir {folder} does not exist")
        return folder
    split = annotations.stem.removeprefix("captions_")
    candidates = [annotations.parent / "images", annotations.parent / split, annotations.parent.parent / split,
                  annotations.parent.parent / "images", annotations.parent]
    probe = file_names[0] if file_names else None
    for folder in candidates:
        if probe is not None and (folder / probe).is_file():
            return folder
    raise FileNotFoundError(f"{annotations}: cannot find the folder of its images (looked for {probe!r} in "
                            f"{[str(c) for c in candidates]}); set data.images_dir")
