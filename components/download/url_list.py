"""A URL list, read a block of rows at a time: one file, or a folder of them (LAION ships `part-*.parquet`).

Formats, by file name: parquet, csv, tsv, json, jsonl, the text ones optionally gzipped. Parquet is read by
record batches, CSV/TSV and JSON lines by blocks of bytes, so a list of any length is read in the memory of
one block (a `.json` array is one document and is read whole: give a long list as JSON lines or Parquet).
Every block is checked as it is read: the url and caption columns exist (LAION's `URL`/`TEXT` are
recognised, the choice logged), no column img2dataset reserves, every URL a string, the same columns in
every file; captions become strings, a missing one empty (the filter drops it). Text that is not UTF-8 (a
crawl's captions come in any encoding) is read with the undecodable bytes replaced, so the row is kept.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from .. import columns

# URL-list file extensions we read, by img2dataset's input_format name
INPUT_FORMATS = ("parquet", "csv", "tsv", "json", "jsonl")
# columns img2dataset writes itself and refuses to take from the URL list
RESERVED_COLUMNS = frozenset(
    "key url caption width height original_width original_height status error_message exif md5 sha256 sha512".split()
)
# where a list's urls and captions may be (`columns.ALIASES`): read as text whatever a first block suggests
TEXT_NAMES = frozenset({"url", "caption", *columns.ALIASES["url"], *columns.ALIASES["caption"]})
BLOCK_ROWS = 1 << 16  # rows of a Parquet list read at a time
BLOCK_BYTES = 1 << 24  # bytes of a text list parsed at a time


def input_format_of(url_list: Path) -> str:
    """The list's format from its file name: `x.parquet`, `x.csv`, `x.jsonl.gz`..."""
    suffixes = [suffix.lstrip(".").lower() for suffix in url_list.suffixes]
    if suffixes[-1:] == ["gz"] and len(suffixes) >= 2 and suffixes[-2] in INPUT_FORMATS[1:]:
        return f"{suffixes[-2]}.gz"
    if suffixes and suffixes[-1] in INPUT_FORMATS:
        return suffixes[-1]
    raise ValueError(f"{url_list}: cannot tell the URL list's format; name it *.{{{','.join(INPUT_FORMATS)}}}")


def is_list_file(path: Path) -> bool:
    try:
        input_format_of(path)
    except ValueError:
        return False
    return True


def skipped(relative: Path) -> bool:
    """Whether a file of a URL list folder (its path relative to the folder) is no part of the list: hidden, or
    `_`-prefixed (`_SUCCESS`, the `.crc` files a Spark export leaves beside its parts)."""
    return any(part.startswith((".", "_")) for part in relative.parts)


def list_files(url_list: Path) -> list[Path]:
    """The files of a URL list: the file itself, or every list file below a folder in path order. A folder's
    hidden and `_`-prefixed files (`_SUCCESS`, `.crc` files a Spark export leaves) are skipped; any other file
    that is no list is refused, naming it."""
    if not url_list.exists():
        raise FileNotFoundError(f"URL list {url_list} does not exist")
    if url_list.is_file():
        return [url_list]
    files = [path for path in sorted(url_list.rglob("*")) if path.is_file() and not skipped(path.relative_to(url_list))]
    others = [path for path in files if not is_list_file(path)]
    if others:
        input_format_of(others[0])  # raises, naming it
    if not files:
        raise ValueError(f"URL list folder {url_list} holds no list file (*.{{{','.join(INPUT_FORMATS)}}}[.gz])")
    return files


class _Utf8Replaced(io.RawIOBase):
    """A binary stream read as UTF-8 with undecodable bytes replaced (U+FFFD), re-encoded: always valid UTF-8."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self.raw, self.pending = raw, b""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            chunk = self.raw.read(1 << 20)
            self.pending = self.decoder.decode(chunk, final=not chunk).encode("utf-8")
            if not chunk:
                break
        size = min(len(buffer), len(self.pending))
        buffer[:size], self.pending = self.pending[:size], self.pending[size:]
        return size

    def close(self) -> None:
        self.raw.close()
        super().close()


def _raw_blocks(path: Path, input_format: str) -> Iterator[pa.RecordBatch]:
    kind = input_format.removesuffix(".gz")
    if kind == "parquet":
        parquet = pq.ParquetFile(path)
        yield pa.RecordBatch.from_pylist([], schema=parquet.schema_arrow)  # its columns, however many rows
        yield from parquet.iter_batches(batch_size=BLOCK_ROWS)
        return
    with _Utf8Replaced(_open(path, input_format)) as text:
        if kind == "json":
            rows = json.loads(text.read())
            if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
                raise ValueError(f"{path}: cannot read it as json: a .json URL list must be an array of objects")
            yield from pa.Table.from_pylist(rows).to_batches()
        elif kind == "jsonl":  # url and caption read as text: a first block without a caption types it null
            texts = [pa.field(name, pa.string()) for name in _first_record(path, input_format) if name in TEXT_NAMES]
            yield from pa_json.open_json(text, read_options=pa_json.ReadOptions(block_size=BLOCK_BYTES),
                                         parse_options=pa_json.ParseOptions(explicit_schema=pa.schema(texts),
                                                                            unexpected_field_behavior="infer"))
        else:  # every column read as text: the types a first block suggests could fail on a later one
            header = _header(path, input_format, kind)
            yield from pa_csv.open_csv(text, read_options=pa_csv.ReadOptions(block_size=BLOCK_BYTES),
                                       parse_options=_csv_options(kind),
                                       convert_options=pa_csv.ConvertOptions(
                                           column_types={name: pa.string() for name in header}))


def _open(path: Path, input_format: str) -> io.BufferedIOBase:
    """The list file's bytes, ungzipped where its name says so."""
    return gzip.open(path, "rb") if input_format.endswith(".gz") else open(path, "rb")


