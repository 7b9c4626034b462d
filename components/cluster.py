"""The one place the pipeline joins Ray: the dVAE, the tokenization and the prior share a session.

`connect` joins the cluster at an address (a `ray start` cluster, a KubeRay head) or starts a local
Ray on first use; a flow calls `disconnect` at its end, which shuts down what `connect` began: the
local Ray it started, or its connection to a cluster (the cluster itself keeps running). Starting
and stopping a local Ray between stages of one process is both slow and fragile (a second Ray
Train run after a shutdown can find its controller cancelled).
"""

from __future__ import annotations

import logging
import os

from .environment import use_defaults

_started_here = False
# Ray Train's own output a user cannot act on, kept out of a run's output:
# - its print patch tees every worker print into a log record as well: each progress line came twice;
# - without a dashboard there is no State API, and its PlacementGroupCleaner warned every few seconds
#   that it could not query it (setup_worker below);
# - a local Ray has no preemptible nodes for its PreemptionWatcher (an actor that logged an error at start).
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
LOCAL_WORKER_ENV = {**WORKER_ENV, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
DASHBOARD_HOST = "127.0.0.1"
NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def setup_worker() -> None:
    """Ray's worker_process_setup_hook, run in every worker process of the session `connect` opened.

    RAY_ADDRESS names this worker's own cluster, so Ray code inside it that looks a cluster up (Ray
    Train's PlacementGroupCleaner queries the State API) finds this one: with a second Ray on the
    machine it found two and died on "Found multiple active Ray instances". And errors only from
    the loggers in NOISY_LOGGERS."""
    import ray

    try:
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except Exception:  # a worker that cannot say is left to Ray's own lookup, never failed for it
        pass
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def local_dashboard() -> dict[str, object]:
    """ray.init's dashboard settings for a local Ray: none unless DALLE_RAY_DASHBOARD=1 (it is several
    processes on a small machine), and then on 127.0.0.1 only, never on every interface."""
    wanted = os.environ.get("DALLE_RAY_DASHBOARD", "0") not in ("", "0", "false")
    return {"include_dashboard": wanted, **({"dashboard_host": DASHBOARD_HOST} if wanted else {})}


def connect(address: str | None = None) -> dict[str, float]:
    """Join Ray at `address` (None: RAY_ADDRESS, else a new local Ray); the cluster's resources."""
    global _started_here
    import ray

    if not ray.is_initialized():
        use_defaults()  # no usage reports from a training job, whoever called this
        # by address, never by discovery: without one, a Ray of our own, whatever else runs on the machine
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        runtime_env = {"env_vars": LOCAL_WORKER_ENV if address == "local" else WORKER_ENV,
                       "worker_process_setup_hook": f"{__name__}.setup_worker"}
        context = ray.init(address=address, configure_logging=False, runtime_env=runtime_env,
                           **(local_dashboard() if address == "local" else {}))
        _started_here = True
        if address == "local" and context.dashboard_url:
            print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)
    return ray.cluster_resources()


def disconnect() -> None:
    """End what `connect` began; a Ray session someone else opened in this process is left alone."""
    global _started_here
    import ray

    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False
