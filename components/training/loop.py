"""`fit`: AdamW, warmup + cosine schedule, grad clipping, EMA, metrics and checkpoint hooks.

Stages differ only in how a batch becomes a loss, so each passes a `loss_fn(model, batch, step)`
returning the loss and the metrics to log; everything else (optimisation, schedules, EMA, timing,
logging cadence, checkpoint cadence) lives here once. Under Ray Train the worker function builds
the model and data for its rank and calls `fit` like any other caller.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import OptimConfig

LossFn = Callable[[nn.Module, Any, int], tuple[torch.Tensor, dict[str, float]]]
LogHook = Callable[[int, dict[str, float]], None]
CheckpointHook = Callable[[int, dict[str, Any]], None]


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; ranks get distinct but reproducible streams."""
    value = seed * 1000 + rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def set_threads(num_threads: int) -> None:
    """0 means every core this process may use."""
    if num_threads <= 0:
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(num_threads)


def learning_rate(step: int, cfg: OptimConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `steps`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, from under DDP (and torch.compile, whose wrapper forwards attributes)."""
    return model.module if hasattr(model, "module") else model


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings (parameters with fewer than 2 dims)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)


class EMA:
    """Exponential moving average of a model's parameters and buffers, kept in a frozen copy."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        source = unwrap(model).state_dict()
        for name, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(source[name].detach(), 1 - self.decay)
            else:
                value.copy_(source[name])


def progress_logger(stage: str, total_steps: int, tracker: Any = None) -> LogHook:
    """The usual `on_log`: one progress line per log window, and the metrics to the stage's tracker."""

    def on_log(step: int, metrics: dict[str, float]) -> None:
        print(f"[{stage}] step {step}/{total_steps} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
              flush=True)
        if tracker is not None:
            tracker.log_metrics(metrics, step=step)

    return on_log


def is_sharded(model: nn.Module) -> bool:
    """True for a model sharded with FSDP2 (`fully_shard`): its parameters are DTensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: nn.Module) -> dict[str, Any]:
    """The whole (unsharded) state dict; for a sharded model, complete on rank 0 only."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_state_options())
    return unwrap(model).state_dict()


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_full_state_options())
    return optimizer.state_dict()


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `model_state` + `optimizer_state`: every rank passes the full dicts, FSDP shards them."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


@dataclass
class FitResult:
    step: int
    metrics: dict[str, float]
    model: nn.Module
    ema_model: nn.Module | None
    history: list[dict[str, float]] = field(default_factory=list)


def _device_type(model: nn.Module) -> str:
    return next(model.parameters()).device.type


