"""The tokenizer's optional image losses beside the pixel likelihood: a patch discriminator trained
from scratch, and a perceptual distance read through VGG16 features loaded from a weights file.

Both are the modern tokenizers' practice (taming-transformers' VQGAN, LlamaGen's VQ tokenizer):
the pixel likelihood alone averages what it cannot place into blur, the discriminator scores
every patch of the reconstruction as real or not, and the perceptual distance compares images by
the features of a network trained on photographs. Nothing here downloads weights: the perceptual
net is built only from the file `dvae.perceptual_weights` names (a torchvision `vgg16` state dict,
its `features.*` keys at least), and the discriminator starts random and learns beside the dVAE.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

# torchvision's vgg16 `features`: the ReLU after each block's last conv (relu1_2 ... relu5_3)
VGG16_TAPS = (3, 8, 15, 22, 29)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix's, as VQGAN uses it): 4x4 convs, two stride-2 then two stride-1, a logit per
    overlapping patch. GroupNorm, not BatchNorm: its statistics are the sample's own, so a batch of
    real and one of reconstructed images score alike under DDP and at any batch size."""

    def __init__(self, width: int = 32, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, layers):
            out = width * min(2**i, 8)
            stride = 2 if i < layers - 1 else 1
            blocks += [nn.Conv2d(channels, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out),
                       nn.LeakyReLU(0.2)]
            channels = out
        blocks.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> a real/fake logit per patch."""
        return self.net(images * 2 - 1)


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: real patches above +1, reconstructed ones below -1. `fake`
    is detached, so only the discriminator learns from it."""
    return 0.5 * (F.relu(1 - discriminator(real)).mean() + F.relu(1 + discriminator(fake.detach())).mean())


def generator_loss(discriminator: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """The decoder's adversarial loss, -mean(D(fake)), through the discriminator's weights detached:
    the gradient reaches the dVAE only, and both losses share one backward pass and optimizer."""
    frozen = {name: param.detach() for name, param in discriminator.named_parameters()}
    return -functional_call(discriminator, frozen, (fake,)).mean()


def load_vgg16_features(path: str | Path) -> nn.Sequential:
    """torchvision's vgg16 `features` with the weights in `path` (a state dict of `vgg16`, or of its
    `features` alone), frozen and in eval mode. FileNotFoundError / ValueError naming the file."""
    from torchvision.models import vgg16

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dvae.perceptual_weights: no file {path} (a torchvision vgg16 state dict, saved "
                                "with torch.save; nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same mistake to the user
        raise ValueError(f"dvae.perceptual_weights: {path} is not a torch state dict ({error})") from error
    if not isinstance(state, dict):
        raise ValueError(f"dvae.perceptual_weights: {path} holds a {type(state).__name__}, not a state dict")
    features = vgg16(weights=None).features
    if any(key.startswith("features.") for key in state):
        state = {key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")}
    missing = sorted(set(features.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(features.state_dict()))
    if missing or unexpected:
        raise ValueError(f"dvae.perceptual_weights: {path} is not torchvision's vgg16 (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    try:
        features.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"dvae.perceptual_weights: {path} does not fit torchvision's vgg16: {error}") from error
    return features.eval().requires_grad_(False)


class PerceptualDistance(nn.Module):
    """LPIPS without its learned linear heads: at relu1_2 ... relu5_3 of VGG16, the squared distance of
    the channel-normalised features, averaged over positions, summed over the taps; per image."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features[: VGG16_TAPS[-1] + 1]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_file(cls, path: str | Path) -> PerceptualDistance:
        return cls(load_vgg16_features(path))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (N, 3, H, W) each -> (N,) distances."""
        x = (torch.cat([a, b]) - self.mean) / self.std
        total = x.new_zeros(a.shape[0])
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in VGG16_TAPS:
                fa, fb = F.normalize(x, dim=1, eps=1e-10).chunk(2)
                total = total + (fa - fb).pow(2).sum(1).mean((1, 2))
        return total
