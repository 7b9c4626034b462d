"""Stage 8: draw candidates for prompts, decode them with the dVAE, rerank with CLIP, save grid + scores."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..clip.model import ClipScorer
from ..clip.model import load as load_clip
from ..config import SampleConfig
from ..corpus.shapes import ShapeSpec, completable_below
from ..dvae.model import ImageTokenizer, decode_tokens, encode_images
from ..dvae.model import load as load_dvae
from ..images import save_grid, to_uint8
from ..prior.model import KVCache, Prior
from ..prior.model import load as load_prior
from ..storage import atomic_path
from ..text.tokenizer import TextTokenizer
from .generate import rerank, sample_image_tokens

SAMPLES_FILE = "samples.npz"
COMPLETIONS_FILE = "completions.npz"
SCORES_FILE = "scores.parquet"


@dataclass(frozen=True)
class SampleResult:
    grid: Path
    samples: Path  # npz: images (P, C, H, W, 3) uint8, clip_scores, log_likelihood, ranking (P, keep)
    scores: Path
    # npz: images (S, keep, H, W, 3) completing `scenes` (S, H, W, 3), those of prompts `prompt_index` (S,), prefix_rows
    completions: Path | None = None
    completions_grid: Path | None = None  # completions.png
    metrics: dict[str, float] = field(default_factory=dict)  # mean CLIP score of the kept candidates and of all
    ARTIFACTS: ClassVar = ("grid", "completions_grid", "scores")  # what its stage's run shows (stages.show_result)


def grid_rows(num_prompts: int, rows: int) -> list[int]:
    """The prompts the sample grid shows: `rows` of them spread evenly from the first to the last, so
    the grid holds the evaluation set's later prompts too (the zero-shot pairs come last)."""
    if rows >= num_prompts:
        return list(range(num_prompts))
    return sorted({round(i * (num_prompts - 1) / (rows - 1)) for i in range(rows)}) if rows > 1 else [0]


