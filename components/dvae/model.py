"""The discrete VAE after OpenAI's released `dall_e` layout, trained as the paper has it.

Encoder: 7x7 input conv, `num_groups` groups of residual blocks (widths 1, 2, 4, 8 x n_hid) with
2x max-pool between groups, then ReLU + 1x1 conv to codebook logits. Decoder: 1x1 conv from the
(relaxed) one-hot codes, mirrored groups with nearest-neighbour upsampling, ReLU + 1x1 conv to
6 channels: the logit-Laplace location and log-scale of each RGB pixel. `decoder_layout: openai` is
OpenAI's released decoder tensor for tensor (its input conv to `decoder_width` channels, residual
kernels 1, 3, 3, 3), so `pretrained.py` loads their weights; 'mirrored' is this project's first
layout, which checkpoints written before the field have. Residual branches are
scaled by 1 / (number of residual blocks)^2 so deep stacks start close to the identity.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn

from .. import checkpoint
from ..config import DVAEArchitecture
from ..images import psnr, to_float, to_uint8
from .vqgan import ARCHITECTURE as VQGAN_ARCHITECTURE
from .vqgan import VQGAN, VQGANConfig

KIND = "dvae"  # the checkpoint kind of a dVAE folder
# what a checkpoint saved before these fields existed was built with (the default is another now)
BEFORE_FIELDS = {"quantizer": "gumbel"}


class DVAEModelConfig(DVAEArchitecture):
    """The dVAE's architecture (`config.DVAEArchitecture`) at an image size; saved in its checkpoint's
    config.json, it rebuilds the model alone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(32, ge=8, description="side of the square input images, in pixels")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    def to_dict(self) -> dict:
        return self.model_dump()


def _widths(cfg: DVAEModelConfig) -> list[int]:
    return [cfg.n_hid * 2**i for i in range(cfg.num_groups)]


def code_channels(cfg: DVAEModelConfig) -> int:
    """Channels between encoder and decoder: a logit per code (gumbel), or the code vector (vq)."""
    return cfg.codebook_size if cfg.quantizer == "gumbel" else cfg.code_dim


