"""`dalle-pipeline train --preset tiny --set prior.layers=8`: run the `train-dalle` flow locally.

Without PREFECT_API_URL, Prefect runs the flow in its ephemeral mode (no server to start).
`main(argv)` is callable from tests with an argv list.
"""

from __future__ import annotations

import argparse
import json
import sys

from dalle_pipeline.components.config import ConfigError, SourceFormat, resolve
from dalle_pipeline.components.presets import PRESETS
from dalle_pipeline.components.overrides import as_overrides
from dalle_pipeline.components.environment import use_defaults


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dalle-pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run the whole train-dalle flow")
    train.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                       help="override one config field, e.g. prior.layers=8 (repeatable)")
    _data_arguments(train, required=False)
    train.add_argument("--root", default=None, help="artifact root (default: $DALLE_HOME or ./runs)")
    train.add_argument("--retrain-from", default=None, metavar="MODEL_URI",
                       help="fine-tune a registered model (e.g. models:/dalle@champion) on the configured data")
    train.add_argument("--retrain-dvae", action="store_true",
                       help="with --retrain-from: fine-tune its dVAE too and re-tokenize the corpus with it")
    train.add_argument("--rerun", action="append", default=[], metavar="STAGE",
                       help="run this stage even if its inputs are unchanged (repeatable; 'all' for every stage)")
    generate = commands.add_parser("generate", help="images from a trained model, best of its candidates by CLIP")
    generate.add_argument("prompts", nargs="+")
    generate.add_argument("--model", default="models:/dalle@champion",
                          help="an MLflow model URI (default models:/dalle@champion) or a bundle folder")
    generate.add_argument("-n", "--num-images", type=int, default=4)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--temperature", type=float, default=None)
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--guidance-scale", type=float, default=None)
    generate.add_argument("--image", default=None, metavar="PATH",
                          help="image-to-image: keep the top rows of this image and draw the rest under each caption")
    generate.add_argument("--prefix-rows", type=int, default=None, metavar="K",
                          help="with --image: token rows kept from its top (default: half the grid)")
    generate.add_argument("--out", default="grid.png", help="PNG grid, one row per prompt")
    generate.add_argument("--root", default=None, help="artifact root whose mlflow.db holds the registry")
    check = commands.add_parser("check-data", help="read, filter and report on a data source; no training")
    _data_arguments(check, required=True)
    check.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="its image size and filter settings")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    check.add_argument("--out", default=None, help="where to write (default: <root>/check-data/<source>-<hash>)")
    show = commands.add_parser("config", help="print the resolved config of a preset as JSON")
    show.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    if getattr(args, "data", None) is not None:  # shorthands for config fields, as `--set` would give them
        args.overrides.append(f"data.source={json.dumps(args.data)}")
    if getattr(args, "format", None) is not None:
        args.overrides.append(f"data.format={json.dumps(args.format)}")
    return args


def _data_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    source_help = ("your data: a URL list, a folder of captioned images, webdataset .tar shards, Parquet with the "
                   "images inside, or a COCO captions JSON (shorthand for --set data.source=...)")
    if required:
        parser.add_argument("data", metavar="SOURCE", help=source_help)
    else:
        parser.add_argument("--data", default=None, metavar="SOURCE", help=source_help)
    parser.add_argument("--format", default=None, choices=list(SourceFormat.__args__),
                        help="what SOURCE is (default: recognised from the path)")