def encode_prompts(tokenizer: TextTokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenizer.encode(prompts)
    text = torch.zeros(len(ids), tokenizer.text_len, dtype=torch.long)
    lengths = torch.tensor([len(row) for row in ids], dtype=torch.long)
    for row, values in enumerate(ids):
        text[row, : len(values)] = torch.tensor(values, dtype=torch.long)
    return text, lengths


def sampling_device(cfg: SampleConfig) -> torch.device:
    """`sample.device`: 'auto' is the GPU where there is one."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("sample.device is 'cuda', but this machine has no CUDA device (set it to 'auto' or 'cpu')")
    return torch.device(cfg.device)


def place_for_sampling(device: torch.device, prior: Prior, dvae: ImageTokenizer, clip: ClipScorer) -> None:
    """Moves the models to `device` (in place). On CUDA the prior goes to bf16, and its KV cache with it:
    half the bytes every decode step reads, and the flash kernels of its sparse layers. The dVAE and
    CLIP keep fp32 (a bf16 dVAE shifted hues in training)."""
    prior.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    dvae.to(device)
    clip.to(device)


def fitting_batch(cfg: SampleConfig, prior: Prior, device: torch.device) -> int:
    """`cfg.batch_size`, or fewer rows where their KV cache (twice the rows with guidance) would not fit
    the memory given (`cfg.memory_gb`, else most of what is free where the prior is). ValueError where
    not one row fits."""
    if cfg.memory_gb is not None:
        budget = cfg.memory_gb * 2**30
    elif device.type == "cuda":
        budget = 0.9 * torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        budget = 0.5 * psutil.virtual_memory().available
    per_row = KVCache.bytes_per_row(prior.cfg, next(prior.parameters()).dtype) * (2 if cfg.guidance_scale != 1 else 1)
    rows = int(budget // per_row)
    if rows < 1:
        raise ValueError(f"one sequence's KV cache takes {per_row / 2**30:.2f} GiB, more than the "
                         f"{budget / 2**30:.2f} GiB sampling may use (sample.memory_gb, or what is free)")
    return min(cfg.batch_size, rows)


@torch.no_grad()
def draw_candidate_tokens(cfg: SampleConfig, prompts: list[str], prior: Prior, tokenizer: TextTokenizer, seed: int,
                          image_prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> image tokens (P, C, N) and log-likelihoods (P, C), where the prior is, drawn with a generator
    there seeded with `seed`. `image_prefix` (P, L): each prompt's first L image tokens, fixed in every
    candidate (image-to-image: the top rows of a given image)."""
    device = next(prior.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    text, lengths = encode_prompts(tokenizer, prompts)
    text = text.repeat_interleave(cfg.candidates, dim=0).to(device)
    lengths = lengths.repeat_interleave(cfg.candidates, dim=0).to(device)
    if image_prefix is not None:
        if image_prefix.shape[0] != len(prompts):
            raise ValueError(f"image_prefix has {image_prefix.shape[0]} rows for {len(prompts)} prompts")
        image_prefix = image_prefix.repeat_interleave(cfg.candidates, dim=0).to(device)
    tokens, log_likelihoods = [], []
    batch_size = fitting_batch(cfg, prior, device)
    for start in range(0, len(text), batch_size):
        rows = slice(start, start + batch_size)
        drawn, log_likelihood = sample_image_tokens(
            prior, text[rows], lengths[rows], generator,
            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, guidance_scale=cfg.guidance_scale,
            image_prefix=None if image_prefix is None else image_prefix[rows],
        )
        tokens.append(drawn)
        log_likelihoods.append(log_likelihood.float())
    return (torch.cat(tokens).view(len(prompts), cfg.candidates, -1),
            torch.cat(log_likelihoods).view(len(prompts), cfg.candidates))


@torch.no_grad()
def draw_candidates(cfg: SampleConfig, prompts: list[str], prior: Prior, dvae: ImageTokenizer,
                    tokenizer: TextTokenizer, seed: int,
                    image_prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw_candidate_tokens` decoded by the dVAE: images (P, C, 3, H, W) in [0, 1] and
    log-likelihoods (P, C), on the CPU."""
    tokens, log_likelihood = draw_candidate_tokens(cfg, prompts, prior, tokenizer, seed, image_prefix)
    images = decode_tokens(dvae, tokens.flatten(0, 1), cfg.batch_size)
    return images.view(*tokens.shape[:2], *images.shape[1:]), log_likelihood.cpu()


def checked_prefix_rows(dvae: ImageTokenizer, prefix_rows: int | None = None) -> int:
    """The token rows image-to-image keeps of a given image: `prefix_rows`, or half the grid."""
    grid = dvae.cfg.grid_size
    prefix_rows = grid // 2 if prefix_rows is None else prefix_rows
    if not 0 < prefix_rows < grid:
        raise ValueError(f"prefix_rows must be between 1 and {grid - 1} (the model's images are {grid} token "
                         f"rows of {dvae.cfg.image_size // grid} px), got {prefix_rows}")
    return prefix_rows


def image_prefix(dvae: ImageTokenizer, images: np.ndarray, prefix_rows: int | None = None,
                 batch_size: int = 256) -> torch.Tensor:
    """Image-to-image's fixed part: the tokens of the top `prefix_rows` token rows (`checked_prefix_rows`)
    of each image (N, H, W, 3) uint8 at the dVAE's size -> (N, prefix_rows * grid)."""
    rows = checked_prefix_rows(dvae, prefix_rows)
    return encode_images(dvae, images, batch_size)[:, : rows * dvae.cfg.grid_size]


def score_and_rank(clip: ClipScorer, images: torch.Tensor, prompts: list[str],
                   keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """images (P, C, 3, H, W) -> CLIP score of each candidate with its prompt (P, C), and the indices of
    the `keep` best per prompt, best first (P, keep)."""
    candidates = images.shape[1]
    scores = clip.scores(images.flatten(0, 1), [p for p in prompts for _ in range(candidates)])
    scores = scores.view(len(prompts), candidates)
    return scores, rerank(scores, keep)


def kept_candidates(images: torch.Tensor, ranking: torch.Tensor) -> torch.Tensor:
    """images (P, C, ...) and ranking (P, keep), candidate indices best first -> the kept images (P, keep, ...)."""
    return images[torch.arange(len(images))[:, None], ranking]


def run(cfg: SampleConfig, prompts: list[str], prior_dir: Path, dvae_dir: Path, tokenizer_path: Path, text_len: int,
        clip_source: str, out_dir: Path,
        scenes: np.ndarray | None = None, specs: Sequence[Sequence[ShapeSpec]] | None = None) -> SampleResult:
    """Sample the trained models saved at these places (the stage's entry point)."""
    return sample_models(cfg, prompts, load_prior(prior_dir), load_dvae(dvae_dir),
                         TextTokenizer.load(tokenizer_path, text_len), load_clip(clip_source), out_dir,
                         scenes, specs)


def complete_scenes(cfg: SampleConfig, prompts: list[str], scenes: np.ndarray, specs: Sequence[Sequence[ShapeSpec]],
                    prior: Prior, dvae: ImageTokenizer, tokenizer: TextTokenizer, clip: ClipScorer,
                    out_dir: Path) -> Path:
    """Image-to-image on the prompts' own scenes (P, H, W, 3) that it can be judged on, those whose
    top half of token rows shows every shape (`specs`, each prompt's) and where one continues below
    (`shapes.completable_below`): that half kept, the rest drawn under the prompt, the best `keep` by
    CLIP; saved with their prompts' indices and the prefix's rows (`COMPLETIONS_FILE`) and shown
    beside their scenes in `completions.png` (none where no scene qualifies: the file then holds none)."""
    grid, size = dvae.cfg.grid_size, scenes.shape[1]
    prefix_rows = checked_prefix_rows(dvae)
    boundary = prefix_rows * size // grid  # the pixel rows given
    chosen = [p for p, prompt_specs in enumerate(specs) if completable_below(prompt_specs, size, boundary)]
    scenes, prompts = scenes[chosen], [prompts[p] for p in chosen]
    pixels = np.zeros((0, cfg.keep, *scenes.shape[1:]), dtype=np.uint8)
    if chosen:
        prefix = image_prefix(dvae, scenes, prefix_rows, cfg.batch_size)
        images, _ = draw_candidates(cfg, prompts, prior, dvae, tokenizer, cfg.seed + 1, prefix)
        _, ranking = score_and_rank(clip, images, prompts, cfg.keep)
        pixels = to_uint8(kept_candidates(images, ranking).flatten(0, 1)).reshape(len(prompts), cfg.keep,
                                                                                  *scenes.shape[1:])
        shown = grid_rows(len(prompts), cfg.grid_prompts)
        save_grid([[scenes[p], *pixels[p]] for p in shown], out_dir / "completions.png",
                  row_labels=[f"{prompts[p]} (top {prefix_rows} of {grid} rows given)" for p in shown])
    with atomic_path(out_dir / COMPLETIONS_FILE) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, images=pixels, scenes=scenes, prompt_index=np.array(chosen, dtype=np.int64),
                                prefix_rows=prefix_rows, grid=grid)
    return out_dir / COMPLETIONS_FILE


def sample_models(cfg: SampleConfig, prompts: list[str], prior: Prior, dvae: ImageTokenizer, tokenizer: TextTokenizer,
                  clip: ClipScorer, out_dir: Path,
                  scenes: np.ndarray | None = None, specs: Sequence[Sequence[ShapeSpec]] | None = None) -> SampleResult:
    """Candidates for every prompt, reranked, with their grid and scores; given `scenes` and `specs`
    (each prompt's own image and its shapes, the shapes corpus), image-to-image completions of them too."""
    if not prompts:
        raise ValueError("no prompts to sample")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    place_for_sampling(sampling_device(cfg), prior, dvae, clip)
    images, log_likelihood = draw_candidates(cfg, prompts, prior, dvae, tokenizer, cfg.seed)
    clip_scores, ranking = score_and_rank(clip, images, prompts, cfg.keep)
    flat_pixels = to_uint8(images.flatten(0, 1))
    pixels = flat_pixels.reshape(len(prompts), cfg.candidates, *flat_pixels.shape[1:])

    shown = grid_rows(len(prompts), cfg.grid_prompts)
    grid = save_grid([[pixels[p, c] for c in ranking[p].tolist()] for p in shown], out_dir / "samples.png",
                     row_labels=[prompts[p] for p in shown])
    with atomic_path(out_dir / SAMPLES_FILE) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, images=pixels, clip_scores=clip_scores.numpy(),
                                log_likelihood=log_likelihood.numpy(), ranking=ranking.numpy())
    rank_of = torch.full_like(clip_scores, -1, dtype=torch.long)
    rank_of.scatter_(1, ranking, torch.arange(cfg.keep).expand_as(ranking))
    table = pa.table({
        "prompt_index": np.repeat(np.arange(len(prompts)), cfg.candidates),
        "prompt": [p for p in prompts for _ in range(cfg.candidates)],
        "candidate": np.tile(np.arange(cfg.candidates), len(prompts)),
        "clip_score": clip_scores.flatten().numpy(),
        "log_likelihood": log_likelihood.flatten().numpy(),
        "rank": rank_of.flatten().numpy(),  # -1: not kept
    })
    with atomic_path(out_dir / SCORES_FILE) as tmp:
        pq.write_table(table, tmp)
    (out_dir / "prompts.json").write_text(json.dumps(prompts, indent=1))
    completions = None
    if scenes is not None and specs is not None:
        completions = complete_scenes(cfg, prompts, scenes, specs, prior, dvae, tokenizer, clip, out_dir)
    completions_grid = out_dir / "completions.png"
    return SampleResult(grid=grid, samples=out_dir / SAMPLES_FILE, scores=out_dir / SCORES_FILE,
                        completions=completions,
                        completions_grid=completions_grid if completions_grid.exists() else None,
                        metrics={"clip_score_kept": float(clip_scores.gather(1, ranking).mean()),
                                 "clip_score_all": float(clip_scores.mean())})
