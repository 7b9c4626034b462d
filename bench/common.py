"""What the benchmarks share: prior-size flags, the config they build, and device-synchronised timing."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

import source_tree  # noqa: F401,E402  (dalle_pipeline without an install)
from dalle_pipeline.components.prior.model import PriorModelConfig  # noqa: E402

PRIOR_FLAGS = ("layers", "d_model", "heads", "text_len", "grid", "text_vocab", "image_vocab", "batch")


def prior_parser(description: str, **defaults: int) -> argparse.ArgumentParser:
    """Flags for every prior dimension (defaults given by the caller), attention type and device."""
    parser = argparse.ArgumentParser(description=description)
    for name in PRIOR_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=defaults.pop(name))
    for name, default in defaults.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    parser.add_argument("--attention", choices=["dalle", "dense"], default="dalle")
    parser.add_argument("--attention-backend", choices=["auto", "segments", "flex", "sdpa", "math"], default="auto",
                        help="how ours computes attention ('auto': segments on CUDA, math on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def prior_config(args: argparse.Namespace) -> PriorModelConfig:
    return PriorModelConfig(text_vocab=args.text_vocab, image_vocab=args.image_vocab, text_len=args.text_len,
                            grid_size=args.grid, layers=args.layers, d_model=args.d_model, heads=args.heads,
                            attention=args.attention, attention_backend=args.attention_backend)


def timed(fn: Callable[[], None], device: torch.device, repeats: int = 1) -> float:
    """Seconds for `repeats` calls of `fn`, after one warm-up call, with the device synchronised."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (platform.processor() is often empty)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def emit(result: dict, out: str | None = None) -> dict:
    """Print `result` as one JSON document on stdout, and write it to `out` too when given."""
    import json

    text = json.dumps(result, default=str)
    print(text, flush=True)
    if out:
        Path(out).write_text(text + "\n")
    return result


def step_seconds(fn: Callable[[], None], device: torch.device, steps: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `steps` calls of `fn`, after `warmup` untimed calls, the device synchronised
    around each: a median of these stands up to other work on a shared machine, a mean does not."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds
