"""Tokenizer files as their authors publish them, made with the authors' own code (the test extra installs it):
taming-transformers' VQGAN as a Lightning checkpoint with its config, and a pickle that would run code."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml
from taming.modules.diffusionmodules import model as taming_model
from taming.modules.vqvae import quantize as taming_quantize
from torch import nn


class Payload:
    """What a hostile pickle calls on load: it would create /tmp/pwned-by-pickle."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/pwned-by-pickle",))


DDCONFIG = {"double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}


class TamingVQModel(nn.Module):
    """taming's VQModel without Lightning (whose taming.main no longer imports on pytorch-lightning 2):
    the authors' Encoder, Decoder and quantisers, under VQModel's and GumbelVQ's attribute names."""

    def __init__(self, gumbel: bool, n_embed: int = 64, embed_dim: int = 32) -> None:
        super().__init__()
        self.encoder = taming_model.Encoder(**DDCONFIG)
        self.decoder = taming_model.Decoder(**DDCONFIG)
        self.quantize = (taming_quantize.GumbelQuantize(DDCONFIG["z_channels"], embed_dim, n_embed=n_embed) if gumbel
                         else taming_quantize.VectorQuantizer2(n_embed, embed_dim, beta=0.25))
        self.quant_conv = nn.Conv2d(DDCONFIG["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, DDCONFIG["z_channels"], 1)
        self.gumbel = gumbel

    @torch.no_grad()
    def place_codes(self, images: torch.Tensor) -> TamingVQModel:
        """nearest: codes at encoder outputs of `images` (in [-1, 1]), as a trained codebook's are, so that
        positions take many codes (random codes far from every output would all lose to the shortest)."""
        if not self.gumbel:
            outputs = self.quant_conv(self.encoder(images))
            outputs = outputs.permute(0, 2, 3, 1).reshape(-1, outputs.shape[1])
            weight = self.quantize.embedding.weight
            weight.copy_(outputs[torch.randperm(len(outputs))[: len(weight)]])
        return self

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:  # images in [-1, 1]
        h = self.quant_conv(self.encoder(images))
        if self.gumbel:  # GumbelVQ's logits; their argmax is the token without the sampling noise
            return self.quantize.proj(h).argmax(1)
        return self.quantize(h)[2][2].view(h.shape[0], h.shape[2], h.shape[3])

    @torch.no_grad()
    def reconstruct(self, tokens: torch.Tensor) -> torch.Tensor:
        b, h, w = tokens.shape
        quant = self.quantize.get_codebook_entry(tokens.flatten(), (b, h, w, self.post_quant_conv.in_channels))
        return self.decoder(self.post_quant_conv(quant))


def save_taming(model: TamingVQModel, folder: Path) -> tuple[Path, Path]:
    """A Lightning checkpoint (with a loss network's weights and a callback's state beside the model's, as
    the released ones have) in logs/NAME/checkpoints/, its config in logs/NAME/configs/."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "configs").mkdir()
    state = {**model.state_dict(), "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4)}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8",
                "callbacks": {Payload: {"best_model_score": torch.tensor(0.5), "hook": Payload()}}},
               folder / "checkpoints" / "last.ckpt")
    target = "taming.models.vqgan.GumbelVQ" if model.gumbel else "taming.models.vqgan.VQModel"
    params = {"embed_dim": 32, "n_embed": 64, "ddconfig": DDCONFIG,
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}
    if model.gumbel:
        params.update(kl_weight=1e-8, temperature_scheduler_config={"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler"})
    config = folder / "configs" / "model.yaml"
    config.write_text(yaml.safe_dump({"model": {"base_learning_rate": 4.5e-6, "target": target, "params": params}}))
    return folder / "checkpoints" / "last.ckpt", config


