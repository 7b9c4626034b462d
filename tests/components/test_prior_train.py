"""Prior training for real on Ray Train: a local Ray, two CPU workers, gloo DDP, MLflow from rank 0."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dalle_pipeline.components.config import PriorConfig
from dalle_pipeline.components.storage import write_json
from dalle_pipeline.components.token_parquet import MANIFEST, schema
from dalle_pipeline.components.tracking import Tracker


def write_learnable_dataset(directory, rows=256, text_len=6, grid=3, seed=0, learnable=True):
    """Captions of 1-3 tokens; the image is a function of the first token, so the prior can learn it
    (with `learnable=False` random tokens: nothing to learn but each training row by heart)."""
    rng = np.random.default_rng(seed)
    first = rng.integers(0, 10, rows)
    texts = [[int(f)] + rng.integers(10, 40, rng.integers(0, 3)).tolist() for f in first]
    images = (first[:, None] * 3 + np.arange(grid * grid)[None, :]) % 32
    if not learnable:
        texts = [rng.integers(0, 40, 3).tolist() for _ in range(rows)]
        images = rng.integers(0, 32, (rows, grid * grid))
    meta = {"dvae_hash": "test", "tokenizer_hash": "test", "grid_size": str(grid), "image_vocab": "32",
            "text_vocab": "40"}
    table = pa.table({
        "key": [f"{i:06d}" for i in range(rows)],
        "caption": ["x"] * rows,
        "text_tokens": pa.array(texts, pa.list_(pa.uint16())),
        "image_tokens": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1), pa.uint16()), grid * grid),
    }, schema=schema(grid, meta))
    directory.mkdir(parents=True)
    pq.write_table(table, directory / "00000.parquet")
    write_json(directory / MANIFEST, {**meta, "rows": rows, "text_len": text_len,
                                      "parts": [{"file": "00000.parquet", "rows": rows}]})
    return directory


@pytest.mark.slow  # two Ray Train workers, DDP and FSDP; the micro flow trains on one
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ray_workers_train_the_prior_and_rank_zero_logs(tmp_path, local_ray, parallel):
    from dalle_pipeline.components.prior.model import load
    from dalle_pipeline.components.prior.train import run

    dataset = write_learnable_dataset(tmp_path / "tokens")
    tracker = Tracker.start(f"sqlite:///{tmp_path}/mlflow.db", "prior-test",
                            artifact_root=(tmp_path / "artifacts").as_uri())
    cfg = PriorConfig(layers=2, d_model=32, heads=2, num_workers=2, caption_dropout=0.0, checkpoint_every=40,
                      parallel=parallel)
    cfg.optim.steps, cfg.optim.batch_size, cfg.optim.lr, cfg.optim.log_every = 80, 32, 3e-3, 10
    result = run(cfg, dataset, tmp_path / "prior", seed=0, tracker=tracker)

    history = tracker.client.get_metric_history(tracker.run_id, "image_loss")
    steps = [m.step for m in history]
    assert steps == sorted(set(steps)), "only rank 0 logs, once per step"
    assert steps[-1] == 80
    assert history[-1].value < 0.5 * history[0].value
    assert tracker.client.get_metric_history(tracker.run_id, "tokens_per_s")
    model = load(result.checkpoint_dir)
    assert model.cfg.grid_size == 3 and model.cfg.text_len == 6
    assert result.metrics["step"] in (40, 80)


def _ray_train_worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow  # kill-and-resume on Ray
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_killed_worker_resumes_from_the_latest_checkpoint(tmp_path, local_ray, parallel):
    """SIGKILL one of two workers after the first checkpoint: Ray restarts the group, which resumes
    from that checkpoint (not from step 0) and finishes every update."""
    from dalle_pipeline.components.prior.train import run

    dataset = write_learnable_dataset(tmp_path / "tokens", rows=512)
    tracker = Tracker.start(f"sqlite:///{tmp_path}/mlflow.db", "prior-kill",
                            artifact_root=(tmp_path / "artifacts").as_uri())
    cfg = PriorConfig(layers=2, d_model=32, heads=2, num_workers=2, caption_dropout=0.0, checkpoint_every=20,
                      max_failures=1, parallel=parallel)
    cfg.optim.steps, cfg.optim.batch_size, cfg.optim.log_every = 400, 32, 10
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run(cfg, dataset, tmp_path / "prior", 0, tracker)))
    thread.start()
    # a checkpoint folder appears before Ray's controller has registered the report; once the
    # second one is there, the first is registered for sure
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list((tmp_path / "prior" / "ray").rglob("checkpoint_*"))) < 2:
        time.sleep(0.5)
    time.sleep(2)
    victims = _ray_train_worker_pids()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "result" in outcome

    resumed = tracker.client.get_metric_history(tracker.run_id, "resumed_from_step")
    assert resumed and resumed[0].value >= 20, "the restarted workers began again from step 0"
    assert max(m.step for m in tracker.client.get_metric_history(tracker.run_id, "image_loss")) == 400


def test_fine_tuning_refuses_a_prior_of_another_architecture(tmp_path):
    from dalle_pipeline.components import checkpoint
    from dalle_pipeline.components.prior.model import Prior
    from dalle_pipeline.components.prior.model import KIND
    from dalle_pipeline.components.prior.train import model_config, run

    dataset = write_learnable_dataset(tmp_path / "tokens", rows=64)
    manifest = json.loads((dataset / MANIFEST).read_text())
    other = model_config(PriorConfig(layers=1, d_model=32, heads=2), manifest)
    saved = checkpoint.save(tmp_path / "other", KIND, Prior(other).state_dict(), other.to_dict())
    cfg = PriorConfig(layers=2, d_model=32, heads=2, init_from=str(saved))
    with pytest.raises(ValueError, match=r"prior.init_from .*differs in \['layers'\]"):
        run(cfg, dataset, tmp_path / "prior", seed=0)


@pytest.mark.slow  # a Ray Train run
def test_the_exported_weights_are_the_best_checkpoints_and_their_metadata_says_so(tmp_path, local_ray):
    """A prior that overfits (random tokens, learnt by heart) keeps its lowest-validation-loss
    checkpoint; its step and validation loss, in the checkpoint's metadata and the stage's metrics,
    are that checkpoint's, and re-measuring the exported weights gives that validation loss."""
    import torch

    from dalle_pipeline.components import checkpoint
    from dalle_pipeline.components.prior.model import KIND, load
    from dalle_pipeline.components.prior.train import run, split_validation, validation_loss
    from dalle_pipeline.components.training import TokenParquet

    dataset = write_learnable_dataset(tmp_path / "tokens", rows=96, learnable=False)
    tracker = Tracker.start(f"sqlite:///{tmp_path}/mlflow.db", "prior-best",
                            artifact_root=(tmp_path / "artifacts").as_uri())
    cfg = PriorConfig(layers=2, d_model=64, heads=2, num_workers=1, caption_dropout=0.0, checkpoint_every=25,
                      val_fraction=0.25, keep_checkpoints=2, dropout=0.0)
    cfg.optim.steps, cfg.optim.batch_size, cfg.optim.lr, cfg.optim.log_every = 300, 32, 3e-3, 25
    cfg.optim.precision = "fp32"  # the re-measurement below is in fp32 too
    result = run(cfg, dataset, tmp_path / "prior", seed=0, tracker=tracker)

    history = {m.step: m.value for m in tracker.client.get_metric_history(tracker.run_id, "val_loss")}
    best_step = min(history, key=history.get)
    assert best_step < 300 and history[300] > history[best_step] + 0.1, f"the run did not overfit: {history}"
    _, _, meta = checkpoint.load(result.checkpoint_dir, KIND)
    assert meta["step"] == result.metrics["step"] == best_step
    assert meta["val_loss"] == pytest.approx(history[best_step]) == result.metrics["val_loss"]

    tokens = TokenParquet(dataset)
    _, val_rows = split_validation(tokens.num_rows, cfg, seed=0)
    with torch.no_grad():
        measured = validation_loss(*tokens.read_rows(val_rows), cfg)(load(result.checkpoint_dir).eval())
    assert measured["loss"] == pytest.approx(meta["val_loss"], rel=1e-3)
