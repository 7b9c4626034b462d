"""Download stage: real img2dataset runs on file:// URLs and on a loopback HTTP server full of faults."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dalle_pipeline.components import sorted_runs
from dalle_pipeline.components.cluster import disconnect
from dalle_pipeline.components.config import CorpusConfig, DataConfig, DownloadConfig, FilterConfig
from dalle_pipeline.components.corpus.shapes import run as generate_corpus
from dalle_pipeline.components.download import batch_shards, finished_batches, read_url_list, run
from dalle_pipeline.components.download import url_list as url_lists
from dalle_pipeline.components.download.run import ATTEMPTED_SPILL, BATCH_URL_LIST
from dalle_pipeline.components.filter import read_report
from dalle_pipeline.components.filter import run as filter_run
from dalle_pipeline.components.filter.run import require_usable
from dalle_pipeline.components.shards import iter_samples, read_shard, shard_paths
from dalle_pipeline.components.sources.kinds import source_kind
from faulty_server import FAULTS, MAX_BYTES, FaultyServer

IMAGE_SIZE = 32
download_module = importlib.import_module("dalle_pipeline.components.download.run")  # `download.run` is the function
FAST = dict(processes_count=1, thread_count=4, samples_per_shard=16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    return generate_corpus(CorpusConfig(num_images=40, max_shapes=2, seed=3), tmp_path_factory.mktemp("corpus"))


def test_file_urls_arrive_with_caption_and_extra_columns(corpus, tmp_path):
    out_dir = tmp_path / "shards"
    result = run(DownloadConfig(allow_file_urls=True, **FAST), corpus.url_list, out_dir, IMAGE_SIZE)

    assert (result.successes, result.failures, result.failures_by_reason, result.new_urls) == (40, 0, {}, 40)
    assert [batch.name for batch in result.batches] == ["batch-00000"]
    assert len(shard_paths(out_dir / "batch-00000")) == len(result.stats_files) == 3  # 16 + 16 + 8
    expected = {row["url"]: row for row in pq.read_table(corpus.url_list).to_pylist()}
    samples = _samples(out_dir)
    assert sorted(s.meta["url"] for s in samples) == sorted(expected)
    for sample in samples:
        row = expected[sample.meta["url"]]
        assert sample.caption == row["caption"]
        assert json.loads(sample.meta["objects"]) == json.loads(row["objects"])
        source_bytes = Path(sample.meta["url"].removeprefix("file://")).read_bytes()
        assert sample.meta["sha256"] == hashlib.sha256(source_bytes).hexdigest()
        source = np.asarray(Image.open(io.BytesIO(source_bytes)).convert("RGB"))
        assert np.array_equal(sample.pixels(), source)  # same size, PNG: nothing may change
    assert (out_dir / "batch-00000" / "_SUCCESS").is_file()
    assert not list(out_dir.glob(".*partial"))  # the staging folder became the batch


def _samples(download_dir: Path) -> list:
    return [sample for batch in finished_batches(download_dir) for tar, _ in batch_shards(batch)
            for sample in read_shard(tar)]


def test_a_rerun_adds_nothing_and_a_longer_list_adds_only_its_new_rows(corpus, tmp_path, monkeypatch):
    # what earlier batches attempted, read back from their shards' parquets: past 8 URLs in files, as past 64k
    monkeypatch.setattr(sorted_runs, "SPILL_ENTRIES", 8)
    spilled, write = [], sorted_runs.SortedRuns._write
    monkeypatch.setattr(sorted_runs.SortedRuns, "_write",
                        lambda self, keys, values: spilled.append(len(keys)) or write(self, keys, values))
    cfg = DownloadConfig(allow_file_urls=True, **FAST)
    rows = pq.read_table(corpus.url_list)
    first_list = tmp_path / "first.parquet"
    pq.write_table(rows.slice(0, 30), first_list)
    out_dir = tmp_path / "shards"
    out_dir.mkdir()
    (out_dir / ".batch-00000.partial").mkdir()  # a crashed run's debris for another request
    (out_dir / ".batch-00000.partial" / "00000.tar").write_bytes(b"half a shard")

    first = run(cfg, first_list, out_dir, IMAGE_SIZE)
    assert (first.successes, first.new_urls, len(_samples(out_dir))) == (30, 30, 30)

    # how it was fetched (parallelism) does not shape the images
    again = run(cfg.model_copy(update={"thread_count": 2}), first_list, out_dir, IMAGE_SIZE)
    assert again.new_urls == 0 and again.batches == first.batches and again.successes == 30

    # the next crawl: the whole list, in another order, with one URL twice: only the 10 new URLs are fetched
    longer_list = tmp_path / "longer.parquet"
    pq.write_table(pa.concat_tables([rows.slice(35), rows.slice(0, 35), rows.slice(38, 1)]), longer_list)
    longer = run(cfg, longer_list, out_dir, IMAGE_SIZE)
    assert (longer.new_urls, longer.successes, [b.name for b in longer.batches]) == (10, 40, ["batch-00000", "batch-00001"])
    assert sorted(s.meta["url"] for s in _samples(out_dir)) == sorted(rows.column("url").to_pylist())
    assert spilled and not (out_dir / ATTEMPTED_SPILL).exists()  # the index was in files, and they are gone

    with pytest.raises(ValueError, match=r"other settings \(image_size: 32 -> 16\)"):
        run(cfg, longer_list, out_dir, 16)


def _list_folder(folder: Path, rows: pa.Table) -> Path:
    """`rows` as a folder of parts, as LAION ships its lists (and a Spark export's _SUCCESS beside them)."""
    folder.mkdir()
    for number, start in enumerate(range(0, rows.num_rows, 15)):
        pq.write_table(rows.slice(start, 15), folder / f"part-{number:05d}.parquet")
    (folder / "_SUCCESS").write_text("")
    return folder


def _batch_lists(out_dir: Path) -> list[list[str]]:
    return [pq.read_table(batch / BATCH_URL_LIST).column("url").to_pylist() for batch in finished_batches(out_dir)]


def test_a_list_folder_is_read_a_block_at_a_time_into_batches_and_a_crash_between_them_resumes(
        corpus, tmp_path, monkeypatch):
    """A long list is never held whole: blocks of 7 rows from a folder of 3 files become batches of 16 new URLs,
    the first row of a URL kept (one URL repeats across files); a run that dies after its first batch, run again,
    gives the batches of an unbroken run, and a rerun adds nothing."""
    monkeypatch.setattr(url_lists, "BLOCK_ROWS", 7)
    rows = pq.read_table(corpus.url_list)
    listed = pa.concat_tables([rows.slice(0, 20), rows.slice(3, 1), rows.slice(20)])  # 41 rows, 40 URLs
    folder = _list_folder(tmp_path / "laion", listed)
    assert source_kind(DataConfig(source=str(folder))) == "url_list"
    cfg = DownloadConfig(allow_file_urls=True, **FAST, batch_urls=16)
    read = []
    monkeypatch.setattr(url_lists, "_raw_blocks", lambda path, kind, raw=url_lists._raw_blocks: (
        read.append(block.num_rows) or block for block in raw(path, kind)))

    unbroken = run(cfg, folder, tmp_path / "unbroken", IMAGE_SIZE)
    assert max(read) == 7  # the driver read 7 rows at a time
    expected = rows.column("url").to_pylist()
    assert _batch_lists(tmp_path / "unbroken") == [expected[:16], expected[16:32], expected[32:]]
    assert (unbroken.new_urls, unbroken.successes) == (40, 40)
    assert sorted(s.meta["url"] for s in _samples(tmp_path / "unbroken")) == sorted(expected)

    download_batch, calls = download_module._download_batch, []

    def dies_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed between batches")
        return download_batch(*args, **kwargs)

    monkeypatch.setattr(download_module, "_download_batch", dies_on_the_second_batch)
    with pytest.raises(RuntimeError, match="killed between batches"):
        run(cfg, folder, tmp_path / "broken", IMAGE_SIZE)
    assert _batch_lists(tmp_path / "broken") == [expected[:16]]
    monkeypatch.setattr(download_module, "_download_batch", download_batch)
    resumed = run(cfg, folder, tmp_path / "broken", IMAGE_SIZE)
    assert resumed.new_urls == 24 and _batch_lists(tmp_path / "broken") == _batch_lists(tmp_path / "unbroken")
    assert run(cfg, folder, tmp_path / "broken", IMAGE_SIZE).new_urls == 0


def test_a_bad_row_late_in_a_list_folder_fails_before_anything_is_downloaded(corpus, tmp_path, monkeypatch):
    """The list is checked whole, a block at a time, before the first download: a None URL in the last file's
    second block, or a file whose columns differ from the first's, stops the run naming the file and row."""
    monkeypatch.setattr(url_lists, "BLOCK_ROWS", 7)
    rows = pq.read_table(corpus.url_list).select(["url", "caption"])
    folder = _list_folder(tmp_path / "laion", rows)
    last = folder / "part-00002.parquet"
    pq.write_table(pa.table({"url": ["file:///a.png"] * 9 + [None], "caption": ["a"] * 10}), last)
    with pytest.raises(ValueError, match=r"part-00002.parquet: column 'url' row 9: None is no URL"):
        run(DownloadConfig(allow_file_urls=True, **FAST), folder, tmp_path / "out", IMAGE_SIZE)
    assert not (tmp_path / "out").exists()

    pq.write_table(pa.table({"url": ["file:///a.png"], "caption": ["a"], "licence": ["cc0"]}), last)
    with pytest.raises(ValueError, match=r"part-00002.parquet: its columns \(url: string, caption: string, licence: "
                                         r"string\) differ from those of .*part-00000.parquet"):
        run(DownloadConfig(allow_file_urls=True, **FAST), folder, tmp_path / "out", IMAGE_SIZE)
    (folder / "notes.md").write_text("where the list came from")
    with pytest.raises(ValueError, match=r"notes.md: cannot tell the URL list's format"):
        run(DownloadConfig(allow_file_urls=True, **FAST), folder, tmp_path / "out", IMAGE_SIZE)
    assert not (tmp_path / "out").exists()


def _fault_rows(server: FaultyServer, names: list[str]) -> list[tuple[str, bytes]]:
    """(url, caption bytes) rows: good images, their other URLs, every fault, and bad captions."""
    good = [(f"{server.url}/good/{name}", f"good {i}".encode()) for i, name in enumerate(names[:10])]
    return good + [
        (f"{server.url}/dup/{names[0]}", b"the same picture, another url"),
        (f"{server.url}/redirect/{names[10]}", b"moved"),
        (f"{server.url}/flaky/{names[11]}", b"rate limited once"),
        (f"{server.url}/slow/0.5/{names[12]}", "caf\u00e9 in latin-1".encode("latin-1")),
        (f"{server.url}/slow/0/{names[13]}", b"long " * 2000),
    ] + [(f"{server.url}{path}", f"fault {path}".encode()) for path in FAULTS]


def _write_csv(path: Path, rows: list[tuple[str, bytes]]) -> Path:
    lines = [b"url,caption"] + [url.encode() + b',"' + caption.replace(b'"', b'""') + b'"' for url, caption in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_a_crawl_full_of_faults_keeps_every_good_image_and_names_every_bad_one(corpus, tmp_path):
    names = sorted(path.name for path in corpus.images_dir.iterdir())
    cfg = DownloadConfig(**FAST, timeout=2, retries=1, max_retry_after=5, max_image_bytes=MAX_BYTES)  # http only
    with FaultyServer(corpus.images_dir) as server:
        url_list = _write_csv(tmp_path / "urls.csv", _fault_rows(server, names))
        outcome: dict = {}
        # Prefect runs submitted tasks on worker threads, where img2dataset cannot install its SIGINT handler
        worker = threading.Thread(target=lambda: outcome.update(result=run(cfg, url_list, tmp_path / "dl", IMAGE_SIZE)))
        worker.start()
        worker.join(timeout=300)
        result = outcome["result"]
        good_requests = sum(count for path, count in server.requests.items() if path.startswith("/good/"))

        assert result.successes == 15  # 10 good, the duplicate, the redirect, the flaky one, the 2 bad captions
        assert result.failures_by_reason == {reason: 1 for reason in FAULTS.values()}
        assert server.requests[f"/flaky/{names[11]}"] == 2  # waited out Retry-After: 1, then got it
        assert server.requests["/rate-limited.png"] == 1  # Retry-After: 86400 is not worth waiting for
        assert server.requests["/missing.png"] == 1  # a 404 is not retried
        assert server.requests["/error.png"] == 2  # a 500 is, once

        again = run(cfg, url_list, tmp_path / "dl", IMAGE_SIZE)
        assert again.new_urls == 0 and again.successes == 15
        assert sum(count for path, count in server.requests.items() if path.startswith("/good/")) == good_requests

    curated = filter_run(FilterConfig(), result.shards_dir, tmp_path / "curated")
    report = {row["url"].removeprefix(server.url): row for row in read_report(curated.report_path).to_pylist()}
    assert len(report) == len(_fault_rows(server, names))
    assert {path: report[path]["reason"] for path in FAULTS} == FAULTS
    assert all(report[path]["stage"] == "download" for path in FAULTS)
    expected_kept = [f"/good/{name}" for name in names[:10]] + [f"/redirect/{names[10]}", f"/flaky/{names[11]}"]
    assert sorted(path for path, row in report.items() if row["kept"]) == sorted(expected_kept)
    assert report[f"/dup/{names[0]}"]["reason"] == "duplicate"
    assert report[f"/slow/0.5/{names[12]}"]["reason"] == "caption_not_utf8"
    assert report[f"/slow/0/{names[13]}"]["reason"] == "caption_too_long"
    assert curated.kept == 12 and sum(1 for _ in iter_samples(curated.curated_dir)) == 12
    assert curated.download_failures_by_reason == {reason: 1 for reason in FAULTS.values()}


@pytest.mark.slow  # kill-and-resume
def test_a_download_killed_midway_resumes_to_the_same_corpus(corpus, tmp_path):
    names = sorted(path.name for path in corpus.images_dir.iterdir())
    cfg = DownloadConfig(processes_count=1, thread_count=2, samples_per_shard=4, timeout=5)
    with FaultyServer(corpus.images_dir) as server:
        url_list = tmp_path / "urls.parquet"
        urls = [f"{server.url}/slow/0.1/{name}" for name in names]
        pq.write_table(pa.table({"url": urls, "caption": [f"image {i}" for i in range(len(urls))]}), url_list)
        clean = run(cfg, url_list, tmp_path / "clean", IMAGE_SIZE)

        killed_dir = tmp_path / "killed"
        script = (
            "import sys; from dalle_pipeline.components.config import DownloadConfig; "
            "from dalle_pipeline.components.download import run; "
            f"run(DownloadConfig.model_validate_json(sys.argv[1]), {str(url_list)!r}, {str(killed_dir)!r}, {IMAGE_SIZE})"
        )
        child = subprocess.Popen([sys.executable, "-c", script, cfg.model_dump_json()], start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        staging = killed_dir / ".batch-00000.partial"
        deadline = time.monotonic() + 120
        while len(list(staging.glob("*_stats.json"))) < 2 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        os.killpg(child.pid, signal.SIGKILL)  # the whole job: the process and img2dataset's workers
        child.wait()
        assert 2 <= len(list(staging.glob("*_stats.json"))) < 10  # it stopped partway
        assert finished_batches(killed_dir) == []  # nothing half-done is visible to later stages
        with pytest.raises(FileNotFoundError, match="no finished download batch"):
            filter_run(FilterConfig(), killed_dir, tmp_path / "too-early")

        resumed = run(cfg, url_list, killed_dir, IMAGE_SIZE)

    assert (resumed.successes, resumed.failures) == (clean.successes, clean.failures) == (40, 0)
    def corpus_of(download_dir: Path, name: str) -> list:
        result = filter_run(FilterConfig(), download_dir, tmp_path / name)
        return sorted((s.key, s.caption, hashlib.sha256(s.image_bytes).hexdigest()) for s in iter_samples(result.curated_dir))
    assert corpus_of(killed_dir, "curated-killed") == corpus_of(tmp_path / "clean", "curated-clean")


def test_a_scheme_we_do_not_fetch_is_one_reason_and_the_rest_is_downloaded(corpus, tmp_path):
    rows = pq.read_table(corpus.url_list).select(["url", "caption"]).slice(0, 5)
    mixed = pa.concat_tables([rows, pa.table({"url": ["ftp://example.com/a.png", "data:image/png;base64,AAAA"],
                                              "caption": ["over ftp", "inline"]})])
    pq.write_table(mixed, tmp_path / "mixed.parquet")
    result = run(DownloadConfig(allow_file_urls=True, **FAST), tmp_path / "mixed.parquet", tmp_path / "dl", IMAGE_SIZE)
    assert (result.successes, result.failures_by_reason) == (5, {"unsupported_scheme": 2})

    refused = run(DownloadConfig(**FAST), corpus.url_list, tmp_path / "no-files", IMAGE_SIZE)  # file:// not allowed
    assert (refused.successes, refused.failures_by_reason) == (0, {"unsupported_scheme": 40})
    curated = filter_run(FilterConfig(), tmp_path / "no-files", tmp_path / "curated")
    with pytest.raises(ValueError, match=r"no usable image-caption pair in the source: of 40 items, "
                                         r"unsupported_scheme 40"):
        require_usable(curated)


def _write_list(path: Path, columns: dict) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.table(columns), path)
    else:
        path.write_text("\n".join(json.dumps(row) for row in pa.table(columns).to_pylist()))
    return path


@pytest.mark.parametrize(
    ("name", "columns", "message"),
    [
        ("urls.parquet", {"url": ["https://example.com/a.png"], "alt": ["a"], "n": [1]},
         r"no caption column 'caption' \(data\.caption_col\); its string columns are \['url', 'alt'\]"),
        ("urls.jsonl", {"link": ["https://example.com/a.png"], "caption": ["a"]}, r"no url column 'url'"),
        ("urls.parquet", {"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}, "is empty"),
        ("urls.parquet", {"url": ["https://e.com/a", None], "caption": ["a", "b"]}, r"row 1: None is no URL"),
        ("urls.parquet", {"url": [1, 2], "caption": ["a", "b"]}, r"column 'url' holds int64, not URL strings"),
        ("urls.parquet", {"url": ["https://e.com/a"], "caption": ["a"], "status": ["x"]}, r"\['status'\] are reserved"),
        ("urls.txt", {"url": ["https://e.com/a"]}, "cannot tell the URL list's format"),
    ],
)
def test_bad_url_lists_fail_before_downloading(tmp_path, name, columns, message):
    url_list = _write_list(tmp_path / name, columns)
    with pytest.raises(ValueError, match=message):
        run(DownloadConfig(**FAST), url_list, tmp_path / "out", IMAGE_SIZE)
    assert not (tmp_path / "out").exists()


def test_laions_column_names_are_read_and_the_choice_logged(tmp_path, caplog):
    """LAION's lists name their columns URL and TEXT; a user need not set data.url_col / caption_col."""
    url_list = _write_list(tmp_path / "laion.parquet", {"URL": ["https://e.com/a.png"], "TEXT": ["a red circle"],
                                                         "WIDTH": [256]})
    with caplog.at_level("WARNING", logger="dalle_pipeline.data"):
        table = read_url_list(url_list)
    assert table.column_names == ["url", "caption", "WIDTH"] and table.column("caption").to_pylist() == ["a red circle"]
    assert "reading the captions from 'TEXT'" in caplog.text and "reading the urls from 'URL'" in caplog.text
    # a column named otherwise than the default is used as named, with no guessing
    with pytest.raises(ValueError, match=r"no caption column 'alt_text'"):
        read_url_list(url_list, url_col="URL", caption_col="alt_text")

    # LAION's own shape, a folder of parts: the choice is said once, not for each part and pass
    parts = tmp_path / "laion-parts"
    parts.mkdir()
    for number in range(3):
        _write_list(parts / f"part-{number:05d}.parquet", {"URL": [f"https://e.com/{number}.png"], "TEXT": ["a"]})
    caplog.clear()
    with caplog.at_level("WARNING", logger="dalle_pipeline.data"):
        assert read_url_list(parts).column("url").to_pylist() == [f"https://e.com/{n}.png" for n in range(3)]
    assert caplog.text.count("reading the captions from 'TEXT'") == 1


def test_a_missing_url_list_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        run(DownloadConfig(), tmp_path / "nowhere.parquet", tmp_path / "out", IMAGE_SIZE)


LIST_ROWS = [{"link": "https://e.com/a.png", "text": "a red circle", "licence": "cc-by"},
             {"link": "https://e.com/b.png", "text": None, "licence": "cc0"}]


def _write_any(path: Path, rows: list[dict]) -> Path:
    kind = path.name.removesuffix(".gz").rsplit(".", 1)[1]
    table = pa.Table.from_pylist(rows)
    if kind == "parquet":
        pq.write_table(table, path)
        return path
    if kind in ("csv", "tsv"):
        sep = "\t" if kind == "tsv" else ","
        lines = [sep.join(table.column_names)] + [sep.join(str(v) if v is not None else "" for v in row.values())
                                                 for row in rows]
        data = "\n".join(lines).encode()
    elif kind == "json":
        data = json.dumps(rows).encode()
    else:
        data = "\n".join(json.dumps(row) for row in rows).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("name", ["l.parquet", "l.csv", "l.tsv", "l.json", "l.jsonl", "l.csv.gz", "l.jsonl.gz"])
@pytest.mark.parametrize("block", ["whole", "small"])
def test_every_url_list_format_reads_the_same_rows(tmp_path, monkeypatch, name, block):
    rows = [{**row, "text": None} for row in LIST_ROWS] * 3 + LIST_ROWS  # the first block may have no caption
    if block == "small":  # read a few rows at a time: a block's types must not fix the next one's
        monkeypatch.setattr(url_lists, "BLOCK_ROWS", 2)
        monkeypatch.setattr(url_lists, "BLOCK_BYTES", 256)
    table = read_url_list(_write_any(tmp_path / name, rows), "link", "text")
    assert table.column("link").to_pylist() == ["https://e.com/a.png", "https://e.com/b.png"] * 4
    assert table.column("text").to_pylist() == [""] * 6 + ["a red circle", ""]  # a missing caption becomes empty
    assert table.column("licence").to_pylist() == ["cc-by", "cc0"] * 4  # extra columns are carried through


def test_an_unreadable_url_list_is_named(tmp_path):
    broken = tmp_path / "urls.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"url": "https://e.com/a", "caption": "a"}\n')[:-6])
    with pytest.raises(ValueError, match=r"urls.jsonl.gz: cannot read it as jsonl.gz"):
        run(DownloadConfig(**FAST), broken, tmp_path / "out", IMAGE_SIZE)
    assert not (tmp_path / "out").exists()


def test_the_ray_distributor_downloads_the_same_samples_through_our_fetch(corpus, tmp_path):
    """img2dataset's Ray distributor, each shard a Ray task on a local Ray, with our fetch inside."""
    page = tmp_path / "page.png"
    page.write_text("<html>an error page saved as .png</html>")
    rows = pq.read_table(corpus.url_list)
    extra = pa.table({"url": [page.as_uri()], "caption": ["not a picture"], "objects": ["[]"]})
    url_list = tmp_path / "urls.parquet"
    pq.write_table(pa.concat_tables([rows.select(["url", "caption", "objects"]), extra]), url_list)

    cfg = DownloadConfig(allow_file_urls=True, distributor="ray", **FAST)
    try:
        result = run(cfg, url_list, tmp_path / "ray", IMAGE_SIZE)
    finally:
        disconnect()  # the local Ray the download started
    # img2dataset's own fetch would pass the page on to OpenCV ("resize_failed"); ours names it
    assert (result.successes, result.failures_by_reason, len(result.stats_files)) == (40, {"not_an_image": 1}, 3)
    expected = {row["url"]: row["caption"] for row in rows.to_pylist()}
    assert {s.meta["url"]: s.caption for s in _samples(tmp_path / "ray")} == expected


def _hold_lock_in_child(folder: str, result_file: str) -> None:
    """A spawned child (as img2dataset's workers are) that runs the download again."""
    from dalle_pipeline.components.download.run import exclusive

    try:
        with exclusive(Path(folder), "download"):
            Path(result_file).write_text("got the lock")
    except RuntimeError as err:
        Path(result_file).write_text(str(err))


def test_a_worker_that_reimports_the_script_is_told_to_guard_it_and_a_second_download_to_wait(tmp_path):
    import multiprocessing

    from dalle_pipeline.components.download.run import exclusive

    with exclusive(tmp_path, "download"):
        child = multiprocessing.get_context("spawn").Process(
            target=_hold_lock_in_child, args=(str(tmp_path), str(tmp_path / "child.txt")))
        child.start()
        child.join(60)
        assert "a worker that the download into" in (tmp_path / "child.txt").read_text()
        assert 'if __name__ == "__main__":' in (tmp_path / "child.txt").read_text()
        stranger = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; "
             "from dalle_pipeline.components.download.run import exclusive\n"
             "with exclusive(Path(sys.argv[1]), 'download'): pass", str(tmp_path)],
            capture_output=True, text=True, timeout=60)
        assert f"another download (pid {os.getpid()}) is writing to" in stranger.stderr
    with exclusive(tmp_path, "download"):  # released: the next download takes it
        pass


def test_the_readme_download_example_runs_as_written(corpus, tmp_path):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    example = readme.split("the call goes under the `__main__` guard:\n\n", 1)[1].split("\n\nRunning", 1)[0]
    script = "\n".join(line.removeprefix("    ") for line in example.splitlines())
    # the example's own list and settings, swapped for a local list and settings that suit 2 cores
    rows = pq.read_table(corpus.url_list).select(["url", "caption"]).rename_columns(["URL", "TEXT"])
    pq.write_table(rows, tmp_path / "laion-part-00000.parquet")
    for wanted, local in [("processes_count=8, thread_count=64", "processes_count=2, thread_count=4, "
                           "allow_file_urls=True"), ("image_size=256", "image_size=32")]:
        assert wanted in script
        script = script.replace(wanted, local)
    (tmp_path / "example.py").write_text(script)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reasons = read_report(tmp_path / "data" / "curated" / "filter_report.parquet").column("reason").to_pylist()
    assert len(reasons) == 40 and "kept" in reasons  # one reason per URL; the shapes corpus repeats scenes
    assert set(reasons) <= {"kept", "duplicate", "near_duplicate"}
