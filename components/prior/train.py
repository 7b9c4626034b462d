"""Train the prior on the token Parquet with Ray Train's TorchTrainer (DDP or FSDP2; gloo on CPU).

`train_worker` is the thin Ray shell around the shared `fit` loop: it streams its rank's share of
the token dataset through a shuffle buffer (`ParquetBatches`), resumes from Ray's latest
checkpoint when a worker or the driver was lost, logs to MLflow from rank 0 and reports
checkpoints through `ray_train.report_checkpoint`. Given the dVAE that made the tokens, rank 0 also
draws a few captions at every checkpoint into the run's image view (`Preview`).

Under FSDP2 (`prior.parallel: fsdp`) no process holds the whole prior: each worker builds it on the
meta device and materialises only its shards (`build`), computes in bf16 with fp32 gradient
reduction where the prior trains in bf16 (`mixed_precision`), writes and reads only its shards at a
checkpoint (DCP, `ray_train.report_sharded`), and the driver streams the kept weights into the
stage's safetensors file a group of tensors at a time (`export`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from .. import checkpoint
from ..config import PriorArchitecture, PriorConfig
from ..dvae.model import ImageTokenizer
from ..dvae.model import load as load_dvae
from ..images import to_uint8
from ..lineage import token_dataset
from ..sample.generate import sample_image_tokens
from ..storage import StorePath, as_path
from ..tracking import Tracker, monitor_system
from ..training import ParquetBatches, TokenParquet, fit, ray_train, sharded
from ..training.flops import measured_matmul_peak, transformer_flops_per_token
from ..training.loop import SHARDED_KEY, unwrap, uses_bf16
from .model import KIND, Prior, PriorModelConfig, prior_loss

# CPU workers under FSDP: glibc's malloc raises its mmap threshold to the largest block freed (up to 32 MiB),
# after which FSDP's gathered blocks and reduced gradients come from the heap, which it seldom gives back: a
# worker of a 100M-parameter prior held 0.5-0.7 GiB more than its tensors, most of what sharding saves. A
# fixed threshold keeps them mapped, and unmapped when freed (peak 2.5 -> 1.8 GiB a worker, no slower).
SHARDED_CPU_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
# the MLflow image series of the preview, one per caption: "preview-<n> <caption>" (MLflow turns a "/" in a key into "~")
PREVIEW_KEY = "preview"
PREVIEW_SCALE = 4  # preview pixels are shown this many screen pixels wide, as the stages' grids are


def model_config(cfg: PriorConfig, manifest: dict) -> PriorModelConfig:
    """The architecture of `cfg` with the vocabularies and lengths of the token dataset."""
    return PriorModelConfig(**cfg.model_dump(include=set(PriorArchitecture.model_fields)),
                            text_vocab=int(manifest["text_vocab"]), image_vocab=int(manifest["image_vocab"]),
                            text_len=int(manifest["text_len"]), grid_size=int(manifest["grid_size"]))


def split_validation(num_rows: int, cfg: PriorConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, validation rows) as global row indices of the token dataset: a seeded draw, the
    same on every rank and every resume."""
    count = min(cfg.val_rows_max, int(num_rows * cfg.val_fraction))
    if count and num_rows - count < 1:
        raise ValueError(f"val_fraction {cfg.val_fraction} leaves no training rows out of {num_rows}")
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return order[count:].sort().values, order[:count].sort().values


def validation_loss(text, lengths, image, cfg: PriorConfig, batch_size: int):
    """Mean text / image / weighted loss over the held-out rows (no caption dropout), `batch_size` rows a forward:
    the training batch, which fits where training does (a fixed 256 made validation's attention the worker's
    peak, growing with the corpus until it had 256 validation rows: 4096 image tokens a row ran out of memory)."""

    def evaluate(model: Prior) -> dict[str, float]:
        totals = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}
        for start in range(0, len(text), batch_size):
            rows = slice(start, start + batch_size)
            padded = model.pad_text(text[rows], lengths[rows])
            loss, metrics = prior_loss(*model(padded, image[rows]), padded, image[rows], cfg.text_loss_weight)
            share = len(padded) / len(text)
            totals["loss"] += loss.item() * share
            totals["text_loss"] += float(metrics["text_loss"]) * share
            totals["image_loss"] += float(metrics["image_loss"]) * share
        return totals

    return evaluate


def prior_loss_fn(cfg: PriorConfig):
    """The loss callback for `fit`; drops whole captions with probability caption_dropout."""

    def loss_fn(model, batch, step):
        text, lengths, image = batch
        if cfg.caption_dropout > 0:
            dropped = torch.rand(len(lengths), device=lengths.device) < cfg.caption_dropout
            lengths = torch.where(dropped, torch.zeros_like(lengths), lengths)
        text = unwrap(model).pad_text(text, lengths)
        text_logits, image_logits = model(text, image)
        return prior_loss(text_logits, image_logits, text, image, cfg.text_loss_weight)

    return loss_fn


