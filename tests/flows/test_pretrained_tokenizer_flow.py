"""The whole `train-dalle` flow with a pretrained tokenizer in place of a trained dVAE: a taming VQGAN's files
(made with the authors' code) go in, the dVAE stage records it without training, and the token Parquet, the
prior, sampling, the registered bundle and `dalle generate` take its grid and codebook unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from dalle_pipeline.components.environment import DEFAULTS
from dalle_pipeline.components.tracking import EXPERIMENT_NAME, PARENT_RUN_TAG

pytest.importorskip("taming.modules.diffusionmodules.model")
from pretrained_files import TamingVQModel, save_taming  # noqa: E402  (after the skip)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # a micro run and a generation


def test_a_pretrained_vqgan_runs_the_whole_flow_and_its_registered_model_generates(tmp_path):
    torch.manual_seed(11)
    vqgan = TamingVQModel(gumbel=False).eval().place_codes(torch.rand(8, 3, 32, 32) * 2 - 1)
    ckpt, _ = save_taming(vqgan, tmp_path / "logs" / "vqgan")
    env = {name: value for name, value in os.environ.items() if name not in DEFAULTS}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), DALLE_HOME=str(tmp_path / "runs"))
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    pretrained = json.dumps({"kind": "taming", "path": str(ckpt)})
    cli = [sys.executable, "-m", "dalle_pipeline.flows.cli"]
    trained = subprocess.run([*cli, "train", "--preset", "micro", "--set", f"dvae.pretrained={pretrained}",
                              "--set", "dvae.optim.steps=0"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "[dvae] step" not in trained.stdout + trained.stderr  # nothing trained

    client = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT_NAME).experiment_id])
    dvae = next(run for run in runs if run.data.tags.get("stage") == "dvae" and PARENT_RUN_TAG in run.data.tags)
    assert {"eval_psnr", "eval_codes_used", "recon_oracle_shape"} <= set(dvae.data.metrics)
    assert not client.get_metric_history(dvae.info.run_id, "recon_mse")  # no training curve
    stage_dir = dvae.data.tags["stage_dir"]
    saved = json.loads(open(f"{stage_dir}/checkpoint/config.json").read())
    assert saved["config"]["architecture"] == "vqgan" and saved["meta"]["pretrained"]["kind"] == "taming"
    prior = next(run for run in runs if run.data.tags.get("stage") == "prior")
    call = json.loads(open(client.download_artifacts(prior.info.run_id, "stage_call.json", str(tmp_path))).read())
    assert call["dvae_dir"] == f"{stage_dir}/checkpoint"

    out = tmp_path / "grid.png"
    generated = subprocess.run([*cli, "generate", "a small red circle in the center", "--model",
                                "models:/dalle@champion", "-n", "2", "--out", str(out)],
                               env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert Image.open(out).size[0] > 2 * 32
