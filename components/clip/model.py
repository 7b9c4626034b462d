"""CLIP through open_clip: our own small architecture, or any pretrained open_clip model.

Three ways in, one object out (`ClipScorer`):
- a pretrained tag (`model_name="ViT-B-32", pretrained="openai"`): open_clip downloads the weights
  where it can, or finds them in its cache;
- a local checkpoint file (`pretrained="/path/to/weights.safetensors"` with its `model_name`);
- a `local-dir:/path` folder holding `open_clip_config.json` + `open_clip_model.safetensors`,
  which is also how the pipeline saves the CLIP it trains on the corpus.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ClipConfig
from ..storage import atomic_path

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
LOCAL_DIR = "local-dir:"


def architecture(cfg: ClipConfig, image_size: int) -> dict[str, Any]:
    """An open_clip model config (the JSON open_clip reads) for our small in-house CLIP."""
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": cfg.vision_layers,
            "width": cfg.vision_width,
            "head_width": max(8, cfg.vision_width // 2),
            "patch_size": cfg.patch_size,
        },
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": 49408,
            "width": cfg.text_width,
            "heads": max(1, cfg.text_width // 32),
            "layers": cfg.text_layers,
        },
    }


def register_architecture(cfg: ClipConfig, image_size: int, directory: Path) -> str:
    """Write our architecture as `<model_name>.json` and register it with open_clip; returns the name."""
    import open_clip

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{cfg.model_name}.json"
    path.write_text(json.dumps(architecture(cfg, image_size), indent=2))
    open_clip.add_model_config(path)
    return cfg.model_name


@contextmanager
def _quiet_when_untrained(untrained: bool) -> Iterator[None]:
    """Without pretrained weights (our CLIP, about to be trained) open_clip warns on the root logger
    that the model is initialised randomly: true, meant, and nothing for a user to act on."""
    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    if untrained:
        root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


@dataclass
class ClipScorer:
    """A CLIP model with its tokenizer and pixel normalisation: images and captions to unit vectors."""

    model: Any
    tokenizer: Any
    image_size: int
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    @classmethod
    def build(cls, model_name: str, pretrained: str | None = None) -> ClipScorer:
        import open_clip

        if pretrained and Path(pretrained).suffix and not Path(pretrained).exists():
            raise FileNotFoundError(f"CLIP checkpoint file {pretrained} does not exist")
        with _quiet_when_untrained(pretrained is None):
            model = open_clip.create_model(model_name, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(model_name)
        preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = preprocess.get("size", model.visual.image_size)
        size = size[0] if isinstance(size, (tuple, list)) else size
        return cls(model=model.eval(), tokenizer=tokenizer, image_size=int(size),
                   mean=tuple(preprocess.get("mean", OPENAI_MEAN)), std=tuple(preprocess.get("std", OPENAI_STD)))

    @classmethod
    def load(cls, source: str) -> ClipScorer:
        """`local-dir:/path` or a bare folder path saved by `save`."""
        if not source.startswith(LOCAL_DIR):
            source = LOCAL_DIR + str(Path(source).resolve())
        folder = Path(source[len(LOCAL_DIR):])
        if not (folder / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{folder} is not an open_clip folder: {CONFIG_FILE} is missing")
        if not (folder / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{folder} holds no CLIP weights: {WEIGHTS_FILE} is missing")
        return cls.build(source)

    @classmethod
    def from_spec(cls, model: str, pretrained: str | None = None) -> ClipScorer:
        """`local-dir:/path`, or an open_clip model name with its pretrained tag or weights file."""
        return cls.load(model) if model.startswith(LOCAL_DIR) else cls.build(model, pretrained)

    def save(self, directory: str | Path, model_cfg: dict[str, Any]) -> Path:
        from safetensors.torch import save_file

        with atomic_path(directory) as tmp:
            tmp.mkdir()
            document = {"model_cfg": model_cfg,
                        "preprocess_cfg": {"mean": list(self.mean), "std": list(self.std), "size": self.image_size}}
            (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2))
            state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE))
        return Path(directory)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> the model's input size and pixel statistics."""
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False).clamp(0, 1)
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> ClipScorer:
        """Moves the model (in place); inputs follow it, features and scores come back on the CPU."""
        self.model.to(device)
        return self

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1], on any device -> unit vectors (N, D) on the CPU."""
        features = self.model.encode_image(self.normalise(images.to(self.device)))
        return F.normalize(features.float(), dim=-1).cpu()

    def text_features(self, captions: list[str]) -> torch.Tensor:
        features = self.model.encode_text(self.tokenizer(captions).to(self.device))
        return F.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def scores(self, images: torch.Tensor, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        """Cosine similarity of image i with caption i, (N,)."""
        out = []
        for start in range(0, len(captions), batch_size):
            image_part = self.image_features(images[start : start + batch_size])
            text_part = self.text_features(captions[start : start + batch_size])
            out.append((image_part * text_part).sum(-1))
        return torch.cat(out)


def load(source: str) -> ClipScorer:
    """Inverse of `ClipResult.clip_source`."""
    if "|" in source:
        model_name, pretrained = source.split("|", 1)
        return ClipScorer.build(model_name, pretrained or None)
    return ClipScorer.load(source)
