"""A VQGAN image tokenizer (Esser et al. 2021), with the parameter names of taming-transformers' `VQModel`
and `GumbelVQ`, so their released checkpoints load as they are (`pretrained.py`).

Encoder: a 3x3 conv, `len(ch_mult)` levels of `num_res_blocks` residual blocks (GroupNorm(32), swish,
3x3 convs), self-attention blocks at the resolutions in `attn_resolutions`, a stride-2 conv (padded on
the right and bottom) between levels, a middle block-attention-block, GroupNorm, swish, 3x3 conv to
`z_channels`, then a 1x1 `quant_conv` to `embed_dim`. Quantiser: 'nearest' takes the code nearest in
squared distance (taming's VectorQuantizer); 'gumbel' the argmax of a 1x1 projection to a logit per
code (GumbelVQ, deterministic here: the argmax of the logits, no noise). The decoder mirrors the
encoder with `num_res_blocks + 1` blocks per level and nearest-neighbour upsampling plus a 3x3 conv.
Images are [0, 1] here and [-1, 1] inside. A diffusers `VQModel` (aMUSEd's) is the same network
under other names (`pretrained.py` renames it), with `distance: cdist` and, for aMUSEd, no middle
attention.

The tokenizer interface is the dVAE's (`encode`, `decode`, `cfg.grid_size`, `cfg.codebook_size`), so
the token Parquet, the prior, sampling and the bundle take either. `forward` is the fine-tuning pass
(`dvae.train`): the pixel loss, the perceptual and adversarial terms where configured, and taming's
codebook and commitment losses.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

ARCHITECTURE = "vqgan"  # the `architecture` a saved VQGAN's config names (a dVAE's names none)


class VQGANConfig(BaseModel):
    """The VQGAN's architecture at an image size; saved in its checkpoint's config.json, it rebuilds the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Literal["vqgan"] = ARCHITECTURE
    image_size: int = Field(256, ge=8, description="side of the square input images, in pixels")
    resolution: int = Field(256, ge=8, description="the resolution attn_resolutions counts from (taming's)")
    ch: int = Field(128, ge=32, description="base width")
    ch_mult: tuple[int, ...] = Field((1, 1, 2, 2, 4), min_length=1, description="width multiple of each level")
    num_res_blocks: int = Field(2, ge=1)
    attn_resolutions: tuple[int, ...] = Field((16,), description="resolutions with self-attention blocks")
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = Field(256, ge=1)
    embed_dim: int = Field(256, ge=1, description="dimension of each code")
    codebook_size: int = Field(16384, ge=2, description="number of image codes")
    quantizer: Literal["nearest", "gumbel"] = "nearest"
    distance: Literal["expanded", "cdist"] = Field(
        "expanded", description="nearest: how distances are computed, as the authors' code does, so near-ties "
        "break the same way: |z|^2 + |e|^2 - 2 z.e (taming) or torch.cdist (diffusers)")
    mid_attention: bool = Field(True, description="an attention block between the middle residual blocks")
    norm_groups: int = Field(32, ge=1, description="GroupNorm groups")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(n_in, groups), nn.Conv2d(n_in, n_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(n_out, groups), nn.Conv2d(n_out, n_out, 3, padding=1)
        if n_in != n_out:
            self.nin_shortcut = nn.Conv2d(n_in, n_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = getattr(self, "nin_shortcut", None)
        return (x if shortcut is None else shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the positions, 1x1 convs for q, k, v and the output."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        batch, channels, height, width = x.shape
        q, k, v = (layer(h).flatten(2) for layer in (self.q, self.k, self.v))  # (B, C, HW)
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * channels**-0.5, dim=2)  # (B, HWq, HWk)
        attended = torch.bmm(v, weights.transpose(1, 2)).view(batch, channels, height, width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution: its residual blocks, each followed by an attention block where the level has them."""

    def __init__(self, widths: list[tuple[int, int]], attention: bool, groups: int) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(n_in, n_out, groups) for n_in, n_out in widths)
        self.attn = nn.ModuleList(AttnBlock(n_out, groups) for _, n_out in widths) if attention else nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[index](x)
        return x


class _Middle(nn.Module):
    def __init__(self, channels: int, cfg: VQGANConfig) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg.norm_groups)
        if cfg.mid_attention:
            self.attn_1 = AttnBlock(channels, cfg.norm_groups)
        self.block_2 = ResnetBlock(channels, channels, cfg.norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_1(x)
        return self.block_2(self.attn_1(x) if hasattr(self, "attn_1") else x)


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        resolution, n_in = cfg.resolution, cfg.ch
        for level, multiple in enumerate(cfg.ch_mult):
            n_out = cfg.ch * multiple
            stage = _Level([(n_in if i == 0 else n_out, n_out) for i in range(cfg.num_res_blocks)],
                           resolution in cfg.attn_resolutions, cfg.norm_groups)
            if level < len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(n_out)
                resolution //= 2
            self.down.append(stage)
            n_in = n_out
        self.mid = _Middle(n_in, cfg)
        self.norm_out = _norm(n_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(n_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        levels = len(cfg.ch_mult)
        n_in = cfg.ch * cfg.ch_mult[-1]
        resolution = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, n_in, 3, padding=1)
        self.mid = _Middle(n_in, cfg)
        stages: list[_Level] = []
        for level in reversed(range(levels)):  # lowest resolution first; stored highest first, as taming
            n_out = cfg.ch * cfg.ch_mult[level]
            stage = _Level([(n_in if i == 0 else n_out, n_out) for i in range(cfg.num_res_blocks + 1)],
                           resolution in cfg.attn_resolutions, cfg.norm_groups)
            if level > 0:
                stage.upsample = Upsample(n_out)
                resolution *= 2
            stages.insert(0, stage)
            n_in = n_out
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(n_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(n_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class NearestCodebook(nn.Module):
    def __init__(self, size: int, dim: int, distance: str) -> None:
        super().__init__()
        self.embedding = nn.Embedding(size, dim)
        self.distance = distance

    def tokens(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> the nearest code of each position (B, h, w)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codes = self.embedding.weight
        if self.distance == "cdist":
            distance = torch.cdist(flat, codes)
        else:
            distance = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.T
        return distance.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens).permute(0, 3, 1, 2)


class GumbelCodebook(nn.Module):
    def __init__(self, size: int, dim: int, n_in: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(n_in, size, 1)
        self.embed = nn.Embedding(size, dim)

    def tokens(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z).argmax(1)

    def vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens).permute(0, 3, 1, 2)


class VQGAN(nn.Module):
    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.downsample:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by the VQGAN's downsampling {cfg.downsample}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.quantize = NearestCodebook(cfg.codebook_size, cfg.embed_dim, cfg.distance) if cfg.quantizer == "nearest" \
            else GumbelCodebook(cfg.codebook_size, cfg.embed_dim, cfg.embed_dim)

    def forward(self, images: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fine-tuning pass: images in [0, 1] -> (reconstructions in about [0, 1], unclamped so the
        gradient reaches every pixel; tokens (B, h, w); the quantiser's loss). nearest: taming's
        codebook loss ||sg(z) - e||^2 + COMMITMENT x ||z - sg(e)||^2, the codes passed straight
        through; gumbel: a straight-through gumbel-softmax sample at `temperature`, no loss."""
        z = self.quant_conv(self.encoder(images * 2 - 1))
        if isinstance(self.quantize, GumbelCodebook):
            logits = self.quantize.proj(z)
            one_hot = F.gumbel_softmax(logits, tau=temperature, hard=True, dim=1)
            quantised = torch.einsum("bkhw,kd->bdhw", one_hot, self.quantize.embed.weight)
            tokens, loss = logits.argmax(1), z.new_zeros(())
        else:
            with torch.no_grad():
                tokens = self.quantize.tokens(z)
            vectors = self.quantize.vectors(tokens)
            loss = (z.detach() - vectors).pow(2).mean() + self.COMMITMENT * (z - vectors.detach()).pow(2).mean()
            quantised = z + (vectors - z).detach()
        return (self.decoder(self.post_quant_conv(quantised)) + 1) / 2, tokens, loss

    COMMITMENT = 0.25  # taming's beta

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images in [0, 1], (B, 3, H, W) -> tokens (B, h*w), row-major."""
        z = self.quant_conv(self.encoder(images * 2 - 1))
        return self.quantize.tokens(z).flatten(1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, h*w) -> images in [0, 1], (B, 3, H, W)."""
        grid = self.cfg.grid_size
        vectors = self.quantize.vectors(tokens.long().view(-1, grid, grid))
        return ((self.decoder(self.post_quant_conv(vectors)).clamp(-1, 1) + 1) / 2)
