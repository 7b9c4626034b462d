"""A run's root on an object store: S3 through moto's standalone server on loopback (a real HTTP endpoint that
boto3 and s3fs talk to as to AWS); the stage cache publishes finished stages there and fetches them back."""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from dalle_pipeline.components.config import FilterConfig
from dalle_pipeline.components.stage_cache import RECORD, STAGES_PLACEHOLDER, StageCache, StageRecord
from dalle_pipeline.components.storage import RunRoot, run_root, walked_files
from local_processes import S3Endpoint


@dataclass(frozen=True)
class Out:
    curated_dir: str


@pytest.fixture(scope="module")
def s3():
    endpoint = S3Endpoint()
    saved = {name: os.environ.get(name) for name in endpoint.env}
    os.environ.update(endpoint.env)
    try:
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        endpoint.stop()


def test_a_root_is_a_local_folder_or_an_object_store_with_a_local_cache(tmp_path, monkeypatch):
    from dalle_pipeline.components.tracking import default_root, default_tracking_uri

    assert run_root(tmp_path / "home", "root") == RunRoot(tmp_path / "home")
    assert run_root((tmp_path / "home").as_uri(), "root") == RunRoot(tmp_path / "home")
    monkeypatch.setenv("DALLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DALLE_HOME", "s3://bucket/dalle/")
    root = default_root()
    assert root == RunRoot(tmp_path / "cache", "s3://bucket/dalle")
    assert root.stages_url == "s3://bucket/dalle/stages" and root.artifact_uri == "s3://bucket/dalle/mlartifacts"
    monkeypatch.delenv("DALLE_CACHE")
    elsewhere = run_root("s3://bucket/other", "root").local  # each store its own cache
    assert elsewhere.parent == Path("~/.cache/dalle-pipeline").expanduser() and elsewhere.name.startswith("s3-")
    assert elsewhere != run_root("s3://bucket/dalle", "root").local

    # MLflow's default store is a sqlite file under the root: an object store needs a tracking URI
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match=r"'s3://bucket/dalle' is an object store.*MLFLOW_TRACKING_URI"):
        default_tracking_uri(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(root) == "http://127.0.0.1:5000"

    # refused before any work, naming the protocol: one fsspec does not know, one whose package is missing
    with pytest.raises(ValueError, match=r"DALLE_HOME 'nosuch://b/x': unknown protocol nosuch://"):
        run_root("nosuch://b/x", "DALLE_HOME")
    with pytest.raises(ValueError, match=r"root 'gs://b/x': .*gcsfs"):
        run_root("gs://b/x", "root")
    assert not (tmp_path / "s3:").exists() and not os.path.exists("s3:") and not os.path.exists("nosuch:")


def finished_stage(cache: StageCache, key: str, files: dict[str, bytes], run: str = "run-1") -> StageRecord:
    folder = cache.root / "filter" / "folder-a"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    record = StageRecord("filter", key, folder, Out(str(folder / "curated")), {"kept": 3.0}, run, 2.0)
    cache.commit(record)
    return record


def test_a_finished_stage_is_published_record_last_and_fetched_into_another_cache(tmp_path, s3):
    url = f"s3://{s3.bucket}/publish/stages"
    here = StageCache(tmp_path / "here" / "stages", url)
    files = {"curated/00000.tar": os.urandom(3000), "curated/report.parquet": b"report", "part.json": b"{}"}
    record = finished_stage(here, "key-1", files)
    prefix = "publish/stages/filter/folder-a/"
    assert s3.keys(prefix) == sorted(prefix + name for name in [*files, RECORD])
    published = json.loads(s3.client().get_object(Bucket=s3.bucket, Key=prefix + RECORD)["Body"].read())
    assert published["outputs"]["curated_dir"] == f"{STAGES_PLACEHOLDER}/filter/folder-a/curated"

    # another machine's cache: a hit is its record alone, its paths its own; nothing else is fetched
    there = StageCache(tmp_path / "there" / "stages", url)
    folder = there.root / "filter" / "folder-a"
    assert there.lookup(folder, "another key", Out) is None and not folder.exists()
    hit = there.lookup(folder, "key-1", Out)
    assert hit.outputs == Out(str(folder / "curated")) and hit.metrics == record.metrics and not folder.exists()
    assert there.stage_value(str(folder / "curated")) == "<filter@key-1>/curated"  # a downstream key names it alike
    # what the flow reads itself is read where it lies, or from a copy of that one file
    assert there.location(folder / "curated") == f"{url}/filter/folder-a/curated"
    report = there.readable(folder / "curated" / "report.parquet")
    assert report.read_bytes() == b"report" and report.is_relative_to(tmp_path / "there" / "read-copies")
    assert not folder.exists()
    # a stage that runs on it fetches it whole first (a path among its arguments names it)
    there.fetch_inputs({"cfg": {"kept": 3}, "shards_dir": folder / "curated", "other": str(tmp_path / "x")})
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
            and p.name != RECORD} == files
    assert not [p for p in folder.parent.iterdir() if p.name != "folder-a"]  # no temporary folder left
    assert there.location(folder / "curated") == str(folder / "curated") and there.readable(folder) == folder
    assert there.lookup(folder, "key-1", Out).outputs == hit.outputs

    # a build published again (a forced rerun) leaves nothing of the last one on the store
    (here.root / "filter" / "folder-a" / "part.json").unlink()
    finished_stage(here, "key-2", {"curated/00000.tar": b"new"})
    assert s3.keys(prefix) == sorted(prefix + name for name in ["curated/00000.tar", "curated/report.parquet",
                                                               RECORD])

    # a publication cut short (files, no record) is no finished stage: nothing fetched, nothing taken
    s3.client().delete_object(Bucket=s3.bucket, Key=prefix + RECORD)
    elsewhere = StageCache(tmp_path / "elsewhere" / "stages", url)
    assert elsewhere.lookup(elsewhere.root / "filter" / "folder-a", "key-2", Out) is None
    assert not (elsewhere.root / "filter" / "folder-a").exists()


