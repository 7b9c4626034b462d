"""Attention kernels for the prior: plain math, FlexAttention, and text-plus-segments.

Row and column attention, as the paper has them, are one pattern: a query in the text attends
causally over the text; a query in the image attends to all the text plus the earlier tokens of
its own segment of `grid` tokens (its row, or its column once the grid is transposed).
`segment_attention` computes exactly that and nothing more:

- text queries over text keys: one causal flash kernel (text_len + 1 long);
- image queries over text keys: one non-causal flash kernel, about a third of the dense causal pairs;
- image queries over their segment: batched (grid x grid) matmuls, too small for flash's tiles;
- the two image parts merged by their log-sum-exps, as ring attention merges its blocks.

The backward pass follows ring attention too: each part's flash backward is given the merged
output and log-sum-exp, which makes its softmax the true one, and the segment part is done by hand.
Of the masked-out pairs only the upper halves of the small segment blocks are ever scored, where a
FlexAttention block mask visits every 128x128 block that one allowed pair falls in (all of them,
for a column layer).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   dropout: float = 0.0) -> torch.Tensor:
    """Attention as plain ops. On CPU at DALL-E's short sequences this beats SDPA's flash kernel,
    whose backward with a boolean mask took 38% of a training step (bench/prior.py: 13k against 9k
    tokens/s at 6 layers, d 192, bf16). The mask enters as an additive bias of its own size, which
    one batched matmul adds with the scale (no masked_fill and no multiply over the scores), and
    the softmax runs in the scores' dtype: the CPU and CUDA kernels accumulate bf16 in fp32, and
    autocast's fp32 softmax was rounded back to bf16 for the values' matmul anyway. `mask`: (Lq, Lk)
    boolean, True where a query may attend; None means causal."""
    scale = q.shape[-1] ** -0.5
    if mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(k.shape[-2] - q.shape[-2])
    scores_dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
    bias = torch.zeros(mask.shape, dtype=scores_dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    scores = torch.baddbmm(bias, q.reshape(-1, *q.shape[-2:]), k.reshape(-1, *k.shape[-2:]).transpose(-1, -2),
                           alpha=scale).view(*q.shape[:-1], k.shape[-2])
    with torch.autocast(q.device.type, enabled=False):
        weights = scores.softmax(dim=-1).to(v.dtype)
    if dropout:
        weights = F.dropout(weights, dropout)
    return weights @ v


@functools.cache
def flex_attention(compiled: bool):
    """flex_attention, compiled into a fused kernel where it runs on CUDA (eager it materialises
    the full score matrix); inside an already compiled model the nested compile is inlined."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False) if compiled else flex


def flex_block_mask(allowed: torch.Tensor, device: torch.device):
    """A FlexAttention BlockMask from a boolean (L, L) mask (True = may attend)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch, head, q_index, kv_index):
        return allowed[q_index, kv_index]

    return create_block_mask(mask_mod, None, None, allowed.shape[0], allowed.shape[1], device=device)


@dataclass(frozen=True)
class Segments:
    """The layout `segment_attention` serves: `text_positions` leading text keys seen by every image
    query, then image tokens in raster order, in segments of `grid` (rows, or columns if `transpose`)."""

    text_positions: int
    grid: int
    transpose: bool
    boolean: torch.Tensor | None = field(default=None, compare=False, repr=False)  # where flash is missing


def segment_attention_supported(q: torch.Tensor) -> bool:
    """Flash kernels exist for any dtype on CPU, for half precision only on CUDA."""
    return q.device.type == "cpu" or q.dtype in (torch.float16, torch.bfloat16)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Segments) -> torch.Tensor:
    """(B, H, L, d) queries, keys and values -> (B, H, L, d) outputs under the `layout` mask: exact,
    equal to SDPA with the boolean row or column mask of `model.build_mask`."""
    image = q.shape[2] - layout.text_positions
    if not 0 < image <= layout.grid**2:
        raise ValueError(f"{q.shape[2]} positions do not fit {layout.text_positions} text positions and a "
                         f"{layout.grid}x{layout.grid} grid")
    return _SegmentAttention.apply(q, k, v, layout.text_positions, layout.grid, layout.transpose)


def _flash_forward(q, k, v, causal: bool, scale: float):
    """(output, log-sum-exp (B, H, Lq) fp32, what the backward needs) from the device's flash kernel."""
    if q.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, rng_state, unused)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse, ()


