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
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import dataclass
from pathlib import Path

import browser
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


def _start_deployment(served: Served, deployment: str, *params: str) -> str:
    """`prefect deployment run` with `--param` each of `params`; the new flow run's id."""
    arguments = [item for param in params for item in ("--param", param)]
    created = served.prefect("deployment", "run", deployment, *arguments)
    assert created.returncode == 0, f"deployment run failed:\n{created.stdout}\n{created.stderr}"
    match = re.search(r"UUID: ([0-9a-f-]{36})", created.stdout)
    assert match, created.stdout
    return match.group(1)


def _wait_for(served: Served, flow_run_id: str, expected: str = "COMPLETED", timeout: float = RUN_TIMEOUT_S) -> dict:
    """The flow run once it reached a final state, which must be `expected`."""
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        flow_run = _get_json(f"{served.prefect_api}/flow_runs/{flow_run_id}")
        state = flow_run.get("state") or {}
        if state.get("type") == "COMPLETED" or state.get("type") in FAILED_STATES:
            break
        time.sleep(2)
    if state.get("type") != expected:
        outcome = f"{state.get('name')}: {state.get('message')}" if state else "no state"
        pytest.fail(
            f"flow run {flow_run_id} did not end {expected} within {timeout:.0f}s ({outcome}); "
            f"last lines of the worker log:\n{served.log_tail('prefect-worker')}"
        )
    return flow_run


def _run_deployment(served: Served, deployment: str, *params: str) -> tuple[str, dict]:
    """`prefect deployment run` with `--param` each of `params`; waits for the run; (id, flow run)."""
    flow_run_id = _start_deployment(served, deployment, *params)
    return flow_run_id, _wait_for(served, flow_run_id)


def _flow_runs(served: Served, deployment: str) -> list[dict]:
    """The flow runs of one deployment (by its name: `full`, `retrain`, `watch`)."""
    return _get_json(f"{served.prefect_api}/flow_runs/filter",
                     {"deployments": {"name": {"any_": [deployment]}}})