def test_a_stage_that_accumulates_adds_to_the_build_the_store_holds_under_an_older_key(tmp_path, s3):
    """A longer URL list on another machine: its download stage's key is new, its folder the same; the build the
    store holds there (a shorter list's) is fetched to add to, not started over. Local work is never replaced."""
    url = f"s3://{s3.bucket}/accumulate/stages"
    files = {"batch-00000/00000.tar": os.urandom(2000), "batch-00000/_SUCCESS": b"{}"}
    finished_stage(StageCache(tmp_path / "here" / "stages", url), "list-of-40", files)

    there = StageCache(tmp_path / "there" / "stages", url)
    folder = there.root / "filter" / "folder-a"
    assert there.lookup(folder, "list-of-50", Out) is None and not folder.exists()
    assert there.fetch_to_accumulate(folder)
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
            and p.name != RECORD} == files
    assert json.loads((folder / RECORD).read_text())["key"] == "list-of-40"  # finished, but not with this key
    assert there.lookup(folder, "list-of-50", Out) is None

    crashed = StageCache(tmp_path / "crashed" / "stages", url)
    partial = crashed.root / "filter" / "folder-a"
    partial.mkdir(parents=True)
    (partial / ".batch-00001.partial").mkdir()  # this machine's own unfinished work: resumed, not replaced
    assert not crashed.fetch_to_accumulate(partial) and [p.name for p in partial.iterdir()] == [".batch-00001.partial"]
    assert not StageCache(tmp_path / "local" / "stages").fetch_to_accumulate(tmp_path / "local" / "stages" / "x")

    # the folder is named alike on every machine: a source mirrored into each one's cache, wherever it keeps it
    from dalle_pipeline.components.config import FilterConfig
    from dalle_pipeline.components.filter.run import run as filter_run

    def folder_name(cache: StageCache) -> str:
        source = cache.root.parent / "sources" / "s3-0123" / "pictures"
        return cache.call_key("filter", filter_run, {"cfg": FilterConfig(), "shards_dir": str(source)}, content=False)

    assert folder_name(there) == folder_name(crashed) != folder_name(StageCache(tmp_path / "local" / "stages"))