def check_same_architecture(checkpoint_dir: str | Path, model_cfg: PriorModelConfig) -> None:
    """ValueError unless the prior at `checkpoint_dir` has this architecture and these vocabularies."""
    checkpoint.check_same_model(checkpoint_dir, KIND, model_cfg.to_dict(), "prior.init_from",
                                ignore=("dropout", "attention_backend"))


def initial_values(model_cfg: PriorModelConfig, seed: int, init_from: str | None = None) -> sharded.InitialValue:
    """Each parameter's full starting value, one at a time: `init_from`'s tensor (fine-tuning), else the
    prior's own initialisation (`Prior.init_parameter`) drawn from a generator seeded by `seed`, parameter
    after parameter in `named_parameters` order: the weights `Prior.reset_parameters` gives a whole prior
    from that generator, under DDP and FSDP alike, on any number of workers."""
    if init_from:
        check_same_architecture(init_from, model_cfg)
        weights = safe_open(str(Path(init_from) / checkpoint.WEIGHTS), framework="pt")
        return lambda name, shape: weights.get_tensor(name)
    with torch.device("meta"):
        prior = Prior(model_cfg)  # its parameter names and initialisation, no storage
    generator = torch.Generator().manual_seed(seed)

    def drawn(name: str, shape: torch.Size) -> torch.Tensor:
        value = torch.empty(shape)
        prior.init_parameter(name, value, generator)
        return value

    return drawn


def mixed_precision(cfg: PriorConfig, device: torch.device):
    """FSDP2's policy: bf16 parameters for compute and fp32 gradient reduction where the prior trains in
    bf16 (`optim.precision`, `auto` where the device has bf16 units); fp32 throughout otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if uses_bf16(cfg.optim, device.type):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def build(model_cfg: PriorModelConfig, cfg: PriorConfig, device: torch.device,
          initial_value: sharded.InitialValue | None) -> Prior:
    """This worker's prior, built on the meta device and given its storage on `device`: whole (for DDP to
    wrap), or under FSDP2 each transformer block sharded on its own, then the rest, and only this rank's
    shards materialised (`sharded.materialise`: no worker ever holds the whole model). Its weights:
    `initial_value` (`initial_values`; None where the run resumes: the checkpoint overwrites every one)."""
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = Prior(model_cfg)
    for block in model.blocks:
        block.activation_checkpointing = cfg.activation_checkpointing
    if cfg.parallel == "fsdp":
        policy = mixed_precision(cfg, device)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    sharded.materialise(model, device, initial_value)
    return model


def captions_of(dataset: TokenParquet, rows: np.ndarray) -> list[str]:
    """The captions of some global rows of the token dataset, in the order given."""
    groups = np.searchsorted(dataset.group_start, rows, side="right") - 1
    captions = []
    for row, group in zip(rows.tolist(), groups.tolist()):
        column = dataset.group_table(group, ["caption"]).column("caption")
        captions.append(column[row - int(dataset.group_start[group])].as_py())
    return captions


def preview_key(index: int, caption: str) -> str:
    """`PREVIEW_KEY-<index> <caption>`, the caption cut short and kept to what an MLflow image key may hold."""
    readable = " ".join(re.sub(r"[^A-Za-z0-9_\-. ]", " ", caption).split())[:60]
    return f"{PREVIEW_KEY}-{index} {readable}".rstrip()


@dataclass
class Preview:
    """A few captions of the token dataset (validation rows, which training never sees, where there are
    any), as the prior reads them, that the prior draws one image for at every checkpoint, decoded by the
    dVAE and logged as MLflow image series, one per caption: the run page's image view steps through what
    the prior learns. The tokens are drawn with a generator of the preview's own, seeded the same every
    time, so the training's random streams are untouched and the pictures change only with the weights."""

    captions: list[str]
    text: torch.Tensor
    lengths: torch.Tensor
    dvae: ImageTokenizer
    seed: int

    @torch.no_grad()
    def images(self, prior: Prior) -> np.ndarray:
        """(captions, H, W, 3) uint8: one image each, drawn at temperature 1 without filtering."""
        generator = torch.Generator(self.text.device).manual_seed(self.seed)
        tokens, _ = sample_image_tokens(prior, self.text, self.lengths, generator, cuda_graph=False)
        with torch.autocast(self.text.device.type, enabled=False):  # fp32, as the sample stage decodes
            return to_uint8(self.dvae.decode(tokens))

    def log(self, prior: Prior, tracker: Tracker, step: int) -> None:
        for index, (caption, pixels) in enumerate(zip(self.captions, self.images(prior))):
            picture = Image.fromarray(pixels)
            picture = picture.resize((picture.width * PREVIEW_SCALE, picture.height * PREVIEW_SCALE),
                                     Image.Resampling.NEAREST)
            tracker.log_image(picture, preview_key(index, caption), step)


