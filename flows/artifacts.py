"""The Prefect artifacts of a `train-dalle` flow run: stage timings and a markdown summary with the sample grid."""

from __future__ import annotations

import base64
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dalle_pipeline.components.stage_cache import StageRecord
from dalle_pipeline.components.tracking import Tracker

INLINE_GRID_BYTES = 2_000_000  # a larger grid is named by its path instead of shown inline


def publish_run_artifacts(parent: Tracker, records: list[StageRecord], metrics: dict[str, float], grid: str,
                          registration) -> None:
    timings = [{"stage": record.stage, "cache": "reused" if record.reused else "built",
                "seconds": round(record.seconds, 1), "seconds_to_build": round(record.build_seconds, 1)}
               for record in records]
    create_table_artifact(timings, key="stage-timings", description="Seconds per stage in this run")
    experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
    link = (f"[{parent.run_id}]({parent.tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{parent.run_id})"
            if parent.tracking_uri.startswith("http") else f"`{parent.run_id}` in `{parent.tracking_uri}`")
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items()) if name.endswith("reranked"))
    picture = Path(grid).read_bytes()
    image = (f"![samples](data:image/png;base64,{base64.b64encode(picture).decode()})"
             if len(picture) < INLINE_GRID_BYTES else f"samples: `{grid}`")
    create_markdown_artifact(
        f"# train-dalle\n\nMLflow run {link}; model version {registration.version}: "
        f"{registration.decision}\n\n| metric (best of the candidates by CLIP) | value |\n|---|---|\n{rows}"
        f"\n\n{image}\n",
        key="train-dalle-summary", description="Metrics, MLflow run and sample grid of this run",
    )
