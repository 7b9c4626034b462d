"""The DALL-E prior: a decoder-only transformer over [BOS, text tokens, image tokens].

Input layout (length text_len + image_len): index 0 is BOS, indices 1..text_len hold the text
tokens, indices text_len+1.. hold image tokens 0..image_len-2. The output at index p predicts
token p of the target sequence [text tokens, image tokens]: indices < text_len predict text,
the rest predict image tokens. Padding is a learned token per text position (the paper's
choice), so the model knows where a caption ended and the null caption is all padding.

Attention per layer, as the paper has it: text is causal; every image position sees all text;
image-to-image is a row band, a column, or a causal conv window around the token the position
holds. The masks are boolean (True = may attend), built once per shape.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from pydantic import ConfigDict, Field
from torch import nn

from .. import checkpoint
from ..config import PriorArchitecture

from .attention import (
    Segments,
    flex_attention,
    flex_block_mask,
    math_attention,
    segment_attention,
    segment_attention_supported,
    segment_decode_attention,
)

KIND = "prior"  # the checkpoint kind of a prior folder


class PriorModelConfig(PriorArchitecture):
    """The prior's architecture (`config.PriorArchitecture`, the fields a user sets) and the vocabularies
    and lengths its data fixes; saved in its checkpoint's config.json, it rebuilds the model alone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_vocab: int = Field(512, ge=1, description="BPE vocabulary size, specials included")
    image_vocab: int = Field(256, ge=2, description="dVAE codebook size")
    text_len: int = Field(24, ge=1, description="text positions")
    grid_size: int = Field(8, ge=1, description="side of the image token grid")

    @property
    def image_len(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    @property
    def bos_id(self) -> int:
        """Text embedding rows: [text vocab | one pad token per position | BOS]."""
        return self.text_vocab + self.text_len

    def pad_id(self, position: int) -> int:
        return self.text_vocab + position

    def to_dict(self) -> dict:
        return self.model_dump()


def layer_attention_types(cfg: PriorModelConfig) -> list[str]:
    """The paper's schedule: column where (i - 2) % 4 == 0, conv on the last layer, row elsewhere."""
    if cfg.attention == "dense":
        return ["dense"] * cfg.layers
    kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(cfg.layers)]
    kinds[-1] = "conv"
    return kinds


def build_mask(cfg: PriorModelConfig, kind: str) -> torch.Tensor:
    """(seq_len, seq_len) bool mask over input indices for one attention type."""
    length, text_positions, grid = cfg.seq_len, cfg.text_len + 1, cfg.grid_size
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    if kind == "dense":
        return causal
    index = torch.arange(length)
    held = index - text_positions  # image token held at each index (negative for text)
    is_image = held >= 0
    row, col = held.div(grid, rounding_mode="floor"), held.remainder(grid)
    q_row, k_row = row[:, None], row[None, :]
    q_col, k_col = col[:, None], col[None, :]
    if kind == "row":
        image_to_image = q_row == k_row
    elif kind == "column":
        image_to_image = q_col == k_col
    elif kind == "conv":
        half = cfg.conv_kernel // 2
        image_to_image = ((q_row - k_row).abs() <= half) & ((q_col - k_col).abs() <= half)
    else:
        raise ValueError(f"unknown attention type {kind!r}")
    mask = torch.where(is_image[:, None] & is_image[None, :], image_to_image, True)
    return mask & causal