def load_preview(dataset: TokenParquet, val_rows: torch.Tensor, dvae_dir: str, count: int, seed: int,
                 device: torch.device) -> Preview:
    """The preview of the first `count` validation rows (of the first rows, without a validation split)."""
    pool = val_rows if len(val_rows) else torch.arange(dataset.num_rows)
    rows = pool[:count].numpy()
    text, lengths, _ = dataset.read_rows(rows)
    return Preview(captions_of(dataset, rows), text.to(device), lengths.to(device),
                   load_dvae(dvae_dir).to(device), seed)


def worker_preview(config: dict[str, Any], cfg: PriorConfig, rank: int, dataset: TokenParquet,
                   val_rows: torch.Tensor, device: torch.device) -> Preview | None:
    """Rank 0's preview, where the run logs to MLflow and was given the dVAE; None on the other ranks.
    FSDP gets none: its parameters are whole only inside the forward pass of every rank together."""
    if rank != 0 or not (cfg.preview_prompts and config.get("dvae_dir") and config.get("tracker")):
        return None
    if cfg.parallel == "fsdp":
        print("[prior] no image preview under FSDP (prior.parallel=fsdp); the sample stage draws images", flush=True)
        return None
    return load_preview(dataset, val_rows, config["dvae_dir"], cfg.preview_prompts, config["seed"], device)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function; `config` is plain data so it pickles to every worker."""
    import ray.train.torch

    cfg = PriorConfig.model_validate(config["prior"])
    dataset = TokenParquet(config["dataset_dir"])
    model_cfg = model_config(cfg, dataset.manifest)
    worker = ray_train.StageWorker.start("prior", config, model_cfg.to_dict(), cfg.optim.steps)
    rank, world_size = worker.rank, worker.world_size
    _, val_rows = split_validation(dataset.num_rows, cfg, config["seed"])
    device = ray.train.torch.get_device()
    init_from = cfg.init_from if worker.fine_tunes(cfg.init_from) else None
    model = build(model_cfg, cfg, device,
                  initial_values(model_cfg, config["seed"], init_from) if worker.resume_state is None else None)
    if cfg.parallel == "ddp":
        model = ray.train.torch.prepare_model(model)
    flops_per_token = transformer_flops_per_token(model, model_cfg.layers, model_cfg.seq_len, model_cfg.d_model)
    peak = measured_matmul_peak(device, torch.bfloat16 if uses_bf16(cfg.optim, device.type) else torch.float32)

    per_rank_batch = max(1, cfg.optim.batch_size // world_size)
    # streamed from the Parquet row groups through a shuffle buffer; the validation rows never enter it
    batches = ParquetBatches(
        dataset, per_rank_batch, seed=config["seed"], rank=rank, world_size=world_size,
        buffer_rows=cfg.shuffle_buffer_rows, exclude_rows=val_rows, device=device,
    ).from_step(worker.start_step * cfg.optim.grad_accum_steps)
    validate = (validation_loss(*(t.to(device) for t in dataset.read_rows(val_rows)), cfg, per_rank_batch)
                if len(val_rows) else None)
    tracker = worker.tracker
    preview = worker_preview(config, cfg, rank, dataset, val_rows, device)

    def on_log(step: int, metrics: dict[str, float]) -> None:
        metrics = dict(metrics)
        if "samples_per_s" in metrics:
            metrics["tokens_per_s"] = metrics.pop("samples_per_s") * model_cfg.seq_len * world_size
            # each worker against its own device's measured matmul peak
            metrics["mfu"] = metrics["tokens_per_s"] / world_size * flops_per_token / peak
        worker.on_log(step, metrics)

    def validate_and_preview(unwrapped: Prior, step: int) -> dict[str, float]:
        """Validation runs right before each checkpoint, so every report carries its val_loss; the
        preview's images are drawn there too."""
        metrics = {f"val_{key}": value for key, value in validate(unwrapped).items()} if validate else {}
        worker.latest_metrics.update(metrics)
        if preview is not None:
            preview.log(unwrapped, tracker, step)
        return metrics

    if preview is not None and worker.start_step == 0:  # the untrained prior's: the image view's slider starts at step 0
        preview.log(unwrap(model), tracker, 0)
    fit(model, prior_loss_fn(cfg), batches, cfg.optim, on_log=on_log, on_checkpoint=worker.on_checkpoint,
        checkpoint_every=cfg.checkpoint_every, resume_state=worker.resume_state, samples_per_batch=per_rank_batch,
        measure=validate_and_preview if validate or preview else None, measure_every=cfg.checkpoint_every)


