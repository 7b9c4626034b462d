"""The discrete VAE after OpenAI's released `dall_e` layout, trained as the paper has it.

Encoder: 7x7 input conv, `num_groups` groups of residual blocks (widths 1, 2, 4, 8 x n_hid) with
2x max-pool between groups, then ReLU + 1x1 conv to codebook logits. Decoder: 1x1 conv from the
(relaxed) one-hot codes, mirrored groups with nearest-neighbour upsampling, ReLU + 1x1 conv to
6 channels: the logit-Laplace location and log-scale of each RGB pixel. Residual branches are
scaled by 1 / (number of residual blocks)^2 so deep stacks start close to the identity.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn

from .. import checkpoint
from ..config import DVAEArchitecture
from ..images import psnr, to_float, to_uint8

KIND = "dvae"  # the checkpoint kind of a dVAE folder


class DVAEModelConfig(DVAEArchitecture):
    """The dVAE's architecture (`config.DVAEArchitecture`) at an image size; saved in its checkpoint's
    config.json, it rebuilds the model alone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(32, ge=8, description="side of the square input images, in pixels")

    @property
    def downsample(self) -> int:
        return 2 ** (self.num_groups - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    def to_dict(self) -> dict:
        return self.model_dump()


def _widths(cfg: DVAEModelConfig) -> list[int]:
    return [cfg.n_hid * 2**i for i in range(cfg.num_groups)]


class ResidualBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, post_gain: float, first_kernel: int = 3) -> None:
        super().__init__()
        hidden = max(1, n_out // 4)
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(), nn.Conv2d(n_in, hidden, first_kernel, padding=first_kernel // 2),
            nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hidden, n_out, 1),
        )
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
        layers += [nn.ReLU(), nn.Conv2d(n_in, cfg.codebook_size, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: DVAEModelConfig) -> None:
        super().__init__()
        post_gain = 1 / (cfg.num_groups * cfg.blocks_per_group) ** 2
        widths = list(reversed(_widths(cfg)))
        layers: list[nn.Module] = [nn.Conv2d(cfg.codebook_size, widths[0] // 2, 1)]
        n_in = widths[0] // 2
        for index, width in enumerate(widths):
            for _ in range(cfg.blocks_per_group):
                layers.append(ResidualBlock(n_in, width, post_gain, first_kernel=1))
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

    # pixels <-> the logit-Laplace domain ------------------------------------------------------
    def map_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> [eps, 1 - eps], so logit(x) stays finite."""
        eps = self.cfg.logit_laplace_eps
        return (1 - 2 * eps) * x + eps

    def unmap_pixels(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.cfg.logit_laplace_eps
        return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)

    def forward(self, images: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: images in [0, 1] -> (codebook logits, decoder statistics of the
        gumbel-softmax relaxed codes at `temperature`). Under DDP this call is what syncs gradients."""
        logits = self.logits(images)
        codes = F.gumbel_softmax(logits, tau=temperature, hard=False, dim=1)
        return logits, self.decode_codes(codes)

    # encode / decode --------------------------------------------------------------------------
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images in [0, 1], (B, 3, H, W) -> codebook logits (B, K, h, w)."""
        return self.encoder(self.map_pixels(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images in [0, 1] -> tokens (B, h*w), row-major argmax codes."""
        return self.logits(images).argmax(dim=1).flatten(1)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(relaxed) one-hot codes (B, K, h, w) -> decoder statistics (B, 6, H, W)."""
        return self.decoder(codes)

    def decode_stats_to_image(self, stats: torch.Tensor) -> torch.Tensor:
        return self.unmap_pixels(torch.sigmoid(stats[:, :3]))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, h*w) -> images in [0, 1], (B, 3, H, W)."""
        grid = self.cfg.grid_size
        one_hot = F.one_hot(tokens.long().view(-1, grid, grid), self.cfg.codebook_size)
        codes = one_hot.permute(0, 3, 1, 2).to(next(self.parameters()).dtype)
        return self.decode_stats_to_image(self.decode_codes(codes))


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
def reconstruct(model: DiscreteVAE, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """images (N, H, W, 3) uint8 through hard (argmax) codes and back, as uint8."""
    device = next(model.parameters()).device
    return np.concatenate([to_uint8(model.decode(model.encode(to_float(images[i : i + batch_size]).to(device))))
                           for i in range(0, len(images), batch_size)])


@torch.no_grad()
def reconstruction_quality(model: DiscreteVAE, images: np.ndarray,
                           batch_size: int = 256) -> tuple[dict[str, float], torch.Tensor]:
    """Hard-code (argmax) reconstruction quality: what the prior's tokens can express."""
    device = next(model.parameters()).device
    tokens, errors = [], []
    for start in range(0, len(images), batch_size):
        batch = to_float(images[start : start + batch_size]).to(device)
        batch_tokens = model.encode(batch)
        tokens.append(batch_tokens)
        errors.append(F.mse_loss(model.decode(batch_tokens), batch, reduction="none").flatten(1).mean(1))
    tokens_all = torch.cat(tokens).cpu()
    mse = float(torch.cat(errors).mean())
    usage = {f"eval_{name}": float(value)
             for name, value in codebook_usage(tokens_all, model.cfg.codebook_size).items()}
    return {"eval_recon_mse": mse, "eval_psnr": psnr(mse), **usage}, tokens_all


def load(checkpoint_dir: str | Path) -> DiscreteVAE:
    """The dVAE saved in `checkpoint_dir` (weights and the config that rebuilds it), in eval mode."""
    state, config, _ = checkpoint.load(checkpoint_dir, KIND)
    model = DiscreteVAE(DVAEModelConfig(**config))
    model.load_state_dict(state)
    return model.eval()