def main(argv: list[str] | None = None) -> int:
    use_defaults()  # before Prefect, MLflow or Ray is imported
    args = parse_args(argv)
    if args.command == "generate":
        return generate_images(args)
    try:
        # `train`: the `k=v` strings become the flow's parameter (nested; None there keeps the preset's
        # value, so `train` refuses `--set f=null`), checked here as the flow will resolve it, so a bad
        # value fails before Prefect starts; `config` resolves the strings as they are (null included)
        overrides = as_overrides(args.overrides) if args.command == "train" else args.overrides
        cfg = resolve(args.preset, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    if args.command == "check-data":
        return check_data(cfg, args.out)
    if not cfg.shapes_corpus:
        from dalle_pipeline.components.sources.kinds import check_source

        try:
            check_source(cfg.data)
        except (OSError, ValueError) as err:  # before Prefect starts: the source is none of the kinds
            print(f"error: {err}", file=sys.stderr)
            return 2
    from dalle_pipeline.components.evaluate import headline_metrics
    from dalle_pipeline.flows.train_dalle import train_dalle

    summary = train_dalle(preset=args.preset, overrides=overrides, root=args.root, rerun=args.rerun,
                          retrain_from=args.retrain_from, retrain_dvae=args.retrain_dvae)
    metrics = summary["metrics"]
    print("\n=== train-dalle finished in %.0fs ===" % summary["seconds"])
    print(f"MLflow run id : {summary['mlflow_run_id']}  ({summary['tracking_uri']})")
    print(f"sample grid   : {summary['sample_grid']}")
    if summary["reused_stages"]:
        print(f"reused stages : {', '.join(summary['reused_stages'])} (inputs unchanged; --rerun STAGE to force)")
    for name, value in headline_metrics(metrics).items():
        print(f"  {name:40s} {value:.4f}")
    print("  (every metric, reranked and of all candidates: the MLflow run above)")
    return 0


def check_data(cfg, out: str | None) -> int:
    """Print the check's counts by reason; 1 when nothing usable is left (and why), 2 for a bad source."""
    from dalle_pipeline.components.sources.check import check_data as run_check

    try:
        check = run_check(cfg, out)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(check.lines()))
    if not check.usable:
        reasons = ", ".join(f"{reason} {count}" for reason, count in check.counts.items())
        print(f"error: no usable image-caption pair in {cfg.data.source} ({reasons})", file=sys.stderr)
        return 1
    return 0


def load_bundle(model: str, root: str | None):
    from pathlib import Path

    from dalle_pipeline.components.register.bundle import Bundle

    if Path(model).is_dir():
        return Bundle.load(model)
    from dalle_pipeline.components.storage import run_root
    from dalle_pipeline.components.tracking import default_tracking_uri, load_registered_model

    return load_registered_model(model, default_tracking_uri(run_root(root, "--root") if root else None)).bundle


def generate_images(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from PIL import Image

    from dalle_pipeline.components.images import save_grid

    try:
        bundle = load_bundle(args.model, args.root)
    except Exception as err:  # an unknown alias, a missing folder: say which model could not be loaded
        print(f"error: cannot load model {args.model!r}: {err}", file=sys.stderr)
        return 2
    image = None
    if args.image is not None:
        try:
            with Image.open(args.image) as opened:
                opened.load()
                image = opened.copy()
            bundle.image_prefix(image, args.prefix_rows)  # a bad --prefix-rows is said before any sampling
        except (OSError, ValueError) as err:
            print(f"error: --image {args.image}: {err}", file=sys.stderr)
            return 2
    elif args.prefix_rows is not None:
        print("error: --prefix-rows needs --image (the image whose top rows are kept)", file=sys.stderr)
        return 2
    rows = []
    for prompt in tqdm(args.prompts, desc="generating", unit="prompt"):
        images, scores = bundle.generate([prompt], num_images=args.num_images, seed=args.seed, image=image,
                                         prefix_rows=args.prefix_rows, temperature=args.temperature,
                                         top_k=args.top_k, top_p=args.top_p, guidance_scale=args.guidance_scale)
        rows.append(list(images[0]))
    labels = list(args.prompts)
    if image is not None:  # the given image first, as the model sees it, then each caption's completions
        kept = bundle.image_prefix(image, args.prefix_rows).shape[1] // bundle.dvae.cfg.grid_size
        rows.insert(0, [bundle.fitted(image)])
        labels.insert(0, f"given image (its top {kept} of {bundle.dvae.cfg.grid_size} token rows kept)")
    path = save_grid(rows, args.out, row_labels=labels)
    print(f"wrote {path} ({len(args.prompts)} prompts x {args.num_images} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
