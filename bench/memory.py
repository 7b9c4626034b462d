"""The prior's memory per GPU: what a preset needs on N GPUs of a given memory, training and sampling.

Counted on the meta device (nothing is allocated; runs on any machine, the paper's 12B prior too):
- parameters, counted from the model the preset builds;
- training per GPU: fp32 weights, fp32 gradients and AdamW's two fp32 moments, each divided by N
  under FSDP (`prior.parallel: fsdp`) or whole on every GPU under DDP; FSDP's transient buffers
  (one block's parameters gathered in bf16, two at once with prefetching, and its fp32 gradients
  before they are reduce-scattered);
- activations at the micro-batch, measured: a teacher-forced forward of the bf16 model (the
  MixedPrecisionPolicy's compute dtype) on the meta device with `saved_tensors_hooks` adding up
  every tensor autograd keeps for the backward pass, attention keeping what a flash kernel keeps
  (q, k, v, the output and the fp32 log-sum-exp: the segments backend on CUDA; the meta device
  itself has only the math kernel, which keeps every fp32 score); with activation checkpointing,
  what each block keeps is its input, plus one block's activations while it is recomputed;
- sampling: the bf16 weights on one GPU and the KV cache, `KVCache.bytes_per_row` a sequence
  (twice the rows with classifier-free guidance), and the rows that fit (`sample.run.fitting_batch`'s
  rule: 90% of what the weights leave free).

    python bench/memory.py --preset paper --gpus 8 16 32 64 --gpu-memory-gb 80

Prints one JSON document (and writes it to `--out`): the plan per GPU count, and the smallest
count on which training fits.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from common import emit

from dalle_pipeline.components.config import resolve
from dalle_pipeline.components.presets import PRESETS
from dalle_pipeline.components.prior.model import KVCache, Prior, PriorModelConfig

GiB = 2**30
FREE_SHARE = 0.9  # of a GPU's memory the plan may fill (the rest: CUDA context, allocator fragmentation)


def prior_config(preset: str, text_vocab: int | None, image_vocab: int | None) -> tuple[PriorModelConfig, object]:
    """The preset's prior architecture with its data's sizes: the tokenizer's vocabulary and text length, the
    tokenizer's grid (the dVAE's: image size / 2^(groups-1); a pretrained VQGAN's f16) and codebook."""
    cfg = resolve(preset)
    image_size = cfg.corpus.image_size
    pretrained = cfg.dvae.pretrained
    grid = image_size // 16 if pretrained is not None else image_size // cfg.dvae.downsample
    codebook = 16384 if pretrained is not None else cfg.dvae.codebook_size
    fields = cfg.prior.model_dump(include=set(PriorModelConfig.model_fields) - {"text_vocab", "image_vocab",
                                                                               "text_len", "grid_size"})
    model_cfg = PriorModelConfig(**fields, text_vocab=text_vocab or cfg.tokenizer.vocab_size,
                                 image_vocab=image_vocab or codebook, text_len=cfg.tokenizer.text_len, grid_size=grid)
    return model_cfg, cfg


class FlashLikeAttention(torch.autograd.Function):
    """Attention's shape and what a flash kernel saves for backward, nothing computed (meta tensors)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        log_sum_exp = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, log_sum_exp)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def flash_like_attention():
    """The prior's attention (its math path, which the meta device takes) as `FlashLikeAttention`."""
    from dalle_pipeline.components.prior import model as prior_model

    original = prior_model.math_attention
    prior_model.math_attention = lambda q, k, v, mask, dropout=0.0: FlashLikeAttention.apply(q, k, v)
    try:
        yield
    finally:
        prior_model.math_attention = original


