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


def _metric(tracker: Tracker, name: str) -> dict[int, float]:
    return {m.step: m.value for m in tracker.client.get_metric_history(tracker.run_id, name)}


@pytest.mark.slow  # three Ray Train runs of a 100M-parameter prior (about 2.5 minutes here)
def test_a_100m_prior_sharded_on_two_workers_killed_resumes_on_one_as_an_unbroken_run_continues(tmp_path,
                                                                                                local_ray):
    """FSDP on two CPU workers: each writes its half of the weights and Adam moments into the checkpoint
    (DCP, one file a rank) and holds less at its peak than one worker holding the whole prior with Adam;
    both are SIGKILLed after the step-4 checkpoint, and the run resumes there on ONE worker (DCP reshards)
    and continues as an unbroken run does. The driver streams the exported weights into model.safetensors."""
    import torch

    from dalle_pipeline.components.prior.model import load
    from dalle_pipeline.components.prior.train import run

    dataset = write_learnable_dataset(tmp_path / "tokens", rows=256)

    def config(workers: int) -> PriorConfig:
        cfg = PriorConfig(layers=8, d_model=1024, heads=8, num_workers=workers, parallel="fsdp", caption_dropout=0.0,
                          val_fraction=0.0, checkpoint_every=4, max_failures=0, preview_prompts=0)
        cfg.optim.steps, cfg.optim.batch_size, cfg.optim.log_every = 8, 8, 1
        cfg.optim.lr, cfg.optim.warmup_steps = 1e-4, 4
        return cfg

    def started(name: str) -> Tracker:
        return Tracker.start(f"sqlite:///{tmp_path}/mlflow.db", name, artifact_root=(tmp_path / "artifacts").as_uri())

    unbroken = started("unbroken")  # one worker: also what a whole replica with Adam holds
    run(config(1), dataset, tmp_path / "unbroken", seed=0, tracker=unbroken)

    killed = started("killed")
    out_dir = tmp_path / "prior"
    failure: dict = {}

    def killed_run() -> None:
        try:
            run(config(2), dataset, out_dir, 0, killed)
        except Exception as error:  # the workers' deaths fail the run (max_failures=0)
            failure["error"] = error

    thread = threading.Thread(target=killed_run)
    thread.start()
    snapshot = out_dir / "ray" / "prior" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "checkpoint_step_0000004" not in (
            snapshot.read_text() if snapshot.exists() else ""):
        time.sleep(0.2)  # the checkpoint is registered: Ray will hand it to the resumed run
    victims = _ray_train_worker_pids()
    assert len(victims) == 2, victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" in failure

    shards = sorted((out_dir / "ray" / "prior" / "checkpoint_step_0000004" / "sharded").glob("*.distcp"))
    numel = sum(param.numel() for param in load(tmp_path / "unbroken" / "checkpoint").parameters())
    assert 95e6 < numel < 110e6
    sizes = [shard.stat().st_size for shard in shards]
    assert len(sizes) == 2 and all(0.48 < size / (12 * numel) < 0.52 for size in sizes), sizes  # 4+4+4 B a half

    resumed = started("resumed")
    result = run(config(1), dataset, out_dir, seed=0, tracker=resumed)
    assert _metric(resumed, "resumed_from_step") == {4: 4.0}
    losses = {name: _metric(handle, "loss") for name, handle in
              (("unbroken", unbroken), ("killed", killed), ("resumed", resumed))}
    assert sorted(losses["resumed"]) == [5, 6, 7, 8]
    after = {name: sum(losses[name][step] for step in (5, 6, 7, 8)) / 4 for name in ("unbroken", "resumed")}
    assert after["resumed"] == pytest.approx(after["unbroken"], rel=0.2), losses
    assert losses["resumed"][5] < 0.9 * losses["unbroken"][1], "the resumed run began again from step 0"

    peaks = {name: max(_metric(handle, "peak_rss_gb").values()) for name, handle in
             (("unbroken", unbroken), ("killed", killed), ("resumed", resumed))}
    full_replica = 16 * numel / 2**30  # fp32 weights, gradients and two Adam moments
    assert peaks["killed"] < peaks["unbroken"] - full_replica / 4, peaks  # 8 B a parameter sharded away
    print(f"parameters {numel}, checkpoint shards {sizes} B, peak RSS per worker {peaks} GiB, 16 B a "
          f"parameter {full_replica:.2f} GiB, losses {losses}")

    exported = load(result.checkpoint_dir)
    assert sum(param.numel() for param in exported.parameters()) == numel
    assert torch.isfinite(next(exported.parameters())).all()


