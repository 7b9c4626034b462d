"""Train the dVAE (gumbel-softmax relaxation, or vq codes) on curated images, on Ray Train, and save it.

Each Ray Train worker reads its rank's share of the curated corpus, streamed from the shards through a
shuffle buffer or, for a small corpus, decoded into memory (`dvae.image_data`), and runs the shared `fit` loop (DDP over gloo on CPU, NCCL on GPUs, bf16 autocast and channels_last on CUDA).
Checkpoints every `checkpoint_every` updates carry weights, optimizer, EMA, every rank's RNG and
the step, so a run killed and started again resumes at the same step with the same data next.
The weights kept are the EMA's where `optim.ema_decay` keeps one (never for vq, whose codebook
follows the live encoder), else the last: those encode the corpus and decode samples.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import checkpoint
from ..config import CorpusConfig, DVAEArchitecture, DVAEConfig
from ..corpus import oracle
from ..corpus.oracle import mean_scores
from ..corpus.shapes import eval_set
from ..images import psnr, save_grid, to_float
from ..lineage import curated_corpus, held_out_corpus
from ..shards import HOLDOUT_DIR, load_corpus, shard_paths
from ..storage import StorePath, as_path
from ..tracking import Tracker, monitor_system
from ..training import TensorBatches, fit, ray_train
from ..training.image_shards import IMAGE_BUFFER_ROWS, ImageShards, streams
from ..training.stream import StreamedBatches
from ..training.loop import unwrap
from . import pretrained
from .losses import PatchDiscriminator, PerceptualDistance, discriminator_loss, generator_loss
from .model import (BEFORE_FIELDS, KIND, DiscreteVAE, DVAEModelConfig, ImageTokenizer, build, codebook_usage,
                    kl_to_uniform, logit_laplace_nll, reconstruct, reconstruction_quality, saved_architecture)
from .vqgan import VQGAN, VQGANConfig

# held-out scenes the reconstruction oracle reads, on the shapes corpus
RECON_ORACLE_SCENES = 256
RECONSTRUCTIONS_KEY = "reconstructions"  # the MLflow image series of the grids logged while training


def temperature_at(step: int, cfg: DVAEConfig) -> float:
    """Cosine anneal from temperature_start to temperature_end over temperature_anneal_steps, then flat."""
    progress = min(1.0, step / cfg.temperature_anneal_steps)
    return cfg.temperature_end + 0.5 * (cfg.temperature_start - cfg.temperature_end) * (1 + math.cos(math.pi * progress))


def kl_weight_at(step: int, cfg: DVAEConfig) -> float:
    """Linear ramp 0 -> kl_weight over kl_warmup_steps."""
    if cfg.kl_warmup_steps == 0:
        return cfg.kl_weight
    return cfg.kl_weight * min(1.0, step / cfg.kl_warmup_steps)


def dvae_loss(cfg: DVAEConfig, perceptual: PerceptualDistance | None = None):
    """The loss callback for `fit`: pixel NLL + beta * KL(q || uniform), both per pixel dimension
    (gumbel), or pixel NLL + commitment_weight * the commitment loss (vq); plus, where configured,
    `perceptual_weight` x the perceptual distance and, once `adversarial_start` updates are done,
    `adversarial_weight` x the patch discriminator's generator loss. The discriminator (the model's
    `discriminator` submodule, attached by `attach_discriminator`) learns its hinge loss in the same
    backward pass from step 0.

    The NLL is the paper's logit-Laplace, or (recon_loss="mse") a Gaussian with fixed sigma. At the
    tiny preset's few hundred updates the logit-Laplace pays only log(error) for a wrong colour
    while it gains without bound by sharpening the background, and the codes learn shapes in grey:
    measured on the shapes corpus (1000 updates) PSNR 16.6 dB, grey reconstructions, against
    21.7 dB with colours for the Gaussian after 600.
    """

    def loss_fn(model, batch: tuple[torch.Tensor], step: int):
        (pixels,) = batch
        inner: ImageTokenizer = unwrap(model)
        images = to_float(pixels)
        if images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        tau, beta = temperature_at(step, cfg), kl_weight_at(step, cfg)
        if isinstance(inner, VQGAN):  # a pretrained VQGAN fine-tuned: its own quantiser's loss
            return vqgan_loss(model, inner, images, step, tau)
        logits, stats, commitment = model(images, tau)
        logits, stats = logits.float(), stats.float()  # the losses in fp32 under bf16 autocast
        dims = images[0].numel()
        recon = inner.decode_stats_to_image(stats)
        if cfg.recon_loss == "mse":
            nll = F.mse_loss(recon, images) / (2 * cfg.mse_sigma**2)
        else:
            nll = logit_laplace_nll(stats, inner.map_pixels(images)).mean() / dims
        with torch.no_grad():
            mse = F.mse_loss(recon, images)
            usage = codebook_usage(logits.argmax(dim=1), logits.shape[1])  # of this batch's hard codes
        # device tensors: `fit` reads them once per log window
        metrics = {"nll": nll.detach(), "recon_mse": mse, **usage}
        loss = nll + image_losses(inner, images, recon, step, metrics)
        if inner.codebook is not None:  # vq: the codes' commitment, no relaxation to anneal
            metrics["commitment"] = commitment.detach()
            return loss + cfg.commitment_weight * commitment, metrics
        kl = kl_to_uniform(logits).mean() / dims
        metrics.update({"kl": kl.detach(), "temperature": tau, "beta": beta})
        return loss + beta * kl, metrics

    def vqgan_loss(model, inner: VQGAN, images: torch.Tensor, step: int, tau: float):
        recon, tokens, quantiser_loss = model(images, tau)
        recon = recon.float()
        nll = F.mse_loss(recon, images) / (2 * cfg.mse_sigma**2)
        with torch.no_grad():
            metrics = {"nll": nll.detach(), "recon_mse": F.mse_loss(recon.clamp(0, 1), images),
                       "commitment": quantiser_loss.detach(), **codebook_usage(tokens, inner.cfg.codebook_size)}
        return nll + quantiser_loss + image_losses(inner, images, recon, step, metrics), metrics

    def image_losses(inner: ImageTokenizer, images: torch.Tensor, recon: torch.Tensor, step: int,
                     metrics: dict) -> torch.Tensor | float:
        """The perceptual and adversarial terms (and the discriminator's own loss), each logged."""
        total: torch.Tensor | float = 0.0
        if perceptual is not None and cfg.perceptual_weight > 0:
            distance = perceptual(images.float(), recon.float()).mean()
            metrics["perceptual"] = distance.detach()
            total = total + cfg.perceptual_weight * distance
        discriminator = getattr(inner, DISCRIMINATOR, None)
        if discriminator is not None:
            d_loss = discriminator_loss(discriminator, images, recon)
            g_loss = generator_loss(discriminator, recon)
            metrics.update({"discriminator_loss": d_loss.detach(), "adversarial": g_loss.detach()})
            weight = cfg.adversarial_weight if step >= cfg.adversarial_start else 0.0
            total = total + d_loss + weight * g_loss
        return total

    return loss_fn


@dataclass(frozen=True)
class DVAEResult:
    checkpoint_dir: Path
    metrics: dict[str, float]  # reported with the kept weights, and measured on them (eval_*, holdout_*, recon_oracle_*)
    step: int = 0  # the update the weights are from
    recon_grid: Path | None = None  # originals above their reconstructions (none for a registered bundle's dVAE)


def reconstruction_grid(model: DiscreteVAE, images: np.ndarray, path: Path) -> Path:
    """Originals above their reconstructions from hard (argmax) codes: what the prior will see."""
    return save_grid([list(images), list(reconstruct(model, images))], path,
                     row_labels=["originals", "dVAE reconstructions"])


def reconstruction_oracle(model: DiscreteVAE, shapes: CorpusConfig, scenes: int = RECON_ORACLE_SCENES) -> dict[str, float]:
    """The shapes oracle read on the reconstructions of `scenes` scenes drawn apart from the training
    corpus (`recon_oracle_colour`, `_shape`, `_size`, `_position`, `_all`): what of each attribute
    the tokenizer keeps, the ceiling of any prior trained on its tokens."""
    items = eval_set(shapes, scenes, seed=shapes.seed)
    recon = reconstruct(model.eval(), np.stack([np.asarray(item.image) for item in items]))
    scores = mean_scores([oracle.score(image, item.specs) for image, item in zip(recon, items)])
    return {f"recon_oracle_{name}": value for name, value in scores.items()}


def check_recon_floor(metrics: dict[str, float], floor: float, where: Path) -> None:
    """ValueError naming every attribute the reconstructions keep less of than `floor`."""
    weak = {name: value for name, value in metrics.items()
            if name.startswith("recon_oracle_") and name != "recon_oracle_all" and value < floor}
    if weak:
        read = ", ".join(f"{name.removeprefix('recon_oracle_')} {value:.2f}" for name, value in sorted(weak.items()))
        raise ValueError(
            f"the dVAE's reconstructions of {RECON_ORACLE_SCENES} held-out shapes scenes keep {read}, below "
            f"dvae.recon_oracle_floor {floor:.2f}: no prior can draw what its tokenizer cannot represent (see "
            f"{where / 'reconstructions.png'}); train the dVAE longer (dvae.optim.steps) or change its losses, "
            f"or lower the floor")


DISCRIMINATOR = "discriminator"  # the training-only submodule; its weights never leave the stage


def attach_discriminator(model: DiscreteVAE, cfg: DVAEConfig) -> DiscreteVAE:
    """Give `model` a patch discriminator (trained with it, saved in its training checkpoints, so a
    resumed run continues both) where `cfg.adversarial_weight` asks for one."""
    if cfg.adversarial_weight > 0:
        model.add_module(DISCRIMINATOR, PatchDiscriminator(cfg.discriminator_width))
    return model


def tokenizer_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training state's model weights without the discriminator's: what the dVAE checkpoint holds."""
    return {key: value for key, value in state.items() if not key.startswith(DISCRIMINATOR + ".")}


def model_config(cfg: DVAEConfig, image_size: int) -> DVAEModelConfig:
    """The architecture of `cfg` at this image size."""
    return DVAEModelConfig(**cfg.model_dump(include=set(DVAEArchitecture.model_fields)), image_size=image_size)


def architecture(cfg: DVAEConfig, image_size: int) -> DVAEModelConfig | VQGANConfig:
    """What the stage trains: a VQGAN where `cfg.init_from` is one (its own architecture, from its
    checkpoint), else the dVAE `cfg` describes."""
    if cfg.init_from:
        saved = saved_architecture(checkpoint.read_config(cfg.init_from, KIND)[0])
        if isinstance(saved, VQGANConfig):
            return saved.model_copy(update={"image_size": image_size})
    return model_config(cfg, image_size)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function: this rank's share of every batch of the corpus through `fit`."""
    import ray.train.torch

    cfg = DVAEConfig.model_validate(config["dvae"])
    model_cfg = architecture(cfg, config["image_size"])
    worker = ray_train.StageWorker.start("dvae", config, model_cfg.to_dict(), cfg.optim.steps)
    rank, world_size = worker.rank, worker.world_size
    shards = ImageShards(config["curated_dir"], config["image_size"])
    streamed = streams(cfg.image_data, shards)
    # the corpus decoded into memory, or (streamed) its first images, for the grids and measures along the way
    corpus = load_corpus(config["curated_dir"], config["image_size"], limit=256 if streamed else None)
    device = ray.train.torch.get_device()
    model = build(model_cfg)
    if worker.fine_tunes(cfg.init_from):
        model.load_state_dict(checkpoint.load(cfg.init_from, KIND)[0])
    model = attach_discriminator(model, cfg).to(device)
    perceptual = PerceptualDistance.from_file(cfg.perceptual_weights).to(device) if cfg.perceptual_weight else None
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    per_rank_batch = max(1, min(cfg.optim.batch_size, shards.num_rows) // world_size)
    if streamed:
        data = StreamedBatches(shards, per_rank_batch, seed=config["seed"], rank=rank, world_size=world_size,
                               buffer_rows=IMAGE_BUFFER_ROWS, device=device)
    else:
        data = TensorBatches((torch.from_numpy(corpus.images).to(device),), per_rank_batch, seed=config["seed"],
                             rank=rank, world_size=world_size)
    batches = data.from_step(worker.start_step * cfg.optim.grad_accum_steps)
    tracker = worker.tracker

    # (with the checkpoints on a store, the grids are this worker's scratch, logged to the stage's run, removed
    # when the worker function returns)
    scratch = None if config["out_dir"] else tempfile.TemporaryDirectory(prefix="dalle-dvae-grids-")
    out_dir = Path(config["out_dir"] or scratch.name)
    shown = corpus.images[:8]

    def on_log(step: int, metrics: dict[str, float]) -> None:
        metrics = {**metrics, "psnr": psnr(metrics["recon_mse"])}
        if "samples_per_s" in metrics:
            metrics["images_per_s"] = metrics.pop("samples_per_s") * world_size
        worker.on_log(step, metrics)

    def during_training(current: DiscreteVAE, step: int) -> dict[str, float]:
        """Every recon_grid_every updates, on rank 0: a grid, and how the hard (argmax) codes reconstruct
        training images (`train_hard_*`: the held-out measure is the stage's, at the end)."""
        if rank != 0:
            return {}
        grid = reconstruction_grid(current, shown, out_dir / "reconstructions" / f"step_{step:07d}.png")
        if tracker is not None:
            tracker.log_artifact(grid, "reconstructions")
            with Image.open(grid) as picture:  # the run page's image view steps through these
                tracker.log_image(picture.convert("RGB"), RECONSTRUCTIONS_KEY, step)
        metrics, _ = reconstruction_quality(current, corpus.images[:256], per_rank_batch)
        return {"train_hard_psnr": metrics["eval_psnr"], "train_hard_codes_used": metrics["eval_codes_used"]}

    if worker.start_step == 0 and tracker is not None:  # the untrained grid: the image view's slider starts at step 0
        with torch.random.fork_rng(devices=[]):
            during_training(unwrap(model), 0)
        model.train()
    fit(model, dvae_loss(cfg, perceptual), batches, cfg.optim, on_log=on_log, samples_per_batch=per_rank_batch,
        measure=during_training, measure_every=cfg.recon_grid_every, on_checkpoint=worker.on_checkpoint,
        checkpoint_every=cfg.checkpoint_every, resume_state=worker.resume_state, clip_separately=(DISCRIMINATOR,))


def log_inputs(curated_dir: Path | StorePath, tracker: Tracker | None) -> None:
    """The curated corpus the dVAE trains on and, where the filter set one apart, the held-out corpus its
    reconstructions are measured on, as the stage run's datasets."""
    if tracker is None:
        return
    tracker.log_input_dataset(curated_corpus(curated_dir), "training")
    if (held_out := held_out_corpus(curated_dir)) is not None:
        tracker.log_input_dataset(held_out, "evaluation")


def run(cfg: DVAEConfig, curated_dir: Path | StorePath, out_dir: Path, image_size: int, seed: int,
        shapes: CorpusConfig | None = None, tracker: Tracker | None = None,
        ray_address: str | None = None, checkpoint_store: StorePath | None = None) -> DVAEResult:
    """Train on Ray Train (resuming a run killed earlier in `out_dir`), then save its weights (the EMA's, where kept).

    `shapes`: the shapes corpus's settings when the images are that corpus; the oracle then reads
    held-out scenes back from the reconstructions (`reconstruction_oracle`), and the stage fails
    below `cfg.recon_oracle_floor`, after saving, so the weights can be looked at. `checkpoint_store`: Ray
    Train's checkpoints there, on an object store (`train_on_ray`); rank 0's grids along the way then go to the
    stage's MLflow run alone, the workers writing nothing into `out_dir`.
    """
    out_dir = Path(out_dir).resolve()
    if not shard_paths(curated_dir):  # fail here, not in every worker and its restarts
        raise FileNotFoundError(f"no curated shards (*.tar) in {curated_dir}")
    if cfg.pretrained is not None and cfg.init_from is None:  # (a retrain's init_from, its trained weights, wins)
        tokenizer = pretrained.load(cfg.pretrained, image_size)  # a bad file fails here, before any training
        if cfg.optim.steps == 0:
            log_inputs(curated_dir, tracker)
            return measure_and_save(tokenizer, cfg, curated_dir, out_dir, image_size, shapes, tracker, step=0,
                                    meta={"pretrained": cfg.pretrained.model_dump()})
        cfg = fine_tuning_settings(cfg, tokenizer, out_dir)
    model_cfg = architecture(cfg, image_size)
    if cfg.perceptual_weight:  # a missing or wrong weights file fails here, before any worker starts
        PerceptualDistance.from_file(cfg.perceptual_weights)
    if isinstance(model_cfg, VQGANConfig) and cfg.recon_loss != "mse":
        raise ValueError(f"dvae.recon_loss {cfg.recon_loss} fine-tuning the VQGAN {cfg.init_from}: a VQGAN "
                         "decodes pixels, not the logit-Laplace's statistics; set dvae.recon_loss=mse")
    if cfg.init_from and isinstance(model_cfg, DVAEModelConfig):
        checkpoint.check_same_model(cfg.init_from, KIND, model_cfg.to_dict(), "dvae.init_from",
                                    defaults={**DVAEModelConfig().to_dict(), **BEFORE_FIELDS})
    loop_config = {
        "dvae": cfg.model_dump(mode="json"),
        "curated_dir": str(as_path(curated_dir).resolve()),  # a folder every worker sees, or a store's URL
        "image_size": image_size,
        "seed": seed,
        "out_dir": None if checkpoint_store else str(out_dir),  # where rank 0 keeps its grids along the way
    }
    log_inputs(curated_dir, tracker)
    with monitor_system(tracker):
        state, train_metrics = ray_train.train_on_ray("dvae", train_worker, loop_config, cfg, out_dir,
                                                      ray_address=ray_address, tracker=tracker,
                                                      reads={"the curated shards": as_path(curated_dir),
                                                             **({"dvae.init_from": as_path(cfg.init_from)}
                                                                if cfg.init_from else {})},
                                                      checkpoint_store=checkpoint_store)
    final_model = build(model_cfg)
    final_model.load_state_dict(tokenizer_weights(state["ema"] if state.get("ema") is not None else state["model"]))
    result = measure_and_save(final_model.eval(), cfg, curated_dir, out_dir, image_size, shapes, tracker,
                              step=state["step"], meta={"ema": state.get("ema") is not None})
    return DVAEResult(checkpoint_dir=result.checkpoint_dir, metrics={**train_metrics, **result.metrics},
                      step=result.step, recon_grid=result.recon_grid)


def fine_tuning_settings(cfg: DVAEConfig, tokenizer: ImageTokenizer, out_dir: Path) -> DVAEConfig:
    """`cfg` to fine-tune a pretrained tokenizer, starting from its weights (saved in `out_dir/pretrained`,
    a checkpoint like any other): a dVAE takes its architecture into `cfg`, a VQGAN's is read from there."""
    start = checkpoint.save(out_dir / "pretrained", KIND, tokenizer.state_dict(), tokenizer.cfg.to_dict(),
                            meta={"pretrained": cfg.pretrained.model_dump()})
    shape = tokenizer.cfg.model_dump(include=set(DVAEArchitecture.model_fields)) \
        if isinstance(tokenizer, DiscreteVAE) else {}
    return cfg.model_copy(update={**shape, "init_from": str(start), "pretrained": None})


def measure_and_save(model: ImageTokenizer, cfg: DVAEConfig, curated_dir: Path | StorePath, out_dir: Path,
                     image_size: int, shapes: CorpusConfig | None, tracker: Tracker | None, step: int,
                     meta: dict[str, Any]) -> DVAEResult:
    """The tokenizer the stage keeps, measured (hard-code PSNR and codes used on the corpus and the
    held-out split, the reconstruction oracle on the shapes corpus), saved as the stage's checkpoint
    with a reconstruction grid, logged; then the oracle floor is checked (after saving, so the weights
    can be looked at)."""
    with monitor_system(tracker):
        corpus = load_corpus(curated_dir, image_size, limit=1024)
        # in training batches: at 256 px a decoder's activations for 256 images doubled the stage's peak
        eval_metrics, _ = reconstruction_quality(model, corpus.images, cfg.optim.batch_size)
        held_out = as_path(curated_dir) / HOLDOUT_DIR
        if shard_paths(held_out):  # your corpus: what the tokenizer makes of images no stage trained on
            held_out_images = load_corpus(held_out, image_size, limit=1024).images
            holdout_metrics, _ = reconstruction_quality(model, held_out_images, cfg.optim.batch_size)
            eval_metrics.update({name.replace("eval_", "holdout_", 1): value
                                 for name, value in holdout_metrics.items()})
        if shapes is not None:
            eval_metrics.update(reconstruction_oracle(model, shapes))
    recon_grid = reconstruction_grid(model, corpus.images[:8], out_dir / "reconstructions.png")
    checkpoint_dir = checkpoint.save(out_dir / "checkpoint", KIND, model.state_dict(), model.cfg.to_dict(),
                                     meta={"step": step, **meta, **eval_metrics})
    if tracker is not None:  # beside the training curves, and before the floor can fail the stage
        tracker.log_metrics(eval_metrics, step=step)
        tracker.log_artifact(recon_grid)
        tracker.log_artifact(checkpoint_dir, "checkpoint")
    check_recon_floor(eval_metrics, cfg.recon_oracle_floor, out_dir)
    return DVAEResult(checkpoint_dir=checkpoint_dir, metrics=eval_metrics, step=step, recon_grid=recon_grid)
