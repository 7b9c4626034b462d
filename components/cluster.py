"""The one place the pipeline joins Ray: the dVAE, the tokenization and the prior share a session.

`connect` joins the cluster at an address (a `ray start` cluster, a KubeRay head) or starts a local
Ray on first use; a flow calls `disconnect` at its end, which shuts down what `connect` began: the
local Ray it started, or its connection to a cluster (the cluster itself keeps running). Starting
and stopping a local Ray between stages of one process is both slow and fragile (a second Ray
Train run after a shutdown can find its controller cancelled).
"""

from __future__ import annotations

import os

_started_here = False


def connect(address: str | None = None) -> dict[str, float]:
    """Join Ray (None: RAY_ADDRESS, a running local cluster, or a new one); the cluster's resources."""
    global _started_here
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a training job
        ray.init(address=address, include_dashboard=False, configure_logging=False)
        _started_here = True
    return ray.cluster_resources()


def disconnect() -> None:
    """End what `connect` began; a Ray session someone else opened in this process is left alone."""
    global _started_here
    import ray

    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False
