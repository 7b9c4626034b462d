"""The one MLflow seam: every stage logs params, metrics and artifacts through a `Tracker`, and the CLI
loads registered models through `load_registered_model`.

A `Tracker` holds an explicit run id and an `MlflowClient`, never MLflow's fluent active-run
state: Prefect runs tasks in threads and Ray runs training in other processes, and both need to
log into the same run. A tracker is cheap to pickle (`tracking_uri` and `run_id` only), so a Ray
worker rebuilds it on its side.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .storage import RunRoot, run_root

if TYPE_CHECKING:
    from .lineage import DatasetRef

PARENT_RUN_TAG = "mlflow.parentRunId"
EXPERIMENT_NAME = "train-dalle"
# seconds between two samples of the system metrics: MLflow's default; its environment variable
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it (a test sets a fraction of a second)
SYSTEM_METRICS_INTERVAL_S = 10.0


def default_root() -> RunRoot:
    """The run's root: `DALLE_HOME` (a local path or an object store URL), else ./runs."""
    return run_root(os.environ.get("DALLE_HOME", "runs"), "DALLE_HOME")


def default_tracking_uri(root: RunRoot | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a sqlite store under the root. An object store cannot hold a
    sqlite file: there, the tracking URI must be given (an MLflow server, or a database)."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    root = root if root is not None else default_root()
    if root.remote:
        raise ValueError(f"the root {root.remote!r} is an object store, which cannot hold MLflow's default sqlite "
                         "store: set MLFLOW_TRACKING_URI to an MLflow tracking server (make serve starts one) or a "
                         "database (postgresql://...); the runs' artifacts go to the store")
    root.local.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root.local}/mlflow.db"


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

    def log_image(self, image: Any, key: str, step: int) -> None:
        """One picture of the series `key` (a numpy array or PIL image): MLflow's image view on the run
        page steps through a series by `step`, so a preview logged every checkpoint shows training progress."""
        self.client.log_image(self.run_id, image, key=key, step=step)

    @contextmanager
    def system_metrics(self, sampling_interval: float = SYSTEM_METRICS_INTERVAL_S) -> Iterator[None]:
        """Log this machine's CPU, memory, disk, network (and GPU, where pynvml finds one) as `system/...`
        metrics of this run while the block runs; the monitor thread stops when the block ends or raises.

        MLflow's monitor takes the run id and the store explicitly, so no fluent active run is needed;
        a resumed stage continues its steps after the last ones logged instead of starting again at 0.
        """
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # its INFO lines (started, stopping, terminated, no GPU metrics: four a stage) say nothing a person needs
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=sampling_interval, resume_logging=True,
                                       tracking_uri=self.tracking_uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def log_input_dataset(self, dataset: DatasetRef, context: str) -> None:
        """Record `dataset` (`lineage`: its name, where it lies, its digest and profile) as an input of this
        run, tagged with the `context` it was read in ("training", "evaluation"): the run page's datasets."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():  # a local path matches MLflow's local source under two schemes
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            source = resolve_dataset_source(dataset.source_uri)
        described = MetaDataset(source, name=dataset.name, digest=dataset.digest).to_dict()
        entity = Dataset(**described, profile=json.dumps(dataset.profile, sort_keys=True) if dataset.profile else None)
        self.client.log_inputs(self.run_id, [DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def log_dict(self, obj: Any, filename: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / filename
            target.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            self.log_artifact(target)

    def log_registered_pyfunc(self, name: str, python_model: Any, artifacts: Mapping[str, str],
                              signature: Any = None, input_example: Any = None,
                              pip_requirements: list[str] | None = None) -> str:
        """Log an MLflow pyfunc model into this run, register it under `name`; returns the version.

        `signature` (an `mlflow.models.ModelSignature`) is what serving validates requests against;
        `input_example` is saved beside the model and checked against the signature, but never run.
        `mlflow.pyfunc.log_model` runs it twice, each after loading the logged model: to check that it
        serves, and (without `pip_requirements`) in the subprocess that infers the requirements from
        what loading and predicting import. For a model whose predict draws images, each costs a load
        of every weight and a sampling run; here the check is off, and given `pip_requirements` there
        is no inference."""
        import mlflow
        import mlflow.pyfunc
        from mlflow.models import Model

        with fluent_store(self.tracking_uri), mlflow.start_run(run_id=self.run_id):
            info = Model.log(artifact_path=None, name=name, flavor=_PyfuncWithoutServingCheck,
                             python_model=python_model, artifacts=dict(artifacts), registered_model_name=name,
                             signature=signature, input_example=input_example, pip_requirements=pip_requirements,
                             validate_serving_input=False,
                             flavor_name=mlflow.pyfunc._get_pyfunc_model_flavor_name(python_model))
        return str(info.registered_model_version)


class _PyfuncWithoutServingCheck:
    """`mlflow.pyfunc` as `Model.log` calls a flavor (what `mlflow.pyfunc.log_model` does), taking the
    `validate_serving_input` switch that `Model.log` reads and pyfunc's `save_model` refuses."""

    @staticmethod
    def save_model(validate_serving_input: bool = True, **kwargs: Any) -> Any:
        import mlflow.pyfunc

        del validate_serving_input  # Model.log has read it
        return mlflow.pyfunc.save_model(**kwargs)


def monitor_system(tracker: Tracker | None) -> AbstractContextManager[None]:
    """`tracker.system_metrics()`, or no monitor for a stage called without a tracker."""
    return tracker.system_metrics() if tracker is not None else nullcontext()


def load_registered_model(model_uri: str, tracking_uri: str) -> Any:
    """The Python model of an MLflow pyfunc (`models:/dalle@champion`, a run's or a version's URI) in the
    store at `tracking_uri`, which holds the registry too; the process-wide URIs are left as they were."""
    import mlflow.pyfunc

    with fluent_store(tracking_uri):
        return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()


@contextmanager
def stage_run(parent: Tracker, name: str) -> Iterator[Tracker]:
    """A nested run for one stage: FINISHED when the block completes, FAILED when it raises."""
    child = parent.start_child(name, tags={"stage": name})
    try:
        yield child
    except BaseException:
        child.end("FAILED")
        raise
    child.end("FINISHED")