def prior_loss(text_logits: torch.Tensor, image_logits: torch.Tensor, text_targets: torch.Tensor,
               image_targets: torch.Tensor, text_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """text_weight x text cross-entropy + (1 - text_weight) x image cross-entropy, in nats per token;
    the two parts come back as detached device tensors (reading them would wait for the device).

    A free function, not a method: under DDP the loss must be computed on the outputs of the
    wrapped module's forward, or gradients are not synchronised.
    """
    text_loss = F.cross_entropy(text_logits.flatten(0, 1).float(), text_targets.flatten())
    image_loss = F.cross_entropy(image_logits.flatten(0, 1).float(), image_targets.flatten())
    loss = text_weight * text_loss + (1 - text_weight) * image_loss
    return loss, {"text_loss": text_loss.detach(), "image_loss": image_loss.detach()}


class KVCache:
    """Preallocated keys and values for every layer: decoding writes one position per step."""

    def __init__(self, cfg: PriorModelConfig, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (cfg.layers, batch, cfg.heads, cfg.seq_len, cfg.d_model // cfg.heads)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)

    @staticmethod
    def bytes_per_row(cfg: PriorModelConfig, dtype: torch.dtype) -> int:
        """What one sequence's keys and values take: 2 x layers x seq_len x d_model values."""
        return 2 * cfg.layers * cfg.seq_len * cfg.d_model * torch.empty((), dtype=dtype).element_size()


class SelfAttention(nn.Module):
    def __init__(self, cfg: PriorModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.backend = cfg.attention_backend

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                start: int | torch.Tensor = 0, kv_len: int | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if isinstance(start, torch.Tensor):  # one position held on the device: no Python int per step
                cache.keys[layer].index_copy_(2, start.view(1), k.to(cache.keys.dtype))
                cache.values[layer].index_copy_(2, start.view(1), v.to(cache.values.dtype))
            else:
                cache.keys[layer, :, :, start : start + length] = k
                cache.values[layer, :, :, start : start + length] = v
            if isinstance(mask, Segments):  # one row or column layer's decode step: text + its segment
                out = segment_decode_attention(q, cache.keys[layer], cache.values[layer], mask, start)
                return self.proj(out.transpose(1, 2).reshape(batch, length, width))
            # attend over the first kv_len entries of the preallocated cache: shapes stay the same at
            # every step (what CUDA graphs and torch.compile need); the mask rows hide the positions
            # not written yet
            k, v = cache.keys[layer][:, :, :kv_len], cache.values[layer][:, :, :kv_len]
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, Segments) and (dropout or not segment_attention_supported(q)):
            mask = mask.boolean  # dropout, or fp32 on CUDA (no flash kernel): the same mask, as a boolean one
        if isinstance(mask, Segments):
            out = segment_attention(q, k, v, mask)
        elif isinstance(mask, torch.Tensor) or mask is None:  # boolean, or None for causal
            if self.backend == "sdpa" or (q.is_cuda and self.backend != "math"):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout)
            else:
                out = math_attention(q, k, v, mask, dropout)
        else:  # a FlexAttention BlockMask: only the blocks the mask allows are computed
            out = flex_attention(q.is_cuda)(q, k, v, block_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, cfg: PriorModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )
        # a training setting, not the architecture (`prior.activation_checkpointing`); never saved
        self.activation_checkpointing = False

    def forward(self, x, mask, cache=None, layer=0, start=0, kv_len=None):
        if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
            # only the block's input is kept for the backward pass, which runs the block again; the
            # recomputation calls `residual`, not the module, so FSDP's hooks (outside) gather once
            return torch.utils.checkpoint.checkpoint(self.residual, x, mask, use_reentrant=False)
        return self.residual(x, mask, cache, layer, start, kv_len)

    def residual(self, x, mask, cache=None, layer=0, start=0, kv_len=None):
        x = x + self.attn(self.norm1(x), mask, cache, layer, start, kv_len)
        return x + self.mlp(self.norm2(x))


class Prior(nn.Module):
    def __init__(self, cfg: PriorModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_embedding = nn.Embedding(cfg.text_vocab + cfg.text_len + 1, cfg.d_model)
        self.text_position = nn.Embedding(cfg.text_len + 1, cfg.d_model)
        self.image_embedding = nn.Embedding(cfg.image_vocab, cfg.d_model)
        self.image_row = nn.Embedding(cfg.grid_size, cfg.d_model)
        self.image_column = nn.Embedding(cfg.grid_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.text_head = nn.Linear(cfg.d_model, cfg.text_vocab + cfg.text_len, bias=False)
        self.image_head = nn.Linear(cfg.d_model, cfg.image_vocab, bias=False)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Every parameter's initial value (`init_parameter`), drawn from `generator` (None: torch's
        global one) in `named_parameters` order."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                self.init_parameter(name, param, generator)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill `tensor`, parameter `name` or a stand-in of its full shape, with its initial value: GPT-2's
        normal(0, 0.02) for weights and embeddings, scaled by 1/sqrt(2 x layers) on the projections into
        the residual stream; zero biases; LayerNorm weights one. One parameter at a time, in order, from
        one seeded generator: the same values whether the model is whole or sharded from the meta device
        (`prior.train.build`)."""
        module = self.get_submodule(name.rpartition(".")[0])
        if name.endswith("bias"):
            tensor.zero_()
        elif isinstance(module, nn.LayerNorm):
            tensor.fill_(1.0)
        elif name.endswith(("attn.proj.weight", "mlp.2.weight")):
            tensor.normal_(0.0, 0.02 / math.sqrt(2 * self.cfg.layers), generator=generator)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)

    @cached_property
    def _masks(self) -> dict[str, torch.Tensor]:
        return {kind: build_mask(self.cfg, kind) for kind in set(layer_attention_types(self.cfg))}

    def masks(self, device: torch.device) -> list[torch.Tensor]:
        """Boolean masks, one per layer (for decoding with the KV cache, and the SDPA path)."""
        masks = self._masks
        for kind, mask in masks.items():
            if mask.device != device:
                masks[kind] = mask.to(device)
        return [masks[kind] for kind in layer_attention_types(self.cfg)]

    def attention_backend(self, device: torch.device) -> str:
        """'auto' is text-plus-segments on CUDA, plain math attention elsewhere (where the CPU
        flash kernels lose to three plain ops at DALL-E's short sequences, in training and decoding)."""
        backend = self.cfg.attention_backend
        if backend == "auto":
            return "segments" if device.type == "cuda" else "math"
        return backend

    def decodes_by_segments(self, cache_keys: torch.Tensor) -> bool:
        """Whether `decode_step` reads only the text and one segment in row and column layers: with
        the segments backend, where a flash kernel exists for the cache's device and dtype."""
        return self.attention_backend(cache_keys.device) == "segments" and segment_attention_supported(cache_keys)

    def training_masks(self, device: torch.device) -> list:
        """What each layer's attention takes in the teacher-forced pass, built once per device:
        - 'segments': row and column layers a `Segments` layout; the conv layer a FlexAttention
          BlockMask on CUDA, its boolean mask elsewhere;
        - 'flex': a BlockMask for every layer;
        - 'sdpa' and 'math': the boolean masks.
        Dense layers take None everywhere but 'flex': causal, so SDPA takes its flash kernel."""
        backend = self.attention_backend(device)
        cache = self.__dict__.setdefault("_training_masks", {})
        if device not in cache:
            boolean = dict(zip(layer_attention_types(self.cfg), self.masks(device)))
            text_positions, grid = self.cfg.text_len + 1, self.cfg.grid_size
            built = {}
            for kind, allowed in boolean.items():
                if backend == "flex" or (backend == "segments" and kind == "conv" and device.type == "cuda"):
                    built[kind] = flex_block_mask(allowed, device)
                elif kind == "dense":
                    built[kind] = None
                elif backend == "segments" and kind in ("row", "column"):
                    built[kind] = Segments(text_positions, grid, transpose=kind == "column", boolean=allowed)
                else:
                    built[kind] = allowed
            cache[device] = built
        return [cache[device][kind] for kind in layer_attention_types(self.cfg)]

    def pad_text(self, text_tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Replace positions at or past each caption's length with that position's pad token."""
        positions = torch.arange(self.cfg.text_len, device=text_tokens.device)
        pads = self.cfg.text_vocab + positions
        return torch.where(positions[None, :] < lengths[:, None], text_tokens, pads[None, :])

    def embed(self, text: torch.Tensor, image: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Embed input indices [start, start + len): `text` covers indices < text_len+1, `image` the rest."""
        cfg = self.cfg
        parts = []
        if text.shape[1]:
            positions = torch.arange(start, start + text.shape[1], device=text.device)
            parts.append(self.text_embedding(text) + self.text_position(positions))
        if image.shape[1]:
            first = max(start - cfg.text_len - 1, 0)
            held = torch.arange(first, first + image.shape[1], device=image.device)
            rows, cols = held // cfg.grid_size, held % cfg.grid_size
            parts.append(self.image_embedding(image) + self.image_row(rows) + self.image_column(cols))
        return torch.cat(parts, dim=1)

    def input_text(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """[BOS, text tokens] (already padded)."""
        bos = torch.full_like(text_tokens[:, :1], self.cfg.bos_id)
        return torch.cat([bos, text_tokens], dim=1)

    def forward(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass. Returns (text logits (B, text_len, V_t+T), image logits (B, image_len, V_i))."""
        x = self.embed(self.input_text(text_tokens), image_tokens[:, :-1])
        for block, mask in zip(self.blocks, self.training_masks(x.device)):
            x = block(x, mask)
        x = self.norm(x)
        text_len = self.cfg.text_len
        return self.text_head(x[:, :text_len]), self.image_head(x[:, text_len:])

    # incremental decoding ------------------------------------------------------------------------
    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> KVCache:
        return KVCache(self.cfg, batch, device, dtype)

    def decode_step(self, image: torch.Tensor, position: torch.Tensor, cache: KVCache,
                    kv_len: int | None = None) -> torch.Tensor:
        """One image token per row (B,) at input index `position` (a 0-d long tensor on the device)
        through the cache; returns the image logits there (B, V_i).

        Every shape and every op is the same at every position (the position is data, not a Python
        int), so one compiled graph, or one captured CUDA graph, serves the whole decode. With the
        segments backend (the default on CUDA) and a flash kernel for the cache's dtype, row and
        column layers read the text and the token's own segment of the cache. The other layers (and
        every layer otherwise) read the first `kv_len` entries (None: all), which must cover
        `position`: a sampler keeps a few graphs of growing `kv_len`, so they read little more
        than the prefix.
        """
        grid, text_positions = self.cfg.grid_size, self.cfg.text_len + 1
        held = position - text_positions  # the image position of the token fed
        x = (self.image_embedding(image) + self.image_row(held // grid) + self.image_column(held % grid))[:, None]
        rows = position.view(1)
        segments = self.decodes_by_segments(cache.keys)
        for layer, (block, kind, mask) in enumerate(zip(self.blocks, layer_attention_types(self.cfg),
                                                        self.masks(x.device))):
            if segments and kind in ("row", "column"):  # reads the text and one segment of the cache
                mask = Segments(text_positions, grid, transpose=kind == "column")
            else:
                mask = mask.index_select(0, rows)[:, :kv_len]
            x = block(x, mask, cache, layer, position, kv_len)
        return self.image_head(self.norm(x[:, -1]))

    def step(self, text: torch.Tensor, image: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Run input indices [start, start + n) through the cache; returns the image logits of the last one."""
        x = self.embed(text, image, start)
        end = start + x.shape[1]
        for layer, (block, mask) in enumerate(zip(self.blocks, self.masks(x.device))):
            x = block(x, mask[start:end], cache, layer, start)
        return self.image_head(self.norm(x[:, -1]))


def load(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> Prior:
    """The prior saved in `checkpoint_dir` (weights and the config that rebuilds it) on `device`, in eval
    mode. Built on the meta device and given the file's tensors as its parameters: one copy of the
    weights in memory, never a random initialisation beside them."""
    state, config, _ = checkpoint.load(checkpoint_dir, KIND, device=device)
    with torch.device("meta"):
        model = Prior(PriorModelConfig(**config))
    model.load_state_dict(state, assign=True)
    return model.eval()
