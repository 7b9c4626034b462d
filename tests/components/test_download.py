"""Download stage: real img2dataset runs on file:// URLs and on a loopback HTTP server."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dalle_pipeline.components.config import CorpusConfig, DownloadConfig
from dalle_pipeline.components.corpus import generate
from dalle_pipeline.components.download import run
from dalle_pipeline.components.shards import iter_samples, shard_paths

IMAGE_SIZE = 32
FAST = dict(processes_count=1, thread_count=4, samples_per_shard=16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    return generate(CorpusConfig(num_images=40, max_shapes=2, seed=3), tmp_path_factory.mktemp("corpus"))


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the corpus images; a request whose query says `noai` gets an X-Robots-Tag: noai header."""

    def end_headers(self) -> None:
        if "noai" in self.path:
            self.send_header("X-Robots-Tag", "noai")
        super().end_headers()

    def log_message(self, *args) -> None:  # keep test output readable
        pass


@pytest.fixture()
def image_server(corpus) -> Iterator[str]:
    handler = functools.partial(_Handler, directory=str(corpus.images_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_file_urls_arrive_with_caption_and_extra_columns(corpus, tmp_path):
    out_dir = tmp_path / "shards"
    result = run(DownloadConfig(allow_file_urls=True, **FAST), corpus.url_list, out_dir, IMAGE_SIZE)

    assert (result.successes, result.failures, result.failures_by_reason) == (40, 0, {})
    assert len(shard_paths(out_dir)) == len(result.stats_files) == 3  # 16 + 16 + 8
    expected = {row["url"]: row for row in pq.read_table(corpus.url_list).to_pylist()}
    samples = list(iter_samples(out_dir))
    assert sorted(s.meta["url"] for s in samples) == sorted(expected)
    for sample in samples:
        row = expected[sample.meta["url"]]
        assert sample.caption == row["caption"]
        assert json.loads(sample.meta["objects"]) == json.loads(row["objects"])
        source = np.asarray(Image.open(sample.meta["url"].removeprefix("file://")).convert("RGB"))
        assert np.array_equal(sample.pixels(), source)  # same size, PNG: nothing may change
    assert (out_dir / "_SUCCESS").is_file()
    assert not list(tmp_path.glob(".*partial"))  # the staging folder became out_dir


def test_a_finished_download_is_reused_and_a_half_finished_one_is_not(corpus, tmp_path):
    cfg = DownloadConfig(allow_file_urls=True, **FAST)
    out_dir = tmp_path / "shards"
    out_dir.mkdir()
    (out_dir / "00000.tar").write_bytes(b"half a shard")  # a crashed run's debris, no _SUCCESS
    first = run(cfg, corpus.url_list, out_dir, IMAGE_SIZE)
    assert first.successes == 40 and len(list(iter_samples(out_dir))) == 40

    marker_time = (out_dir / "_SUCCESS").stat().st_mtime_ns
    again = run(cfg.model_copy(update={"thread_count": 2}), corpus.url_list, out_dir, IMAGE_SIZE)
    assert again == first
    assert (out_dir / "_SUCCESS").stat().st_mtime_ns == marker_time  # nothing was downloaded again


def test_http_successes_and_failures_are_counted_from_a_worker_thread(corpus, image_server, tmp_path):
    names = sorted(path.name for path in corpus.images_dir.iterdir())[:10]
    urls = [f"{image_server}/{name}" for name in names]
    urls += [f"{image_server}/missing.png", f"{image_server}/{names[0]}?noai"]
    url_list = tmp_path / "urls.csv"
    pa_csv.write_csv(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}), url_list)

    outcome: dict = {}
    cfg = DownloadConfig(**FAST)  # http only: file:// stays refused
    # Prefect runs submitted tasks on worker threads, where img2dataset cannot install its SIGINT handler
    worker = threading.Thread(target=lambda: outcome.update(result=run(cfg, url_list, tmp_path / "out", IMAGE_SIZE)))
    worker.start()
    worker.join(timeout=120)
    result = outcome["result"]

    assert result.successes == 10
    assert result.failures == 2
    assert result.failures_by_reason == {
        "HTTP Error 404: File not found": 1,
        "Use of image disallowed by X-Robots-Tag directive": 1,
    }
    assert sorted(s.caption for s in iter_samples(result.shards_dir)) == sorted(f"caption {i}" for i in range(10))


def test_file_urls_are_refused_unless_allowed(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"column 'url' row 0: 'file://.*allow_file_urls.*\(40 such rows"):
        run(DownloadConfig(**FAST), corpus.url_list, tmp_path / "out", IMAGE_SIZE)
    assert not (tmp_path / "out").exists()


def _write_list(path: Path, columns: dict) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.table(columns), path)
    else:
        path.write_text("\n".join(json.dumps(row) for row in pa.table(columns).to_pylist()))
    return path


@pytest.mark.parametrize(
    ("name", "columns", "message"),
    [
        ("urls.parquet", {"url": ["https://example.com/a.png"], "text": ["a"]}, r"no caption column 'caption'"),
        ("urls.jsonl", {"link": ["https://example.com/a.png"], "caption": ["a"]}, r"no url column 'url'"),
        ("urls.parquet", {"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}, "is empty"),
        ("urls.parquet", {"url": ["https://e.com/a", "ftp://e.com/b"], "caption": ["a", "b"]}, r"row 1: 'ftp://e.com/b'"),
        ("urls.parquet", {"url": ["https://e.com/a", None], "caption": ["a", "b"]}, r"row 1: None"),
        ("urls.parquet", {"url": ["https://e.com/a"], "caption": ["a"], "status": ["x"]}, r"\['status'\] are reserved"),
        ("urls.txt", {"url": ["https://e.com/a"]}, "cannot tell the URL list's format"),
    ],
)
def test_bad_url_lists_fail_before_downloading(tmp_path, name, columns, message):
    url_list = _write_list(tmp_path / name, columns)
    with pytest.raises(ValueError, match=message):
        run(DownloadConfig(**FAST), url_list, tmp_path / "out", IMAGE_SIZE)
    assert not (tmp_path / "out").exists()


def test_a_missing_url_list_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        run(DownloadConfig(), tmp_path / "nowhere.parquet", tmp_path / "out", IMAGE_SIZE)
