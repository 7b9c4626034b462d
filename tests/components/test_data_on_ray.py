"""The data stages on Ray: the same corpus and report as in one process, on both nodes of a cluster,
after a data worker is killed, and after an ingest is killed; a node without the driver's disk refused, or
filtering on an object store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from local_processes import NO_AUTH, S3Endpoint, namespaces_allowed
from test_filter import _encode, _picture
from test_ray_cluster import local_cluster

from dalle_pipeline.components import checkpoint
from dalle_pipeline.components.config import DataConfig, DownloadConfig, FilterConfig, TokenizerConfig
from dalle_pipeline.components.download.run import distributor_of
from dalle_pipeline.components.dvae.model import KIND, DiscreteVAE, DVAEModelConfig
from dalle_pipeline.components.filter import read_report
from dalle_pipeline.components.filter import run as filter_run
from dalle_pipeline.components.filter.run import REPORT_SCHEMA
from dalle_pipeline.components.shards import iter_samples, shard_paths
from dalle_pipeline.components.sources import run as ingest
from dalle_pipeline.components.storage import StorePath
from dalle_pipeline.components.text.tokenizer import train_and_save as train_tokenizer

FILTER = FilterConfig(near_duplicate_distance=4, min_image_size=16)


def captioned_folder(root: Path, count: int, side: int = 48) -> Path:
    """`count` distinct pictures with captions, every tenth a copy of an earlier one (a duplicate to find)."""
    root.mkdir(parents=True)
    for index in range(count):
        picture = _picture(index - 5 if index % 10 == 9 else index, side)
        (root / f"{index:04d}.png").write_bytes(_encode(picture))
        (root / f"{index:04d}.txt").write_text(f"picture number {index}")
    return root


def curate(source: Path, out: Path, per_shard: int = 8, holdout: float = 0.2):
    downloaded = ingest(DataConfig(source=str(source)), DownloadConfig(samples_per_shard=per_shard), out / "dl", 32)
    return downloaded, filter_run(FILTER, out / "dl", out / "curated", holdout_fraction=holdout)


def corpus_of(curated: Path) -> list[tuple]:
    """Every curated sample (held-out included) as comparable values."""
    return [(sample.key, sample.caption, sample.image_bytes, json.dumps(sample.meta, sort_keys=True))
            for folder in (curated, curated / "holdout") for sample in iter_samples(folder)]


def test_on_ray_the_data_stages_curate_what_one_process_curates(tmp_path, local_ray):
    source = captioned_folder(tmp_path / "source", 40)
    downloaded, on_ray = curate(source, tmp_path / "ray")
    assert set(downloaded.shards_by_node) - {"local"} and set(on_ray.shards_by_node) - {"local"}  # Ray tasks did it
    assert on_ray.index_partitions_by_node == {}  # one node: the kept index in the driver
    # the kept index split into three actors: the same verdicts, by digest; with exact dedup off, the copies
    # found by their pHashes (distance 0) through the actors' band tables
    split = filter_run(FILTER, tmp_path / "ray" / "dl", tmp_path / "split", holdout_fraction=0.2, index_partitions=3)
    assert list(split.index_partitions_by_node.values()) == [3]
    assert read_report(split.report_path).equals(read_report(on_ray.report_path))
    by_hash = FILTER.model_copy(update={"drop_exact_duplicates": False})
    near = [filter_run(by_hash, tmp_path / "ray" / "dl", tmp_path / f"near-{count}", 0.2, index_partitions=count)
            for count in (0, 2)]
    assert near[0].dropped_by_reason == near[1].dropped_by_reason == {"near_duplicate": 4}
    assert read_report(near[0].report_path).equals(read_report(near[1].report_path))
    import ray

    ray.shutdown()  # the same calls without a Ray session: in this process
    _, here = curate(source, tmp_path / "here")
    assert here.shards_by_node == {"local": 5}
    assert distributor_of(DownloadConfig()) == "multiprocessing"  # no Ray session: img2dataset's processes
    assert read_report(on_ray.report_path).equals(read_report(here.report_path))
    assert corpus_of(on_ray.curated_dir) == corpus_of(here.curated_dir)
    assert on_ray.dropped_by_reason == here.dropped_by_reason == {"duplicate": 4}
    assert on_ray.data_digest == here.data_digest and on_ray.kept + on_ray.held_out == 36


DRIVER = """
import json, sys
import ray
sys.path[:0] = sys.argv[4:]
from test_data_on_ray import curate
from pathlib import Path
ray.init(address=sys.argv[1], include_dashboard=False, configure_logging=False)
downloaded, curated = curate(Path(sys.argv[2]), Path(sys.argv[3]), per_shard=4)
from dalle_pipeline.components.config import DownloadConfig
from dalle_pipeline.components.download.run import distributor_of, run as download
cfg = DownloadConfig(allow_file_urls=True, samples_per_shard=8, timeout=5)
fetched = download(cfg, Path(sys.argv[3]) / "urls.parquet", Path(sys.argv[3]) / "fetched", 32)
print("RESULT " + json.dumps({"ingest": downloaded.shards_by_node, "filter": curated.shards_by_node,
                              "index": curated.index_partitions_by_node,
                              "nodes": [node["NodeID"] for node in ray.nodes() if node["Alive"]],
                              "distributor": distributor_of(cfg), "downloaded": fetched.successes}))