def test_a_source_on_the_store_is_mirrored_into_the_cache_and_kept_in_step_with_it(tmp_path, s3):
    from dalle_pipeline.components.config import DataConfig
    from dalle_pipeline.components.sources.kinds import source_kind
    from dalle_pipeline.components.stage_cache import folder_listing_digest
    from dalle_pipeline.components.storage import mirror

    client = s3.client()
    files = {"photos/a.jpg": os.urandom(500), "photos/a.txt": b"a red square", "photos/more/b.png": os.urandom(300),
             "photos/more/b.txt": b"a blue circle"}
    for key, data in files.items():
        client.put_object(Bucket=s3.bucket, Key=f"src/{key}", Body=data)
    url = f"s3://{s3.bucket}/src/photos"
    copy = mirror(url, tmp_path / "sources", "data.source")
    assert copy.parent.parent == tmp_path / "sources" and copy.name == "photos"
    assert {p.relative_to(copy.parent).as_posix(): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == files
    assert source_kind(DataConfig(source=str(copy))) == "folder"

    # copies list alike on every machine (the store's modification times): the stage keyed by the listing is reused
    elsewhere = mirror(url, tmp_path / "elsewhere", "data.source")
    assert folder_listing_digest(elsewhere) == folder_listing_digest(copy)

    # the store changes: a file rewritten at another size, one at the same size, one removed, one added;
    # unchanged files are not fetched again (the same file, not a new one renamed in)
    kept = (copy / "a.jpg").stat().st_ino
    time.sleep(1.1)  # S3 keeps modification times to the second
    client.put_object(Bucket=s3.bucket, Key="src/photos/a.txt", Body=b"a large red square")
    client.put_object(Bucket=s3.bucket, Key="src/photos/more/b.txt", Body=b"a blue square")
    client.delete_object(Bucket=s3.bucket, Key="src/photos/more/b.png")
    client.put_object(Bucket=s3.bucket, Key="src/photos/c.jpg", Body=b"c")
    assert mirror(url, tmp_path / "sources", "data.source") == copy
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()) == [
        "a.jpg", "a.txt", "c.jpg", "more/b.txt"]
    assert (copy / "a.txt").read_bytes() == b"a large red square" and (copy / "a.jpg").stat().st_ino == kept
    assert (copy / "more/b.txt").read_bytes() == b"a blue square"  # as long as "a blue circle": still fetched

    single = mirror(f"s3://{s3.bucket}/src/photos/a.txt", tmp_path / "sources", "data.source")
    assert single.read_bytes() == b"a large red square"
    with pytest.raises(FileNotFoundError, match=rf"data.source s3://{s3.bucket}/src/nothing does not exist"):
        mirror(f"s3://{s3.bucket}/src/nothing", tmp_path / "sources", "data.source")


def test_the_flow_refuses_a_source_missing_from_the_store_before_any_work(tmp_path, s3, monkeypatch):
    from dalle_pipeline.flows.train_dalle import train_dalle

    monkeypatch.setenv("DALLE_HOME", str(tmp_path / "runs"))
    with pytest.raises(FileNotFoundError, match=rf"data.source s3://{s3.bucket}/nowhere does not exist"):
        train_dalle.fn(preset="micro", overrides={"data": {"source": f"s3://{s3.bucket}/nowhere"}})
    assert not (tmp_path / "runs").exists()