SMALL = dict(text_vocab=40, image_vocab=32, text_len=6, grid_size=3, layers=3, d_model=48, heads=2)


def _prior_built_sharded(rank: int, seed: int, init_from: str | None, activation_checkpointing: bool):
    """On each of two ranks: (this rank's shard sizes, every parameter whole) of the prior `train.build` makes
    under FSDP from the meta device, and its gradients of one loss."""
    import torch

    from dalle_pipeline.components.prior.model import PriorModelConfig, prior_loss
    from dalle_pipeline.components.prior.train import build, initial_values

    model_cfg = PriorModelConfig(**SMALL)
    cfg = PriorConfig(parallel="fsdp", activation_checkpointing=activation_checkpointing)
    cfg.optim.precision = "fp32"
    model = build(model_cfg, cfg, torch.device("cpu"), initial_values(model_cfg, seed, init_from))
    text = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(5))
    image = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(6))
    prior_loss(*model(text, image), text, image, 1 / 8)[0].backward()
    return ({name: param.to_local().numel() for name, param in model.named_parameters()},
            {name: param.full_tensor() for name, param in model.named_parameters()},
            {name: param.grad.full_tensor() for name, param in model.named_parameters()})


def test_a_prior_sharded_from_the_meta_device_starts_from_the_weights_of_a_whole_one(tmp_path):
    """Two FSDP ranks build the prior on the meta device and materialise only their shards (about half
    of each parameter), drawn one parameter at a time: the weights a whole prior gets from the same seed
    (`reset_parameters`), bit for bit; another seed, other weights. Recomputing each block in the
    backward pass (activation checkpointing) under FSDP gives the same gradients."""
    import torch
    from process_group import on_ranks

    from dalle_pipeline.components.prior.model import Prior, PriorModelConfig
    from dalle_pipeline.components.prior.train import initial_values

    whole = Prior(PriorModelConfig(**SMALL))
    whole.reset_parameters(torch.Generator().manual_seed(7))
    ranks = on_ranks(_prior_built_sharded, 2, tmp_path / "seed7", 7, None, False)
    for name, value in whole.named_parameters():
        assert torch.equal(ranks[0][1][name], value.detach()), name
        assert ranks[0][0][name] + ranks[1][0][name] == value.numel()
        assert ranks[0][0][name] >= value.numel() // 2, name  # dim 0 split in two, the first chunk the larger
    drawn = {seed: initial_values(PriorModelConfig(**SMALL), seed)("text_embedding.weight", (47, 48))
             for seed in (7, 8)}
    assert torch.equal(drawn[7], ranks[0][1]["text_embedding.weight"]) and not torch.equal(drawn[8], drawn[7])

    recomputed = on_ranks(_prior_built_sharded, 2, tmp_path / "checkpointed", 7, None, True)
    for name, grad in ranks[0][2].items():
        torch.testing.assert_close(recomputed[0][2][name], grad, rtol=1e-5, atol=1e-7)


def test_a_prior_sharded_from_the_meta_device_fine_tunes_from_its_init_from_weights(tmp_path):
    import torch
    from process_group import on_ranks

    from dalle_pipeline.components import checkpoint
    from dalle_pipeline.components.prior.model import KIND, Prior, PriorModelConfig

    model_cfg = PriorModelConfig(**SMALL)
    torch.manual_seed(3)
    start = Prior(model_cfg)
    saved = checkpoint.save(tmp_path / "start", KIND, start.state_dict(), model_cfg.to_dict())
    ranks = on_ranks(_prior_built_sharded, 2, tmp_path / "group", 0, str(saved), False)
    for name, value in start.state_dict().items():
        assert torch.equal(ranks[1][1][name], value), name


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
        # in batches of 5 (24 rows: the last one short), not the 32 it was measured in: the same mean
        measured = validation_loss(*tokens.read_rows(val_rows), cfg, 5)(load(result.checkpoint_dir).eval())
    assert measured["loss"] == pytest.approx(meta["val_loss"], rel=1e-3)


