"""Ray Train plumbing shared by every stage that trains under `TorchTrainer` (the dVAE, the prior).

Driver side, `train_on_ray`: joins (or starts) Ray through `cluster.connect`, takes a GPU per
worker where the cluster has one for each (NCCL between them) and CPU workers over gloo otherwise,
keeps the best k checkpoints, restarts a lost worker group from the latest one, and returns the
training state to keep. A run launched again into the same `out_dir` (a crashed driver re-run by
Prefect) continues from its latest checkpoint: Ray Train V2 restores a run of the same name and
storage path.

Worker side: `worker_rank` seeds and sizes the worker, `resume_state` reads the checkpoint Ray hands
a restarted worker, and `report_checkpoint` gathers every rank's RNG state and reports the
training state from rank 0, so a resumed run draws the same random numbers as an uninterrupted one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..cluster import connect
from ..config import RayTrainConfig
from ..tracking import Tracker
from .loop import rng_state, seed_everything, set_threads

STATE_FILE = "train_state.pt"


def train_on_ray(
    name: str,
    worker_fn: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    cfg: RayTrainConfig,
    out_dir: Path,
    score_attribute: str | None = None,
    ray_address: str | None = None,
    tracker: Tracker | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Run `worker_fn(loop_config)` on `cfg.num_workers` workers; (training state kept, its metrics).

    The state kept is the best checkpoint by `score_attribute` (lower is better) when given, else
    the latest; the metrics are the ones reported with that checkpoint, so they describe its weights
    (a run that overfit keeps an early step and that step's validation loss, not the last report's). `loop_config` gains `threads_per_worker` and `tracker` (what rebuilds `tracker` on
    rank 0: `rank_zero_tracker`); it must be plain data (it is pickled).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = connect(ray_address)
    threads_per_worker = max(1, int(resources.get("CPU", 1)) // cfg.num_workers)
    use_gpu = int(resources.get("GPU", 0)) >= cfg.num_workers
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={
            **loop_config, "threads_per_worker": threads_per_worker,
            "tracker": {"tracking_uri": tracker.tracking_uri, "run_id": tracker.run_id} if tracker else None,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": threads_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(out_dir).resolve() / "ray"),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute=score_attribute,
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name} training reported no checkpoint (error: {result.error})")
    kept, reported = kept_checkpoint(result, score_attribute)
    with kept.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, weights_only=True)
    metrics = {k: float(v) for k, v in reported.items() if isinstance(v, (int, float))}
    return state, metrics


def kept_checkpoint(result, score_attribute: str | None):
    """(checkpoint, the metrics reported with it) of a finished Ray Train `result`: the lowest
    `score_attribute` among the checkpoints kept, else the latest."""
    scored = [(ckpt, reported) for ckpt, reported in (result.best_checkpoints or [])
              if score_attribute and isinstance(reported.get(score_attribute), (int, float))]
    if scored:
        return min(scored, key=lambda pair: pair[1][score_attribute])
    return result.checkpoint, result.metrics or {}  # every report carries a checkpoint


def worker_rank(config: dict[str, Any], seed: int) -> tuple[int, int]:
    """(rank, world size) of this worker, with its threads set and its RNGs seeded for its rank."""
    import ray.train

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    set_threads(config["threads_per_worker"])
    seed_everything(seed, rank)
    return rank, world_size


def rank_zero_tracker(config: dict[str, Any], rank: int, stage: str,
                      resume_state: dict[str, Any] | None) -> Tracker | None:
    """The stage's tracker on rank 0 (None elsewhere, or without one); says so when the run resumes."""
    if rank != 0:
        return None
    tracker = Tracker(**config["tracker"]) if config.get("tracker") else None
    if resume_state is not None:
        step = int(resume_state["step"])
        print(f"[{stage}] resuming from the checkpoint of step {step}", flush=True)
        if tracker is not None:
            tracker.log_metrics({"resumed_from_step": step}, step=step)
    return tracker


def resume_state(rank: int, world_size: int) -> dict[str, Any] | None:
    """The training state of the checkpoint Ray restores this run from, with this rank's RNG state.

    A checkpoint written by a group of another size keeps the seeded RNGs (the data position and
    every weight still resume exactly).
    """
    import ray.train

    latest = ray.train.get_checkpoint()
    if latest is None:
        return None
    with latest.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, weights_only=True)
    rngs = state.get("rng")
    state["rng"] = rngs[rank] if isinstance(rngs, list) and len(rngs) == world_size else None
    return state


def _all_ranks_rng() -> list[dict[str, Any]]:
    import torch.distributed as dist

    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def report_checkpoint(rank: int, metrics: dict[str, float], state: dict[str, Any],
                      files: dict[str, str] | None = None) -> None:
    """Every rank calls this at a checkpoint step; rank 0 writes `state` (and `files`: name -> text)."""
    import ray.train

    state = {**state, "rng": _all_ranks_rng()}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, Path(directory) / STATE_FILE)
        for file_name, text in (files or {}).items():
            (Path(directory) / file_name).write_text(text)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