def test_lineage_reads_a_stage_only_the_store_holds_where_it_lies(tmp_path, s3):
    """The flow's own lineage of stages reused from the store: listed and read on the store (no shard fetched),
    the same digests and counts as read from a cache holding them, the store's URL as their source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dalle_pipeline.components import lineage
    from dalle_pipeline.components.filter.run import REPORT_NAME, REPORT_SCHEMA
    from dalle_pipeline.components.shards import HOLDOUT_DIR, Sample, write_shard

    url = f"s3://{s3.bucket}/lineage/stages"
    here = StageCache(tmp_path / "here" / "stages", url)
    curated, dataset = here.root / "filter" / "k1", here.root / "tokenize-corpus" / "k2"
    samples = [Sample(f"{i:05d}", os.urandom(100 + i), "png", f"caption {i}") for i in range(3)]
    write_shard(curated / "00000.tar", samples[:2])
    write_shard(curated / "00001.tar", samples[2:])
    write_shard(curated / HOLDOUT_DIR / "00000.tar", samples[:1])
    rows = [{"key": s.key, "url": f"https://example.com/{s.key}.png", "stage": "filter", "kept": True,
             "reason": "kept", "sha256": f"{i:064x}"} for i, s in enumerate(samples)]
    pq.write_table(pa.Table.from_pylist(rows, schema=REPORT_SCHEMA), curated / REPORT_NAME)
    dataset.mkdir(parents=True)
    (dataset / "part-00000.parquet").write_bytes(b"tokens")
    (dataset / "_manifest.json").write_text(json.dumps({"parts": [{"file": "part-00000.parquet", "rows": 3}]}))
    local = {"curated": lineage.curated_corpus(curated), "held_out": lineage.held_out_corpus(curated),
             "tokens": lineage.token_dataset(dataset)}
    for folder, stage in ((curated, "filter"), (dataset, "tokenize-corpus")):
        here.commit(StageRecord(stage, folder.name, folder, Out(str(folder)), {}, "run-1", 1.0))

    there = StageCache(tmp_path / "there" / "stages", url)
    curated, dataset = there.root / "filter" / "k1", there.root / "tokenize-corpus" / "k2"
    assert there.lookup(curated, "k1", Out) and there.lookup(dataset, "k2", Out)
    on_store = {"curated": lineage.curated_corpus(there.location(curated)),
                "held_out": lineage.held_out_corpus(there.location(curated)),
                "tokens": lineage.token_dataset(there.location(dataset))}
    for name, ref in on_store.items():
        assert (ref.name, ref.digest, ref.profile) == (local[name].name, local[name].digest, local[name].profile)
    assert on_store["curated"].profile["digest_of"] == f"training samples in {REPORT_NAME}"
    assert on_store["curated"].source_uri == f"{url}/filter/k1"
    assert on_store["held_out"].source_uri == f"{url}/filter/k1/{HOLDOUT_DIR}"
    assert not (tmp_path / "there" / "stages").exists() and not (tmp_path / "there" / "read-copies").exists()
    # the evaluation set's read: the held-out shards alone are copied, not the curated corpus
    held_out = there.readable(curated / HOLDOUT_DIR)
    assert [p.relative_to(held_out.parent).as_posix() for p in held_out.parent.rglob("*") if p.is_file()] == \
        [f"{HOLDOUT_DIR}/00000.tar"] and not curated.exists()


def test_a_build_published_again_puts_only_what_changed_while_the_store_holds_the_last(tmp_path, s3):
    """A stage folder grown and published again (a URL list grown by a day) puts its new and changed files, not
    the whole folder; a file gone from it goes from the store; after another machine's build the whole is put."""
    url = f"s3://{s3.bucket}/incremental/stages"
    prefix = "incremental/stages/filter/folder-a/"
    here = StageCache(tmp_path / "here" / "stages", url)
    finished_stage(here, "k1", {"batch-0/00000.tar": b"a" * 500, "batch-0/stats.json": b"{}", "old.json": b"1"})

    def modified() -> dict[str, object]:
        listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix)["Contents"]
        return {item["Key"][len(prefix):]: item["LastModified"] for item in listed}

    first = modified()
    time.sleep(1.1)  # S3 keeps modification times to the second
    folder = here.root / "filter" / "folder-a"
    (folder / "old.json").unlink()
    (folder / "batch-0" / "stats.json").write_bytes(b"[]")  # rewritten at the same size
    finished_stage(here, "k2", {"batch-1/00000.tar": b"b" * 500})
    second = modified()
    assert sorted(second) == [RECORD, "batch-0/00000.tar", "batch-0/stats.json", "batch-1/00000.tar"]
    assert second["batch-0/00000.tar"] == first["batch-0/00000.tar"]  # left as it was: not put again
    assert second["batch-0/stats.json"] > first["batch-0/stats.json"] and second[RECORD] > first[RECORD]
    assert s3.client().get_object(Bucket=s3.bucket, Key=prefix + "batch-0/stats.json")["Body"].read() == b"[]"

    # fetched elsewhere to add to, grown and published there: the fetched files stay as the store holds them
    there = StageCache(tmp_path / "there" / "stages", url)
    assert there.fetch_to_accumulate(there.root / "filter" / "folder-a")
    time.sleep(1.1)
    finished_stage(there, "k3", {"batch-2/00000.tar": b"c" * 500})
    third = modified()
    assert [name for name in third if third[name] > second.get(name, second[RECORD])] == [RECORD, "batch-2/00000.tar"]

    # back here: the store holds another machine's build, so this cache's memory of the last one is no guide
    time.sleep(1.1)
    finished_stage(here, "k4", {})
    fourth = modified()
    assert sorted(fourth) == [RECORD, "batch-0/00000.tar", "batch-0/stats.json", "batch-1/00000.tar"]
    assert all(fourth[name] > third[name] for name in fourth)

    # another build of the same key (another run built it elsewhere) is another build too: put over whole
    third_cache = StageCache(tmp_path / "third" / "stages", url)
    assert third_cache.fetch_to_accumulate(third_cache.root / "filter" / "folder-a")
    finished_stage(third_cache, "k4", {}, run="run-2")
    time.sleep(1.1)
    before = modified()
    finished_stage(here, "k5", {})
    assert all(modified()[name] > before[name] for name in before)


FILTER = FilterConfig(min_image_size=16, min_caption_chars=3, near_duplicate_distance=4)


def download_folder(local: Path) -> Path:
    """Three download shards in two batches, as the download stage leaves them: duplicates, captions too short,
    a failed download each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dalle_pipeline.components.shards import Sample, write_shard

    def picture(seed: int) -> bytes:  # 32 px of noise a seed: two seeds are far apart, one seed twice a duplicate
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    for number, shard in ((0, "00000"), (0, "00001"), (1, "00000")):
        batch = local / f"batch-{number:05d}"
        samples = [Sample(f"{shard}{i:04d}", picture(7 * number + i % 5), "png",
                          ["a red circle", "a blue square on the left", "", "x"][i % 4],
                          {"url": f"https://e.com/{number}/{shard}/{i}"}) for i in range(12)]
        write_shard(batch / f"{shard}.tar", samples)
        rows = [{"key": s.key, "url": s.meta["url"], "status": "success", "error_message": None} for s in samples]
        rows.append({"key": f"{shard}9999", "url": f"https://e.com/gone/{number}/{shard}",
                     "status": "failed_to_download", "error_message": "http_404"})
        pq.write_table(pa.Table.from_pylist(rows), batch / f"{shard}.parquet")
        (batch / "_SUCCESS").write_text("{}")
    return local


def test_the_filter_and_the_text_tokenizer_read_a_stage_on_the_store_where_it_lies(tmp_path, s3):
    """A download folder on the store, filtered from its URL (nothing fetched to disk: its shards and Parquet read
    range by range), gives the report and curated shards its local copy gives, and a build from a fetched copy is
    reused when filtered from the store (the same signatures); the text tokenizer trains alike on curated shards
    on the store. The stage cache hands such a stage the store's URL of an input the cache does not hold."""
    import pyarrow.parquet as pq

    from dalle_pipeline.components.config import TokenizerConfig
    from dalle_pipeline.components.filter import read_report, run as filter_run
    from dalle_pipeline.components.filter.run import REPORT_NAME, REPORT_SCHEMA
    from dalle_pipeline.components.shards import shard_paths
    from dalle_pipeline.components.storage import copy_from_store
    from dalle_pipeline.components.text.tokenizer import TextTokenizer, run as tokenizer_run

    local = download_folder(tmp_path / "download")
    fs, _ = fsspec.core.url_to_fs(f"s3://{s3.bucket}")
    fs.put(str(local), f"{s3.bucket}/in-place/download", recursive=True)
    url = f"s3://{s3.bucket}/in-place/download"
    cfg = FILTER

    from_copy = filter_run(cfg, local, tmp_path / "from-copy", holdout_fraction=0.2)
    in_place = filter_run(cfg, url, tmp_path / "in-place", holdout_fraction=0.2)
    assert read_report(in_place.report_path).equals(read_report(from_copy.report_path))
    assert (in_place.kept, in_place.held_out, in_place.dropped_by_reason) == \
        (from_copy.kept, from_copy.held_out, from_copy.dropped_by_reason)
    assert 0 < in_place.kept < 36 and in_place.dropped_by_reason.get("duplicate", 0) > 0
    a, b = tmp_path / "in-place", tmp_path / "from-copy"
    tars = [p.relative_to(a).as_posix() for p in sorted(a.rglob("*.tar"))]
    assert tars == [p.relative_to(b).as_posix() for p in sorted(b.rglob("*.tar"))] and len(tars) >= 3
    assert all((a / name).read_bytes() == (b / name).read_bytes() for name in tars)
    # a build from a copy fetched from the store is reused shard by shard when filtered from the store itself
    fetched = copy_from_store(fs, f"{s3.bucket}/in-place/download", tmp_path / "fetched")
    filter_run(cfg, fetched, tmp_path / "resumed", holdout_fraction=0.2)
    assert filter_run(cfg, url, tmp_path / "resumed", holdout_fraction=0.2).reused_shards == 3
    with pytest.raises(FileNotFoundError, match=r"no finished download batch .* s3://"):
        filter_run(cfg, f"s3://{s3.bucket}/in-place/nothing", tmp_path / "none")
    # written on the store too: the same objects, the report last; filtered again, every shard reused there
    written = f"s3://{s3.bucket}/in-place/filtered"
    on_store = filter_run(cfg, url, written, holdout_fraction=0.2)
    assert (str(on_store.curated_dir), str(on_store.report_path)) == (written, f"{written}/{REPORT_NAME}")
    stored = {key.removeprefix("in-place/filtered/"): key for key in s3.keys("in-place/filtered/")}
    assert {name for name in stored if name.endswith(".tar")} == set(tars)
    assert all(s3.client().get_object(Bucket=s3.bucket, Key=stored[name])["Body"].read() == (b / name).read_bytes()
               for name in tars)
    with on_store.report_path.open() as report:
        assert pq.read_table(report, schema=REPORT_SCHEMA).equals(read_report(from_copy.report_path))
    assert filter_run(cfg, url, written, holdout_fraction=0.2).reused_shards == 3
    # a source shard put again: it and those after it are filtered again, their parts read back as written now
    time.sleep(1.1)  # the store's modification times are to the second
    fs.put_file(str(local / "batch-00000" / "00000.tar"), f"{s3.bucket}/in-place/download/batch-00000/00000.tar")
    again = filter_run(cfg, url, written, holdout_fraction=0.2)
    assert again.reused_shards == 0 and again.data_digest == from_copy.data_digest
    assert not any(tmp_path.glob("**/_dedup_spill")) and not any(name.startswith("_dedup") for name in stored)

    fs.put(str(tmp_path / "from-copy"), f"{s3.bucket}/in-place/curated", recursive=True)
    tokenizer_cfg = TokenizerConfig(vocab_size=300, text_len=8)
    on_store = tokenizer_run(tokenizer_cfg, f"s3://{s3.bucket}/in-place/curated", f"s3://{s3.bucket}/in-place/bpe")
    here = tokenizer_run(tokenizer_cfg, tmp_path / "from-copy", tmp_path / "tokenizer-here")
    assert (on_store.tokenizer_hash, on_store.metrics) == (here.tokenizer_hash, here.metrics)
    assert str(on_store.tokenizer_path) == f"s3://{s3.bucket}/in-place/bpe/tokenizer.json"  # written there, whole
    assert TextTokenizer.load(on_store.tokenizer_path, 8).encode(["a red circle"]) == \
        TextTokenizer.load(here.tokenizer_path, 8).encode(["a red circle"])
    assert [p.name for p in shard_paths(f"s3://{s3.bucket}/in-place/curated")] == \
        [p.name for p in shard_paths(tmp_path / "from-copy")]

    # the stage cache: an input only the store holds is handed over as its URL; once the cache holds it, its path
    stages_url = f"s3://{s3.bucket}/in-place/stages"
    finished_stage(StageCache(tmp_path / "built" / "stages", stages_url), "key-1", {"curated/00000.tar": b"t"})
    there = StageCache(tmp_path / "there" / "stages", stages_url)
    folder = there.root / "filter" / "folder-a"
    assert there.lookup(folder, "key-1", Out) is not None
    arguments = {"cfg": cfg, "curated_dir": str(folder / "curated"), "other": tmp_path / "x", "steps": 3}
    assert there.in_place(arguments, ["curated_dir", "other"]) == \
        {**arguments, "curated_dir": f"{stages_url}/filter/folder-a/curated"}
    assert there.in_place(arguments, ["other"]) == arguments  # an argument not read in place: fetched
    assert not folder.exists()
    there.fetch_inputs(there.stage_value(arguments, content=False))
    assert there.in_place(arguments, ["curated_dir"]) == arguments
    # on a cluster of several nodes, whose other nodes do not see this cache: the store's, held here or not
    assert there.in_place(arguments, ["curated_dir", "other"], prefer_store=True) == \
        {**arguments, "curated_dir": f"{stages_url}/filter/folder-a/curated"}
    assert StageCache(there.root).in_place(arguments, ["curated_dir"], prefer_store=True) == arguments  # no store


