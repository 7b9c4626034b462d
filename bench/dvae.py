"""dVAE throughput: training steps and encoding, ours against the same model in plain eager fp32.

Ours is what the pipeline runs on the device: training through `dvae_loss` and the shared `fit`
loop (AdamW, grad clipping, EMA, metrics), bf16 autocast where the device has bf16 units,
channels_last and torch.compile on CUDA; encoding is `model.encode` (encoder + argmax) under
torch.inference_mode with the same optimisations. The baseline, measured in the same process, is
the same model (same initial weights) in plain eager fp32 NCHW: the same loss terms and AdamW, no
autocast, no compile, no channels_last, no EMA. Images are random uint8; no dataset is needed.

FLOPs are counted by `FlopCounterMode` (convolutions, i.e. the matmul-class work) on one forward,
and on forward + backward for training, on the meta device; achieved FLOP/s are set against the
device's measured square-matmul peak (`measured_matmul_peak`) in the precision used.

The default run needs torch, numpy, pyarrow and this package's dvae/training/config modules only
(no Prefect, Ray or MLflow), so it runs on a lent GPU machine as is:

    python bench/dvae.py --preset paper --batch 8 --encode-batch 128 --steps 10

`--corpus-tokenization` also compares the pipeline's corpus tokenization (shards -> Parquet, end
to end, twice: the first run carries one-off start-up such as Ray's) with the encoder's bare
forward on the same images, on CPU (issue #4's goal: at least 0.85 of the bare forward):

    python bench/dvae.py --preset small --steps 3 --corpus-tokenization --images 2000

Prints one JSON document (and writes it to `--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import device_name, emit, step_seconds
from torch.utils.flop_counter import FlopCounterMode

from dalle_pipeline.components.config import resolve
from dalle_pipeline.components.presets import PRESETS
from dalle_pipeline.components.dvae.model import DiscreteVAE, DVAEModelConfig
from dalle_pipeline.components.dvae.train import dvae_loss, model_config
from dalle_pipeline.components.images import to_float
from dalle_pipeline.components.training import TensorBatches, fit
from dalle_pipeline.components.training.flops import measured_matmul_peak
from dalle_pipeline.components.training.loop import _should_compile, set_threads, uses_bf16

# flag -> the preset field it overrides
DIM_FLAGS = {
    "image_size": "corpus.image_size",
    "n_hid": "dvae.n_hid",
    "num_groups": "dvae.num_groups",
    "blocks_per_group": "dvae.blocks_per_group",
    "codebook_size": "dvae.codebook_size",
}
BASELINE = "same model and initial weights in plain eager fp32 NCHW: same loss (dvae_loss), torch AdamW, no EMA"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for name, field in DIM_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=f"overrides {field}")
    parser.add_argument("--quantizer", choices=["gumbel", "vq"], help="overrides dvae.quantizer (the tokenizer kind)")
    parser.add_argument("--batch", type=int, help="training batch (default: the preset's dvae.optim.batch_size)")
    parser.add_argument("--encode-batch", type=int, help="encoding batch (default: --batch)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps and encoding batches")
    parser.add_argument("--warmup", type=int, help="untimed steps first (compilation, allocator); default 3 on "
                        "CUDA (a compile, then a recompile once the temperature varies), 1 on CPU")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="ours' autocast; auto: bf16 where the device has bf16 units")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="torch.compile ours; auto: the pipeline's rule (the preset's, else CUDA only)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = every core allowed)")
    parser.add_argument("--corpus-tokenization", action="store_true",
                        help="also time the pipeline's corpus tokenization against the bare encoder (CPU)")
    parser.add_argument("--images", type=int, default=2000, help="images in the tokenization corpus")
    parser.add_argument("--shard-size", type=int, help="samples per shard (default: the preset's download one)")
    parser.add_argument("--tokenize-batch", type=int, default=256, help="batch_size passed to the tokenization")
    parser.add_argument("--image-data", action="store_true",
                        help="also time training on a corpus of --images shape scenes read from memory and streamed")
    parser.add_argument("--rounds", type=int, default=3, help="--image-data: alternating rounds of each path")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 3 if args.device == "cuda" else 1
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.corpus_tokenization and args.device != "cpu":
        parser.error("--corpus-tokenization compares on CPU: run it with --device cpu")
    return args


def flops_per_image(model_cfg: DVAEModelConfig, train: bool) -> float:
    """FlopCounterMode's count for one image (batch 1) on the meta device: nothing is computed."""
    with torch.device("meta"):
        model = DiscreteVAE(model_cfg).eval()  # eval: vq's codebook update reads values, which meta tensors lack
        images = torch.rand(1, 3, model_cfg.image_size, model_cfg.image_size)
    with FlopCounterMode(display=False) as counter:
        if train:  # the loss's elementwise terms are not matmul-class work and are not counted
            logits, stats, _ = model(images, 1.0)
            (logits.sum() + stats.sum()).backward()
        else:
            model.encode(images)
    return float(counter.get_total_flops())


