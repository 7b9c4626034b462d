"""The micro flow with its root on an object store (`DALLE_HOME=s3://...`): S3 is moto's standalone server on
loopback, MLflow a tracking server whose artifacts go to the same bucket. The run writes nothing outside its
temporary cache but the filter's and the tokenization's, which are built on the store and read there; a fresh cache reuses every stage from the store,
and a filter forced to run there reads the download folder on the store where it lies; `generate` loads the
champion from there; a folder source on the store is ingested from its copy in the cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from local_processes import S3Endpoint, free_port
from mlflow.tracking import MlflowClient
from PIL import Image

from dalle_pipeline.components.config import resolve
from dalle_pipeline.components.corpus.shapes import run as generate_corpus
from dalle_pipeline.components.environment import DEFAULTS
from dalle_pipeline.components.tracking import PARENT_RUN_TAG

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # three micro runs (the second reuses every stage)

STAGES = {"corpus", "download", "filter", "text-tokenizer", "dvae", "tokenize-corpus", "prior", "clip", "sample",
          "evaluate", "register"}
CLI = [sys.executable, "-m", "dalle_pipeline.flows.cli"]
FAST = ["--set", "dvae.optim.steps=10", "--set", "prior.optim.steps=10", "--set", "clip.optim.steps=10",
        "--set", "data.holdout_fraction=0.1"]


def mlflow_server(tmp_path: Path, env: dict, bucket: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow-server/mlflow.db",
         "--default-artifact-root", f"s3://{bucket}/mlflow-default", "--no-serve-artifacts"],
        env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, cwd=tmp_path / "mlflow-server",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return server, url
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise AssertionError("the MLflow server did not start")
            time.sleep(0.5)


def shapes_png(index: int) -> bytes:
    """A small picture of its own (a square at a place of its own), as PNG bytes."""
    import io

    image = Image.new("RGB", (32, 32), (255, 255, 255))
    image.paste((200, 30, 30), (index * 4, index * 4, index * 4 + 10, index * 4 + 10))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def train(env: dict, cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    proc = subprocess.run([*CLI, "train", "--preset", "micro", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, re.search(r"MLflow run id : ([0-9a-f]{32})", proc.stdout).group(1)


def stage_dir(client: MlflowClient, run_id: str, stage: str) -> str:
    """The folder name of `stage`'s build that the flow run `run_id` used."""
    runs = client.search_runs([client.get_run(run_id).info.experiment_id],
                              f"tags.`{PARENT_RUN_TAG}` = '{run_id}' and tags.stage = '{stage}'")
    return Path(runs[0].data.tags["stage_dir"]).name


def stage_cache_tags(client: MlflowClient, run_id: str) -> dict[str, str]:
    runs = client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{run_id}'")
    return {run.data.tags["stage"]: run.data.tags["cache"] for run in runs}


