"""FLOP accounting for model FLOPs utilisation (MFU): what the model needs against what the device can do."""

from __future__ import annotations

import time

import torch
from torch import nn


def transformer_flops_per_token(model: nn.Module, layers: int, seq_len: int, d_model: int) -> float:
    """6N + 12·L·T·d per trained token (PaLM's accounting), N = the weight matrices outside the
    embeddings (biases and norms are not matmuls; the anchors count the same way)."""
    embedding_names = ("embed", "position", "image_row", "image_column")  # lookups, not matmuls
    matmul = sum(p.numel() for name, p in model.named_parameters()
                 if p.dim() >= 2 and not any(part in name for part in embedding_names))
    return 6 * matmul + 12 * layers * seq_len * d_model


def measured_matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int | None = None,
                         repeats: int = 5, tries: int = 3) -> float:
    """FLOP/s of a square matmul on this device and dtype, the best of `tries` timings (a busy
    moment would otherwise lower the peak and lift every MFU above what the device did). The side
    is 8192 on a GPU, as the anchors measure it (2048 leaves an H200 well below its peak, which
    would lift every MFU), and 2048 on a CPU."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(tries):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best