def test_a_store_path_reads_an_object_another_process_put_again_after_this_one_listed_it(s3):
    """The filter's driver lists its report parts, its tasks (other processes) put some again, the driver reads
    them: the listing must not be trusted over the store (s3fs opened by the listed ETag: FileExpired)."""
    from dalle_pipeline.components.storage import StorePath, open_binary

    s3.client().put_object(Bucket=s3.bucket, Key="relisted/part.bin", Body=b"old")
    folder = StorePath(f"s3://{s3.bucket}/relisted")
    (part,) = folder.glob("*.bin")
    assert part.stat().st_size == 3 and [p.name for p in folder.glob("*")] == ["part.bin"]
    s3.client().put_object(Bucket=s3.bucket, Key="relisted/part.bin", Body=b"newer")  # as a task elsewhere would
    with open_binary(folder / "part.bin") as file:
        assert file.read() == b"newer"
    assert [p.stat().st_size for p in folder.glob("*.bin")] == [5]


def test_a_published_stage_takes_the_stores_times_so_a_filter_of_it_resumes_on_the_store(tmp_path, s3):
    """A download folder built in a cache and published: its files take the store's modification times, so the
    filter's parts signed from it here are reused by a filter reading it on the store (from any machine); with
    the cache's own times every shard was filtered anew."""
    from dalle_pipeline.components.filter import run as filter_run
    from dalle_pipeline.components.storage import modified_ns

    url = f"s3://{s3.bucket}/times/stages"
    cache = StageCache(tmp_path / "cache" / "stages", url)
    folder = download_folder(cache.root / "download" / "f")
    cache.commit(StageRecord("download", "k", folder, Out(str(folder)), {}, "run-1", 1.0))
    fs, _ = fsspec.core.url_to_fs(url)
    stored = {name.split("/download/f/", 1)[1]: modified_ns(info)
              for name, info in fs.find(f"{s3.bucket}/times/stages/download/f", detail=True).items()}
    assert {relative: stat.st_mtime_ns for relative, stat in walked_files(folder) if relative != RECORD} == \
        {relative: ns for relative, ns in stored.items() if relative != RECORD}
    filter_run(FILTER, folder, tmp_path / "filtered")
    assert filter_run(FILTER, f"{url}/download/f", tmp_path / "filtered").reused_shards == 3


