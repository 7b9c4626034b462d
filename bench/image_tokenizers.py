"""Image tokenizer kinds side by side: what each keeps of the shapes corpus, at the same grid and codebook.

For every kind (`dvae.quantizer`: the paper's gumbel dVAE, and vq) and every seed, the dVAE stage
runs as the pipeline runs it (`dvae.train.run`, on Ray Train, the preset's settings) on the preset's
shapes corpus written straight to curated shards, and reports: hard-code PSNR and codes used on the
corpus, the reconstruction oracle on 256 held-out scenes (`recon_oracle_*`: the ceiling of any
prior on its tokens), and seconds to train. Per kind the mean, min and max over the seeds.

    python bench/tokenizers.py --preset tiny --seeds 0 1 2

Needs Ray (the stage's own). Run it alone: two training processes on two cores slow each other
several times over. Prints one JSON document (and writes it to `--out`).

`--pretrained` measures instead how fast each released tokenizer encodes at 256 px through
`dvae.pretrained` against its authors' own forward in the same run (the test extra's `dall-e`,
`taming-transformers-rom1504`, `diffusers`), at the released sizes with random weights, files saved
as each author publishes them: OpenAI's dVAE, the taming VQGAN f16/16384, aMUSEd's VQ (diffusers).
Ours in NCHW and channels_last, and the share of tokens both give alike.

    python bench/tokenizers.py --pretrained --batch 4 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.parquet as pq
import torch
from common import device_name, emit

from dalle_pipeline.components.config import DVAEConfig, resolve
from dalle_pipeline.components.corpus.shapes import run as generate_corpus
from dalle_pipeline.components.presets import PRESETS
from dalle_pipeline.components.shards import Sample, write_shard

KINDS = ("gumbel", "vq")
REPORTED = ("eval_psnr", "eval_codes_used", "eval_codebook_perplexity", "recon_oracle_colour", "recon_oracle_shape",
            "recon_oracle_size", "recon_oracle_position", "recon_oracle_all", "seconds")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config override for every kind, e.g. dvae.optim.steps=600")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--pretrained", action="store_true",
                        help="encode images/s of the released tokenizers against their authors' forward")
    parser.add_argument("--pretrained-kinds", nargs="+", choices=PRETRAINED_KINDS, default=list(PRETRAINED_KINDS))
    parser.add_argument("--batch", type=int, default=4, help="--pretrained: images per encode call")
    parser.add_argument("--repeats", type=int, default=3, help="--pretrained: timed calls (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


PRETRAINED_KINDS = ("openai", "taming", "diffusers")
TAMING_F16 = {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0}
AMUSED_VQ = {"block_out_channels": (128, 256, 256, 512, 768), "layers_per_block": 2, "latent_channels": 64,
             "num_vq_embeddings": 8192, "vq_embed_dim": 64, "norm_num_groups": 32, "sample_size": 32,
             "down_block_types": ("DownEncoderBlock2D",) * 5, "up_block_types": ("UpDecoderBlock2D",) * 5,
             "mid_block_add_attention": False}


def released_files(kind: str, folder: Path):
    """The authors' model at its released size (random weights), saved as they publish it; (their encode
    function from images in [0, 1] to tokens (B, h*w), the dvae.pretrained setting)."""
    from dalle_pipeline.components.config import PretrainedTokenizer

    if kind == "openai":
        import dall_e

        encoder = dall_e.Encoder().eval()  # n_hid 256, 2 blocks a group, 8192 codes
        torch.save(encoder, folder / "encoder.pkl")
        torch.save(dall_e.Decoder().eval(), folder / "decoder.pkl")
        return (lambda x: encoder(dall_e.map_pixels(x)).argmax(1).flatten(1)), \
            PretrainedTokenizer(kind="openai", path=str(folder))
    if kind == "taming":
        import yaml
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import VectorQuantizer2

        parts = torch.nn.ModuleDict({"encoder": Encoder(**TAMING_F16), "decoder": Decoder(**TAMING_F16),
                                     "quantize": VectorQuantizer2(16384, 256, beta=0.25),
                                     "quant_conv": torch.nn.Conv2d(256, 256, 1),
                                     "post_quant_conv": torch.nn.Conv2d(256, 256, 1)}).eval()
        torch.save({"state_dict": parts.state_dict()}, folder / "last.ckpt")
        (folder / "model.yaml").write_text(yaml.safe_dump({"model": {
            "target": "taming.models.vqgan.VQModel",
            "params": {"embed_dim": 256, "n_embed": 16384, "ddconfig": TAMING_F16}}}))

        def taming_encode(x):
            h = parts["quant_conv"](parts["encoder"](x * 2 - 1))
            return parts["quantize"](h)[2][2].view(len(x), -1)
        return taming_encode, PretrainedTokenizer(kind="taming", path=str(folder / "last.ckpt"))
    import diffusers

    model = diffusers.VQModel(**AMUSED_VQ).eval()
    model.save_pretrained(folder)
    return (lambda x: model.quantize(model.encode(x * 2 - 1).latents)[2][2].view(len(x), -1)), \
        PretrainedTokenizer(kind="diffusers", path=str(folder))


def pretrained_throughput(args: argparse.Namespace) -> dict:
    """Per kind: encode images/s of the authors' forward and of ours (NCHW, channels_last), and their ratio."""
    from common import timed

    from dalle_pipeline.components.dvae import pretrained

    device = torch.device(args.device)
    images = torch.rand(args.batch, 3, 256, 256, generator=torch.Generator().manual_seed(0)).to(device)
    kinds = {}
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        for kind in args.pretrained_kinds:
            folder = Path(scratch) / kind
            folder.mkdir()
            torch.manual_seed(0)
            theirs, setting = released_files(kind, folder)
            ours = pretrained.load(setting, 256).to(device)
            # the share of positions whose token agrees, NCHW both (released codebooks at their random initial
            # values sit nearly on top of each other, so a near-tie may break either way; the tests check exactly)
            agree = float((theirs(images) == ours.encode(images)).float().mean())
            rates = {}
            for name, layout in (("theirs", torch.contiguous_format), ("ours", torch.contiguous_format),
                                 ("ours_channels_last", torch.channels_last)):
                encode = theirs if name == "theirs" else ours.encode
                batch = images.contiguous(memory_format=layout)
                if name == "ours_channels_last":
                    ours.to(memory_format=torch.channels_last)
                rates[name] = args.batch * args.repeats / timed(lambda: encode(batch), device, args.repeats)
            best = max(rates["ours"], rates["ours_channels_last"])
            kinds[kind] = {"images_per_s": rates, "ours_vs_theirs": best / rates["theirs"], "tokens_agree": agree,
                           "grid": ours.cfg.grid_size, "codebook_size": ours.cfg.codebook_size}
            print(f"{kind}: " + " ".join(f"{k}={v:.2f}" for k, v in rates.items())
                  + f" ratio={kinds[kind]['ours_vs_theirs']:.2f} tokens_agree={agree:.3f}", flush=True)
            del ours, theirs
    return kinds


