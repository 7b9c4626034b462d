"""The environment every entry point of the pipeline runs in: no phoning home, and patience on a busy machine.

The machines this runs on are often offline, and a user's own machine should not report usage
because a pipeline ran: Prefect, MLflow, Ray and albumentations (through img2dataset) each try to,
and each has its own switch (MLflow honours DO_NOT_TRACK only when it says "true"). Prefect's
ephemeral server gets two minutes to start instead of twenty seconds: on two busy cores it timed
out before any work. `use_defaults` sets what the user has not set; the CLI calls it before it
imports Prefect, the flow at its start (for a run a worker started), `cluster.connect` before Ray
starts, the tests in their conftest;
`python -m dalle_pipeline.components.environment` prints them as shell exports for infra/env.sh.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def use_defaults() -> None:
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)


if __name__ == "__main__":
    for name, value in DEFAULTS.items():  # what the caller's environment sets wins, as in use_defaults
        print(f'export {name}="${{{name}:-{value}}}"')
