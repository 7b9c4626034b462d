"""The defaults every entry point sets: no usage reports from Prefect, MLflow or Ray; a patient Prefect."""

import subprocess
import sys

from dalle_pipeline.components.environment import DEFAULTS, use_defaults


def test_defaults_fill_what_the_user_left_unset_and_keep_what_they_set(monkeypatch):
    for name in DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    use_defaults()
    import os

    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # MLflow reads DO_NOT_TRACK=1 as "track"
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "300"


def test_the_shell_form_is_the_same_defaults():
    exports = subprocess.run([sys.executable, "-m", "dalle_pipeline.components.environment"], capture_output=True,
                             text=True, check=True).stdout
    script = exports + "\n" + "\n".join(f'echo "{name}=${name}"' for name in DEFAULTS)
    shown = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                           env={"PATH": "/usr/bin:/bin", "DO_NOT_TRACK": "0"}).stdout.split()
    assert shown == [f"{name}={'0' if name == 'DO_NOT_TRACK' else value}" for name, value in DEFAULTS.items()]