"""


@pytest.mark.slow  # two-node Ray
def test_both_nodes_of_a_cluster_ingest_and_filter(tmp_path, monkeypatch):
    source = captioned_folder(tmp_path / "source", 64, side=96)
    (tmp_path / "out").mkdir()
    pictures = sorted(source.glob("*.png"))
    pq.write_table(pa.table({"url": [path.as_uri() for path in pictures],
                             "caption": [path.with_suffix(".txt").read_text() for path in pictures]}),
                   tmp_path / "out" / "urls.parquet")
    for address in local_cluster(monkeypatch, "data-nodes", 1, [1]):
        proc = subprocess.run([sys.executable, "-c", DRIVER, address, str(source), str(tmp_path / "out"),
                               str(Path(__file__).parent), str(Path(__file__).parent.parent)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, **NO_AUTH})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        result = json.loads(proc.stdout.split("RESULT ", 1)[1])
        # 16 shards, four tasks in flight on two nodes of one CPU: each node takes some
        assert sorted(result["ingest"]) == sorted(result["nodes"]) == sorted(result["filter"])
        assert sum(result["ingest"].values()) == sum(result["filter"].values()) == 16
        # two nodes: the kept index in two partitions, one on each
        assert sorted(result["index"]) == sorted(result["nodes"]) and set(result["index"].values()) == {1}
        # a URL list on a cluster of two nodes: img2dataset's shards are Ray tasks (download.distributor auto)
        assert result["distributor"] == "ray" and result["downloaded"] == 64
    _, here = curate(source, tmp_path / "here", per_shard=4)
    assert read_report(tmp_path / "out" / "curated" / "filter_report.parquet").equals(read_report(here.report_path))


UNSHARED = """
import json, sys
import ray
from pathlib import Path
from dalle_pipeline.components.config import DataConfig, DownloadConfig, FilterConfig
from dalle_pipeline.components.download.run import run as download
from dalle_pipeline.components.filter import run as filter_run
from dalle_pipeline.components.parallel import NotShared
from dalle_pipeline.components.sources import run as ingest

source, out = Path(sys.argv[2]), Path(sys.argv[3])
ray.init(address=sys.argv[1], include_dashboard=False, configure_logging=False)
refusals = {}
for stage, call in {
    "ingest": lambda: ingest(DataConfig(source=str(source)), DownloadConfig(samples_per_shard=4), out / "dl", 32),
    "filter": lambda: filter_run(FilterConfig(), out / "here", out / "curated"),
    "download": lambda: download(DownloadConfig(allow_file_urls=True, samples_per_shard=4), out / "urls.parquet",
                                 out / "fetched", 32),
}.items():
    try:
        call()
    except NotShared as refusal:
        refusals[stage] = str(refusal)
# both folders on the object store instead: every node reads and writes there, nothing to share
on_store = filter_run(FilterConfig(near_duplicate_distance=4, min_image_size=16), sys.argv[4] + "/here",
                     sys.argv[4] + "/curated", holdout_fraction=0.2)  # as `curate` filtered it here
from dalle_pipeline.components.tokenize_corpus.run import run as tokenize
tokens = tokenize(sys.argv[4] + "/curated", sys.argv[4] + "/dvae", sys.argv[4] + "/tokenizer.json", out / "tokens",
                  text_len=16)
print("RESULT " + json.dumps({"refusals": refusals, "here": ray.get_runtime_context().get_node_id(),
                              "nodes": [node["NodeID"] for node in ray.nodes() if node["Alive"]],
                              "on_store": on_store.shards_by_node, "tokens": tokens.rows,
                              "token_parts": [part["source_shard"] for part in tokens.manifest["parts"]]}))
