"""One attention layer, forward and backward, at the prior's shape: each of our kernels and mask
layouts against SDPA's dense causal flash kernel (the baseline, in the same run).

Runs with torch alone. The GPU shape of #5 (the anchors time the same at batch 8):

    python bench/attention.py --batch 8 --heads 16 --head-dim 64 --text-len 256 --grid 32

Prints one JSON object: milliseconds per forward+backward of each variant, and each one's time
over the dense causal baseline (below 1: the mask costs less than dense attention).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import device_name, emit, step_seconds

from dalle_pipeline.components.prior.attention import (
    Segments,
    flex_attention,
    flex_block_mask,
    math_attention,
    segment_attention,
)
from dalle_pipeline.components.prior.model import PriorModelConfig, build_mask


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--text-len", type=int, default=24)
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    cfg = PriorModelConfig(text_len=args.text_len, grid_size=args.grid)
    text_positions = args.text_len + 1
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, cfg.seq_len, args.head_dim, device=device, dtype=dtype,
                           requires_grad=True) for _ in range(3))

    variants = {"sdpa_dense_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for kind in ("row", "column"):
        layout = Segments(text_positions, args.grid, transpose=kind == "column")
        variants[f"segments_{kind}"] = lambda layout=layout: segment_attention(q, k, v, layout)
    for kind in ("dense", "row", "column", "conv"):
        mask = build_mask(cfg, kind).to(device)
        if device.type == "cpu":  # FlexAttention has no backward on CPU
            variants[f"math_{kind}"] = lambda mask=mask: math_attention(q, k, v, mask)
            continue
        block_mask = flex_block_mask(mask, device)
        variants[f"flex_{kind}"] = lambda block_mask=block_mask: flex_attention(True)(q, k, v, block_mask=block_mask)
        variants[f"sdpa_mask_{kind}"] = lambda mask=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    milliseconds, errors = {}, {}
    for name, attention in variants.items():
        def forward_backward(attention=attention):
            attention().sum().backward()
            q.grad = k.grad = v.grad = None

        try:
            seconds = sorted(step_seconds(forward_backward, device, args.steps, warmup=3))
            milliseconds[name] = 1e3 * seconds[len(seconds) // 2]
        except Exception as error:  # one failing kernel must not lose the others' figures
            errors[name] = repr(error)[:300]
    baseline = milliseconds.get("sdpa_dense_causal")
    return emit({
        "bench": "attention_fwd_bwd",
        "settings": vars(args),
        "device": device_name(device),
        "dtype": str(dtype),
        "baseline": "sdpa_dense_causal: SDPA's causal kernel over the whole sequence",
        "ms": milliseconds,
        "over_dense_causal": {name: ms / baseline for name, ms in milliseconds.items()} if baseline else None,
        "errors": errors,
    }, args.out)


if __name__ == "__main__":
    main()
