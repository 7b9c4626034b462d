"""Stage 7: a CLIP for reranking and evaluation, pretrained or trained contrastively on the corpus (its images
decoded into memory or, for a large corpus, streamed from the shards: `clip.image_data`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ClipConfig
from ..images import to_float
from ..lineage import curated_corpus
from ..shards import load_corpus
from ..storage import StorePath
from ..tracking import Tracker, monitor_system
from ..training import TensorBatches, fit, seed_everything
from ..training.image_shards import IMAGE_BUFFER_ROWS, ImageShards, streams
from ..training.loop import progress_logger, set_threads
from ..training.stream import StreamedBatches
from .model import LOCAL_DIR, ClipScorer, architecture, register_architecture


def contrastive_loss(scorer: ClipScorer):
    """Symmetric InfoNCE over the batch; also reports in-batch retrieval accuracy."""

    def loss_fn(model, batch, step):
        pixels, tokens = batch
        image = F.normalize(model.encode_image(scorer.normalise(to_float(pixels))), dim=-1)
        text = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T
        labels = torch.arange(len(logits))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return loss, {"retrieval_accuracy": accuracy, "logit_scale": model.logit_scale.exp().detach()}

    return loss_fn


@dataclass(frozen=True)
class ClipResult:
    clip_source: str  # what `ClipScorer.load`/`build` takes: local-dir:... for ours
    metrics: dict[str, float]
    step: int = 0  # the updates it trained for (0: a pretrained or given CLIP)

    TAGS: ClassVar = ("clip_source",)  # what a stage's run shows of its result (flows/stages.py: show_result)


def run(cfg: ClipConfig, curated_dir: Path | StorePath, out_dir: Path, image_size: int, seed: int,
        tracker: Tracker | None = None) -> ClipResult:
    if cfg.pretrained is not None or cfg.model_name.startswith(LOCAL_DIR):
        scorer = ClipScorer.build(cfg.model_name, cfg.pretrained)  # fails here if the weights are absent
        return ClipResult(clip_source=f"{cfg.model_name}|{cfg.pretrained or ''}", metrics={})

    set_threads(cfg.optim.num_threads)
    seed_everything(seed)
    out_dir = Path(out_dir)
    register_architecture(cfg, image_size, out_dir / "architecture")
    scorer = ClipScorer.build(cfg.model_name)
    shards = ImageShards(curated_dir, image_size, tokenize=scorer.tokenizer)
    if tracker is not None:
        tracker.log_input_dataset(curated_corpus(curated_dir), "training")
    batch_size = min(cfg.optim.batch_size, shards.num_rows)
    if streams(cfg.image_data, shards):
        batches = iter(StreamedBatches(shards, batch_size, seed=seed, buffer_rows=IMAGE_BUFFER_ROWS))
    else:
        corpus = load_corpus(curated_dir, image_size)
        batches = iter(TensorBatches((torch.from_numpy(corpus.images), scorer.tokenizer(corpus.captions)),
                                     batch_size, seed=seed))

    with monitor_system(tracker):
        result = fit(scorer.model, contrastive_loss(scorer), batches, cfg.optim,
                     on_log=progress_logger("clip", cfg.optim.steps, tracker), samples_per_batch=batch_size)
    scorer.model = result.model.eval()
    directory = scorer.save(out_dir / "model", architecture(cfg, image_size))
    if tracker is not None:
        tracker.log_artifact(directory, "clip")
    return ClipResult(clip_source=LOCAL_DIR + str(directory.resolve()), metrics=result.metrics, step=result.step)
