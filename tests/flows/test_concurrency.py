"""The `training` limit on a real (ephemeral) Prefect server: created once with one slot on a
machine without GPUs, kept as the user set it, and exclusive: while one holder trains, a second waits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = """
import json, threading, time
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from dalle_pipeline.flows.concurrency import TRAINING_LIMIT, ensure_training_limit, training_slot

@flow
def check():
    created = ensure_training_limit()
    held, release = threading.Event(), threading.Event()

    def first_run_trains():
        with training_slot("prior"):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=first_run_trains)
    holder.start()
    held.wait(60)
    try:
        with concurrency(TRAINING_LIMIT, timeout_seconds=3, strict=True):
            second_waited = False
    except TimeoutError:
        second_waited = True
    release.set()
    holder.join()
    with training_slot("prior") as waited:  # free again
        pass
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(TRAINING_LIMIT, GlobalConcurrencyLimitUpdate(limit=3))
    kept = ensure_training_limit()
    return {"created": created, "second_waited": second_waited, "then_waited": waited, "kept": kept}

print("RESULT " + json.dumps(check()))
"""


def test_training_stages_take_turns_on_one_slot(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["created"] == 1  # no GPU here: one slot for the machine
    assert result["second_waited"], "a second holder got a slot while the first trained"
    assert result["then_waited"] < 2
    assert result["kept"] == 3  # a limit the user set is left alone