@contextlib.contextmanager
def saved_bytes(total: list[int], model: torch.nn.Module):
    """Adds the bytes of every tensor autograd saves for the backward pass to total[0], but the model's own
    parameters (a linear layer keeps its weight, or a view of it: weights are counted apart, and FSDP frees
    the gathered ones after the forward pass and gathers them again for the backward)."""
    parameters = {id(parameter) for parameter in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in parameters and (tensor._base is None or id(tensor._base) not in parameters):
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def activation_bytes(model: Prior, cfg: PriorModelConfig, batch: int) -> dict[str, int]:
    """Saved activations of a teacher-forced forward at `batch` rows: the whole model's, one block's, and the
    model's with every block checkpointed (block inputs, one block recomputed, and everything outside blocks)."""
    text = torch.zeros(batch, cfg.text_len, dtype=torch.long, device="meta")
    image = torch.zeros(batch, cfg.image_len, dtype=torch.long, device="meta")
    whole = [0]
    with flash_like_attention(), saved_bytes(whole, model):
        model(text, image)
    block = [0]
    x = torch.zeros(batch, cfg.seq_len, cfg.d_model, dtype=torch.bfloat16, device="meta", requires_grad=True)
    with flash_like_attention(), saved_bytes(block, model):
        model.blocks[0](x, model.training_masks(x.device)[0])
    block_input = batch * cfg.seq_len * cfg.d_model * 2
    outside = whole[0] - cfg.layers * block[0]
    return {"whole": whole[0], "block": block[0],
            "checkpointed": cfg.layers * block_input + block[0] + max(outside, 0)}


def plan(params: int, block_params: int, activations: int, gpus: int, fsdp: bool, gpu_bytes: float) -> dict:
    shard = gpus if fsdp else 1
    parts = {"weights_fp32": 4 * params / shard, "gradients_fp32": 4 * params / shard,
             "adam_moments_fp32": 8 * params / shard,
             "fsdp_transient": block_params * (2 * 2 + 4) if fsdp else 0, "activations": activations}
    total = sum(parts.values())
    return {"gpus": gpus, **{name: value / GiB for name, value in parts.items()}, "total_gib": total / GiB,
            "fits": total <= FREE_SHARE * gpu_bytes}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128])
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, GiB")
    parser.add_argument("--micro-batch", type=int, default=1, help="rows a GPU takes per forward pass")
    parser.add_argument("--text-vocab", type=int, help="the BPE's size (default: the preset's tokenizer.vocab_size)")
    parser.add_argument("--image-vocab", type=int, help="the codebook's size (default: the preset's tokenizer)")
    parser.add_argument("--guidance", action="store_true", help="sampling with classifier-free guidance (2 rows)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)

    model_cfg, cfg = prior_config(args.preset, args.text_vocab, args.image_vocab)
    with torch.device("meta"):
        model = Prior(model_cfg).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in model.blocks[0].parameters())
    activations = activation_bytes(model, model_cfg, args.micro_batch)
    gpu_bytes = args.gpu_memory_gb * GiB
    fsdp = cfg.prior.parallel == "fsdp"
    plans = {name: [plan(params, block_params, activations[key], gpus, parallel == "fsdp", gpu_bytes)
                    for gpus in args.gpus]
             for name, key, parallel in (("fsdp", "whole", "fsdp"), ("fsdp_checkpointed", "checkpointed", "fsdp"),
                                         ("ddp", "whole", "ddp"))}
    smallest = {name: next((row["gpus"] for row in rows if row["fits"]), None) for name, rows in plans.items()}
    weights_bf16 = 2 * params
    per_row = KVCache.bytes_per_row(model_cfg, torch.bfloat16) * (2 if args.guidance else 1)
    rows_fit = int(max(0.0, FREE_SHARE * gpu_bytes - weights_bf16) // per_row)
    result = {
        "bench": "memory",
        "preset": args.preset,
        "settings": vars(args),
        "dims": {**model_cfg.to_dict(), "seq_len": model_cfg.seq_len},
        "parameters": params,
        "block_parameters": block_params,
        "preset_parallel": cfg.prior.parallel,
        "activations_gib_per_micro_batch": {name: value / GiB for name, value in activations.items()},
        "training_per_gpu": plans,
        "smallest_gpu_count_that_fits": smallest,
        "preset_fits_on": smallest["fsdp" if fsdp else "ddp"],
        "sampling_one_gpu": {"weights_bf16_gib": weights_bf16 / GiB, "kv_cache_gib_per_row": per_row / GiB,
                             "rows_that_fit": rows_fit, "preset_batch_size": cfg.sample.batch_size,
                             "kv_cache_gib_at_preset_batch": cfg.sample.batch_size * per_row / GiB},
        "assumptions": "AdamW fp32 moments, fp32 master weights and gradients; bf16 compute; "
                       f"{FREE_SHARE:.0%} of a GPU usable; no optimizer or activation offloading",
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