def bf16_supported(device_type: str) -> bool:
    """Whether bf16 matmuls run natively (CUDA Ampere+, or a CPU with AVX512-BF16/AMX via oneDNN)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def uses_bf16(cfg: OptimConfig, device_type: str) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_supported(device_type))


def _precision_context(cfg: OptimConfig, device_type: str):
    if uses_bf16(cfg, device_type):
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _should_compile(cfg: OptimConfig, device_type: str) -> bool:
    return cfg.compile if cfg.compile is not None else device_type == "cuda"


def rng_state() -> dict[str, Any]:
    """Torch, NumPy and Python RNG states as tensors and lists, loadable with weights_only=True."""
    _, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "python": [version, list(python_state), gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))


def _metric(value: float | torch.Tensor) -> float | torch.Tensor:
    """A metric to sum over a window: a float, or a 0-d tensor kept on its device."""
    return value.detach().float() if isinstance(value, torch.Tensor) else float(value)


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterator[Any],
    cfg: OptimConfig,
    *,
    on_log: LogHook | None = None,
    on_checkpoint: CheckpointHook | None = None,
    checkpoint_every: int | None = None,
    resume_state: dict[str, Any] | None = None,
    samples_per_batch: int | None = None,
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
    eval_every: int | None = None,
) -> FitResult:
    """Train `model` for `cfg.steps` updates on `batches`; returns the final metrics and models.

    Each update accumulates gradients over `cfg.grad_accum_steps` batches (under DDP, only the last
    micro-batch synchronises), in `cfg.precision`, through `torch.compile` where `cfg.compile` says.
    `on_log(step, metrics)` receives averages over the last `cfg.log_every` updates, plus lr, grad
    norm, samples/s and, every `eval_every` updates, `evaluate(model, step)`'s metrics prefixed `val_`.
    `on_checkpoint(step, state)` receives everything needed to resume (weights, optimizer, EMA,
    RNG): pass that state back as `resume_state` to continue at the same step.
    """
    if cfg.ema_decay > 0 and is_sharded(model):
        raise ValueError("ema_decay > 0 is not supported with FSDP sharding yet; set optim.ema_decay=0")
    optimizer = make_optimizer(model, cfg)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    step = 0
    if resume_state is not None:
        load_training_state(model, optimizer, resume_state)
        if ema is not None and resume_state.get("ema") is not None:
            ema.model.load_state_dict(resume_state["ema"])
        if resume_state.get("rng") is not None:
            set_rng_state(resume_state["rng"])
        step = int(resume_state["step"])

    device_type = _device_type(model)
    forward_model = torch.compile(model) if _should_compile(cfg, device_type) else model
    accumulate = cfg.grad_accum_steps
    model.train()
    # metrics stay on the device until a window is logged: no step waits for the device to drain,
    # so the next batch is loaded while the device still works on this one
    window: dict[str, float | torch.Tensor] = {}
    window_steps, window_start = 0, time.perf_counter()
    finite: bool | torch.Tensor = True  # every loss since `checked_step` was finite
    checked_step = step
    history: list[dict[str, float]] = []
    last: dict[str, float] = {}
    validation: dict[str, float] = {}
    while step < cfg.steps:
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        step_metrics: dict[str, float | torch.Tensor] = {}
        for micro in range(accumulate):
            # under DDP, forward and backward of all but the last micro-batch skip the all-reduce
            sync = micro == accumulate - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                with _precision_context(cfg, device_type):
                    loss, metrics = loss_fn(forward_model, next(batches), step)
                (loss / accumulate).backward()
            finite = finite & torch.isfinite(loss.detach())
            for key, value in {"loss": loss, **metrics}.items():
                step_metrics[key] = step_metrics.get(key, 0.0) + _metric(value) / accumulate
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        if ema is not None:
            ema.update(model)
        step += 1

        for key, value in {**step_metrics, "grad_norm": _metric(grad_norm)}.items():
            window[key] = window.get(key, 0.0) + value
        window_steps += 1
        logs = step % cfg.log_every == 0 or step == cfg.steps
        checkpoints = on_checkpoint is not None and checkpoint_every and (
            step % checkpoint_every == 0 or step == cfg.steps)
        if logs or checkpoints:  # nothing is logged or saved from a model that saw a non-finite loss
            if not bool(finite):
                raise FloatingPointError(f"the loss was not finite (nan or inf) in steps {checked_step + 1}..{step}")
            finite, checked_step = True, step
        if evaluate is not None and eval_every and (step % eval_every == 0 or step == cfg.steps):
            model.eval()
            with torch.no_grad(), _precision_context(cfg, device_type):
                validation = {f"val_{key}": value for key, value in evaluate(unwrap(model), step).items()}
            model.train()
        if logs:
            last = {key: float(value) / window_steps for key, value in window.items()}  # waits for the device
            elapsed = time.perf_counter() - window_start
            last["lr"] = lr
            if samples_per_batch:
                last["samples_per_s"] = samples_per_batch * accumulate * window_steps / max(elapsed, 1e-9)
            last.update(validation)
            history.append({"step": step, **last})
            if on_log is not None:
                on_log(step, last)
            window, window_steps, window_start = {}, 0, time.perf_counter()
            validation = {}
        if checkpoints:
            on_checkpoint(
                step,
                {
                    "model": model_state(model),
                    "optimizer": optimizer_state(model, optimizer),
                    "ema": ema.model.state_dict() if ema is not None else None,
                    "rng": rng_state(),
                    "step": step,
                },
            )
    model.eval()
    return FitResult(
        step=step, metrics=last, model=unwrap(model), ema_model=ema.model if ema else None, history=history
    )