def test_ingest_writes_its_batches_on_the_store_marker_last(tmp_path, s3):
    """A folder source ingested into a URL: each shard's tar, Parquet and stats put by its task, the batch's
    `_SUCCESS` last, in the batch's own folder (a store cannot rename a staging one); the same shards as a local
    ingest; a grown folder adds a batch of its new items; an unfinished batch of another request is cleared."""
    from dalle_pipeline.components.config import DataConfig, DownloadConfig
    from dalle_pipeline.components.download.run import finished_batches
    from dalle_pipeline.components.sources import run as ingest
    from dalle_pipeline.components.storage import StorePath

    source = tmp_path / "pictures"
    source.mkdir()

    def add(index: int) -> None:
        pixels = np.random.default_rng(index).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(source / f"{index:03d}.png")
        (source / f"{index:03d}.txt").write_text(f"picture number {index}")

    for index in range(10):
        add(index)
    data, cfg, url = DataConfig(source=str(source)), DownloadConfig(samples_per_shard=4), f"s3://{s3.bucket}/ingested"
    here = ingest(data, cfg, tmp_path / "here", 32)
    there = ingest(data, cfg, url, 32)
    assert (there.successes, there.new_urls, str(there.shards_dir)) == (here.successes, here.new_urls, url) == \
        (10, 10, url)
    stored = s3.keys("ingested/")
    assert [key.removeprefix("ingested/") for key in stored if key.endswith(".tar")] == \
        [f"batch-00000/{shard:05d}.tar" for shard in range(3)]
    for shard in range(3):
        name = f"batch-00000/{shard:05d}.tar"
        assert StorePath(f"{url}/{name}").read_bytes() == (tmp_path / "here" / name).read_bytes()
    assert not any(".partial" in key or key.endswith("_SETTINGS") for key in stored)

    # an unfinished batch of another request (a crash, other settings): cleared, then the new items' batch
    s3.client().put_object(Bucket=s3.bucket, Key="ingested/batch-00001/_SETTINGS", Body=b"{}")
    s3.client().put_object(Bucket=s3.bucket, Key="ingested/batch-00001/00007.tar", Body=b"stale")
    assert [batch.name for batch in finished_batches(url)] == ["batch-00000"]
    for index in (10, 11):
        add(index)
    grown = ingest(data, cfg, url, 32)
    assert (grown.new_urls, grown.successes, [batch.name for batch in finished_batches(url)]) == \
        (2, 12, ["batch-00000", "batch-00001"])
    assert [key for key in s3.keys("ingested/batch-00001/")] == \
        [f"ingested/batch-00001/{name}" for name in ("00000.parquet", "00000.tar", "00000_stats.json", "_SUCCESS")]