def measure(batch: int, seconds: list[float], flops: float, peak: float) -> dict[str, float]:
    """Images/s from the median step (and from the mean), achieved FLOP/s and share of the peak."""
    images_per_s = batch / statistics.median(seconds)
    return {"images_per_s": images_per_s, "images_per_s_mean": batch * len(seconds) / sum(seconds),
            "flops_per_s": images_per_s * flops, "share_of_matmul_peak": images_per_s * flops / peak,
            "step_seconds": {"min": min(seconds), "median": statistics.median(seconds), "max": max(seconds)}}


def train_ours(model: DiscreteVAE, cfg, pixels: torch.Tensor, batch: int, args, bf16: bool,
               compiled: bool, batches=None) -> list[float]:
    """Step seconds of `fit` + `dvae_loss` as the worker runs them, from one `on_log` call per step; on random
    `pixels`, or on `batches` (the corpus as a worker reads it)."""
    if pixels.is_cuda:
        model = model.to(memory_format=torch.channels_last)  # as the Ray Train worker does
    optim = cfg.optim.model_copy(update={"steps": args.warmup + args.steps, "batch_size": batch, "log_every": 1,
                                         "precision": "bf16" if bf16 else "fp32", "compile": compiled})
    ends: list[float] = []

    def on_log(step: int, metrics: dict[str, float]) -> None:  # after optimizer.step and the EMA update
        if pixels.is_cuda:
            torch.cuda.synchronize()
        ends.append(time.perf_counter())

    batches = batches if batches is not None else iter(TensorBatches((pixels,), batch, seed=0))
    fit(model, dvae_loss(cfg), batches, optim, on_log=on_log)
    return [end - previous for previous, end in zip(ends[args.warmup - 1 : -1], ends[args.warmup :])]


