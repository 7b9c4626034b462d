"""Stage 9: FID, FD on CLIP image features (`fd_clip`), CLIP score, caption retrieval, and the shapes oracle.

Every metric is computed twice, on the CLIP-reranked kept candidates and on all candidates, so
the gain of reranking is a number. The oracle is scored separately on the zero-shot prompts
(colour-shape pairs never seen in training: zero-shot composition), as `zero_shot_oracle_*`. Caption retrieval ranks each
sample's own prompt among the retrieval pool (every held-out caption) by the CLIP in use:
`retrieval_top1` / `retrieval_top5` are the shares ranked first / in the first five, logged beside
their chance levels (`retrieval_chance_top1`, `..._top5`: k over the pool size).

FID (torchmetrics, Inception-v3 pool features) needs torch-fidelity's Inception weights on disk:
nothing is downloaded here. Without them FID is skipped and `metrics.json` says so (`fid_skipped`).
Given the dVAE, FID also measures its reconstructions of the reference images (`fid_reconstructions`:
the tokenizer's ceiling, the FID no prior on its codes can beat by much).
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlparse

import numpy as np
import torch

from ..clip.model import ClipScorer
from ..clip.model import load as load_clip
from ..corpus import oracle
from ..corpus.shapes import ShapeSpec, completable_below
from ..dvae.model import ImageTokenizer, reconstruct
from ..dvae.model import load as load_dvae
from ..images import psnr, to_float
from ..storage import write_json
from .evaluation_set import EvaluationSet, retrieval_pool_of

METRICS_FILE = "metrics.json"


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D).

    tr(sqrt(S1 S2)) is a sum of square roots of non-negative reals by construction, so no complex parts or
    NaNs for small N. With A, B the centred features scaled by 1/sqrt(N - 1) (S1 = A^T A, S2 = B^T B),
    S1 S2 has the nonzero eigenvalues of (A B^T)(A B^T)^T: with no more samples than dimensions the trace
    is the sum of the singular values of A B^T (N1 x N2, cheap for 2048-dim Inception features); else the
    sum of square roots of the eigenvalues of the symmetric PSD matrix sqrt(S1) S2 sqrt(S1) (D x D).
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
    a, b = (real - mu1) / np.sqrt(len(real) - 1), (fake - mu2) / np.sqrt(len(fake) - 1)
    if max(len(a), len(b)) <= real.shape[1]:
        trace_sqrt = _trace_sqrt_from_samples(a, b)
    else:
        trace_sqrt = _trace_sqrt_from_covariances(a.T @ a, b.T @ b)
    return float(((mu1 - mu2) ** 2).sum() + (a**2).sum() + (b**2).sum() - 2 * trace_sqrt)


def _trace_sqrt_from_samples(a: np.ndarray, b: np.ndarray) -> float:
    """tr(sqrt(A^T A B^T B)) = the sum of the singular values of A B^T."""
    return float(np.linalg.svd(a @ b.T, compute_uv=False).sum())


def _trace_sqrt_from_covariances(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrt(S1 S2)) through the symmetric PSD matrix sqrt(S1) S2 sqrt(S1), which has the same eigenvalues."""
    values, vectors = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    return float(np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum())


@torch.no_grad()
def _features(clip: ClipScorer, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return torch.cat([clip.image_features(to_float(pixels[i : i + batch_size]))
                      for i in range(0, len(pixels), batch_size)]).numpy()


def inception_cache_path() -> Path:
    """Where torch-fidelity's own download of the Inception weights lands: `<torch hub dir>/checkpoints/`
    (`$TORCH_HOME/hub`, by default `~/.cache/torch/hub`), under the file name of its release URL."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(URL_INCEPTION_V3).path).name


def find_inception_weights(configured: str | Path | None) -> Path | None:
    """The Inception weights file FID uses: `configured` (a path that is not a file is an error), else
    torch-fidelity's file in the torch hub cache if it is there, else None (FID is skipped)."""
    if configured is not None:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"sample.inception_weights: no Inception weights file at {path}")
        return path
    cached = inception_cache_path()
    return cached if cached.is_file() else None


