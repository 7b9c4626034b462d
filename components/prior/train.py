"""Train the prior on the token Parquet with Ray Train's TorchTrainer (DDP or FSDP; gloo on CPU).

`train_worker` is the thin Ray shell around the shared `fit` loop: it streams its rank's share of
the token dataset through a shuffle buffer (`ParquetBatches`), resumes from Ray's latest
checkpoint when a worker or the driver was lost, logs to MLflow from rank 0 and reports
checkpoints through `ray_train.report_checkpoint`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..config import PriorArchitecture, PriorConfig
from ..tracking import Tracker
from ..training import ParquetBatches, TokenParquet, fit, ray_train
from ..training.flops import measured_matmul_peak, transformer_flops_per_token
from ..training.loop import progress_logger, unwrap, uses_bf16
from .model import KIND, Prior, PriorModelConfig, prior_loss

def model_config(cfg: PriorConfig, manifest: dict) -> PriorModelConfig:
    """The architecture of `cfg` with the vocabularies and lengths of the token dataset."""
    return PriorModelConfig(**cfg.model_dump(include=set(PriorArchitecture.model_fields)),
                            text_vocab=int(manifest["text_vocab"]), image_vocab=int(manifest["image_vocab"]),
                            text_len=int(manifest["text_len"]), grid_size=int(manifest["grid_size"]))


def split_validation(num_rows: int, cfg: PriorConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, validation rows) as global row indices of the token dataset: a seeded draw, the
    same on every rank and every resume."""
    count = min(cfg.val_rows_max, int(num_rows * cfg.val_fraction))
    if count and num_rows - count < 1:
        raise ValueError(f"val_fraction {cfg.val_fraction} leaves no training rows out of {num_rows}")
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return order[count:].sort().values, order[:count].sort().values


def validation_loss(text, lengths, image, cfg: PriorConfig, batch_size: int = 256):
    """Mean text / image / weighted loss over the held-out rows (no caption dropout)."""

    def evaluate(model: Prior) -> dict[str, float]:
        totals = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}
        for start in range(0, len(text), batch_size):
            rows = slice(start, start + batch_size)
            padded = model.pad_text(text[rows], lengths[rows])
            loss, metrics = prior_loss(*model(padded, image[rows]), padded, image[rows], cfg.text_loss_weight)
            share = len(padded) / len(text)
            totals["loss"] += loss.item() * share
            totals["text_loss"] += float(metrics["text_loss"]) * share
            totals["image_loss"] += float(metrics["image_loss"]) * share
        return totals

    return evaluate


def prior_loss_fn(cfg: PriorConfig):
    """The loss callback for `fit`; drops whole captions with probability caption_dropout."""

    def loss_fn(model, batch, step):
        text, lengths, image = batch
        if cfg.caption_dropout > 0:
            dropped = torch.rand(len(lengths), device=lengths.device) < cfg.caption_dropout
            lengths = torch.where(dropped, torch.zeros_like(lengths), lengths)
        text = unwrap(model).pad_text(text, lengths)
        text_logits, image_logits = model(text, image)
        return prior_loss(text_logits, image_logits, text, image, cfg.text_loss_weight)

    return loss_fn


def check_same_architecture(checkpoint_dir: str | Path, model_cfg: PriorModelConfig) -> None:
    """ValueError unless the prior at `checkpoint_dir` has this architecture and these vocabularies."""
    checkpoint.check_same_model(checkpoint_dir, KIND, model_cfg.to_dict(), "prior.init_from",
                                ignore=("dropout", "attention_backend"))


def initialise_from(model: Prior, checkpoint_dir: str | Path) -> None:
    """Start from another prior's weights (fine-tuning)."""
    check_same_architecture(checkpoint_dir, model.cfg)
    state, _, _ = checkpoint.load(checkpoint_dir, KIND)
    model.load_state_dict(state)