"""


@pytest.mark.slow  # two-node Ray
def test_a_node_without_the_stage_folders_is_refused_and_filters_on_an_object_store(tmp_path, monkeypatch):
    if not namespaces_allowed():
        pytest.skip("this machine lets no user mount a folder in namespaces of its own (unshare)")
    source = captioned_folder(tmp_path / "source", 24)
    _, local = curate(source, tmp_path / "out" / "local", per_shard=4)  # a download folder for the filter, made here
    (tmp_path / "out" / "local" / "dl").rename(tmp_path / "out" / "here")
    s3 = S3Endpoint()  # and a copy of it on an object store, which every node reaches
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    fs, _ = fsspec.core.url_to_fs(f"s3://{s3.bucket}")
    fs.put(str(tmp_path / "out" / "here"), f"{s3.bucket}/unshared/here", recursive=True)
    model = DVAEModelConfig(image_size=32, codebook_size=64, n_hid=8, num_groups=3)  # and what tokenization reads
    checkpoint.save(tmp_path / "dvae", KIND, DiscreteVAE(model).state_dict(), model.to_dict())
    fs.put(str(tmp_path / "dvae"), f"{s3.bucket}/unshared/dvae", recursive=True)
    tokenizer, _ = train_tokenizer(TokenizerConfig(vocab_size=300), [f"picture number {i}" for i in range(24)],
                                   tmp_path / "tokenizer")
    fs.put_file(str(tokenizer), f"{s3.bucket}/unshared/tokenizer.json")
    pictures = sorted(source.glob("*.png"))
    pq.write_table(pa.table({"url": [path.as_uri() for path in pictures], "caption": ["a picture"] * len(pictures)}),
                   tmp_path / "out" / "urls.parquet")
    # the second node runs where tmp_path is an empty folder: a node without the driver's disk
    try:
        for address in local_cluster(monkeypatch, "unshared-nodes", 1, [1], hidden=tmp_path):
            proc = subprocess.run([sys.executable, "-c", UNSHARED, address, str(source), str(tmp_path / "out"),
                                   f"s3://{s3.bucket}/unshared"],
                                  capture_output=True, text=True, timeout=300, env={**os.environ, **NO_AUTH})
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            result = json.loads(proc.stdout.split("RESULT ", 1)[1])
        with StorePath(f"s3://{s3.bucket}/unshared/curated/filter_report.parquet").open() as report:
            on_store = pq.read_table(report, schema=REPORT_SCHEMA)
    finally:
        s3.stop()
    (other,) = set(result["nodes"]) - {result["here"]}
    refusals = result["refusals"]
    assert sorted(refusals) == ["download", "filter", "ingest"]
    for stage, what, read, written in [("ingest", "data.source", source, "dl"),
                                       ("filter", "the download folder", tmp_path / "out" / "here", "curated"),
                                       ("download", "the URL list", tmp_path / "out" / "urls.parquet", "fetched")]:
        assert f"{what} ({read}) on node {other[:8]}" in refusals[stage]
        assert f"the folder {tmp_path / 'out' / written}, which the stage writes, on node {other[:8]}" \
            in refusals[stage]
        assert result["here"][:8] not in refusals[stage] and "DALLE_CACHE" in refusals[stage]
        # refused before any work: no batch, no curated shard, no report, no probe left behind
        assert sorted(path.name for path in (tmp_path / "out" / written).iterdir()) == []
    # on the store, the node without the disk filtered shards too, and the report is the one made here; the
    # curated shards on the store, the dVAE and the text tokenizer tokenized from there on the cluster
    assert sorted(result["on_store"]) == sorted(result["nodes"]) and sum(result["on_store"].values()) == 6
    assert on_store.equals(read_report(local.report_path))
    assert result["tokens"] == local.kept and result["token_parts"] == [p.name for p in shard_paths(local.curated_dir)]


def kill_first(name: str, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first process of this process tree whose title names `name` (a Ray task running)."""
    me = psutil.Process()
    while not stop.is_set() and not killed:
        for process in me.children(recursive=True):
            try:
                if name in " ".join(process.cmdline()):
                    process.send_signal(signal.SIGKILL)
                    killed.append(process.pid)
                    return
            except psutil.Error:
                continue
        time.sleep(0.005)


