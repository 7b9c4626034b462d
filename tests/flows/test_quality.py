"""The tiny preset, end to end as `make demo` runs it, must still draw what its captions say.

Floors below the lowest the demo measured (see bench/RESULTS.md), so a regression that a
person would see in the sample grid (a dVAE that loses hues, a prior that ignores the caption)
fails here instead of being caught by hand. The slow tier, so CI runs it: cut to 800 dVAE updates
(today 1600 of half the batch, the same compute) and 500 prior updates, the tiny preset is no
longer the 22 minutes it was on the AVX2-only CPU kind.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from dalle_pipeline.components.tracking import EXPERIMENT_NAME, PARENT_RUN_TAG

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# reranked oracle accuracy on held-out prompts and on the zero-shot pairs; six demo runs (seeds 0-2
# on the AVX-512 BF16 CPU, the prior in bf16, and in fp32 with that CPU held to AVX2) measured colour
# 1.00, shape 0.91-1.00, size 0.99-1.00, position 1.00, zero-shot colour 0.84-0.97 and shape
# 0.70-0.84, and a seventh (this test, seed 0 in bf16 again: bf16 runs are not bit-repeatable)
# zero-shot shape 0.59. The floors catch a tokenizer that loses hues or a prior that ignores the
# caption (chance: colour 1/8, shape 1/3), not one run's luck
FLOORS = {"oracle_colour_reranked": 0.9, "oracle_shape_reranked": 0.85, "oracle_size_reranked": 0.9,
          "oracle_position_reranked": 0.95, "zero_shot_oracle_colour_reranked": 0.7,
          "zero_shot_oracle_shape_reranked": 0.5}
# what the tokenizer keeps of held-out scenes (the ceiling of the above): 0.99-1.00 on each
RECON_FLOORS = {"recon_oracle_colour": 0.95, "recon_oracle_shape": 0.95}


def test_the_tiny_preset_draws_what_its_captions_say(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "DALLE_HOME": str(tmp_path / "runs")}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "dalle_pipeline.flows.cli", "train", "--preset", "tiny"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT_NAME).experiment_id])
    (parent,) = [run for run in runs if PARENT_RUN_TAG not in run.data.tags]
    metrics = parent.data.metrics
    below = {name: round(metrics[name], 3) for name, floor in FLOORS.items() if metrics[name] < floor}
    assert not below, f"below the floors {FLOORS}: {below}"
    (dvae,) = [run for run in runs if run.data.tags.get(PARENT_RUN_TAG) == parent.info.run_id
               and run.data.tags.get("stage") == "dvae"]
    recon = dvae.data.metrics
    below = {name: round(recon[name], 3) for name, floor in RECON_FLOORS.items() if recon[name] < floor}
    assert not below, f"the tokenizer below the floors {RECON_FLOORS}: {below}"