def _flash_backward(grad_out, q, k, v, out, lse, causal: bool, scale: float, saved: tuple):
    """Gradients of q, k, v, given the output and log-sum-exp the softmax is to be normalised by."""
    if q.is_cuda:
        cum_q, cum_k, max_q, max_k, rng_state, unused = saved
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, rng_state, unused, scale=scale)
    else:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, causal, scale=scale)
    return grads[:3]


def _to_segments(x: torch.Tensor, layout: Segments) -> torch.Tensor:
    """(B, H, n, ...) image positions -> (B, H, grid, grid, ...) segments, zero-padded to the full
    grid. The padding takes the last image position, which is after every real token of its row
    and its column: causal masking hides it from them."""
    grid = layout.grid
    pad = grid * grid - x.shape[2]
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2)
    x = x.unflatten(2, (grid, grid))
    return x.transpose(2, 3) if layout.transpose else x


def _from_segments(x: torch.Tensor, layout: Segments, image: int) -> torch.Tensor:
    if layout.transpose:
        x = x.transpose(2, 3)
    return x.flatten(2, 3)[:, :, :image]


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype the merges and the segment part compute in: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _split(text: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each (B, H, L, d) tensor's text positions, then each one's image positions."""
    return [x[:, :, :text] for x in tensors] + [x[:, :, text:] for x in tensors]


def _merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over keys A and keys B from each part's output and log-sum-exp: (output in `dtype`,
    log-sum-exp), both contiguous (flash's backward reads them densely)."""
    lse = torch.logaddexp(lse_a, lse_b)
    wide = _wide(dtype)
    out = out_a.to(wide) * (lse_a - lse).exp()[..., None] + out_b.to(wide) * (lse_b - lse).exp()[..., None]
    return out.to(dtype).contiguous(), lse.contiguous()


class _SegmentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, text_positions: int, grid: int, transpose: bool):
        layout = Segments(text_positions, grid, transpose)
        scale = q.shape[-1] ** -0.5
        qt, kt, vt, qi, ki, vi = _split(text_positions, q, k, v)
        out_text, lse_text, saved_text = _flash_forward(qt, kt, vt, True, scale)
        out_prefix, lse_prefix, saved_prefix = _flash_forward(qi, kt, vt, False, scale)
        out_image, lse_image = _merge(out_prefix, lse_prefix, *_segment_forward(qi, ki, vi, layout, scale), q.dtype)
        ctx.layout, ctx.scale = layout, scale
        ctx.saved_text, ctx.saved_prefix = saved_text, saved_prefix
        ctx.save_for_backward(q, k, v, out_text, lse_text, out_image, lse_image)
        return torch.cat([out_text, out_image], dim=2)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out_text, lse_text, out_image, lse_image = ctx.saved_tensors
        layout, scale, text, wide = ctx.layout, ctx.scale, ctx.layout.text_positions, _wide(q.dtype)
        qt, kt, vt, qi, ki, vi = _split(text, q, k, v)
        grad_out = grad_out.to(q.dtype)
        grad_text, grad_image = grad_out[:, :, :text].contiguous(), grad_out[:, :, text:].contiguous()
        dq_text, dk_text, dv_text = _flash_backward(grad_text, qt, kt, vt, out_text, lse_text, True, scale,
                                                    ctx.saved_text)
        dq_prefix, dk_prefix, dv_prefix = _flash_backward(grad_image, qi, kt, vt, out_image, lse_image, False, scale,
                                                          ctx.saved_prefix)
        dq_segment, dk_segment, dv_segment = _segment_backward(grad_image, qi, ki, vi, out_image, lse_image,
                                                               layout, scale)
        dq = torch.cat([dq_text, (dq_prefix.to(wide) + dq_segment).to(q.dtype)], dim=2)
        dk = torch.cat([(dk_text.to(wide) + dk_prefix).to(k.dtype), dk_segment.to(k.dtype)], dim=2)
        dv = torch.cat([(dv_text.to(wide) + dv_prefix).to(v.dtype), dv_segment.to(v.dtype)], dim=2)
        return dq, dk, dv, None, None, None


