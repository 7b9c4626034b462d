"""Stage 9: FD on CLIP image features (`fd_clip`), CLIP score, and the shapes oracle per attribute.

Every metric is computed twice, on the CLIP-reranked kept candidates and on all candidates, so
the gain of reranking is a number. The oracle is scored separately on the `holdout` prompts
(colour-shape pairs never seen in training: zero-shot composition).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..clip.model import ClipScorer
from ..corpus import oracle
from ..corpus.shapes import ShapeSpec
from ..images import to_float
from ..storage import write_json
from ..tracking import Tracker


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D).

    tr(sqrt(S1 S2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix sqrt(S1) S2 sqrt(S1): real by construction, so no complex parts or NaNs for small N.
    """
    for name, features in (("real", real), ("generated", fake)):
        if len(features) < 2:
            raise ValueError(f"Fréchet distance needs at least 2 {name} samples, got {len(features)}")
        if len(features) <= features.shape[1]:
            warnings.warn(
                f"Fréchet distance with {len(features)} {name} samples for {features.shape[1]}-dim features: "
                "the covariance is rank-deficient and the distance is biased upward", stacklevel=2)
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    mu1, mu2 = real.mean(0), fake.mean(0)
    sigma1, sigma2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    values, vectors = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


@torch.no_grad()
def _features(clip: ClipScorer, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return torch.cat([clip.image_features(to_float(pixels[i : i + batch_size]))
                      for i in range(0, len(pixels), batch_size)]).numpy()


def oracle_accuracy(pixels: np.ndarray, specs: Sequence[list[ShapeSpec]]) -> dict[str, float]:
    """pixels (P, K, H, W, 3): mean oracle score per attribute over every image of every prompt."""
    scores = [oracle.score(image, prompt_specs) for prompt_specs, images in zip(specs, pixels) for image in images]
    return oracle.mean_scores(scores)


def run(samples_path: Path, prompts: list[str], reference_images: np.ndarray, clip: ClipScorer, out_dir: Path,
        specs: Sequence[list[ShapeSpec]] | None = None, holdout: Sequence[bool] | None = None,
        tracker: Tracker | None = None) -> dict[str, float]:
    """reference_images: held-out real images (N, H, W, 3) for fd_clip; specs: the shapes behind each prompt."""
    data = np.load(samples_path)
    images, clip_scores, ranking = data["images"], data["clip_scores"], data["ranking"]
    kept = np.take_along_axis(images, ranking[:, :, None, None, None], axis=1)
    kept_scores = np.take_along_axis(clip_scores, ranking, axis=1)
    real_features = _features(clip, reference_images)
    metrics = {
        "fd_clip_reranked": frechet_distance(real_features, _features(clip, kept.reshape(-1, *kept.shape[2:]))),
        "fd_clip_all": frechet_distance(real_features, _features(clip, images.reshape(-1, *images.shape[2:]))),
        "clip_score_reranked": float(100 * kept_scores.clip(min=0).mean()),
        "clip_score_all": float(100 * clip_scores.clip(min=0).mean()),
    }
    if specs is not None:
        holdout_mask = np.asarray(holdout if holdout is not None else [False] * len(prompts))
        for subset, mask in (("", ~holdout_mask), ("holdout_", holdout_mask)):
            if not mask.any():
                continue
            chosen = [s for s, m in zip(specs, mask) if m]
            for label, pixels in (("reranked", kept[mask]), ("all", images[mask])):
                for attribute, value in oracle_accuracy(pixels, chosen).items():
                    metrics[f"{subset}oracle_{attribute}_{label}"] = value
    write_json(Path(out_dir) / "metrics.json", metrics)
    if tracker is not None:
        tracker.log_metrics(metrics)
        tracker.log_artifact(Path(out_dir) / "metrics.json")
    return metrics