@dataclass(frozen=True)
class PriorResult:
    checkpoint_dir: Path
    metrics: dict[str, float]  # reported with the kept weights
    step: int = 0  # the update the weights are from


def check_preview_dvae(dvae_dir: str | Path, manifest: dict) -> None:
    """ValueError unless `dvae_dir` holds the dVAE that made the token dataset's image tokens."""
    found = checkpoint.weights_hash(dvae_dir)
    if found != manifest["dvae_hash"]:
        raise ValueError(f"the dVAE at {dvae_dir} (weights {found[:12]}) did not tokenize this dataset (made by "
                         f"weights {manifest['dvae_hash'][:12]}): its decoder would draw the preview's tokens as "
                         f"something else; pass the dVAE the tokenize-corpus stage used")


def export(state: dict[str, Any], directory: Path, model_cfg: PriorModelConfig, meta: dict[str, Any]) -> Path:
    """The kept training state's weights as the stage's checkpoint (`model.safetensors` + `config.json`).
    Sharded ones (FSDP) are read from the checkpoint's DCP folder a group of tensors at a time and
    streamed into the file (`checkpoint.save_streamed`): the driver never holds the whole model."""
    if not state.get(SHARDED_KEY):
        return checkpoint.save(directory, KIND, state["model"], model_cfg.to_dict(), meta=meta)
    layout = sharded.saved_layout(state[SHARDED_KEY])
    return checkpoint.save_streamed(directory, KIND, layout, sharded.saved_weights(state[SHARDED_KEY], layout),
                                    model_cfg.to_dict(), meta=meta)


def run(cfg: PriorConfig, dataset_dir: Path | StorePath, out_dir: Path, seed: int, tracker: Tracker | None = None,
        ray_address: str | None = None, dvae_dir: Path | StorePath | None = None,
        checkpoint_store: StorePath | None = None) -> PriorResult:
    """Train on Ray Train (resuming a run killed earlier in `out_dir`), then save the kept weights.

    `dvae_dir`: the dVAE that tokenized the dataset; with it (and a `tracker`), rank 0 draws
    `cfg.preview_prompts` held-out captions at every checkpoint into the run's image view (`Preview`).
    `checkpoint_store`: Ray Train's checkpoints there, on an object store (`train_on_ray`), but for a model
    sharded with FSDP, whose ranks write their shards straight into a local or shared storage (`report_sharded`).
    """
    out_dir = Path(out_dir).resolve()
    manifest = TokenParquet(dataset_dir).manifest  # fail here, not in a worker, if the dataset is incomplete
    model_cfg = model_config(cfg, manifest)
    if cfg.init_from:
        check_same_architecture(cfg.init_from, model_cfg)
    if dvae_dir is not None:
        check_preview_dvae(dvae_dir, manifest)
    loop_config = {
        "prior": cfg.model_dump(mode="json"),
        "dataset_dir": str(as_path(dataset_dir).resolve()),  # a folder every worker sees, or a store's URL
        "seed": seed,
        "dvae_dir": str(as_path(dvae_dir).resolve()) if dvae_dir is not None else None,
    }
    if tracker is not None:
        tracker.log_input_dataset(token_dataset(dataset_dir), "training")
    with monitor_system(tracker):
        state, metrics = ray_train.train_on_ray(
            "prior", train_worker, loop_config, cfg, out_dir,
            score_attribute="val_loss" if cfg.val_fraction > 0 else None, ray_address=ray_address, tracker=tracker,
            cpu_worker_env=SHARDED_CPU_WORKER_ENV if cfg.parallel == "fsdp" else None,
            reads={"the token dataset": as_path(dataset_dir),
                   **({"the dVAE": as_path(dvae_dir)} if dvae_dir is not None else {}),
                   **({"prior.init_from": as_path(cfg.init_from)} if cfg.init_from else {})},
            checkpoint_store=checkpoint_store if cfg.parallel != "fsdp" else None,
        )
    checkpoint_dir = export(state, out_dir / "checkpoint", model_cfg,
                            meta={**metrics, "step": state["step"], "dvae_hash": manifest["dvae_hash"],
                                  "tokenizer_hash": manifest["tokenizer_hash"]})
    if tracker is not None:
        tracker.log_artifact(checkpoint_dir, "checkpoint")
    return PriorResult(checkpoint_dir=checkpoint_dir, metrics=metrics, step=state["step"])