def curated_corpus(cfg, out_dir: Path, shard_size: int = 1000) -> Path:
    """The preset's shapes corpus as curated shards, as the filter writes them (no download)."""
    result = generate_corpus(cfg.corpus, out_dir / "corpus")
    rows = pq.read_table(result.url_list).to_pylist()
    curated = out_dir / "curated"
    for start in range(0, len(rows), shard_size):
        write_shard(curated / f"{start // shard_size:05d}.tar", [
            Sample(key=f"{i:09d}", image_bytes=Path(urlparse(row["url"]).path).read_bytes(), image_ext="png",
                   caption=row["caption"], meta={"objects": row["objects"]})
            for i, row in enumerate(rows[start : start + shard_size], start)])
    return curated


def summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {name: {"mean": statistics.fmean(run[name] for run in runs), "min": min(run[name] for run in runs),
                   "max": max(run[name] for run in runs)} for name in REPORTED}


def main(argv: list[str] | None = None) -> dict:
    from dalle_pipeline.components.dvae.train import run as train_dvae

    args = parse_args(argv)
    load_at_start = os.getloadavg()[0]
    if args.pretrained:
        return emit({"bench": "pretrained-tokenizers", "settings": vars(args),
                     "device": device_name(torch.device(args.device)), "image_size": 256,
                     "kinds": pretrained_throughput(args),
                     "load_average_1m": {"start": load_at_start, "end": os.getloadavg()[0]}}, args.out)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        base = resolve(args.preset, args.overrides)
        # validated before the corpus is drawn: a kind the preset's other settings do not allow (vq with a
        # weight average) is refused, naming the setting
        configs = {kind: DVAEConfig.model_validate({**base.dvae.model_dump(), "quantizer": kind}) for kind in args.kinds}
        curated = curated_corpus(base, Path(scratch))
        for kind in args.kinds:
            runs = []
            for seed in args.seeds:
                cfg = configs[kind]
                started = time.perf_counter()
                result = train_dvae(cfg, curated, Path(scratch) / f"{kind}-{seed}", base.corpus.image_size, seed,
                                    shapes=base.corpus)
                runs.append({**{name: result.metrics[name] for name in REPORTED if name in result.metrics},
                             "seconds": time.perf_counter() - started, "seed": seed})
                print(f"{kind} seed {seed}: " + " ".join(f"{k}={v:.3f}" for k, v in runs[-1].items()), flush=True)
            results[kind] = {"runs": runs, "summary": summary(runs)}
    return emit({
        "bench": "tokenizers",
        "preset": args.preset,
        "settings": vars(args),
        "device": device_name(torch.device("cpu")),
        "load_average_1m": {"start": load_at_start, "end": os.getloadavg()[0]},
        "dims": {"image_size": base.corpus.image_size, "grid_size": base.corpus.image_size // base.dvae.downsample,
                 "codebook_size": base.dvae.codebook_size, "steps": base.dvae.optim.steps,
                 "corpus_images": base.corpus.num_images},
        "kinds": results,
    }, args.out)


if __name__ == "__main__":
    main()
