"""FLOP accounting for model FLOPs utilisation (MFU): what the model needs against what the device can do."""

from __future__ import annotations

import time

import torch
from torch import nn


def transformer_flops_per_token(model: nn.Module, layers: int, seq_len: int, d_model: int) -> float:
    """6N + 12·L·T·d per trained token (PaLM's accounting), N = parameters outside the embeddings."""
    embedding_names = ("embed", "position", "image_row", "image_column")  # lookups, not matmuls
    non_embedding = sum(p.numel() for name, p in model.named_parameters()
                        if not any(part in name for part in embedding_names))
    return 6 * non_embedding + 12 * layers * seq_len * d_model


def measured_matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 2048,
                         repeats: int = 5, tries: int = 3) -> float:
    """FLOP/s of a square matmul on this device and dtype, the best of `tries` timings (a busy
    moment would otherwise lower the peak and lift every MFU above what the device did)."""
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
