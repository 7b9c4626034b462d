"""The `train-dalle` flow on a user's own folder of captioned images: ingest in place of download,
the folder's bad items reported, a grown folder ingesting only its new files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from dalle_pipeline.components.config import resolve
from dalle_pipeline.components.corpus.shapes import run as generate_corpus
from dalle_pipeline.components.filter import read_report
from dalle_pipeline.components.tracking import EXPERIMENT_NAME, PARENT_RUN_TAG

pytestmark = pytest.mark.e2e
FAST = ["--set", "dvae.optim.steps=10", "--set", "prior.optim.steps=10", "--set", "clip.optim.steps=10",
        "--set", "data.holdout_fraction=0.1"]


def _train(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "DALLE_HOME": str(tmp_path / "runs")}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "dalle_pipeline.flows.cli", "train", "--preset", "micro", *args],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_a_source_that_is_none_of_the_kinds_fails_before_any_work(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "readme.md").write_text("no pictures here")
    proc = _train(tmp_path, "--data", str(tmp_path / "data"))
    assert proc.returncode == 2
    assert "a folder with no images, .tar shards, .parquet files or URL lists (1 files: readme.md)" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # two micro runs
def test_the_flow_trains_on_a_folder_and_a_grown_folder_ingests_only_its_new_files(tmp_path):
    corpus = generate_corpus(resolve("micro").corpus.model_copy(update={"num_images": 160}), tmp_path / "corpus")
    folder = tmp_path / "pictures"
    folder.mkdir()
    for index, path in enumerate(sorted(corpus.images_dir.glob("*.png"))):
        if index < 150:
            shutil.copy(path, folder / path.name)
    import pyarrow.parquet as pq

    for row in pq.read_table(corpus.url_list).to_pylist():
        name = row["url"].rsplit("/", 1)[1]
        if (folder / name).exists():
            (folder / name).with_suffix(".txt").write_text(row["caption"])
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "broken.txt").write_text("a broken picture")

    first = _train(tmp_path, "--data", str(folder), *FAST)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT_NAME).experiment_id])
    (parent,) = [run for run in runs if PARENT_RUN_TAG not in run.data.tags]
    children = {run.data.tags["stage"]: run for run in runs if run.data.tags.get(PARENT_RUN_TAG) == parent.info.run_id}
    assert "corpus" not in children and "download" not in children  # the folder is the data: no shapes corpus
    assert children["ingest"].data.metrics["successes"] == 150
    assert children["ingest"].data.metrics["failed_corrupt_image"] == 1
    report = read_report(next((tmp_path / "runs" / "stages" / "filter").glob("*/filter_report.parquet")))
    reasons = dict(zip(report.column("url").to_pylist(), report.column("reason").to_pylist()))
    assert reasons["broken.png"] == "corrupt_image" and len(reasons) == 151
    assert parent.data.params["data.source"] == str(folder)
    assert parent.data.params["filter.drop_exact_duplicates"] == "None"  # by source: on for a user's folder

    # judged on its own held-out samples: their captions are the prompts, retrieval beside its chance level
    held_out = {url for url, reason in reasons.items() if reason == "held_out"}
    assert held_out and children["filter"].data.metrics["held_out"] == len(held_out)
    captions = {path.name: path.with_suffix(".txt").read_text() for path in folder.glob("*.png")}
    prompts = json.loads(next((tmp_path / "runs" / "stages" / "sample").glob("*/prompts.json")).read_text())
    assert set(prompts) <= {captions[url] for url in held_out}
    metrics = parent.data.metrics
    assert {"retrieval_top1_reranked", "retrieval_top5_reranked", "retrieval_chance_top5", "fd_clip_reranked"} <= \
        set(metrics)
    assert not any(name.startswith("oracle_") for name in metrics)  # the shapes oracle is for the shapes corpus
    assert "holdout_psnr" in children["dvae"].data.metrics and "holdout_codes_used" in children["dvae"].data.metrics
    (version,) = client.search_model_versions("name='dalle'")
    assert version.tags["data_source"] == str(folder)
    assert version.tags["data_digest"] == children["filter"].data.tags["data_digest"]

    for path in sorted(corpus.images_dir.glob("*.png"))[150:]:  # ten new pictures arrive
        shutil.copy(path, folder / path.name)
        (folder / path.name).with_suffix(".txt").write_text("a new picture")
    again = _train(tmp_path, "--data", str(folder), *FAST)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT_NAME).experiment_id])
    (second,) = [run for run in runs if PARENT_RUN_TAG not in run.data.tags and run.info.run_id != parent.info.run_id]
    children = {run.data.tags["stage"]: run for run in runs if run.data.tags.get(PARENT_RUN_TAG) == second.info.run_id}
    assert children["ingest"].data.tags["cache"] == "miss" and children["ingest"].data.metrics["new_urls"] == 10
    assert children["ingest"].data.metrics["successes"] == 160  # the folder's total: 150 read before, 10 now
    assert len(list((tmp_path / "runs" / "stages" / "ingest").iterdir())) == 1  # the same folder, grown

    # a retrain of the champion is judged on the champion's held-out items, whatever the grown corpus holds out
    champion = client.get_model_version_by_alias("dalle", "champion")
    retrained = _train(tmp_path, "--data", str(folder), "--retrain-from", "models:/dalle@champion", *FAST)
    assert retrained.returncode == 0, retrained.stdout[-3000:] + retrained.stderr[-3000:]
    newest = max(client.search_model_versions("name='dalle'"), key=lambda v: int(v.version))
    assert newest.tags["evaluation_set"] == champion.tags["evaluation_set"]
    assert f"champion v{champion.version}" in newest.tags["champion_decision"]
    assert "another set" not in newest.tags["champion_decision"]
