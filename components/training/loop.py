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
from .sharded import load as load_sharded
from .sharded import state_dicts

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
        if tracker is not None:  # `progress` moves the flow run's progress artifact (flows/stages.py)
            tracker.log_metrics({**metrics, "progress": step / max(1, total_steps)}, step=step)

    return on_log


def is_sharded(model: nn.Module) -> bool:
    """True for a model sharded with FSDP2 (`fully_shard`): its parameters are DTensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


SHARDED_KEY = "sharded"  # a resume state's DCP folder, where its weights and optimizer state are sharded


def training_weights(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model", "optimizer"} of a checkpoint: whole state dicts, or for a model sharded with FSDP2 this
    rank's shards of both (DTensors), which every rank writes into one DCP folder: nothing is gathered."""
    if is_sharded(model):
        return state_dicts(model, optimizer)
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `training_weights`. A state naming a DCP folder (`SHARDED_KEY`) is read by every rank
    for its own shards, whatever the number of ranks that wrote it; whole state dicts (a DDP run's, or
    a checkpoint written before sharded checkpoints) are passed whole by every rank, FSDP shards them."""
    if state.get(SHARDED_KEY):
        load_sharded(model, optimizer, state[SHARDED_KEY])
    elif is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        moments = _by_parameter_name(model, optimizer, state["optimizer"])
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=moments,
                       options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])


def _by_parameter_name(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """A whole optimizer state dict keyed by parameter name, as `set_state_dict` takes it: a plain
    `optimizer.state_dict()` (a DDP run's) numbers the parameters in the order of the optimizer's groups,
    which `make_optimizer` builds the same for the same model, sharded or not."""
    if not all(isinstance(key, int) for key in saved["state"]):
        return saved  # already by name (FSDP's whole checkpoints before sharded ones)
    name_of = {param: name for name, param in unwrap(model).named_parameters()}
    names = [name_of[param] for group in optimizer.param_groups for param in group["params"]]
    return {"state": {names[index]: value for index, value in saved["state"].items()},
            "param_groups": [{**group, "params": [names[index] for index in group["params"]]}
                             for group in saved["param_groups"]]}


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


class _Window:
    """Metric sums over one log window, kept on the device until the window is logged, and whether
    every loss since the last check was finite."""

    def __init__(self, step: int) -> None:
        self.sums: dict[str, float | torch.Tensor] = {}
        self.steps, self.started = 0, time.perf_counter()
        self.finite: bool | torch.Tensor = True
        self.checked_step = step

    def add(self, metrics: dict[str, float | torch.Tensor], finite: bool | torch.Tensor) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1
        self.finite = self.finite & finite

    def check_finite(self, step: int) -> None:
        """Raise before anything is logged or saved from a model that saw a non-finite loss."""
        if not bool(self.finite):
            raise FloatingPointError(f"the loss was not finite (nan or inf) in steps {self.checked_step + 1}..{step}")
        self.finite, self.checked_step = True, step

    def close(self) -> tuple[dict[str, float], int, float]:
        """(the window's averages as floats, its updates, its seconds); this waits for the device.
        The next window starts now."""
        closed = ({key: float(value) / self.steps for key, value in self.sums.items()}, self.steps,
                  time.perf_counter() - self.started)
        self.sums, self.steps, self.started = {}, 0, time.perf_counter()
        return closed


def _resume(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None,
            state: dict[str, Any] | None) -> int:
    """Load a checkpoint state (weights, optimizer, EMA, RNG) into the run; the step to continue at."""
    if state is None:
        return 0
    load_training_state(model, optimizer, state)
    if ema is not None and state.get("ema") is not None:
        ema.model.load_state_dict(state["ema"])
    if state.get("rng") is not None:
        set_rng_state(state["rng"])
    return int(state["step"])


def _update(model: nn.Module, forward_model: nn.Module, loss_fn: LossFn, batches: Iterator[Any],
            optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int, lr: float, device_type: str,
            clip_groups: dict[str, list[nn.Parameter]]) -> tuple[dict[str, float | torch.Tensor], bool | torch.Tensor]:
    """One optimizer update at learning rate `lr` over `cfg.grad_accum_steps` micro-batches: its
    metrics (device tensors, averaged over the micro-batches, with each clip group's grad norm) and
    whether every loss was finite."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    accumulate = cfg.grad_accum_steps
    metrics_sum: dict[str, float | torch.Tensor] = {}
    finite: bool | torch.Tensor = True
    for micro in range(accumulate):
        with _gradient_sync(model, micro == accumulate - 1):
            with _precision_context(cfg, device_type):
                loss, metrics = loss_fn(forward_model, next(batches), step)
            (loss / accumulate).backward()
        finite = finite & torch.isfinite(loss.detach())
        for key, value in {"loss": loss, **metrics}.items():
            metrics_sum[key] = metrics_sum.get(key, 0.0) + _metric(value) / accumulate
    norms = {f"grad_norm_{name}" if name else "grad_norm": _metric(_clip(params, cfg.grad_clip))
             for name, params in clip_groups.items()}
    optimizer.step()
    return {**metrics_sum, **norms}, finite


@contextlib.contextmanager
def _gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Where `sync` is False, a backward pass that keeps its gradients on this rank: DDP's `no_sync`,
    FSDP2's `set_requires_gradient_sync(False)` (which holds the unsharded gradients, in fp32, until the
    last micro-batch reduce-scatters their sum). A single process has nothing to synchronise."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _clip_groups(model: nn.Module, separately: tuple[str, ...]) -> dict[str, list[nn.Parameter]]:
    """The parameters whose gradient norm is clipped together: the submodules named in `separately`
    each on their own (an adversary's gradients must not scale the model's down), the rest as one."""
    inner = unwrap(model)
    groups = {name: list(inner.get_submodule(name).parameters()) for name in separately if hasattr(inner, name)}
    apart = {id(param) for params in groups.values() for param in params}
    return {"": [param for param in model.parameters() if id(param) not in apart], **groups}


def _clip(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP


def _measure(model: nn.Module, measure: Callable[[nn.Module, int], dict[str, float]], cfg: OptimConfig,
             step: int, device_type: str) -> dict[str, float]:
    model.eval()
    with torch.no_grad(), _precision_context(cfg, device_type):
        measured = measure(unwrap(model), step)
    model.train()
    return measured


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None, step: int) -> dict[str, Any]:
    """Everything `fit` needs to continue at `step` exactly: weights, optimizer, EMA, RNG."""
    return {**training_weights(model, optimizer), "ema": ema.model.state_dict() if ema is not None else None,
            "rng": rng_state(), "step": step}


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
    measure: Callable[[nn.Module, int], dict[str, float]] | None = None,
    measure_every: int | None = None,
    clip_separately: tuple[str, ...] = (),
) -> FitResult:
    """Train `model` for `cfg.steps` updates on `batches`; returns the final metrics and models.

    Each update accumulates gradients over `cfg.grad_accum_steps` batches (under DDP and FSDP, only the
    last micro-batch synchronises), in `cfg.precision`, through `torch.compile` where `cfg.compile` says.
    `on_log(step, metrics)` receives averages over the last `cfg.log_every` updates, plus lr, grad
    norm, samples/s and, every `measure_every` updates, `measure(model, step)`'s metrics (the model in eval
    mode, without gradients), under the names it gives them: `val_*` for held-out data, `train_*` for
    training data.
    `on_checkpoint(step, state)` receives everything needed to resume (weights, optimizer, EMA,
    RNG): pass that state back as `resume_state` to continue at the same step. Under FSDP the weights
    and optimizer state are this rank's shards (`training_weights`), for every rank to write into one
    DCP folder; `resume_state` then names that folder (`SHARDED_KEY`). The submodules named
    in `clip_separately` (the dVAE's discriminator) have their gradient norm clipped apart from the rest.
    """
    if cfg.ema_decay > 0 and is_sharded(model):
        raise ValueError("ema_decay > 0 is not supported with FSDP sharding yet; set optim.ema_decay=0")
    optimizer = make_optimizer(model, cfg)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    step = _resume(model, optimizer, ema, resume_state)
    clip_groups = _clip_groups(model, clip_separately)
    device_type = _device_type(model)
    forward_model = torch.compile(model) if _should_compile(cfg, device_type) else model
    model.train()
    # metrics stay on the device until a window is logged: no step waits for the device to drain,
    # so the next batch is loaded while the device still works on this one
    window = _Window(step)
    history: list[dict[str, float]] = []
    last: dict[str, float] = {}
    measured: dict[str, float] = {}
    while step < cfg.steps:
        lr = learning_rate(step, cfg)
        metrics, finite = _update(model, forward_model, loss_fn, batches, optimizer, cfg, step, lr, device_type,
                                  clip_groups)
        if ema is not None:
            ema.update(model)
        step += 1
        window.add(metrics, finite)
        logs = step % cfg.log_every == 0 or step == cfg.steps
        checkpoints = on_checkpoint is not None and checkpoint_every and (
            step % checkpoint_every == 0 or step == cfg.steps)
        if logs or checkpoints:
            window.check_finite(step)
        if measure is not None and measure_every and (step % measure_every == 0 or step == cfg.steps):
            measured = _measure(model, measure, cfg, step, device_type)
        if logs:
            last, updates, elapsed = window.close()
            last["lr"] = lr
            if samples_per_batch:
                last["samples_per_s"] = samples_per_batch * cfg.grad_accum_steps * updates / max(elapsed, 1e-9)
            last.update(measured)
            history.append({"step": step, **last})
            if on_log is not None:
                on_log(step, last)
            measured = {}
        if checkpoints:
            on_checkpoint(step, _training_state(model, optimizer, ema, step))
    model.eval()
    return FitResult(
        step=step, metrics=last, model=unwrap(model), ema_model=ema.model if ema else None, history=history
    )