def test_a_run_rooted_on_s3_writes_only_its_cache_reuses_stages_from_the_store_and_generates(tmp_path):
    s3 = S3Endpoint()
    (tmp_path / "mlflow-server").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    env = {name: value for name, value in os.environ.items() if name not in DEFAULTS}
    env.pop("PREFECT_API_URL", None)
    env.update(s3.env, PREFECT_HOME=str(tmp_path / "prefect"), DALLE_HOME=f"s3://{s3.bucket}/dalle",
               DALLE_CACHE=str(tmp_path / "cache"))
    server, tracking_uri = mlflow_server(tmp_path, env, s3.bucket)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    try:
        first, run_id = train(env, work)
        keys = s3.keys("dalle/")
        records = {key.split("/")[2] for key in keys if key.endswith("/_stage.json")}
        assert records == STAGES, keys[:50]
        assert any(key.startswith("dalle/mlartifacts/") and key.endswith("/MLmodel") for key in keys), keys[-50:]
        assert not any(key.startswith("mlflow-default/") for key in s3.keys())  # the run's artifacts: under the root
        assert list(work.iterdir()) == [] and not Path("s3:").exists()  # nothing written where the run started
        # the curated corpus and the token dataset are built on the store and read there by every stage after them:
        # no curated shard and no token part ever in the cache
        output = first.stdout + first.stderr
        for stage, argument in (("dvae", "curated_dir"), ("clip", "curated_dir"), ("tokenize-corpus", "curated_dir"),
                                ("prior", "dataset_dir")):
            assert f"{stage}: reads {argument} where it lies on the store, s3://{s3.bucket}/dalle/stages/" in output
        assert "tokenize-corpus: building in place on the store, s3://" in output
        assert "download: building in place on the store, s3://" in output
        # the trainers' Ray Train checkpoints on the store (every node reaches them), gone once the stage is published
        for stage in ("dvae", "prior"):
            assert f"{stage}: keeps its training checkpoints on the store, s3://{s3.bucket}/dalle/stages/{stage}/" \
                in output
        assert not [key for key in keys if "/ray/" in key] and not list((tmp_path / "cache").glob("stages/*/*/ray"))
        cached = [p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
        assert not [name for name in cached if name.startswith(("stages/download/", "stages/filter/",
                                                                "stages/tokenize-corpus/"))
                    and name.endswith((".tar", ".parquet"))], cached
        client = MlflowClient(tracking_uri)
        parent = client.get_run(run_id)
        assert parent.data.tags["stages_root"] == f"s3://{s3.bucket}/dalle/stages"
        assert parent.info.artifact_uri.startswith(f"s3://{s3.bucket}/dalle/mlartifacts/")
        logged = json.dumps([parent.data.params, parent.data.tags]) + first.stdout + first.stderr
        assert s3.env["AWS_SECRET_ACCESS_KEY"] not in logged  # credentials come from the environment, never logged

        # another machine (a fresh cache): every stage is finished on the store, reused, not run again, and
        # nothing of them fetched but their records and the sample grid: no shards, token parts or weights; the
        # filter, forced to run, reads the download folder on the store where it lies and writes on the store
        # (nothing of either in the cache but a copy of its report, logged to MLflow) the same curated corpus (its
        # lineage digest below)
        shutil.rmtree(tmp_path / "cache")
        again, again_id = train({**env, "DALLE_CACHE": str(tmp_path / "cache-2")}, work, "--rerun", "filter")
        assert stage_cache_tags(client, again_id) == {stage: "forced" if stage == "filter" else "hit"
                                                      for stage in STAGES}, again.stdout[-3000:]
        assert f"filter: reads shards_dir where it lies on the store, s3://{s3.bucket}/dalle/stages/download/" in \
            again.stdout + again.stderr
        fetched = sorted(p.relative_to(tmp_path / "cache-2").as_posix()
                         for p in (tmp_path / "cache-2").rglob("*") if p.is_file())
        assert {name.split("/")[0] for name in fetched} == {"stage-records", "read-copies"}, fetched
        assert [name for name in fetched if name.startswith("read-copies/")] == \
            [f"read-copies/filter/{stage_dir(client, again_id, 'filter')}/filter_report.parquet",
             f"read-copies/sample/{stage_dir(client, again_id, 'sample')}/samples.png"], fetched
        # (MLflow keeps one dataset per name and digest in an experiment: the second run's shows the first's source)
        datasets = {run: {item.dataset.name: (item.dataset.digest, item.dataset.source)
                          for item in client.get_run(run).inputs.dataset_inputs} for run in (run_id, again_id)}
        assert {name: digest for name, (digest, _) in datasets[again_id].items()} == \
            {name: digest for name, (digest, _) in datasets[run_id].items()}  # lineage read where the stages lie

        # the champion loads from the registry, its weights from the store (no cache at all now)
        shutil.rmtree(tmp_path / "cache-2")
        out = tmp_path / "grid.png"
        generated = subprocess.run([*CLI, "generate", "a small red circle in the center", "--model",
                                    "models:/dalle@champion", "-n", "2", "--out", str(out)],
                                   env=env, cwd=work, capture_output=True, text=True, timeout=300)
        assert generated.returncode == 0, generated.stderr[-3000:]
        assert Image.open(out).size[0] > 2 * 32 and list(work.iterdir()) == []

        # your data on the store too: a folder of captioned pictures, ingested from its copy in the cache
        corpus = generate_corpus(resolve("micro").corpus.model_copy(update={"num_images": 80}), tmp_path / "corpus")
        for row in pq.read_table(corpus.url_list).to_pylist():
            name = row["url"].rsplit("/", 1)[1]
            s3.client().put_object(Bucket=s3.bucket, Key=f"pictures/{name}",
                                   Body=(corpus.images_dir / name).read_bytes())
            s3.client().put_object(Bucket=s3.bucket, Key=f"pictures/{Path(name).with_suffix('.txt')}",
                                   Body=row["caption"].encode())
        own, _ = train(env, work, "--data", f"s3://{s3.bucket}/pictures", *FAST)
        assert f"data.source s3://{s3.bucket}/pictures: read from its copy in {tmp_path / 'cache'}" in own.stdout + own.stderr
        assert any(key.startswith("dalle/stages/ingest/") and key.endswith("/_stage.json") for key in s3.keys("dalle/"))
        assert list(work.iterdir()) == []

        # the folder grows, and is trained on from a fresh cache: ingest and filter add to their builds on the store,
        # in place
        for index in range(5):
            s3.client().put_object(Bucket=s3.bucket, Key=f"pictures/grown-{index}.png", Body=shapes_png(index))
            s3.client().put_object(Bucket=s3.bucket, Key=f"pictures/grown-{index}.txt", Body=b"a new picture")
        shutil.rmtree(tmp_path / "cache")  # another machine's, elsewhere: its mirror of the source is elsewhere too
        grown, _ = train({**env, "DALLE_CACHE": str(tmp_path / "cache-3")}, work, "--data",
                         f"s3://{s3.bucket}/pictures", *FAST)
        output = grown.stdout + grown.stderr
        # ingest and filter add to their builds on the store in place (nothing of either fetched)
        assert "ingest: building in place on the store, s3://" in output, output[-3000:]
        assert "filter: building in place on the store, s3://" in output
        assert "ingested 85 images (5 items new)" in output

        # webdataset shards on the store: ingested where they lie, nothing of them copied into the cache
        from dalle_pipeline.components.shards import Sample, write_shard

        rows = pq.read_table(corpus.url_list).to_pylist()
        for shard in range(2):
            tar = tmp_path / "shards" / f"{shard:05d}.tar"
            write_shard(tar, [Sample(f"{shard}{index:04d}", (corpus.images_dir / Path(row["url"]).name).read_bytes(),
                                     "png", row["caption"], {}) for index, row in enumerate(rows[shard::2])])
            s3.client().put_object(Bucket=s3.bucket, Key=f"shards/{tar.name}", Body=tar.read_bytes())
        shards, _ = train({**env, "DALLE_CACHE": str(tmp_path / "cache-4")}, work, "--data",
                          f"s3://{s3.bucket}/shards", *FAST)
        output = shards.stdout + shards.stderr
        assert f"data.source s3://{s3.bucket}/shards: webdataset, read where it lies on the store" in output
        assert "ingested 80 images (80 items new)" in output, output[-3000:]
        assert not (tmp_path / "cache-4" / "sources").exists() and list(work.iterdir()) == []
    finally:
        server.terminate()
        server.wait(timeout=30)
        s3.stop()
