"""The whole `train-dalle` flow on the micro preset, as `make demo` runs it (Prefect's ephemeral mode),
checked from the MLflow store it wrote: one parent run, a nested run per stage, metrics, artifacts."""

from __future__ import annotations

import base64
import io
import json
import re
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from local_processes import free_port, start_ray_head, stop_ray_cluster
from mlflow.tracking import MlflowClient
from PIL import Image

from dalle_pipeline.components.environment import DEFAULTS
from dalle_pipeline.components.tracking import EXPERIMENT_NAME, PARENT_RUN_TAG

pytestmark = pytest.mark.e2e

STAGES = {"corpus", "download", "filter", "text-tokenizer", "dvae", "tokenize-corpus", "prior", "clip", "sample",
          "evaluate", "register"}


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """One run of `dalle-pipeline train --preset micro` in a fresh DALLE_HOME, shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("micro")
    # as a user's shell has it: none of the defaults the CLI sets itself (no usage reports, a patient Prefect)
    env = {name: value for name, value in os.environ.items() if name not in DEFAULTS}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), DALLE_HOME=str(tmp_path / "runs"))
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    # another Ray on the machine (a `ray start` cluster, as a user may have running): the run must
    # start and use its own, by address, and Ray Train inside it must not look the other one up
    other_ray = f"beside-micro-{os.getpid()}"
    other_address = start_ray_head(other_ray)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dalle_pipeline.flows.cli", "train", "--preset", "micro"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )
    finally:
        stop_ray_cluster(other_ray, other_address)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path, env, proc


def test_micro_flow_end_to_end(micro_run):
    tmp_path, _, proc = micro_run
    assert "MLflow run id" in proc.stdout and "sample grid" in proc.stdout
    # what a user reads: each progress line once, and none of the tools' noise about themselves
    output = proc.stdout + proc.stderr
    for noise in ("telemetry", "PlacementGroupCleaner", "PreemptionWatcher", "Traceback", "No pretrained weights"):
        assert noise not in output, (noise, output[-5000:])
    progress = re.findall(r"\[(?:dvae|prior)\] step \d+/\d+ .*", output)
    assert len(progress) == 6 and len(set(progress)) == 6, progress  # 3 windows each, printed once

    client = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if PARENT_RUN_TAG not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.params["preset"] == "micro" and parent.data.params["prior.layers"] == "2"
    assert parent.info.run_id in proc.stdout

    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get(PARENT_RUN_TAG) == parent.info.run_id}
    assert set(children) == STAGES
    assert all(child.info.status == "FINISHED" for child in children.values())

    # metrics per step from the training stages, the headline metrics on the parent
    prior_history = client.get_metric_history(children["prior"].info.run_id, "image_loss")
    assert [m.step for m in prior_history] == [10, 20, 30]
    assert len(client.get_metric_history(children["dvae"].info.run_id, "recon_mse")) >= 3
    for name in ("fd_clip_reranked", "clip_score_reranked", "oracle_colour_reranked", "oracle_shape_reranked",
                 "oracle_position_reranked", "zero_shot_oracle_colour_reranked", "i2i_scenes"):
        assert name in parent.data.metrics, name
    # image-to-image is judged on the scenes whose shapes the top half starts (none of micro's six, maybe)
    completed = parent.data.metrics["i2i_scenes"] > 0
    assert ("i2i_prefix_psnr" in parent.data.metrics) == completed
    assert {"recon_oracle_colour", "recon_oracle_shape"} <= set(children["dvae"].data.metrics)
    assert children["download"].data.metrics["successes"] == 256

    # artifacts: config, sample grid, reconstruction grid, checkpoints
    assert {"config.json", "samples.png"} <= _artifact_paths(client, parent.info.run_id)
    assert not children["prior"].data.params  # the config is the parent's; a stage's call is its stage_call.json
    call = json.loads(Path(client.download_artifacts(children["prior"].info.run_id, "stage_call.json", str(tmp_path)))
                      .read_text())
    assert call["cfg"]["layers"] == 2 and call["dvae_dir"] == children["dvae"].data.tags["stage_dir"] + "/checkpoint"
    dvae_artifacts = _artifact_paths(client, children["dvae"].info.run_id)
    assert {"reconstructions.png", "checkpoint/model.safetensors", "checkpoint/config.json"} <= dvae_artifacts
    assert any(path.startswith("reconstructions/step_") for path in dvae_artifacts)  # grids during training
    assert client.get_metric_history(children["dvae"].info.run_id, "codebook_perplexity")
    assert client.get_metric_history(children["prior"].info.run_id, "val_image_loss")
    assert "checkpoint/model.safetensors" in _artifact_paths(client, children["prior"].info.run_id)
    assert "filter_report.parquet" in _artifact_paths(client, children["filter"].info.run_id)
    assert {child.data.tags["cache"] for child in children.values()} == {"miss"}
    assert Path(children["sample"].data.tags["stage_dir"], "samples.png").exists()
    assert Path(children["sample"].data.tags["stage_dir"], "completions.npz").exists()
    assert Path(children["sample"].data.tags["stage_dir"], "completions.png").exists() == completed

    # MLflow's own views: image series stepping through training (from step 0), datasets, system metrics
    images = _artifact_paths(client, children["prior"].info.run_id, "images")
    assert any(path.startswith("images/preview-0 ") and "+step+0+" in path for path in images), images
    assert any(path.startswith("images/preview-0 ") and "+step+30+" in path for path in images), images
    assert any(path.startswith("images/reconstructions+step+0+")
               for path in _artifact_paths(client, children["dvae"].info.run_id, "images"))
    inputs = {(d.dataset.name, next(t.value for t in d.tags if t.key == "mlflow.data.context"))
              for d in client.get_run(parent.info.run_id).inputs.dataset_inputs}
    assert {("curated-corpus", "training"), ("token-dataset", "training")} <= inputs, inputs
    assert any(name.startswith("system/") for name in children["prior"].data.metrics), children["prior"].data.metrics
    assert client.get_metric_history(children["prior"].info.run_id, "progress")[-1].value == 1.0


def test_bad_override_fails_before_any_work(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "DALLE_HOME": str(tmp_path / "runs")}
    proc = subprocess.run(
        [sys.executable, "-m", "dalle_pipeline.flows.cli", "train", "--preset", "micro", "--set", "prior.heads=3"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "prior" in proc.stderr and "divisible by heads" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_retraining_the_dvae_needs_a_model_to_retrain(tmp_path):
    from dalle_pipeline.flows.train_dalle import train_dalle

    with pytest.raises(ValueError, match="retrain_dvae .* set retrain_from"):
        train_dalle.fn(preset="micro", root=str(tmp_path / "runs"), retrain_dvae=True)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # a served model over HTTP
def test_registered_champion_generates_from_the_cli_and_serves_over_http(micro_run):
    tmp_path, env, _ = micro_run
    store = f"sqlite:///{tmp_path}/runs/mlflow.db"
    client = MlflowClient(store, registry_uri=store)
    champion = client.get_model_version_by_alias("dalle", "champion")
    assert str(champion.version) == "1" and "no champion yet" in champion.tags["champion_decision"]

    out = tmp_path / "grid.png"
    generated = subprocess.run(
        [sys.executable, "-m", "dalle_pipeline.flows.cli", "generate", "a small red circle in the center",
         "--model", "models:/dalle@champion", "-n", "3", "--out", str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert Image.open(out).size[0] > 3 * 32

    # image-to-image from the CLI: the given image's top rows kept, the rest drawn under the caption
    from dalle_pipeline.components.corpus.shapes import ShapeSpec, render

    given = tmp_path / "given.png"
    render([ShapeSpec("red", "square", "large", "center")], 32).save(given)
    cli = [sys.executable, "-m", "dalle_pipeline.flows.cli", "generate", "a large red square in the center",
           "--model", "models:/dalle@champion", "-n", "2", "--out", str(tmp_path / "completed.png")]
    completed = subprocess.run([*cli, "--image", str(given), "--prefix-rows", "3"], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "2 images" in completed.stdout and Image.open(tmp_path / "completed.png").size[0] > 2 * 32
    for args, message in (([ "--prefix-rows", "3"], "--prefix-rows needs --image"),
                          (["--image", str(tmp_path / "missing.png")], "--image .*missing.png"),
                          (["--image", str(given), "--prefix-rows", "99"], "prefix_rows must be between 1 and")):
        refused = subprocess.run([*cli, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and re.search(message, refused.stderr), refused.stderr[-2000:]

    port = free_port()
    serve_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/runs/mlflow.db",
                 "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/dalle@champion", "--env-manager",
         "local", "--host", "127.0.0.1", "-p", str(port)],
        env=serve_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/ping", server)
        body = json.dumps({"dataframe_records": [{"prompt": "a large blue square at the top", "num_images": 2}]})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            predictions = json.load(response)["predictions"]
        assert [p["rank"] for p in predictions] == [0, 1]
        image = Image.open(io.BytesIO(base64.b64decode(predictions[0]["image_png"])))
        assert image.size == (32, 32)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _train_again(tmp_path: Path, env: dict, *args: str) -> dict[str, str]:
    """Run `train --preset micro` again in the same DALLE_HOME; the cache tag of each stage of that run."""
    proc = subprocess.run([sys.executable, "-m", "dalle_pipeline.flows.cli", "train", "--preset", "micro", *args],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = re.search(r"MLflow run id : ([0-9a-f]{32})", proc.stdout).group(1)
    client = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    runs = client.search_runs([client.get_run(run_id).info.experiment_id],
                              f"tags.`{PARENT_RUN_TAG}` = '{run_id}'")
    return {run.data.tags["stage"]: run.data.tags["cache"] for run in runs}


@pytest.mark.slow  # two more micro runs; the keys are unit-tested in test_stage_cache
def test_a_rerun_reuses_unchanged_stages_and_reruns_what_a_change_reaches(micro_run):
    tmp_path, env, _ = micro_run
    assert _train_again(tmp_path, env) == {stage: "hit" for stage in STAGES}

    after_prior_change = _train_again(tmp_path, env, "--set", "prior.optim.lr=0.003", "--rerun", "clip")
    downstream = {"prior", "sample", "evaluate", "register"}
    assert after_prior_change == {stage: "miss" if stage in downstream else "forced" if stage == "clip" else "hit"
                                  for stage in STAGES}


def _wait_for(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited: {server.stdout.read().decode()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout}s")


@pytest.mark.slow  # a third micro run
def test_retraining_the_champion_on_a_new_url_list_registers_a_judged_version(micro_run):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dalle_pipeline.components.config import resolve
    from dalle_pipeline.components.corpus.shapes import run as generate_corpus

    tmp_path, env, _ = micro_run
    # the next crawl: the corpus the champion saw plus 64 images it never saw
    (first_list,) = (tmp_path / "runs" / "stages" / "corpus").glob("*/urls.parquet")
    more = generate_corpus(resolve("micro").corpus.model_copy(update={"num_images": 64, "seed": 7}), tmp_path / "more")
    longer = tmp_path / "crawl.parquet"
    pq.write_table(pa.concat_tables([pq.read_table(first_list), pq.read_table(more.url_list)]), longer)
    store = f"sqlite:///{tmp_path}/runs/mlflow.db"
    client = MlflowClient(store, registry_uri=store)
    versions_before = {v.version for v in client.search_model_versions("name='dalle'")}

    caches = _train_again(tmp_path, env, "--retrain-from", "models:/dalle@champion", "--retrain-dvae",
                          "--data", str(longer), "--set", "download.allow_file_urls=true",  # file:// URLs: opted in
                          "--set", "prior.optim.steps=10",
                          "--set", "dvae.optim.steps=10")

    # the tokenizer and CLIP are the champion's; its dVAE is fine-tuned, everything after the data runs
    assert caches == {stage: "miss" for stage in ("base-model", "download", "filter", "dvae",
                                                  "tokenize-corpus", "prior", "sample", "evaluate", "register")}
    (new_version,) = [v for v in client.search_model_versions("name='dalle'") if v.version not in versions_before]
    decision = new_version.tags["champion_decision"]
    assert f"challenger v{new_version.version}" in decision and "champion v" in decision
    retrain_run = client.get_run(new_version.run_id)
    assert retrain_run.data.tags["retrain_from"] == "models:/dalle@champion"
    assert retrain_run.data.params["prior.init_from"].endswith("prior")
    assert retrain_run.data.params["dvae.init_from"].endswith("dvae")
    assert retrain_run.data.params["dvae.optim.steps"] == "10"
    assert retrain_run.data.params["data.source"] == str(longer)


NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow  # Jupyter kernels
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebooks_execute_against_the_runs(micro_run, notebook, monkeypatch):
    """Each notebook runs top to bottom on this module's runs, so none of them rots."""
    import nbformat
    from nbclient import NotebookClient

    tmp_path, env, _ = micro_run
    monkeypatch.setenv("DALLE_HOME", env["DALLE_HOME"])
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # the kernel's python
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' scratch folders, gone with the test's
    document = nbformat.read(notebook, as_version=4)
    NotebookClient(document, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in document.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs)  # every notebook shows pictures
