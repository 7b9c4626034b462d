"""Ray Train plumbing shared by every stage that trains under `TorchTrainer` (the dVAE, the prior).

Driver side, `train_on_ray`: joins (or starts) Ray through `cluster.connect`, takes a GPU per
worker on a cluster with GPUs (NCCL between them; fewer GPUs than workers is an error) and CPU
workers over gloo otherwise, each asking for the CPUs it can find on one node (`worker_shares`),
keeps the best k checkpoints, restarts a lost worker group from the latest one, and returns the
training state to keep. A run launched again into the same `out_dir` (a crashed driver re-run by
Prefect) continues from its latest checkpoint: Ray Train V2 restores a run of the same name and
storage path.

Worker side: `worker_rank` seeds and sizes the worker, `resume_state` reads the checkpoint Ray hands
a restarted worker, and `report_checkpoint` gathers every rank's RNG state and reports the
training state from rank 0, so a resumed run draws the same random numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cluster import connect
from ..config import RayTrainConfig
from ..tracking import Tracker
from .loop import LogHook, progress_logger, rng_state, seed_everything, set_threads

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

    import ray

    connect(ray_address)
    use_gpu, threads_per_worker = worker_shares([node["Resources"] for node in ray.nodes() if node.get("Alive")],
                                                cfg.num_workers, cfg.device)
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


def worker_shares(nodes: list[dict[str, float]], num_workers: int, device: str = "auto") -> tuple[bool, int]:
    """(a GPU per worker?, CPUs per worker) for `num_workers` workers on a cluster of `nodes` (each node's
    resources): the most CPUs each worker can ask for with every worker still fitting on some node
    (on GPU nodes, their CPUs shared among their GPUs), never the cluster's total split, which a
    worker may find on no single node. ValueError where `device` asks for what the cluster lacks."""
    gpus = sum(int(node.get("GPU", 0)) for node in nodes)
    use_gpu = device == "gpu" or (device == "auto" and gpus > 0)
    if use_gpu and gpus < num_workers:
        raise ValueError(f"{num_workers} GPU workers, but the Ray cluster has {gpus} GPU(s): lower num_workers to "
                         f"{gpus or 1}{'' if gpus else ' and add a GPU node'}, or set device='cpu' to train on CPUs")
    if use_gpu:  # a worker per GPU, the node's CPUs shared among its GPUs
        return True, max(1, min(int(node.get("CPU", 0)) // int(node["GPU"]) for node in nodes if node.get("GPU")))
    cpus = sorted((int(node.get("CPU", 0)) for node in nodes), reverse=True)
    share = max((c for c in range(1, max(cpus, default=1) + 1)
                 if sum(cpu // c for cpu in cpus) >= num_workers), default=1)
    return False, share


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


@dataclass
class StageWorker:
    """The Ray Train worker shell every training stage shares: this worker's rank, seeded; the state a
    restarted run resumes from; the stage's tracker on rank 0; the latest metrics, which each checkpoint
    reports with the model's config beside its weights."""

    stage: str
    rank: int
    world_size: int
    resume_state: dict[str, Any] | None
    tracker: Tracker | None
    model_config: dict[str, Any]
    log_progress: LogHook
    latest_metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, stage: str, config: dict[str, Any], model_config: dict[str, Any], total_steps: int) -> StageWorker:
        """In a worker of `train_on_ray`: `config` is its loop config (seeded by `config["seed"]`)."""
        rank, world_size = worker_rank(config, config["seed"])
        state = resume_state(rank, world_size)
        tracker = rank_zero_tracker(config, rank, stage, state)
        return cls(stage, rank, world_size, state, tracker, model_config, progress_logger(stage, total_steps, tracker))

    @property
    def start_step(self) -> int:
        """The optimizer update the run continues at: 0, or the resumed checkpoint's."""
        return int(self.resume_state["step"]) if self.resume_state else 0

    def fine_tunes(self, init_from: str | None) -> bool:
        """Whether to load `init_from`'s weights: a resumed run has its own."""
        return bool(init_from) and self.resume_state is None

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """`fit`'s on_log, once the stage has added its own rates: kept for the next checkpoint's report, and
        one progress line and one MLflow write per step from rank 0, not one per worker."""
        self.latest_metrics.update(metrics)
        if self.rank == 0:
            self.log_progress(step, metrics)

    def on_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        report_checkpoint(self.rank, {**self.latest_metrics, "step": step}, state,
                          {"model_config.json": json.dumps(self.model_config)})