@torch.no_grad()
def inception_fid(weights: Path, reference_images: np.ndarray, generated: Mapping[str, np.ndarray],
                  feature: int = 2048, batch_size: int = 32, device: str | torch.device | None = None
                  ) -> dict[str, float]:
    """FID of each generated set against the reference images, all (N, H, W, 3) uint8.

    The features are those of torchmetrics' `FrechetInceptionDistance(feature)` (2048: the pool layer FID
    is defined on) with the Inception weights in `weights` (torch-fidelity's state_dict): images go in as
    uint8 at their own size and its Inception resizes them to 299x299 (bilinear) itself. The distance is
    `frechet_distance`, the value torchmetrics' `compute()` gives, without its general eigendecomposition
    of the D x D product S1 S2 (about 14 s per set at D = 2048 on 2 cores; an N1 x N2 SVD here).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    # torch-fidelity loads the file with weights_only=False, which runs any pickled code: refuse that first
    try:
        torch.load(weights, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise ValueError(f"{weights} is not a plain state_dict of Inception weights (torch-fidelity's format)") \
            from error
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    inception = FrechetInceptionDistance(feature=feature, feature_extractor_weights_path=str(weights)).inception
    inception.to(device)

    def features(images: np.ndarray) -> np.ndarray:
        batches = (torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
                   for start in range(0, len(images), batch_size))
        return torch.cat([inception(batch.to(device)).double().cpu() for batch in batches]).numpy()

    real = features(reference_images)
    return {name: frechet_distance(real, features(images)) for name, images in generated.items()}


def distinct_share(images: np.ndarray) -> float:
    """images (P, C, H, W, 3): the mean over prompts of the share of a prompt's C candidates that are
    distinct images. Reranking can only choose among candidates that differ."""
    return float(np.mean([len({candidate.tobytes() for candidate in prompt}) / len(prompt) for prompt in images]))


@torch.no_grad()
def caption_retrieval(clip: ClipScorer, images: np.ndarray, prompts: Sequence[str], pool: Sequence[str],
                      batch_size: int = 256) -> dict[str, float]:
    """images (P, K, H, W, 3), one row per prompt: the share of images whose own prompt ranks first, and in
    the first five, among the `pool` captions by CLIP similarity (ties count against it)."""
    pool = list(pool)
    text = torch.cat([clip.text_features(pool[i : i + batch_size]) for i in range(0, len(pool), batch_size)])
    index = {caption: position for position, caption in enumerate(pool)}
    flat = images.reshape(-1, *images.shape[2:])
    own = torch.tensor([index[prompt] for prompt in prompts for _ in range(images.shape[1])])
    similarity = torch.from_numpy(_features(clip, flat)) @ text.T
    own_similarity = similarity.gather(1, own[:, None])
    rank = (similarity >= own_similarity).sum(1) - 1  # how many other captions score at least as high
    return {"top1": float((rank < 1).float().mean()), "top5": float((rank < 5).float().mean())}


def oracle_accuracy(pixels: np.ndarray, specs: Sequence[list[ShapeSpec]]) -> dict[str, float]:
    """pixels (P, K, H, W, 3): mean oracle score per attribute over every image of every prompt."""
    scores = [oracle.score(image, prompt_specs) for prompt_specs, images in zip(specs, pixels) for image in images]
    return oracle.mean_scores(scores)


def image_to_image_metrics(completions: Mapping[str, np.ndarray], specs: Sequence[list[ShapeSpec]]) -> dict[str, float]:
    """How image-to-image completes the shapes corpus's scenes (`sample.run.complete_scenes`, which
    completes the scenes whose every shape starts inside the given rows and one continues below
    them): `i2i_prefix_psnr`, the given rows against the scene's (the rows come back); the oracle
    on the best completion (`i2i_oracle_<attribute>`: does it finish the shape the prefix shows?);
    and the share of all scenes completed (`i2i_scenes`)."""
    images, scenes = completions["images"], completions["scenes"]
    size, rows, grid = scenes.shape[1], int(completions["prefix_rows"]), int(completions["grid"])
    boundary = rows * size // grid  # pixel rows the prefix holds
    completed = completions["prompt_index"]  # which prompt each completion is of
    eligible = [row for row, prompt in enumerate(completed) if completable_below(specs[prompt], size, boundary)]
    metrics = {"i2i_scenes": len(eligible) / len(specs)}
    if eligible:
        given = images[eligible, :, :boundary].astype(np.float64)
        mse = float(np.mean((given - scenes[eligible, None, :boundary].astype(np.float64)) ** 2)) / 255.0**2
        metrics["i2i_prefix_psnr"] = psnr(mse)
        scores = oracle.mean_scores([oracle.score(images[row, 0], specs[completed[row]]) for row in eligible])
        metrics.update({f"i2i_oracle_{attribute}": value for attribute, value in scores.items()})
    return metrics


def score_samples(samples_path: Path, prompts: list[str], reference_images: np.ndarray, clip: ClipScorer, out_dir: Path,
        specs: Sequence[list[ShapeSpec]] | None = None, zero_shot: Sequence[bool] | None = None,
        inception_weights: str | Path | None = None,
        retrieval_pool: Sequence[str] | None = None, dvae: ImageTokenizer | None = None,
        completions_path: str | Path | None = None) -> dict[str, float]:
    """reference_images: held-out real images (N, H, W, 3) for fid and fd_clip; specs: the shapes behind each
    prompt; inception_weights: the weights file for FID (None: the torch hub cache; see `find_inception_weights`);
    retrieval_pool: the captions each sample's prompt is ranked among (None: the distinct prompts); dvae: the
    tokenizer, whose reconstructions of the references get their own FID; completions_path: image-to-image
    completions of each prompt's scene (with `specs`: `image_to_image_metrics`)."""
    data = np.load(samples_path)
    images, clip_scores, ranking = data["images"], data["clip_scores"], data["ranking"]
    kept = np.take_along_axis(images, ranking[:, :, None, None, None], axis=1)
    kept_scores = np.take_along_axis(clip_scores, ranking, axis=1)
    generated = {"reranked": kept.reshape(-1, *kept.shape[2:]), "all": images.reshape(-1, *images.shape[2:])}
    real_features = _features(clip, reference_images)
    metrics = {f"fd_clip_{label}": frechet_distance(real_features, _features(clip, pixels))
               for label, pixels in generated.items()}
    notes = {}
    weights = find_inception_weights(inception_weights)
    if weights is None:
        notes["fid_skipped"] = "no Inception weights"
        print(f"[evaluate] fid skipped: no Inception weights (set sample.inception_weights, or put torch-fidelity's "
              f"file at {inception_cache_path()})", flush=True)
    else:
        if dvae is not None:
            generated = {**generated, "reconstructions": reconstruct(dvae, reference_images)}
        metrics.update({f"fid_{label}": value
                        for label, value in inception_fid(weights, reference_images, generated).items()})
    metrics["distinct_candidates"] = distinct_share(images)
    metrics["clip_score_reranked"] = float(100 * kept_scores.clip(min=0).mean())
    metrics["clip_score_all"] = float(100 * clip_scores.clip(min=0).mean())
    pool = retrieval_pool_of(prompts, retrieval_pool)
    for label, pixels in (("reranked", kept), ("all", images)):
        for k, value in caption_retrieval(clip, pixels, prompts, pool).items():
            metrics[f"retrieval_{k}_{label}"] = value
    metrics["retrieval_chance_top1"], metrics["retrieval_chance_top5"] = 1 / len(pool), min(5, len(pool)) / len(pool)
    if specs is not None:
        zero_shot_mask = np.asarray(zero_shot if zero_shot is not None else [False] * len(prompts))
        for subset, mask in (("", ~zero_shot_mask), ("zero_shot_", zero_shot_mask)):
            if not mask.any():
                continue
            chosen = [s for s, m in zip(specs, mask) if m]
            for label, pixels in (("reranked", kept[mask]), ("all", images[mask])):
                for attribute, value in oracle_accuracy(pixels, chosen).items():
                    metrics[f"{subset}oracle_{attribute}_{label}"] = value
    if specs is not None and completions_path is not None:
        metrics.update(image_to_image_metrics(np.load(completions_path), specs))
    # the notes say why a metric is absent; they are not numbers, so they stay out of the returned metrics
    write_json(Path(out_dir) / METRICS_FILE, {**metrics, **notes})
    return metrics