@pytest.mark.slow  # a Ray worker killed mid-task
def test_a_data_worker_killed_mid_filter_changes_nothing(tmp_path, local_ray):
    source = captioned_folder(tmp_path / "source", 96, side=192)
    ingest(DataConfig(source=str(source)), DownloadConfig(samples_per_shard=8), tmp_path / "dl", 192)
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_first, args=("ray::examine_shard", killed, stop), daemon=True)
    killer.start()
    try:
        result = filter_run(FILTER, tmp_path / "dl", tmp_path / "curated", holdout_fraction=0.2)
    except Exception:  # Ray gave the task up: the stage is run again, as a flow's retry would
        result = filter_run(FILTER, tmp_path / "dl", tmp_path / "curated", holdout_fraction=0.2)
    stop.set()
    assert killed, "no filter task was seen running"
    import ray

    ray.shutdown()
    unbroken = filter_run(FILTER, tmp_path / "dl", tmp_path / "unbroken", holdout_fraction=0.2)
    assert read_report(result.report_path).equals(read_report(unbroken.report_path))
    assert corpus_of(result.curated_dir) == corpus_of(unbroken.curated_dir)


@pytest.mark.slow  # an index partition's actor killed mid-filter
def test_a_lost_index_partition_fails_the_filter_by_name_and_a_rerun_curates_the_same(tmp_path, local_ray,
                                                                                      monkeypatch):
    import importlib

    from dalle_pipeline.components.download.run import batch_shards, finished_batches
    from dalle_pipeline.components.filter.partitioned import PartitionLost

    run_module = importlib.import_module("dalle_pipeline.components.filter.run")
    monkeypatch.setattr(run_module, "LOOKUP_ROWS", 8)  # a lookup a shard: lookups go on after the first part

    source = captioned_folder(tmp_path / "source", 96, side=192)
    ingest(DataConfig(source=str(source)), DownloadConfig(samples_per_shard=8), tmp_path / "dl", 192)
    batch = finished_batches(tmp_path / "dl")[0]
    first_part = tmp_path / "curated" / "_parts" / f"{batch.name}-{batch_shards(batch)[0][0].stem}.parquet"
    killed: list[int] = []

    def kill_once_a_shard_is_written() -> None:
        while not first_part.exists():
            time.sleep(0.005)
        kill_first("ray::IndexPartition", killed, threading.Event())

    killer = threading.Thread(target=kill_once_a_shard_is_written, daemon=True)
    killer.start()
    with pytest.raises(PartitionLost, match="partition of the filter's duplicate index was lost.*run the stage again"):
        filter_run(FILTER, tmp_path / "dl", tmp_path / "curated", holdout_fraction=0.2, index_partitions=2)
    killer.join(10)
    assert killed, "no index partition was seen running"
    again = filter_run(FILTER, tmp_path / "dl", tmp_path / "curated", holdout_fraction=0.2, index_partitions=2)
    assert 0 < again.reused_shards < 12  # it resumed from the shards written before the loss
    import ray

    ray.shutdown()
    unbroken = filter_run(FILTER, tmp_path / "dl", tmp_path / "unbroken", holdout_fraction=0.2)
    assert read_report(again.report_path).equals(read_report(unbroken.report_path))
    assert corpus_of(again.curated_dir) == corpus_of(unbroken.curated_dir)


INGEST = """
import sys
from dalle_pipeline.components.config import DataConfig, DownloadConfig
from dalle_pipeline.components.sources import run
run(DataConfig(source=sys.argv[1]), DownloadConfig(samples_per_shard=4), sys.argv[2], 128)
"""


@pytest.mark.slow  # an ingest killed with SIGKILL, then run again
def test_an_ingest_killed_midway_resumes_to_the_same_batch(tmp_path):
    source = captioned_folder(tmp_path / "source", 120, side=256)
    out = tmp_path / "dl"
    proc = subprocess.Popen([sys.executable, "-c", INGEST, str(source), str(out)])
    staging = out / ".batch-00000.partial"
    deadline = time.monotonic() + 120
    while len(list(staging.glob("*_stats.json"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(staging.glob("*_stats.json")))
    assert 3 <= done_before < 30 and not (out / "batch-00000").exists()
    resumed = ingest(DataConfig(source=str(source)), DownloadConfig(samples_per_shard=4), out, 128)
    unbroken = ingest(DataConfig(source=str(source)), DownloadConfig(samples_per_shard=4), tmp_path / "whole", 128)
    assert resumed.successes == unbroken.successes == 120 and resumed.new_urls == 120
    batches = [shard_paths(folder / "batch-00000") for folder in (out, tmp_path / "whole")]
    assert [p.name for p in batches[0]] == [p.name for p in batches[1]]
    for mine, theirs in zip(*batches):
        assert [(s.key, s.caption, s.image_bytes) for s in iter_samples_of(mine)] == \
            [(s.key, s.caption, s.image_bytes) for s in iter_samples_of(theirs)]


def iter_samples_of(shard: Path):
    from dalle_pipeline.components.shards import read_shard

    return list(read_shard(shard))
