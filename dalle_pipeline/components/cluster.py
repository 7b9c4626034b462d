"""The one place the pipeline joins Ray: the dVAE, the tokenization and the prior share a session.

`connect` joins the cluster at an address (a `ray start` cluster, a KubeRay head) or starts a local
Ray on first use; a flow calls `disconnect` at its end, which shuts Ray down only if `connect`
started it. Starting and stopping a local Ray between stages of one process is both slow and
fragile (a second Ray Train run after a shutdown can find its controller cancelled).
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
        context = ray.init(address=address, include_dashboard=False, configure_logging=False)
        # a local cluster started here has no address to join (ray.init started the head itself)
        _started_here = address is None and not os.environ.get("RAY_ADDRESS") and context is not None
    return ray.cluster_resources()


def disconnect() -> None:
    """Shut Ray down if `connect` started it; leave a cluster someone else runs alone."""
    global _started_here
    import ray

    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False