@dataclass(frozen=True)
class EvaluationResult:
    metrics_path: Path  # metrics.json: the metrics and the notes
    metrics: dict[str, float]
    notes: dict[str, str] = field(default_factory=dict)  # why a metric is absent (fid_skipped)
    TAGS: ClassVar = ("notes",)  # what a stage's run shows of its result (flows/stages.py: show_result)
    ARTIFACTS: ClassVar = ("metrics_path",)


def run(samples_path: Path, evaluation: EvaluationSet, clip_source: str, out_dir: Path,
        inception_weights: str | Path | None = None, dvae_dir: str | Path | None = None,
        completions_path: str | Path | None = None) -> EvaluationResult:
    """The stage's entry point: `score_samples` on the samples of `evaluation`'s prompts, with the CLIP saved at
    `clip_source` (and the dVAE saved at `dvae_dir`, for the FID of its reconstructions); the
    image-to-image completions at `completions_path` are scored by the oracle too (the shapes corpus)."""
    metrics = score_samples(samples_path, evaluation.prompts, evaluation.references, load_clip(clip_source), out_dir,
                            specs=evaluation.specs, zero_shot=evaluation.zero_shot,
                            inception_weights=inception_weights, retrieval_pool=evaluation.captions,
                            dvae=load_dvae(dvae_dir) if dvae_dir is not None else None,
                            completions_path=completions_path)
    written = json.loads((Path(out_dir) / METRICS_FILE).read_text())
    return EvaluationResult(Path(out_dir) / METRICS_FILE, metrics,
                            notes={name: value for name, value in written.items() if isinstance(value, str)})
