"""The trained model as one folder (dVAE, prior, tokenizer, CLIP, config) and prompts -> images from it.

The bundle is what MLflow registers as the pyfunc model `dalle`, what `dalle generate` loads, and
what `mlflow models serve` answers from.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..clip.model import LOCAL_DIR, ClipScorer
from ..clip.model import load as load_clip
from ..config import PipelineConfig, SampleConfig
from ..dvae.model import ImageTokenizer
from ..dvae.model import load as load_dvae
from ..images import as_rgb, resized, to_uint8
from ..prior.model import Prior
from ..prior.model import load as load_prior
from ..sample.run import (draw_candidates, image_prefix, kept_candidates, place_for_sampling, sampling_device,
                          score_and_rank)
from ..saved_configs import upgrade
from ..storage import atomic_path
from ..text.tokenizer import TextTokenizer

CONFIG_FILE = "pipeline_config.json"


def build(directory: Path, cfg: PipelineConfig, dvae_dir: Path, prior_dir: Path, tokenizer_path: Path,
          clip_source: str, evaluation_ids: list[str] | None = None) -> Path:
    """Copy every part the model needs into one folder, written atomically; `evaluation_ids`, the held-out
    items it was judged on, go into the manifest, so a retrain is judged on the same set."""
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        shutil.copytree(dvae_dir, tmp / "dvae")
        shutil.copytree(prior_dir, tmp / "prior")
        shutil.copy2(tokenizer_path, tmp / "tokenizer.json")
        if clip_source.startswith(LOCAL_DIR):
            shutil.copytree(clip_source[len(LOCAL_DIR):], tmp / "clip")
            clip_source = "bundle"
        manifest = {"config": cfg.model_dump(mode="json"), "clip_source": clip_source,
                    **({"evaluation_ids": evaluation_ids} if evaluation_ids is not None else {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(manifest, indent=2))
    return Path(directory)


def read_manifest(directory: Path) -> tuple[dict[str, Any], str]:
    """(the pipeline config the bundle was trained with, its CLIP source with `bundle` made a local-dir)."""
    if not (directory / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{directory} is not a dalle bundle: {CONFIG_FILE} is missing")
    document = json.loads((directory / CONFIG_FILE).read_text())
    clip_source = document["clip_source"]
    if clip_source == "bundle":
        clip_source = LOCAL_DIR + str((directory / "clip").resolve())
    return upgrade(document["config"]), clip_source


def read_evaluation_ids(directory: Path) -> list[str] | None:
    """The held-out items the bundle was judged on (None: the shapes corpus, or a bundle built before)."""
    return json.loads((Path(directory) / CONFIG_FILE).read_text()).get("evaluation_ids")


@dataclass
class Bundle:
    cfg: PipelineConfig
    dvae: ImageTokenizer
    prior: Prior
    tokenizer: TextTokenizer
    clip: ClipScorer

    @classmethod
    def load(cls, directory: str | Path) -> Bundle:
        directory = Path(directory)
        config, clip_source = read_manifest(directory)
        cfg = PipelineConfig.model_validate(config)
        return cls(cfg=cfg, dvae=load_dvae(directory / "dvae"), prior=load_prior(directory / "prior"),
                   tokenizer=TextTokenizer.load(directory / "tokenizer.json", cfg.tokenizer.text_len),
                   clip=load_clip(clip_source))

    @torch.no_grad()
    def generate(self, prompts: list[str], num_images: int = 1, seed: int = 0,
                 image: Image.Image | Sequence[Image.Image] | None = None, prefix_rows: int | None = None,
                 **sampling: Any) -> tuple[np.ndarray, np.ndarray]:
        """Best `num_images` of the preset's candidates per prompt by CLIP score.

        Returns images (P, num_images, H, W, 3) uint8 and their CLIP scores (P, num_images).
        `sampling` overrides SampleConfig fields (temperature, top_k, top_p, guidance_scale, candidates).
        With `image` (one for every prompt, or one each), the paper's image-to-image: its top
        `prefix_rows` token rows (default: half the grid), fitted to the model's size, are kept in every
        candidate and the rest is drawn under the caption.
        """
        if not prompts:
            raise ValueError("no prompts given")
        fields = {**self.cfg.sample.model_dump(), **{k: v for k, v in sampling.items() if v is not None}}
        fields["candidates"] = max(fields["candidates"], num_images)
        fields["keep"] = num_images
        cfg = SampleConfig.model_validate(fields)
        place_for_sampling(sampling_device(cfg), self.prior, self.dvae, self.clip)
        prefix = None
        if image is not None or prefix_rows is not None:
            given = [image] * len(prompts) if image is None or isinstance(image, Image.Image) else list(image)
            if len(given) != len(prompts):
                raise ValueError(f"{len(given)} images for {len(prompts)} prompts: give one, or one per prompt")
            prefix = torch.cat([self.image_prefix(one, prefix_rows) for one in given])
        images, _ = draw_candidates(cfg, prompts, self.prior, self.dvae, self.tokenizer, seed, prefix)
        scores, best = score_and_rank(self.clip, images, prompts, num_images)
        chosen = kept_candidates(images, best)
        pixels = to_uint8(chosen.flatten(0, 1)).reshape(len(prompts), num_images, *images.shape[-2:], 3)
        return pixels, scores.gather(1, best).numpy()

    def image_prefix(self, image: Image.Image | None, prefix_rows: int | None = None) -> torch.Tensor:
        """(1, prefix_rows * grid) dVAE tokens of the top rows of `image` (default: half the grid),
        fitted to the model's size."""
        if image is None:
            raise ValueError(f"prefix_rows {prefix_rows} needs an image to take the rows from")
        return image_prefix(self.dvae, self.fitted(image)[None], prefix_rows)

    def fitted(self, image: Image.Image) -> np.ndarray:
        """`image` as the model takes it: upright, RGB, centre-cropped to its size; (H, W, 3) uint8."""
        return np.array(resized(as_rgb(ImageOps.exif_transpose(image)), self.dvae.cfg.image_size, "center_crop"))


def png_from_base64(text: str, what: str) -> Image.Image:
    """The image a base64 string holds; ValueError naming `what` when it holds none."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as image:
            image.load()
            return image.copy()
    except Exception as err:
        raise ValueError(f"{what} is not a base64-encoded image: {type(err).__name__}: {err}") from None


def png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
