"""Image tokenizer kinds side by side: what each keeps of the shapes corpus, at the same grid and codebook.

For every kind (`dvae.quantizer`: the paper's gumbel dVAE, and vq) and every seed, the dVAE stage
runs as the pipeline runs it (`dvae.train.run`, on Ray Train, the preset's settings) on the preset's
shapes corpus written straight to curated shards, and reports: hard-code PSNR and codes used on the
corpus, the reconstruction oracle on 256 held-out scenes (`recon_oracle_*`: the ceiling of any
prior on its tokens), and seconds to train. Per kind the mean, min and max over the seeds.

    python bench/tokenizers.py --preset tiny --seeds 0 1 2

Needs Ray (the stage's own). Run it alone: two training processes on two cores slow each other
several times over. Prints one JSON document (and writes it to `--out`).
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
from dalle_pipeline.components.corpus import generate
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
    return parser.parse_args(argv)


def curated_corpus(cfg, out_dir: Path, shard_size: int = 1000) -> Path:
    """The preset's shapes corpus as curated shards, as the filter writes them (no download)."""
    result = generate(cfg.corpus, out_dir / "corpus")
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
