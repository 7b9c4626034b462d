"""The pipeline as a user drives it from servers: `infra/serve.sh`, then
`prefect deployment run train-dalle/full`, then the MLflow store, then `infra/stop.sh`.

Everything runs for real on loopback: a Prefect server, an MLflow server and a process worker,
started by the infra scripts under a temporary DALLE_HOME (which also holds PREFECT_HOME), on free
ports, so nothing of the user's ~/.prefect, runs/ or ports 4200/5000 is touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from local_processes import free_port, processes_with_env

from dalle_pipeline.components.tracking import PARENT_RUN_TAG

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # real servers, minutes each

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
SERVE_TIMEOUT_S = 420  # three services at up to ~40 s each on 2 busy cores, plus `prefect deploy`
RUN_TIMEOUT_S = 360  # the micro preset through the worker, Completed
FAILED_STATES = {"FAILED", "CRASHED", "CANCELLED"}
FLOW_RUN_TAG = "prefect.flow_run_id"  # set by train_dalle on its parent MLflow run

if sys.platform != "linux" or shutil.which("setsid") is None or shutil.which("curl") is None:
    pytest.skip("infra/serve.sh needs Linux with setsid and curl", allow_module_level=True)


@dataclass
class Served:
    home: Path
    env: dict[str, str]
    prefect_api: str
    mlflow_url: str

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.home}/mlflow.db"

    def prefect(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The Prefect CLI as a user runs it: `source infra/env.sh && $PREFECT_BIN ...`."""
        script = 'source "$0" && exec "$PREFECT_BIN" "$@"'
        return subprocess.run(
            ["bash", "-c", script, str(INFRA / "env.sh"), *args],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )

    def log_tail(self, service: str, lines: int = 60) -> str:
        path = self.home / "logs" / f"{service}.log"
        if not path.exists():
            return f"(no {path})"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(INFRA / "stop.sh")], env=self.env, capture_output=True, text=True, timeout=180
        )

    def leftovers(self) -> list[int]:
        """Pids still alive that were started under this home (servers, worker, flow runs, Ray)."""
        return processes_with_env("DALLE_HOME", str(self.home))