def test_validation_runs_in_training_batches_whatever_the_number_of_validation_rows():
    """Validation took 256 rows a forward whatever the training batch: at 256 px (4096 image tokens a row) its
    attention was the worker's peak, and grew with the corpus (5% of it) until a corpus of 8000 ran out of
    memory. Each forward now takes at most the training batch, and the mean is the same."""
    import torch

    from dalle_pipeline.components.prior.model import Prior
    from dalle_pipeline.components.prior.train import model_config, validation_loss

    cfg = PriorConfig(layers=1, d_model=32, heads=2)
    model = Prior(model_config(cfg, {"grid_size": "3", "image_vocab": "32", "text_vocab": "40", "text_len": 6})).eval()
    rows = torch.Generator().manual_seed(0)
    text, image = torch.randint(0, 40, (23, 6), generator=rows), torch.randint(0, 32, (23, 9), generator=rows)
    lengths = torch.randint(1, 7, (23,), generator=rows)
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    with torch.no_grad():
        batched = validation_loss(text, lengths, image, cfg, batch_size=4)(model)
        assert seen == [4, 4, 4, 4, 4, 3]
        whole = validation_loss(text, lengths, image, cfg, batch_size=23)(model)
    assert batched == pytest.approx(whole, rel=1e-5)


@pytest.mark.slow  # Ray Train twice, its storage on moto's S3
def test_checkpoints_on_an_object_store_are_resumed_from_by_a_run_elsewhere(tmp_path, monkeypatch, capfd):
    """With `checkpoint_store` on S3 (moto's server), Ray Train keeps the prior's checkpoints there, nothing under
    the stage's local folder but the exported weights; the same run launched again from another folder (another
    machine, the first one's disk gone) resumes from the store's latest checkpoint."""
    import ray
    from local_processes import S3Endpoint

    from dalle_pipeline.components.cluster import disconnect
    from dalle_pipeline.components.prior.model import load
    from dalle_pipeline.components.prior.train import run
    from dalle_pipeline.components.storage import StorePath

    dataset = write_learnable_dataset(tmp_path / "tokens")
    cfg = PriorConfig(layers=1, d_model=16, heads=2, num_workers=1, caption_dropout=0.0, checkpoint_every=10,
                      val_fraction=0.0)
    cfg.optim.steps, cfg.optim.batch_size, cfg.optim.log_every = 20, 16, 10
    disconnect()
    s3 = S3Endpoint()
    try:
        for name, value in s3.env.items():
            monkeypatch.setenv(name, value)  # before Ray starts: its workers reach the store so
        store = StorePath(f"s3://{s3.bucket}/stages/prior/abc/ray")
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
        first = run(cfg, dataset, tmp_path / "here", seed=0, checkpoint_store=store)
        states = [key for key in s3.keys("stages/prior/abc/ray/") if key.endswith("/train_state.pt")]
        assert states, s3.keys("stages/prior/abc/ray/")
        assert not (tmp_path / "here" / "ray").exists() and (tmp_path / "here" / "checkpoint").is_dir()
        capfd.readouterr()
        again = run(cfg, dataset, tmp_path / "elsewhere", seed=0, checkpoint_store=store)
        out, err = capfd.readouterr()
    finally:
        ray.shutdown()
        s3.stop()
    assert "[prior] resuming from the checkpoint of step 20" in out + err
    assert first.step == again.step == 20
    first_weights, again_weights = load(first.checkpoint_dir).state_dict(), load(again.checkpoint_dir).state_dict()
    assert all(np.array_equal(first_weights[name].numpy(), again_weights[name].numpy()) for name in first_weights)
