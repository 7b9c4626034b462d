"""A real image-caption corpus for the slow tier: OpenMoji, as npm's `openmoji` package ships it.

4,495 emoji drawn as SVGs (`color/svg/<hexcode>.svg`), each with its Unicode annotation in
`data/openmoji.json` ("grinning face", "woman office worker: light skin tone", "flag: Germany").
`make real-corpus` (run by `make test-slow` / `make test-all`, so by CI, and `make test-quality`) fetches the package
tarball from the npm registry into `.cache/`; nothing is fetched at import or test time. The
tests rasterise it (cairosvg) into a folder of `<hexcode>.png` + `<hexcode>.txt`, and serve that
folder on loopback for the URL-list kind.
"""

from __future__ import annotations

import json
import os
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

VERSION = "17.0.0"
DEFAULT_TARBALL = Path(__file__).resolve().parents[1] / ".cache" / f"openmoji-{VERSION}.tgz"


def tarball() -> Path:
    """The package tarball (`OPENMOJI_TGZ`, else `.cache/`); missing, the test is skipped, or fails in CI."""
    path = Path(os.environ.get("OPENMOJI_TGZ", DEFAULT_TARBALL))
    if not path.is_file():
        message = f"no OpenMoji package at {path}: run `make real-corpus` (npm pack openmoji@{VERSION})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def rasterise(package: Path, out_dir: Path, size: int = 64) -> Path:
    """Every emoji of the package as `<hexcode>.png` (RGBA, `size` px) with its annotation in `<hexcode>.txt`;
    the few SVGs cairosvg cannot draw are listed in `unrendered.txt` beside the folder."""
    import cairosvg

    out_dir.mkdir(parents=True, exist_ok=True)
    unrendered: list[str] = []
    with tarfile.open(package) as archive:
        annotations = {entry["hexcode"]: entry["annotation"]
                       for entry in json.load(archive.extractfile("package/data/openmoji.json"))}
        for member in archive:
            name = Path(member.name)
            if member.isfile() and name.parent.as_posix() == "package/color/svg" and name.stem in annotations:
                try:
                    png = cairosvg.svg2png(bytestring=archive.extractfile(member).read(), output_width=size,
                                           output_height=size)
                except Exception as err:  # cairosvg fails on some markers and references
                    unrendered.append(f"{name.name}: {type(err).__name__}: {err}")
                    continue
                (out_dir / f"{name.stem}.png").write_bytes(png)
                (out_dir / f"{name.stem}.txt").write_text(annotations[name.stem])
    (out_dir.parent / "unrendered.txt").write_text("\n".join(unrendered))
    return out_dir


class FolderServer:
    """The folder on a loopback HTTP server, for as long as the `with` block lasts."""

    def __init__(self, folder: Path) -> None:
        handler = partial(_QuietHandler, directory=str(folder))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FolderServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # one line per image otherwise
        pass


def url_list(folder: Path, base_url: str, path: Path) -> Path:
    """A URL list of the folder's images as served at `base_url`, captions from their sidecars."""
    images = sorted(folder.glob("*.png"))
    pq.write_table(pa.table({"url": [f"{base_url}/{image.name}" for image in images],
                             "caption": [image.with_suffix(".txt").read_text() for image in images]}), path)
    return path