def distribute(model: Prior, parallel: str) -> torch.nn.Module:
    """DDP through Ray, or FSDP2: each transformer block sharded on its own, then the rest."""
    import ray.train.torch

    if parallel == "ddp":
        return ray.train.torch.prepare_model(model)
    from torch.distributed.fsdp import fully_shard

    model = model.to(ray.train.torch.get_device())
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function; `config` is plain data so it pickles to every worker."""
    cfg = PriorConfig.model_validate(config["prior"])
    rank, world_size = ray_train.worker_rank(config, config["seed"])

    dataset = TokenParquet(config["dataset_dir"])
    _, val_rows = split_validation(dataset.num_rows, cfg, config["seed"])
    model_cfg = model_config(cfg, dataset.manifest)
    model = Prior(model_cfg)
    resume_state = ray_train.resume_state(rank, world_size)
    if cfg.init_from and resume_state is None:  # a resumed run has its own weights
        initialise_from(model, cfg.init_from)
    model = distribute(model, cfg.parallel)
    device = next(model.parameters()).device
    flops_per_token = transformer_flops_per_token(model, model_cfg.layers, model_cfg.seq_len, model_cfg.d_model)
    peak = measured_matmul_peak(device, torch.bfloat16 if uses_bf16(cfg.optim, device.type) else torch.float32)

    start_step = int(resume_state["step"]) if resume_state else 0
    per_rank_batch = max(1, cfg.optim.batch_size // world_size)
    # streamed from the Parquet row groups through a shuffle buffer; the validation rows never enter it
    batches = ParquetBatches(
        dataset, per_rank_batch, seed=config["seed"], rank=rank, world_size=world_size,
        buffer_rows=cfg.shuffle_buffer_rows, exclude_rows=val_rows, device=device,
    ).from_step(start_step * cfg.optim.grad_accum_steps)
    validate = validation_loss(*(t.to(device) for t in dataset.read_rows(val_rows)), cfg) if len(val_rows) else None
    tracker = ray_train.rank_zero_tracker(config, rank, "prior", resume_state)
    log_progress = progress_logger("prior", cfg.optim.steps, tracker)
    latest_metrics: dict[str, float] = {}

    def on_log(step: int, metrics: dict[str, float]) -> None:
        metrics = dict(metrics)
        if "samples_per_s" in metrics:
            metrics["tokens_per_s"] = metrics.pop("samples_per_s") * model_cfg.seq_len * world_size
            # each worker against its own device's measured matmul peak
            metrics["mfu"] = metrics["tokens_per_s"] / world_size * flops_per_token / peak
        latest_metrics.update(metrics)
        if rank == 0:  # one line and one MLflow write per step, not one per worker
            log_progress(step, metrics)

    def evaluate(unwrapped: Prior, step: int) -> dict[str, float]:
        """Validation runs right before each checkpoint, so every report carries its val_loss."""
        metrics = validate(unwrapped)
        latest_metrics.update({f"val_{key}": value for key, value in metrics.items()})
        return metrics

    def on_checkpoint(step: int, state: dict[str, Any]) -> None:
        ray_train.report_checkpoint(rank, {**latest_metrics, "step": step}, state,
                                    {"model_config.json": json.dumps(model_cfg.to_dict())})

    fit(model, prior_loss_fn(cfg), batches, cfg.optim, on_log=on_log, on_checkpoint=on_checkpoint,
        checkpoint_every=cfg.checkpoint_every, resume_state=resume_state, samples_per_batch=per_rank_batch,
        evaluate=evaluate if validate else None, eval_every=cfg.checkpoint_every)


@dataclass
class PriorResult:
    checkpoint_dir: Path
    metrics: dict[str, float]


def run(cfg: PriorConfig, dataset_dir: Path, out_dir: Path, seed: int, tracker: Tracker | None = None,
        ray_address: str | None = None) -> PriorResult:
    out_dir = Path(out_dir).resolve()
    manifest = TokenParquet(dataset_dir).manifest  # fail here, not in a worker, if the dataset is incomplete
    model_cfg = model_config(cfg, manifest)
    if cfg.init_from:
        check_same_architecture(cfg.init_from, model_cfg)
    loop_config = {
        "prior": cfg.model_dump(mode="json"),
        "dataset_dir": str(Path(dataset_dir).resolve()),
        "seed": seed,
    }
    state, metrics = ray_train.train_on_ray(
        "prior", train_worker, loop_config, cfg, out_dir,
        score_attribute="val_loss" if cfg.val_fraction > 0 else None, ray_address=ray_address, tracker=tracker,
    )
    checkpoint_dir = checkpoint.save(
        out_dir / "checkpoint", KIND, state["model"], model_cfg.to_dict(),
        meta={**metrics, "step": state["step"], "dvae_hash": manifest["dvae_hash"],
              "tokenizer_hash": manifest["tokenizer_hash"]},
    )
    if tracker is not None:
        tracker.log_artifact(checkpoint_dir, "checkpoint")
    return PriorResult(checkpoint_dir=checkpoint_dir, metrics=metrics)
