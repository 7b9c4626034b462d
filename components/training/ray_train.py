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

A checkpoint is a folder: `train_state.pt` (step, every rank's RNG, EMA; with DDP the weights and
optimizer state too, written by rank 0) and, for a model sharded with FSDP2, `sharded/`: a DCP
folder into which every rank writes its own shards of the weights and optimizer state, straight in
Ray's storage (nothing gathered, nothing copied after).
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cluster import connect
from ..config import RayTrainConfig
from ..parallel import require_shared
from ..storage import StorePath, arrow_filesystem
from ..tracking import Tracker
from . import sharded
from .loop import SHARDED_KEY, LogHook, progress_logger, rng_state, seed_everything, set_threads

STATE_FILE = "train_state.pt"
SHARDED_DIR = "sharded"  # in a checkpoint folder: the DCP folder of a sharded model's weights and optimizer


def train_on_ray(
    name: str,
    worker_fn: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    cfg: RayTrainConfig,
    out_dir: Path,
    score_attribute: str | None = None,
    ray_address: str | None = None,
    tracker: Tracker | None = None,
    cpu_worker_env: dict[str, str] | None = None,
    reads: dict[str, Path | StorePath] | None = None,
    checkpoint_store: StorePath | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Run `worker_fn(loop_config)` on `cfg.num_workers` workers; (training state kept, its metrics).

    The state kept is the best checkpoint by `score_attribute` (lower is better) when given, else
    the latest; the metrics are the ones reported with that checkpoint, so they describe its weights
    (a run that overfit keeps an early step and that step's validation loss, not the last report's). `loop_config` gains `threads_per_worker` and `tracker` (what rebuilds `tracker` on
    rank 0: `rank_zero_tracker`); it must be plain data (it is pickled). `cpu_worker_env`: environment
    variables of the workers where they train on CPUs. `checkpoint_store`: Ray Train's storage on an object
    store (the workers upload each checkpoint there, a restarted run downloads it), not `out_dir/ray`: the
    workers then write nothing that `out_dir` must share with them.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import ray

    connect(ray_address)
    # the workers read `reads`, keep checkpoints under out_dir (or on the store)
    require_shared(reads or {}, writes=None if checkpoint_store else Path(out_dir))
    filesystem, storage_path = (arrow_filesystem(str(checkpoint_store), "the training checkpoints") if checkpoint_store
                                else (None, str(Path(out_dir).resolve() / "ray")))
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
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute=score_attribute,
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # Ray Train's own INFO lines (the worker group requested, started, its ranks and process group: 5
            # a stage) stay in its log files; the console keeps its warnings and the stage's progress lines
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": cpu_worker_env} if cpu_worker_env and not use_gpu else None,
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name} training reported no checkpoint (error: {result.error})")
    kept, reported = kept_checkpoint(result, score_attribute)
    with kept.as_directory() as directory:  # a local storage's folder itself; from a store, a copy
        state = read_state(Path(directory))
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


def read_state(directory: Path) -> dict[str, Any]:
    """The training state of the checkpoint folder `directory`, its tensors on the CPU; where the weights
    and optimizer state are sharded, not them but their DCP folder's path (`loop.SHARDED_KEY`), for each
    rank to read its own shards (`loop.load_training_state`) or the driver the weights (`sharded.saved_weights`)."""
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    if (directory / SHARDED_DIR).is_dir():
        state[SHARDED_KEY] = str(directory / SHARDED_DIR)
    return state


def quiet_ray_train_reports() -> None:
    """In a worker: Ray Train logs two long lines at INFO for every checkpoint of every rank ("Checkpoint
    successfully created at", "Reporting training result ... from rank N"); the stage's progress line
    says the step and its metrics already. Those under `ray.train` stay out of the console by the run's
    `LoggingConfig`; this one module's logger is named by its file's path, not under ray.train, so its
    level is raised here. Warnings and errors still show."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    if isinstance(getattr(context, "logger", None), logging.Logger):
        context.logger.setLevel(logging.WARNING)


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
    with latest.as_directory() as directory:  # a local storage's folder itself; from a store, a copy
        state = read_state(Path(directory))
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
    """Every rank calls this at a checkpoint step; rank 0 writes `state` (and `files`: name -> text).
    Sharded weights and optimizer state (FSDP2) are written by every rank (`report_sharded`)."""
    import ray.train

    state = {**state, "rng": _all_ranks_rng()}
    if sharded.is_sharded_state(state):
        report_sharded(rank, metrics, state, files)
        return
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, Path(directory) / STATE_FILE)
        for file_name, text in (files or {}).items():
            (Path(directory) / file_name).write_text(text)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def report_sharded(rank: int, metrics: dict[str, float], state: dict[str, Any], files: dict[str, str] | None) -> None:
    """Every rank writes its shards of the weights and optimizer state into the checkpoint folder in
    Ray's storage (`SHARDED_DIR`, one DCP file a rank); rank 0 the rest of `state` and `files`, then
    reports the folder as it is (no upload: it is already where Ray keeps checkpoints). The folder is
    named by the step: a run killed while writing one leaves a folder Ray never registered, which the
    resumed run clears before writing that step again."""
    import pyarrow.fs
    import ray.train
    import torch.distributed as dist

    storage = ray.train.get_context().get_storage()
    if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        raise ValueError(f"sharded checkpoints are written where Ray keeps its checkpoints, which must be a local "
                         f"or shared file system; got {storage.storage_filesystem.type_name}")
    name = f"checkpoint_step_{int(state['step']):07d}"
    directory = Path(storage.experiment_fs_path) / name
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
    dist.barrier()
    sharded.save(directory / SHARDED_DIR, {key: state.pop(key) for key in ("model", "optimizer")})
    checkpoint = None
    if rank == 0:
        torch.save(state, directory / STATE_FILE)
        for file_name, text in (files or {}).items():
            (directory / file_name).write_text(text)
        checkpoint = ray.train.Checkpoint(str(directory))
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)


def peak_rss_gb() -> float:
    """The most resident memory any worker of the group has held so far, in GiB (every rank calls this)."""
    import torch.distributed as dist

    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return max(every)


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
        quiet_ray_train_reports()
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
        """`fit`'s on_log, once the stage has added its own rates, with the workers' peak resident memory
        (`peak_rss_gb`): kept for the next checkpoint's report, and one progress line and one MLflow write
        per step from rank 0, not one per worker. Every rank calls it."""
        metrics = {**metrics, "peak_rss_gb": peak_rss_gb()}
        self.latest_metrics.update(metrics)
        if self.rank == 0:
            self.log_progress(step, metrics)

    def on_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        report_checkpoint(self.rank, {**self.latest_metrics, "step": step}, state,
                          {"model_config.json": json.dumps(self.model_config)})
