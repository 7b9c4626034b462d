"""The one MLflow seam: every stage logs params, metrics and artifacts through a `Tracker`.

A `Tracker` holds an explicit run id and an `MlflowClient`, never MLflow's fluent active-run
state: Prefect runs tasks in threads and Ray runs training in other processes, and both need to
log into the same run. A tracker is cheap to pickle (`tracking_uri` and `run_id` only), so a Ray
worker rebuilds it on its side.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PARENT_RUN_TAG = "mlflow.parentRunId"
EXPERIMENT_NAME = "train-dalle"


def default_root() -> Path:
    return Path(os.environ.get("DALLE_HOME", "runs")).resolve()


def default_tracking_uri(root: str | Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a sqlite store under the artifact root."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    root = Path(root) if root is not None else default_root()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root.resolve()}/mlflow.db"


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    # the registry lives in the same store; naming it keeps a process-wide registry URI out
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@contextmanager
def fluent_store(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's process-wide (fluent) tracking and registry URIs at one store for the block,
    then put back what was there: set_tracking_uri/set_registry_uri also set MLFLOW_TRACKING_URI and
    MLFLOW_REGISTRY_URI, which later clients, subprocesses and `default_tracking_uri` would inherit."""
    import mlflow
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    saved_env = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved_tracking, saved_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_tracking)
        registry_utils._registry_uri = saved_registry
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ensure_experiment(tracking_uri: str, name: str = EXPERIMENT_NAME, artifact_root: str | None = None) -> str:
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


@dataclass
class Tracker:
    """Logs into one MLflow run. `start_child` opens a nested run under it."""

    tracking_uri: str
    run_id: str
    _client_cache: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client_cache": None}

    def stage_key(self) -> str:
        """What a stage that writes into this tracker's store is keyed by: the store, not the run."""
        return self.tracking_uri

    @property
    def client(self):
        if self._client_cache is None:
            self._client_cache = _client(self.tracking_uri)
        return self._client_cache

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        run_name: str,
        tags: Mapping[str, str] | None = None,
        experiment: str = EXPERIMENT_NAME,
        artifact_root: str | None = None,
        parent_run_id: str | None = None,
    ) -> Tracker:
        experiment_id = ensure_experiment(tracking_uri, experiment, artifact_root)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags[PARENT_RUN_TAG] = parent_run_id
        run = _client(tracking_uri).create_run(experiment_id, run_name=run_name, tags=all_tags)
        return cls(tracking_uri=tracking_uri, run_id=run.info.run_id)

    def start_child(self, run_name: str, tags: Mapping[str, str] | None = None) -> Tracker:
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        run = self.client.create_run(
            experiment_id, run_name=run_name, tags={**(tags or {}), PARENT_RUN_TAG: self.run_id}
        )
        return Tracker(tracking_uri=self.tracking_uri, run_id=run.info.run_id)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        from mlflow.entities import Param

        flat = _flatten(params, prefix)
        items = [Param(k, v[:6000]) for k, v in flat.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, filename: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / filename
            target.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            self.log_artifact(target)

    def log_registered_pyfunc(self, name: str, python_model: Any, artifacts: Mapping[str, str]) -> str:
        """Log an MLflow pyfunc model into this run, register it under `name`; returns the version."""
        import mlflow
        import mlflow.pyfunc

        with fluent_store(self.tracking_uri), mlflow.start_run(run_id=self.run_id):
            info = mlflow.pyfunc.log_model(name=name, python_model=python_model, artifacts=dict(artifacts),
                                           registered_model_name=name)
        return str(info.registered_model_version)

    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri


@contextmanager
def stage_run(parent: Tracker, name: str, params: Mapping[str, Any] | None = None) -> Iterator[Tracker]:
    """A nested run for one stage: FINISHED when the block completes, FAILED when it raises."""
    child = parent.start_child(name, tags={"stage": name})
    if params:
        child.log_params(params)
    try:
        yield child
    except BaseException:
        child.end("FAILED")
        raise
    child.end("FINISHED")
