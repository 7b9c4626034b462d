"""`dalle-pipeline train --preset tiny --set prior.layers=8`: run the `train-dalle` flow locally.

Without PREFECT_API_URL, Prefect runs the flow in its ephemeral mode (no server to start).
`main(argv)` is callable from tests with an argv list.
"""

from __future__ import annotations

import argparse
import json
import sys

from .components.config import PRESETS, ConfigError, parse_override, resolve


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dalle-pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run the whole train-dalle flow")
    train.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                       help="override one config field, e.g. prior.layers=8 (repeatable)")
    train.add_argument("--root", default=None, help="artifact root (default: $DALLE_HOME or ./runs)")
    show = commands.add_parser("config", help="print the resolved config of a preset as JSON")
    show.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides = dict(parse_override(item) for item in args.overrides)
        cfg = resolve(args.preset, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    from .flows.train_dalle import train_dalle

    summary = train_dalle(preset=args.preset, overrides=overrides, root=args.root)
    metrics = summary["metrics"]
    print("\n=== train-dalle finished in %.0fs ===" % summary["seconds"])
    print(f"MLflow run id : {summary['mlflow_run_id']}  ({summary['tracking_uri']})")
    print(f"sample grid   : {summary['sample_grid']}")
    for name in sorted(metrics):
        if name.endswith("_reranked") or name.endswith("_all"):
            print(f"  {name:40s} {metrics[name]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