@contextmanager
def serving(tmp_path: Path, **settings: str) -> Iterator[Served]:
    """infra/serve.sh under a home in `tmp_path` on free ports (and `settings` in its environment);
    stops everything started under that home at the end."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        DALLE_HOME=str(home),
        PREFECT_PORT=str(free_port()),
        MLFLOW_PORT=str(free_port()),
        PREFECT_POOL="dalle-e2e",
        PREFECT_WORKER_QUERY_SECONDS="2",  # pick the run up sooner than the default 10 s
    )
    env.update(settings)
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


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serving(tmp_path) as server:
        yield server


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
    assert not _flow_runs(served, "full"), "a refused run was created"

    # --param values are read as JSON, falling back to a plain string (`preset=micro`).
    flow_run_id, flow_run = _run_deployment(served, "train-dalle/full", "preset=micro", 'overrides={"seed": 1}')
    assert flow_run["parameters"] == {"preset": "micro", "overrides": {"seed": 1}}
    artifacts = _get_json(f"{served.prefect_api}/artifacts/filter",
                          {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    tables = {a["key"]: a for a in artifacts if a["type"] == "table"}
    assert {"filter-report", "stage-timings"} <= set(tables), artifacts
    # each training stage's progress artifact, moved to 100 when it finished
    assert {a["key"]: a["data"] for a in artifacts if a["type"] == "progress"} == {
        "dvae-progress": 100.0, "prior-progress": 100.0, "clip-progress": 100.0}, artifacts
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

    # what a user sees in a real browser: the prior's run page draws its preview images, step 0 first
    (prior_run,) = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}' "
                                                    "and tags.stage = 'prior'")
    page = (f"{served.mlflow_url}/#/experiments/{parent.info.experiment_id}/runs/{prior_run.info.run_id}"
            "/model-metrics")
    with browser.open_page(page, 'img[src*="get-artifact?path=images%2Fpreview-"]') as shown_page:
        shown_page.wait_for_function("[...document.querySelectorAll('img.rc-image-img')]"
                                     ".every(image => image.complete && image.naturalWidth > 0)")
        drawn = shown_page.eval_on_selector_all("img.rc-image-img", """images => images.map(image => {
            const card = image.closest('[data-testid="experiment-view-compare-runs-card"]').getBoundingClientRect();
            const box = image.getBoundingClientRect();
            return [image.src, box.height > 100 && box.top >= card.top && box.bottom <= card.bottom]; })""")
        shown_page.screenshot(path=str(served.home / "prior-run-page.png"), full_page=True)
    steps = {re.search(r"%2Bstep%2B(\d+)%2B", src).group(1) for src, _ in drawn}
    assert len(drawn) == 4 and steps == {"0"}, drawn  # one chart per preview caption, its slider at step 0
    assert all(inside for _, inside in drawn), drawn  # drawn in full inside its card, not pushed out by text

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


class WebhookReceiver:
    """A loopback HTTP server keeping the JSON body of every request: the webhook the automations call."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        calls = self.calls

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    calls.append(json.loads(body))
                except ValueError:
                    calls.append({"unparsed": body.decode(errors="replace")})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait_for(self, wanted, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [call for call in self.calls if wanted(call)]
            if found:
                return found[0]
            time.sleep(1)
        pytest.fail(f"no webhook call as wanted within {timeout:.0f}s; calls: {self.calls}")


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver()
    yield hook
    hook.server.shutdown()


def _compute_spans(client, parent_run_id: str) -> list[tuple[float, float, str]]:
    """(start, end, stage) in seconds of each compute stage a pipeline run built, from its slot to its end."""
    from dalle_pipeline.flows.stage_names import COMPUTE_STAGES

    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    children = client.search_runs(experiment_ids, filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'")
    return sorted((child.info.start_time / 1000 + child.data.metrics.get("training_slot_wait_s", 0.0),
                   child.info.end_time / 1000, child.data.tags["stage"])
                  for child in children
                  if child.data.tags.get("stage") in COMPUTE_STAGES and child.data.tags.get("cache") != "hit")


def _parent_run_id(client, flow_run_id: str) -> str:
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    tagged = client.search_runs(experiment_ids, filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'")
    (parent,) = [run for run in tagged if PARENT_RUN_TAG not in run.data.tags]
    return parent.info.run_id


def test_runs_take_turns_retrain_on_a_data_change_and_call_the_webhook(tmp_path: Path, receiver) -> None:
    """What `make serve` meets: a failing run, three runs at once (the worker's limit), a data change that
    starts a retrain; each completes or fails as it should, and the server answers every request (#33)."""
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    with serving(tmp_path, DALLE_WEBHOOK_URL=receiver.url) as served:
        # a run that fails calls the webhook, naming the run and the error
        failing = _start_deployment(served, "train-dalle/full", "preset=micro",
                                    'overrides={"data": {"source": "/nonexistent/urls.parquet"}}')
        _wait_for(served, failing, expected="FAILED", timeout=180)
        call = receiver.wait_for(lambda c: c.get("flow_run_id") == failing)
        assert call["event"] == "prefect.flow-run.Failed" and "does not exist" in call["message"], call

        # three runs started together, as the worker takes them (a schedule, a data change and a user's run at
        # once): all complete, and their compute stages take turns on `training`
        together = [_start_deployment(served, "train-dalle/full", "preset=micro", f"root={served.home / name}",
                                      f'overrides={{"seed": {seed}}}')
                    for seed, name in enumerate("abc")]
        for flow_run_id in together:
            _wait_for(served, flow_run_id, timeout=3 * RUN_TIMEOUT_S)
        client = MlflowClient(tracking_uri=served.tracking_uri)
        spans = sorted(span for flow_run_id in together
                       for span in _compute_spans(client, _parent_run_id(client, flow_run_id)))
        assert len(spans) >= 15, spans  # dvae, tokenize-corpus, prior, clip, sample, evaluate of each
        overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1] - 0.5]
        assert not overlaps, f"compute stages of two runs ran at once: {overlaps}"

        # the first registered version became champion: the webhook hears of it
        call = receiver.wait_for(lambda c: c.get("event") == "dalle.model.champion-moved")
        assert call["version"] == "1" and "champion" in call["message"], call

        # retrain on a data change: the watcher sees the retrain deployment's source grow, emits
        # dalle.data.changed, and the deployment's trigger starts one retrain for two changes in a row
        (corpus,) = (served.home / "a").glob("stages/corpus/*/urls.parquet")  # the first run's
        rows = pq.read_table(corpus)
        url_list = served.home / "urls.parquet"
        pq.write_table(rows.slice(0, 64), url_list)
        retrain = _get_json(f"{served.prefect_api}/deployments/name/train-dalle/retrain")
        parameters = {**retrain["parameters"], "preset": "micro",
                      "overrides": {"data": {"source": str(url_list)}, "download": {"allow_file_urls": True},
                                    "prior": {"optim": {"steps": 10}}}}
        request = urllib.request.Request(f"{served.prefect_api}/deployments/{retrain['id']}", method="PATCH",
                                         data=json.dumps({"parameters": parameters}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()
        _run_deployment(served, "watch-data/watch")  # the first look records the source
        assert not _flow_runs(served, "retrain")
        pq.write_table(rows, url_list.with_suffix(".tmp"))  # the list grows
        url_list.with_suffix(".tmp").replace(url_list)
        _run_deployment(served, "watch-data/watch")
        deadline = time.monotonic() + 60
        while not _flow_runs(served, "retrain") and time.monotonic() < deadline:
            time.sleep(2)
        os.utime(url_list, ns=(time.time_ns(), time.time_ns() + 10**9))  # a second change, soon after
        _run_deployment(served, "watch-data/watch")
        time.sleep(15)  # what a second trigger would have needed to create a run
        runs = _flow_runs(served, "retrain")
        assert len(runs) == 1, [run["name"] for run in runs]
        _wait_for(served, runs[0]["id"])
        versions = {str(v.version): v for v in client.search_model_versions("name='dalle'")}
        assert sorted(versions, key=int) == ["1", "2", "3", "4"]  # the three runs', then the retrain's
        assert client.get_run(versions["4"].run_id).data.tags["retrain_from"] == "models:/dalle@champion"

        # through all of it the server answered every request: no 5xx, no refused write (infra/serve.sh)
        errors = server_errors(served)
        assert not errors, "the Prefect server answered with 5xx:\n" + "\n".join(errors[:40])


# what the server logs with a 5xx answer (a 503's cause too: serve.sh sets PREFECT_SERVER_LOG_RETRYABLE_ERRORS),
# a uvicorn access line with a 5xx status, or SQLite refusing a write to a request or a service of the server
SERVER_ERROR_LINE = re.compile(r'Encountered (retryable )?exception in request|"[A-Z]+ [^"]*" 5\d\d\b|database is locked')


def server_errors(served: Served) -> list[str]:
    """The lines of the Prefect server's log that report a 5xx answer, the exception behind one, or a refused write."""
    log = (served.home / "logs" / "prefect-server.log").read_text(errors="replace")
    return [line for line in log.splitlines() if SERVER_ERROR_LINE.search(line)]