def _delimiter(kind: str) -> str:
    return "\t" if kind == "tsv" else ","


def _csv_options(kind: str) -> pa_csv.ParseOptions:
    return pa_csv.ParseOptions(delimiter=_delimiter(kind), newlines_in_values=True)


def _first_record(path: Path, input_format: str) -> list[str]:
    """The keys of a JSON-lines list's first record."""
    with _open(path, input_format) as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line.decode("utf-8", errors="replace"))
                return list(record) if isinstance(record, dict) else []
    return []


def _header(path: Path, input_format: str, kind: str) -> list[str]:
    """The column names of a CSV/TSV list: its first record."""
    with _open(path, input_format) as handle:
        lines = io.TextIOWrapper(handle, encoding="utf-8", errors="replace", newline="")
        return next(csv.reader(lines, delimiter=_delimiter(kind)), [])


class _ListChecks:
    """What every block of a list must agree on: its file's column names, the first file's columns."""

    def __init__(self, url_col: str, caption_col: str, log: bool) -> None:
        self.url_col, self.caption_col, self.log = url_col, caption_col, log
        self.renames: dict[str, str] = {}
        self.first: tuple[Path, pa.Schema] | None = None
        self.logged: set[tuple[str, ...]] = set()  # the files' column names whose choice was logged

    def start_file(self, path: Path, schema: pa.Schema) -> None:
        self.renames = {}
        log = self.log and tuple(schema.names) not in self.logged  # once for the parts of a list, not per part
        self.logged.add(tuple(schema.names))
        for role, column in (("url", self.url_col), ("caption", self.caption_col)):
            found = columns.pick(schema.names, column, role, path, columns.string_columns(schema), log=log)
            if found != column:  # the rest of the pipeline reads it under the configured name
                self.renames[found] = column
        names = [self.renames.get(name, name) for name in schema.names]
        reserved = sorted(RESERVED_COLUMNS.intersection(set(names) - {self.url_col, self.caption_col}))
        if reserved:
            raise ValueError(f"{path}: columns {reserved} are reserved by img2dataset; rename them")

    def block(self, path: Path, block: pa.RecordBatch, first_row: int) -> pa.Table:
        table = pa.Table.from_batches([block])
        table = table.rename_columns([self.renames.get(name, name) for name in table.column_names])
        urls = table.column(self.url_col)
        if not columns.is_text(urls.type) and urls.null_count < len(urls):
            raise ValueError(f"{path}: column {self.url_col!r} holds {urls.type}, not URL strings")
        if urls.null_count:
            first = first_row + pc.indices_nonzero(pc.is_null(urls))[0].as_py()
            raise ValueError(f"{path}: column {self.url_col!r} row {first}: None is no URL ({urls.null_count} such "
                             "rows in this block)")
        table = table.set_column(table.column_names.index(self.url_col), self.url_col, pc.cast(urls, pa.string()))
        captions = pc.fill_null(pc.cast(table.column(self.caption_col), pa.string()), "")
        table = table.set_column(table.column_names.index(self.caption_col), self.caption_col, captions)
        ordered = [self.url_col, self.caption_col, *(n for n in table.column_names if n not in (self.url_col,
                                                                                           self.caption_col))]
        table = table.select(ordered)
        if self.first is None:
            self.first = (path, table.schema)
        elif not table.schema.equals(self.first[1]):
            raise ValueError(f"{path}: its columns {_described(table.schema)} differ from those of {self.first[0]} "
                             f"{_described(self.first[1])}; every file of a URL list must have the same columns")
        return table


def _described(schema: pa.Schema) -> str:
    return "(" + ", ".join(f"{field.name}: {field.type}" for field in schema) + ")"


def read_blocks(url_list: str | Path, url_col: str = "url", caption_col: str = "caption",
                log: bool = False) -> Iterator[pa.Table]:
    """The rows of the list, checked, a block at a time, file after file (columns: url, caption, the rest).
    A list that breaks a rule raises ValueError naming the file (and the column and row). With `log`, a
    column read under another name (LAION's `TEXT`) is logged, once; `check` does, so reading after it need not."""
    url_list = Path(url_list)
    checks = _ListChecks(url_col, caption_col, log)
    for path in list_files(url_list):
        input_format, rows, started = input_format_of(path), 0, False
        try:
            for block in _raw_blocks(path, input_format):
                if not started:
                    checks.start_file(path, block.schema)
                    started = True
                if block.num_rows:
                    yield checks.block(path, block, rows)
                rows += block.num_rows
        except (pa.ArrowException, OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read it as {input_format}: {err}") from err


def check(url_list: str | Path, url_col: str = "url", caption_col: str = "caption") -> int:
    """Read the whole list once, block by block, before anything is downloaded: its row count, or
    ValueError for the first rule it breaks (an empty list included)."""
    total = sum(block.num_rows for block in read_blocks(url_list, url_col, caption_col, log=True))
    return _not_empty(url_list, total)


def read_url_list(url_list: str | Path, url_col: str = "url", caption_col: str = "caption") -> pa.Table:
    """The whole list as one table, checked as `check` does (a short list; the download stage reads it a block
    at a time)."""
    blocks = list(read_blocks(url_list, url_col, caption_col, log=True))
    _not_empty(url_list, sum(block.num_rows for block in blocks))
    return pa.concat_tables(blocks)


def _not_empty(url_list: str | Path, rows: int) -> int:
    if rows == 0:
        raise ValueError(f"{url_list}: the URL list is empty")
    return rows