class Codebook(nn.Module):
    """vq: `codebook_size` unit vectors of `code_dim`; a position takes the code nearest its encoder
    output by cosine. The codes are EMA cluster means of the encoder outputs they take (no gradient),
    initialised by spherical k-means on the first training batch; a code used less than
    `DEAD_CODE_COUNT` times a batch (EMA) is restarted at one of the batch's worst-represented encoder
    outputs (lowest cosine to their code: what the codebook misses, a rare colour say), and has
    `RESTART_COUNT` batches' worth of uses to prove itself. Every state is a buffer, so DDP's buffer
    broadcast keeps the workers on rank 0's codebook."""

    DEAD_CODE_COUNT = 1.0  # uses per batch, as EMA
    RESTART_COUNT = 2.0
    KMEANS_ITERS = 10

    def __init__(self, size: int, dim: int, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("codes", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("cluster_sum", torch.zeros(size, dim))
        self.register_buffer("cluster_count", torch.zeros(size))
        self.register_buffer("initialised", torch.tensor(False))

    def similarities(self, z: torch.Tensor) -> torch.Tensor:
        """unit vectors (B, D, h, w) -> cosine to every code (B, K, h, w), in fp32 under autocast too
        (bf16 cosines tie, and the argmax is the token)."""
        exact = torch.autocast(z.device.type, enabled=False) if z.device.type in ("cpu", "cuda") else nullcontext()
        with exact:
            return torch.einsum("bdhw,kd->bkhw", z.float(), self.codes.float())

    @torch.no_grad()
    def _kmeans(self, flat: torch.Tensor) -> None:
        size = self.codes.shape[0]
        picks = torch.randint(len(flat), (size,), device=flat.device) if len(flat) < size else \
            torch.randperm(len(flat), device=flat.device)[:size]
        codes = flat[picks].clone()
        for _ in range(self.KMEANS_ITERS):
            nearest = (flat @ codes.T).argmax(1)
            sums = torch.zeros_like(codes).index_add_(0, nearest, flat)
            counts = torch.bincount(nearest, minlength=size).float()
            codes = torch.where(counts[:, None] > 0, F.normalize(sums, dim=1), codes)
        self.codes.copy_(codes)
        self.cluster_sum.copy_(codes * self.RESTART_COUNT)
        self.cluster_count.fill_(self.RESTART_COUNT)
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(self, z: torch.Tensor, nearest: torch.Tensor) -> None:
        """One training batch: EMA of each code's cluster, dead codes restarted."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        if not bool(self.initialised):
            self._kmeans(flat)
            return
        size = self.codes.shape[0]
        index = nearest.flatten()
        counts = torch.bincount(index, minlength=size).float()
        sums = torch.zeros_like(self.cluster_sum).index_add_(0, index, flat)
        self.cluster_count.lerp_(counts, 1 - self.decay)
        self.cluster_sum.lerp_(sums, 1 - self.decay)
        self.codes.copy_(F.normalize(self.cluster_sum, dim=1))
        dead = self.cluster_count < self.DEAD_CODE_COUNT
        if dead.any():
            error = 1 - (flat * self.codes[index]).sum(1)  # 1 - cosine to the code each output took
            worst = error.topk(min(len(flat), 4 * int(dead.sum()))).indices
            fresh = flat[worst[torch.randperm(len(worst), device=flat.device)[: int(dead.sum())]]]
            if len(fresh) < int(dead.sum()):  # a batch smaller than the dead codes: repeat
                fresh = fresh[torch.arange(int(dead.sum()), device=flat.device) % len(fresh)]
            self.cluster_sum[dead] = fresh * self.RESTART_COUNT
            self.cluster_count[dead] = self.RESTART_COUNT
            self.codes[dead] = fresh


class ResidualBlock(nn.Module):
    """x + post_gain * four ReLU-conv pairs (widths n_in -> n_out/4 -> n_out/4 -> n_out/4 -> n_out) of
    `kernels`; a 1x1 conv on the identity path where the width changes."""

    ENCODER = (3, 3, 3, 1)
    DECODER = {"openai": (1, 3, 3, 3), "mirrored": (1, 3, 3, 1)}

    def __init__(self, n_in: int, n_out: int, post_gain: float, kernels: tuple[int, ...] = ENCODER) -> None:
        super().__init__()
        hidden = max(1, n_out // 4)
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, hidden, hidden, hidden, n_out]
        layers: list[nn.Module] = []
        for index, kernel in enumerate(kernels):
            layers += [nn.ReLU(), nn.Conv2d(widths[index], widths[index + 1], kernel, padding=kernel // 2)]
        self.res_path = nn.Sequential(*layers)
        self.post_gain = post_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    def __init__(self, cfg: DVAEModelConfig) -> None:
        super().__init__()
        post_gain = 1 / (cfg.num_groups * cfg.blocks_per_group) ** 2
        layers: list[nn.Module] = [nn.Conv2d(3, cfg.n_hid, 7, padding=3)]
        n_in = cfg.n_hid
        for index, width in enumerate(_widths(cfg)):
            for _ in range(cfg.blocks_per_group):
                layers.append(ResidualBlock(n_in, width, post_gain))
                n_in = width
            if index < cfg.num_groups - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.ReLU(), nn.Conv2d(n_in, code_channels(cfg), 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: DVAEModelConfig) -> None:
        super().__init__()
        post_gain = 1 / (cfg.num_groups * cfg.blocks_per_group) ** 2
        widths = list(reversed(_widths(cfg)))
        n_in = cfg.decoder_width if cfg.decoder_layout == "openai" else widths[0] // 2
        layers: list[nn.Module] = [nn.Conv2d(code_channels(cfg), n_in, 1)]
        for index, width in enumerate(widths):
            for _ in range(cfg.blocks_per_group):
                layers.append(ResidualBlock(n_in, width, post_gain, ResidualBlock.DECODER[cfg.decoder_layout]))
                n_in = width
            if index < cfg.num_groups - 1:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers += [nn.ReLU(), nn.Conv2d(n_in, 6, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.net(codes)


class DiscreteVAE(nn.Module):
    def __init__(self, cfg: DVAEModelConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.downsample:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by the downsampling {cfg.downsample}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.codebook = Codebook(cfg.codebook_size, cfg.code_dim, cfg.codebook_decay) if cfg.quantizer == "vq" else None

    # pixels <-> the logit-Laplace domain ------------------------------------------------------
    def map_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> [eps, 1 - eps], so logit(x) stays finite."""
        eps = self.cfg.logit_laplace_eps
        return (1 - 2 * eps) * x + eps

    def unmap_pixels(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.cfg.logit_laplace_eps
        return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)

    def forward(self, images: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: images in [0, 1] -> (codebook logits, decoder statistics, quantiser loss).

        gumbel: the statistics of the gumbel-softmax relaxed codes at `temperature`, no quantiser
        loss (the KL is the caller's). vq: of the nearest codes passed straight through, and the
        commitment loss ||z - sg(code)||^2 per position; the codebook takes this batch (training
        mode). Under DDP this call is what syncs gradients."""
        if self.codebook is None:
            logits = self.logits(images)
            codes = F.gumbel_softmax(logits, tau=temperature, hard=False, dim=1)
            return logits, self.decode_codes(codes), logits.new_zeros(())
        z = self._unit_codes(images)
        if self.training:
            self.codebook.update(z.detach(), self.codebook.similarities(z.detach()).argmax(1))
        similarities = self.codebook.similarities(z)
        quantised = self._code_vectors(similarities.argmax(1))
        commitment = (z - quantised).pow(2).sum(1).mean()
        return similarities, self.decode_codes(z + (quantised - z).detach()), commitment

    def _unit_codes(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(self.map_pixels(images)).float(), dim=1)

    def _code_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, h, w) -> their code vectors (B, D, h, w)."""
        return self.codebook.codes[tokens].permute(0, 3, 1, 2)

    # encode / decode --------------------------------------------------------------------------
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images in [0, 1], (B, 3, H, W) -> a score per code (B, K, h, w), the token its argmax:
        logits (gumbel), cosine similarities (vq)."""
        if self.codebook is not None:
            return self.codebook.similarities(self._unit_codes(images))
        return self.encoder(self.map_pixels(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images in [0, 1] -> tokens (B, h*w), row-major argmax codes."""
        return self.logits(images).argmax(dim=1).flatten(1)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(relaxed) one-hot codes (B, K, h, w), or code vectors (B, D, h, w) -> decoder statistics (B, 6, H, W)."""
        return self.decoder(codes.to(self.decoder.net[0].weight.dtype))

    def decode_stats_to_image(self, stats: torch.Tensor) -> torch.Tensor:
        return self.unmap_pixels(torch.sigmoid(stats[:, :3]))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, h*w) -> images in [0, 1], (B, 3, H, W)."""
        grid = self.cfg.grid_size
        tokens = tokens.long().view(-1, grid, grid)
        if self.codebook is not None:
            return self.decode_stats_to_image(self.decode_codes(self._code_vectors(tokens)))
        codes = F.one_hot(tokens, self.cfg.codebook_size).permute(0, 3, 1, 2)
        return self.decode_stats_to_image(self.decode_codes(codes))


# what encodes images to tokens and back: a dVAE this project trained, or a pretrained one (pretrained.py)
ImageTokenizer = DiscreteVAE | VQGAN


def logit_laplace_nll(stats: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image NLL (nats) of `target` (already mapped into (eps, 1-eps)) under the logit-Laplace.

    density: 1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b), with mu, log b = the decoder's
    6 output channels.
    """
    mu, log_b = stats[:, :3], stats[:, 3:].clamp(min=-7.0, max=7.0)
    logit_x = torch.logit(target)
    nll = (
        math.log(2.0) + log_b + torch.log(target) + torch.log1p(-target)
        + (logit_x - mu).abs() * torch.exp(-log_b)
    )
    return nll.flatten(1).sum(dim=1)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Per-image KL(q || uniform) summed over grid positions, q = softmax(logits) over the codebook."""
    log_q = F.log_softmax(logits, dim=1)
    kl = (log_q.exp() * log_q).sum(dim=1) + math.log(logits.shape[1])
    return kl.flatten(1).sum(dim=1)


def codebook_usage(tokens: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Perplexity of the code histogram and the share of codes used at least once."""
    counts = torch.bincount(tokens.flatten(), minlength=codebook_size).float()
    probs = counts / counts.sum()
    entropy = torch.special.entr(probs).sum()  # -p log p, 0 where p is 0
    return {"codebook_perplexity": entropy.exp(), "codes_used": (counts > 0).float().mean()}


@torch.no_grad()
def encode_images(model: ImageTokenizer, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """images (N, H, W, 3) uint8 -> their tokens (N, h*w), encoded in batches where the model is; on the CPU."""
    device = next(model.parameters()).device
    return torch.cat([model.encode(to_float(images[i : i + batch_size]).to(device)).cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def decode_tokens(model: ImageTokenizer, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """tokens (N, h*w) -> images in [0, 1] (N, 3, H, W), decoded in batches where the model is; on the CPU."""
    device = next(model.parameters()).device
    return torch.cat([model.decode(tokens[i : i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(tokens), batch_size)])


@torch.no_grad()
def reconstruct(model: ImageTokenizer, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """images (N, H, W, 3) uint8 through hard (argmax) codes and back, as uint8."""
    return to_uint8(decode_tokens(model, encode_images(model, images, batch_size), batch_size))


@torch.no_grad()
def reconstruction_quality(model: ImageTokenizer, images: np.ndarray,
                           batch_size: int) -> tuple[dict[str, float], torch.Tensor]:
    """Hard-code (argmax) reconstruction quality: what the prior's tokens can express, `batch_size` images a
    forward (the training batch: what fits where the tokenizer trains)."""
    tokens_all = encode_images(model, images, batch_size)
    errors = [F.mse_loss(decode_tokens(model, tokens_all[start : start + batch_size], batch_size),
                         to_float(images[start : start + batch_size]), reduction="none").flatten(1).mean(1)
              for start in range(0, len(images), batch_size)]
    mse = float(torch.cat(errors).mean())
    usage = {f"eval_{name}": float(value)
             for name, value in codebook_usage(tokens_all, model.cfg.codebook_size).items()}
    return {"eval_recon_mse": mse, "eval_psnr": psnr(mse), **usage}, tokens_all


def saved_architecture(config: dict) -> DVAEModelConfig | VQGANConfig:
    """The architecture a tokenizer checkpoint's config describes: a VQGAN's names itself, a dVAE's
    written before a field existed has BEFORE_FIELDS for it."""
    if config.get("architecture") == VQGAN_ARCHITECTURE:
        return VQGANConfig(**config)
    return DVAEModelConfig(**{**BEFORE_FIELDS, **config})


def build(model_cfg: DVAEModelConfig | VQGANConfig) -> ImageTokenizer:
    return VQGAN(model_cfg) if isinstance(model_cfg, VQGANConfig) else DiscreteVAE(model_cfg)


def load(checkpoint_dir: str | Path) -> ImageTokenizer:
    """The image tokenizer saved in `checkpoint_dir` (weights and the config that rebuilds it), in eval
    mode: a DiscreteVAE, or a VQGAN (a pretrained one the stage recorded) where its config says so."""
    state, config, _ = checkpoint.load(checkpoint_dir, KIND)
    model = build(saved_architecture(config))
    model.load_state_dict(state)
    return model.eval()