def _segment_scores(qi, ki, layout: Segments, scale: float) -> torch.Tensor:
    """Scores (B, H, grid, grid, grid), widened, of each image query against its segment, causal."""
    wide = _wide(qi.dtype)
    scores = (_to_segments(qi, layout).to(wide) @ _to_segments(ki, layout).to(wide).transpose(-1, -2)) * scale
    causal = torch.ones(layout.grid, layout.grid, dtype=torch.bool, device=qi.device).tril()
    return scores.masked_fill(~causal, float("-inf"))


def _segment_forward(qi, ki, vi, layout: Segments, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (B, H, n, d) and log-sum-exps (B, H, n), widened, of image queries over their segments
    alone (every query sees itself, so each log-sum-exp is finite)."""
    scores = _segment_scores(qi, ki, layout, scale)
    lse = scores.logsumexp(dim=-1)
    out = (scores - lse[..., None]).exp() @ _to_segments(vi, layout).to(scores.dtype)
    image = qi.shape[2]
    return _from_segments(out, layout, image), _from_segments(lse, layout, image)


def _segment_backward(grad_image, qi, ki, vi, out_image, lse_image, layout: Segments, scale: float):
    """Gradients from the segment part, with its softmax normalised by the merged log-sum-exp:
    dS = P * (dP - rowsum(dO * O)), as flash attention's backward computes it."""
    image = qi.shape[2]
    probs = (_segment_scores(qi, ki, layout, scale) - _to_segments(lse_image, layout)[..., None]).exp()
    def segments(x):
        return _to_segments(x, layout).to(probs.dtype)

    grad_s = segments(grad_image)
    grad_probs = grad_s @ segments(vi).transpose(-1, -2)
    grad_scores = probs * (grad_probs - (grad_s * segments(out_image)).sum(dim=-1, keepdim=True)) * scale
    dq = grad_scores @ segments(ki)
    dk = grad_scores.transpose(-1, -2) @ segments(qi)
    dv = probs.transpose(-1, -2) @ grad_s
    return _from_segments(dq, layout, image), _from_segments(dk, layout, image), _from_segments(dv, layout, image)


def segment_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: Segments,
                             position: torch.Tensor) -> torch.Tensor:
    """One query (B, H, 1, d) at input index `position` (a 0-d device tensor) of a row or column
    layer, over a layer's KV cache (B, H, L, d): it reads the text and the `grid` entries of its
    segment, not the whole prefix. The text part is a flash kernel (the contiguous text block, read
    in place, with its log-sum-exp), the segment part `grid` gathered entries, merged as in training.
    Every shape is the same at every position, for CUDA graphs."""
    text, grid = layout.text_positions, layout.grid
    out_text, lse_text, _ = _flash_forward(q, keys[:, :, :text], values[:, :, :text], False, q.shape[-1] ** -0.5)
    held = position - text  # the image slot the query holds
    steps = torch.arange(grid, device=q.device)
    slots = held % grid + grid * steps if layout.transpose else held - held % grid + steps
    index = (text + slots).clamp(max=keys.shape[2] - 1)  # the grid's last slot is never an input
    wide = _wide(q.dtype)
    scores = (q.to(wide) @ keys.index_select(2, index).to(wide).transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(slots > held, float("-inf"))
    lse_segment = scores.logsumexp(dim=-1)
    out_segment = (scores - lse_segment[..., None]).exp() @ values.index_select(2, index).to(wide)
    return _merge(out_text, lse_text, out_segment, lse_segment, q.dtype)[0]