def _get_json(url: str, body: dict | None = None) -> dict:
    """GET `url`, or POST `body` to it as JSON."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _run_deployment(served: Served, deployment: str, *params: str) -> tuple[str, dict]:
    """`prefect deployment run` with `--param` each of `params`; waits for the run; (id, flow run)."""
    arguments = [item for param in params for item in ("--param", param)]
    created = served.prefect("deployment", "run", deployment, *arguments)
    assert created.returncode == 0, f"deployment run failed:\n{created.stdout}\n{created.stderr}"
    match = re.search(r"UUID: ([0-9a-f-]{36})", created.stdout)
    assert match, created.stdout
    flow_run_id = match.group(1)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    state: dict = {}
    while time.monotonic() < deadline:
        flow_run = _get_json(f"{served.prefect_api}/flow_runs/{flow_run_id}")
        state = flow_run.get("state") or {}
        if state.get("type") == "COMPLETED" or state.get("type") in FAILED_STATES:
            break
        time.sleep(2)
    if state.get("type") != "COMPLETED":
        outcome = f"{state.get('name')}: {state.get('message')}" if state else "no state"
        pytest.fail(
            f"{deployment} run {flow_run_id} did not complete within {RUN_TIMEOUT_S}s ({outcome}); "
            f"last lines of the worker log:\n{served.log_tail('prefect-worker')}"
        )
    return flow_run_id, flow_run


@pytest.fixture
def served(tmp_path: Path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        DALLE_HOME=str(home),
        PREFECT_PORT=str(free_port()),
        MLFLOW_PORT=str(free_port()),
        PREFECT_POOL="dalle-e2e",
        PREFECT_WORKER_QUERY_SECONDS="2",  # pick the run up sooner than the default 10 s
    )
    # The scripts use the virtualenv running this test when it has the CLIs, else <repo>/.venv.
    if (Path(sys.prefix) / "bin" / "prefect").exists():
        env["VENV"] = sys.prefix
    server = Served(
        home=home,
        env=env,
        prefect_api=f"http://127.0.0.1:{env['PREFECT_PORT']}/api",
        mlflow_url=f"http://127.0.0.1:{env['MLFLOW_PORT']}",
    )
    try:
        started = time.monotonic()
        proc = subprocess.run(
            ["bash", str(INFRA / "serve.sh")], env=env, capture_output=True, text=True,
            timeout=SERVE_TIMEOUT_S,
        )
        assert proc.returncode == 0, f"serve.sh failed:\n{proc.stdout}\n{proc.stderr}"
        print(f"serve.sh took {time.monotonic() - started:.0f}s\n{proc.stderr}")
        yield server
    finally:
        try:
            server.stop()  # idempotent: a no-op when the test stopped everything already
        except subprocess.TimeoutExpired:
            pass
        for pid in server.leftovers():  # only processes started under this test's home
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_deployment_run_trains_and_logs_to_the_served_mlflow(served: Served) -> None:
    # serve.sh is idempotent: a second call finds everything running and starts nothing new.
    pids_before = {p.name: p.read_text() for p in (served.home / "pids").glob("*.pid")}
    assert set(pids_before) == {"prefect-server.pid", "mlflow-server.pid", "prefect-worker.pid"}
    again = subprocess.run(
        ["bash", str(INFRA / "serve.sh")], env=served.env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, f"second serve.sh failed:\n{again.stdout}\n{again.stderr}"
    assert again.stderr.count("already running") == 3, again.stderr
    assert {p.name: p.read_text() for p in (served.home / "pids").glob("*.pid")} == pids_before

    # The deployment's form is the flow's parameter schema: `overrides` nested per stage, typed and
    # documented; the server refuses a run whose parameters do not fit it, naming the field.
    full = _get_json(f"{served.prefect_api}/deployments/name/train-dalle/full")
    optim = full["parameter_openapi_schema"]["definitions"]["OptimOverrides"]["properties"]
    assert optim["steps"]["description"] == "optimizer updates"
    refused = served.prefect("deployment", "run", "train-dalle/full", "--param",
                             'overrides={"prior": {"optim": {"steps": "many"}}}')
    assert refused.returncode != 0 and "overrides.prior.optim.steps" in refused.stdout + refused.stderr, refused
    assert not _get_json(f"{served.prefect_api}/flow_runs/filter", {}), "a refused run was created"

    # --param values are read as JSON, falling back to a plain string (`preset=micro`).
    flow_run_id, flow_run = _run_deployment(served, "train-dalle/full", "preset=micro", 'overrides={"seed": 1}')
    assert flow_run["parameters"] == {"preset": "micro", "overrides": {"seed": 1}}
    artifacts = _get_json(f"{served.prefect_api}/artifacts/filter",
                          {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    tables = {a["key"]: a for a in artifacts if a["type"] == "table"}
    assert {"filter-report", "stage-timings"} <= set(tables), artifacts
    summary = [a for a in artifacts if a["type"] == "markdown" and a["key"] == "train-dalle-summary"]
    assert summary and "champion" in summary[0]["data"] and "data:image/png;base64," in summary[0]["data"]
    timings = tables["stage-timings"]["data"]
    timings = json.loads(timings) if isinstance(timings, str) else timings
    assert [row["stage"] for row in timings if row["cache"] == "built"][:3] == ["corpus", "download", "filter"]
    rows = tables["filter-report"]["data"]
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert {"stage": "filter", "reason": "kept"} == {k: rows[0][k] for k in ("stage", "reason")} and rows[0]["samples"] > 0

    # The flow logged into the store the worker was pointed at, under one parent run tagged with
    # this flow run's id; and the MLflow server shows that same run.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=served.tracking_uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    tagged = client.search_runs(
        experiment_ids, filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'"
    )
    parents = [run for run in tagged if PARENT_RUN_TAG not in run.data.tags]
    assert len(parents) == 1, f"expected one parent run tagged {flow_run_id}, got {tagged}"
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    shown = _get_json(f"{served.mlflow_url}/api/2.0/mlflow/runs/get?run_id={parent.info.run_id}")
    assert shown["run"]["info"]["run_id"] == parent.info.run_id

    # retrain: weekly, its schedule inactive until a source is set; forced to run now, it fine-tunes the
    # champion on the list and registers a challenger with its decision
    retrain = _get_json(f"{served.prefect_api}/deployments/name/train-dalle/retrain")
    assert [(s["schedule"]["cron"], s["active"]) for s in retrain["schedules"]] == [("0 3 * * 1", False)]
    (url_list,) = served.home.glob("stages/corpus/*/urls.parquet")
    overrides = json.dumps({"data": {"source": str(url_list)}, "download": {"allow_file_urls": True},
                            "prior": {"optim": {"steps": 10}}})
    _run_deployment(served, "train-dalle/retrain", "preset=micro", f"overrides={overrides}")
    versions = {str(v.version): v for v in client.search_model_versions("name='dalle'")}
    assert sorted(versions, key=int) == ["1", "2"]
    assert "challenger v2" in versions["2"].tags["champion_decision"]
    assert client.get_run(versions["2"].run_id).data.tags["retrain_from"] == "models:/dalle@champion"

    stopped = served.stop()
    assert stopped.returncode == 0, f"stop.sh failed:\n{stopped.stdout}\n{stopped.stderr}"
    assert not list((served.home / "pids").glob("*.pid")), "stop.sh left pid files behind"
    assert not served.leftovers(), f"processes left running after stop.sh: {served.leftovers()}"