def test_webdataset_and_parquet_sources_on_the_store_are_ingested_where_they_lie(tmp_path, s3):
    """Webdataset shards and a Parquet file with images on S3, given as their URLs: recognised there (a folder of
    pictures is not: the flow reads it from a local copy), their captions listed and each image read by the task
    that fits it, on the store (a tar's members through one open file); the same shards, byte for byte, as from a
    local copy of the same files. The stage key of such a source follows its listing: a shard added changes it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dalle_pipeline.components.config import DataConfig, DownloadConfig
    from dalle_pipeline.components.shards import Sample, write_shard
    from dalle_pipeline.components.sources import run as ingest
    from dalle_pipeline.components.sources.kinds import source_kind, store_kind
    from dalle_pipeline.components.storage import StorePath

    def png(index: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    local = tmp_path / "local"
    for shard in range(2):
        write_shard(local / "shards" / f"part-{shard}.tar",
                    [Sample(f"{shard}{index:03d}", png(10 * shard + index), "png", f"picture {shard} {index}", {})
                     for index in range(6)])
    (local / "table").mkdir()
    pq.write_table(pa.table({"image": [png(100 + index) for index in range(7)],
                             "text": [f"row {index}" for index in range(7)]}), local / "table" / "images.parquet",
                   row_group_size=3)
    (local / "pictures").mkdir()
    (local / "pictures" / "a.png").write_bytes(png(0))
    (local / "pictures" / "a.txt").write_text("a picture")
    fs = fsspec.filesystem("s3")
    fs.put(str(local), f"{s3.bucket}/sources", recursive=True)
    url = f"s3://{s3.bucket}/sources"
    cfg = DownloadConfig(samples_per_shard=4)

    assert store_kind(DataConfig(source=f"{url}/shards")) == "webdataset"
    assert store_kind(DataConfig(source=f"{url}/shards/part-0.tar")) == "webdataset"
    assert store_kind(DataConfig(source=f"{url}/table")) == "parquet"
    assert store_kind(DataConfig(source=f"{url}/pictures")) is None
    with pytest.raises(ValueError, match="read this one from a local copy"):
        source_kind(DataConfig(source=f"{url}/pictures"))
    for kind, count in (("shards", 12), ("table", 7)):
        here = ingest(DataConfig(source=str(local / kind)), cfg, tmp_path / f"{kind}-here", 32)
        there = ingest(DataConfig(source=f"{url}/{kind}"), cfg, tmp_path / f"{kind}-there", 32)
        assert there.successes == here.successes == count
        for tar in sorted((tmp_path / f"{kind}-here" / "batch-00000").glob("*.tar")):
            assert (tmp_path / f"{kind}-there" / "batch-00000" / tar.name).read_bytes() == tar.read_bytes()
        ids = [pq.read_table(path, columns=["url"]).column("url").to_pylist()
               for path in sorted((tmp_path / f"{kind}-there" / "batch-00000").glob("*.parquet"))]
        assert sum(ids, [])[:2] == (["part-0.tar/0000", "part-0.tar/0001"] if kind == "shards"
                                    else ["images.parquet#0", "images.parquet#1"])

    # a shard ingested, put again with other pictures (the same names and sizes) and ingested anew in this process:
    # the new pictures, none from a block the last ingest read ahead (each task closes what it opened)
    ingest(DataConfig(source=f"{url}/shards/part-1.tar"), cfg, tmp_path / "once", 32)
    write_shard(local / "shards" / "part-1.tar", [Sample(f"1{index:03d}", png(60 + index), "png",
                                                         f"picture 1 {index}", {}) for index in range(6)])
    fs.put_file(str(local / "shards" / "part-1.tar"), f"{s3.bucket}/sources/shards/part-1.tar")
    ingest(DataConfig(source=f"{url}/shards/part-1.tar"), cfg, tmp_path / "anew", 32)
    ingest(DataConfig(source=str(local / "shards" / "part-1.tar")), cfg, tmp_path / "anew-here", 32)
    for tar in sorted((tmp_path / "anew-here" / "batch-00000").glob("*.tar")):
        assert (tmp_path / "anew" / "batch-00000" / tar.name).read_bytes() == tar.read_bytes()

    cache = StageCache(tmp_path / "stages")
    source = DataConfig(source=f"{url}/shards")
    before = cache.stage_value(source)
    assert before == cache.stage_value(source) and "#listing=" in before["source"]
    write_shard(StorePath(f"{url}/shards/part-2.tar"), [Sample("2000", png(50), "png", "one more", {})])
    assert cache.stage_value(source) != before


def test_a_url_list_downloads_into_the_store_marker_last(tmp_path, s3):
    """img2dataset's processes put each shard into the batch's own folder on S3, `_SUCCESS` last (no staging
    folder: a store cannot rename one); the same samples as a local download; a longer list adds a batch of its
    new rows alone; an unfinished batch of another request is cleared."""
    import pyarrow.parquet as pq

    from dalle_pipeline.components.config import CorpusConfig, DownloadConfig
    from dalle_pipeline.components.corpus.shapes import run as generate_corpus
    from dalle_pipeline.components.download import finished_batches, run as download
    from dalle_pipeline.components.shards import read_shard, shard_paths

    corpus = generate_corpus(CorpusConfig(num_images=30, max_shapes=2, seed=3), tmp_path / "corpus")
    rows = pq.read_table(corpus.url_list)
    pq.write_table(rows.slice(0, 20), tmp_path / "first.parquet")
    cfg, url = DownloadConfig(allow_file_urls=True, processes_count=1, thread_count=4, samples_per_shard=8), \
        f"s3://{s3.bucket}/downloaded"
    here = download(cfg, tmp_path / "first.parquet", tmp_path / "here", 32)
    there = download(cfg, tmp_path / "first.parquet", url, 32)
    assert (there.successes, there.new_urls, str(there.shards_dir)) == (here.successes, here.new_urls, url) == \
        (20, 20, url)
    stored = s3.keys("downloaded/")
    assert [key for key in stored if key.endswith(".tar")] == [f"downloaded/batch-00000/{shard:05d}.tar"
                                                               for shard in range(3)]
    assert not any(".partial" in key or "_tmp" in key or key.endswith("_REQUEST") for key in stored), stored

    def samples(shards) -> dict:
        return {sample.meta["url"]: (sample.caption, sample.image_bytes) for tar in shards for sample in read_shard(tar)}

    assert samples(shard_paths(f"{url}/batch-00000")) == samples(shard_paths(tmp_path / "here" / "batch-00000"))

    s3.client().put_object(Bucket=s3.bucket, Key="downloaded/batch-00001/_REQUEST", Body=b"another")
    s3.client().put_object(Bucket=s3.bucket, Key="downloaded/batch-00001/00003.tar", Body=b"stale")
    grown = download(cfg, corpus.url_list, url, 32)
    assert (grown.new_urls, grown.successes, [batch.name for batch in finished_batches(url)]) == \
        (10, 30, ["batch-00000", "batch-00001"])
    assert "downloaded/batch-00001/00003.tar" not in s3.keys("downloaded/")