def train_baseline(model: DiscreteVAE, cfg, pixels: torch.Tensor, batch: int, args) -> list[float]:
    """Step seconds of a plain eager fp32 step: forward, the same loss (`dvae_loss`), backward, torch AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    loss_fn, batch_pixels = dvae_loss(cfg), pixels[:batch]
    model.train()

    def step() -> None:
        loss, _ = loss_fn(model, (batch_pixels,), cfg.kl_warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step_seconds(step, pixels.device, args.steps, args.warmup)


def encode_rate(model: DiscreteVAE, pixels: torch.Tensor, batch: int, args, optimised: bool, bf16: bool = False,
                compiled: bool = False) -> list[float]:
    """Batch seconds of `model.encode` from uint8 pixels (conversion included), under inference_mode."""
    cuda = pixels.is_cuda
    model.eval()
    if optimised and cuda:
        model = model.to(memory_format=torch.channels_last)
    encode = torch.compile(model.encode) if optimised and compiled else model.encode
    autocast = torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=optimised and bf16)
    batch_pixels = pixels[:batch]

    def step() -> None:
        images = to_float(batch_pixels)
        images = images.contiguous(memory_format=torch.channels_last) if optimised and cuda else images.contiguous()
        with torch.inference_mode(), autocast:
            encode(images)

    return step_seconds(step, pixels.device, args.steps, args.warmup)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0]
    set_threads(args.threads)
    device = torch.device(args.device)
    overrides = {DIM_FLAGS[name]: getattr(args, name) for name in DIM_FLAGS if getattr(args, name) is not None}
    if args.quantizer is not None:
        overrides["dvae.quantizer"] = args.quantizer
    pipeline_cfg = resolve(args.preset, overrides)
    cfg = pipeline_cfg.dvae
    model_cfg = model_config(cfg, pipeline_cfg.corpus.image_size)
    batch = args.batch or cfg.optim.batch_size
    encode_batch = args.encode_batch or batch
    bf16 = uses_bf16(cfg.optim.model_copy(update={"precision": args.precision}), device.type)
    compiled = {"on": True, "off": False, "auto": _should_compile(cfg.optim, device.type)}[args.compile]

    torch.manual_seed(0)
    size = model_cfg.image_size
    pixels = torch.randint(0, 256, (2 * max(batch, encode_batch), size, size, 3), dtype=torch.uint8, device=device)
    ours = DiscreteVAE(model_cfg).to(device)
    baseline = DiscreteVAE(model_cfg).to(device)
    baseline.load_state_dict(ours.state_dict())

    train_flops, encode_flops = flops_per_image(model_cfg, train=True), flops_per_image(model_cfg, train=False)
    # a peak is the best the device does (measured_matmul_peak takes the best of a few tries)
    peaks = {"fp32": measured_matmul_peak(device, torch.float32)}
    if bf16:
        peaks["bf16"] = measured_matmul_peak(device, torch.bfloat16)
    ours_peak = peaks["bf16" if bf16 else "fp32"]

    baseline_train = train_baseline(baseline, cfg, pixels, batch, args)
    ours_train = train_ours(ours, cfg, pixels, batch, args, bf16, compiled)
    baseline_encode = encode_rate(baseline, pixels, encode_batch, args, optimised=False)
    ours_encode = encode_rate(ours, pixels, encode_batch, args, optimised=True, bf16=bf16, compiled=compiled)

    result = {
        "bench": "dvae",
        "preset": args.preset,
        "settings": vars(args),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        # other work on a shared machine skews CPU figures: the 1-minute load before and after
        "load_average_1m": {"start": load_at_start, "end": os.getloadavg()[0]},
        "dims": {**model_cfg.to_dict(), "grid_size": model_cfg.grid_size, "batch": batch, "encode_batch": encode_batch},
        "ours": {"precision": "bf16" if bf16 else "fp32", "compile": compiled, "channels_last": device.type == "cuda",
                 "ema_decay": cfg.optim.ema_decay, "preset_precision": cfg.optim.precision},
        "flops_per_image": {"train": train_flops, "encode": encode_flops},
        "matmul_peak_flops_per_s": peaks,
        "train": {"ours": measure(batch, ours_train, train_flops, ours_peak),
                  "baseline": measure(batch, baseline_train, train_flops, peaks["fp32"])},
        "encode": {"ours": measure(encode_batch, ours_encode, encode_flops, ours_peak),
                   "baseline": measure(encode_batch, baseline_encode, encode_flops, peaks["fp32"])},
        "baseline": BASELINE,
    }
    for name in ("train", "encode"):
        section = result[name]
        section["ours_over_baseline"] = section["ours"]["images_per_s"] / section["baseline"]["images_per_s"]
    del ours, baseline, pixels
    if args.corpus_tokenization:
        result["corpus_tokenization"] = corpus_tokenization(pipeline_cfg, model_cfg, args)
    if args.image_data:
        result["image_data"] = image_data(pipeline_cfg, model_cfg, cfg, batch, args, bf16, compiled)
    return emit(result, args.out)


# corpus tokenization (CPU): imports of the pipeline's heavier parts stay in here ----------------


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def build_inputs(pipeline_cfg, model_cfg: DVAEModelConfig, root: Path, count: int, shard_size: int):
    """Curated shards of generated shape scenes, a (randomly initialised) dVAE checkpoint and a BPE."""
    from dalle_pipeline.components import checkpoint
    from dalle_pipeline.components.corpus import caption, render, sample_specs
    from dalle_pipeline.components.shards import Sample, write_shard
    from dalle_pipeline.components.text.tokenizer import train_and_save as train_tokenizer

    rng = np.random.default_rng(0)
    corpus = pipeline_cfg.corpus
    scenes = [sample_specs(rng, corpus.max_shapes, corpus.zero_shot_pairs) for _ in range(count)]
    samples = [Sample(key=f"{index:09d}", image_bytes=_png(render(specs, corpus.image_size)), image_ext="png",
                      caption=caption(specs)) for index, specs in enumerate(scenes)]
    curated = root / "curated"
    for number, start in enumerate(range(0, count, shard_size)):
        write_shard(curated / f"{number:05d}.tar", samples[start : start + shard_size])
    torch.manual_seed(0)
    dvae_dir = checkpoint.save(root / "dvae", "dvae", DiscreteVAE(model_cfg).state_dict(), model_cfg.to_dict())
    tokenizer_path, _ = train_tokenizer(pipeline_cfg.tokenizer, [sample.caption for sample in samples], root / "text")
    return curated, dvae_dir, tokenizer_path


def bare_forward_rate(model: DiscreteVAE, pixels: np.ndarray, batch: int) -> float:
    """Images/s of the loaded encoder alone (fp32 eager, as loaded) over the decoded corpus."""
    with torch.inference_mode():
        model.encode(to_float(pixels[:batch]))  # warm-up
        start = time.perf_counter()
        for first in range(0, len(pixels), batch):
            model.encode(to_float(pixels[first : first + batch]))
        return len(pixels) / (time.perf_counter() - start)


def corpus_tokenization(pipeline_cfg, model_cfg: DVAEModelConfig, args) -> dict:
    """Two end-to-end tokenizations into fresh folders, each right after a bare forward over the same
    images, so each ratio sets the pipeline against the encoder under the same load."""
    from dalle_pipeline.components.dvae.train import load
    from dalle_pipeline.components.shards import read_shard, shard_paths
    from dalle_pipeline.components.tokenize_corpus.run import run as tokenize

    shard_size = args.shard_size or pipeline_cfg.download.samples_per_shard
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-dvae-") as tmp:
        root = Path(tmp)
        curated, dvae_dir, tokenizer_path = build_inputs(pipeline_cfg, model_cfg, root, args.images, shard_size)
        model = load(dvae_dir)
        pixels = np.stack([sample.pixels() for shard in shard_paths(curated) for sample in read_shard(shard)])
        try:
            for attempt in ("first", "second"):
                bare = bare_forward_rate(model, pixels, args.tokenize_batch)
                start = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):  # worker logs must not break the JSON on stdout
                    corpus = tokenize(curated, dvae_dir, tokenizer_path, root / f"tokens-{attempt}",
                                      pipeline_cfg.tokenizer.text_len, batch_size=args.tokenize_batch)
                seconds = time.perf_counter() - start
                if corpus.rows != args.images:
                    raise RuntimeError(f"tokenization wrote {corpus.rows} rows for {args.images} images")
                runs.append({"run": attempt, "seconds": seconds, "images_per_s": corpus.rows / seconds,
                             "bare_forward_images_per_s": bare, "over_bare_forward": corpus.rows / seconds / bare,
                             "load_average_1m": os.getloadavg()[0]})
        finally:
            if "ray" in sys.modules:  # the tokenization may have started Ray (cluster.connect): stop it
                from dalle_pipeline.components.cluster import disconnect

                disconnect()
    return {
        "images": args.images,
        "shards": -(-args.images // shard_size),
        "batch_size": args.tokenize_batch,
        "bare_forward": "the loaded dVAE's encode (fp32 eager, this process's torch threads) on the decoded images",
        "runs": runs,  # the first carries one-off start-up (Ray, actors); the second is the steady state
        "steady_over_bare_forward": runs[-1]["over_bare_forward"],
        "goal": 0.85,
    }


def image_data(pipeline_cfg, model_cfg: DVAEModelConfig, cfg, batch: int, args, bf16: bool, compiled: bool) -> dict:
    """Steady-state training images/s on the same curated shards, decoded into memory (`TensorBatches`) and
    streamed (`StreamedBatches` over `ImageShards`: shard reads and decoding in background threads), in
    alternating rounds from the same initial weights."""
    from dalle_pipeline.components.shards import load_corpus
    from dalle_pipeline.components.training.image_shards import IMAGE_BUFFER_ROWS, ImageShards
    from dalle_pipeline.components.training.stream import StreamedBatches

    shard_size = args.shard_size or pipeline_cfg.download.samples_per_shard
    rates: dict[str, list[float]] = {"memory": [], "stream": []}
    with tempfile.TemporaryDirectory(prefix="bench-dvae-data-") as tmp:
        curated, _, _ = build_inputs(pipeline_cfg, model_cfg, Path(tmp), args.images, shard_size)
        torch.manual_seed(0)
        initial = DiscreteVAE(model_cfg).state_dict()
        for _ in range(args.rounds):
            for path in rates:
                model = DiscreteVAE(model_cfg)
                model.load_state_dict(initial)
                if path == "memory":  # as the worker has it: the decoding of the corpus is not timed
                    pixels = torch.from_numpy(load_corpus(curated, model_cfg.image_size).images)
                    batches = iter(TensorBatches((pixels,), batch, seed=0))
                else:
                    batches = iter(StreamedBatches(ImageShards(curated, model_cfg.image_size), batch, seed=0,
                                                   buffer_rows=IMAGE_BUFFER_ROWS))
                seconds = train_ours(model, cfg, torch.zeros(0), batch, args, bf16, compiled, batches=batches)
                rates[path].append(batch / statistics.median(seconds))
    medians = {path: statistics.median(values) for path, values in rates.items()}
    return {"images": args.images, "shard_size": shard_size, "batch": batch, "buffer_rows": IMAGE_BUFFER_ROWS,
            "images_per_s": rates, "median_images_per_s": medians,
            "stream_over_memory": medians["stream"] / medians["memory"], "goal": 0.9}


if __name__ == "__main__":
    main()
