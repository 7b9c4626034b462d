"""Per-shard work of the data stages, on every CPU of the Ray cluster a flow connected to.

`ordered_map(function, jobs)` calls `function(job)` for each job and yields the results in job
order. With a Ray session open in this process (`cluster.connect`, which the flow calls before its
data stages) each call is a Ray task of one CPU, at most `in_flight` of them submitted at once (by
default two per CPU of the cluster), so any node may run them and the driver holds only the
results not yet consumed; tasks are spread over the nodes (Ray's SPREAD strategy: short tasks
would otherwise all queue on the driver's node). Without one, the calls run here, one after another: a component called
on its own (a test, a notebook) needs no Ray.

A job's function must be a module-level function (Ray ships it by reference) and idempotent: a
task whose worker dies is run again by Ray (`max_retries`), and its outputs are written atomically.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")

TASK_RETRIES = 3  # a task whose worker process died (OOM, SIGKILL, a lost node) is run again this often
_remote_functions: dict[Callable, Any] = {}


def ray_session() -> bool:
    """Whether this process has a Ray session open (and the work should go to its cluster)."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def cluster_cpus() -> int:
    if not ray_session():
        return 1
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def ordered_map(function: Callable[[Job], Result], jobs: Iterable[Job], in_flight: int | None = None,
                **options: Any) -> Iterator[Result]:
    """`function(job)` for each job, in job order; Ray tasks where a Ray session is open (`options` are
    Ray's task options, e.g. memory), else in this process."""
    if not ray_session():
        for job in jobs:
            yield function(job)
        return
    import ray

    remote = _remote_functions.get(function)
    if remote is None:
        remote = _remote_functions[function] = ray.remote(function)
    remote = remote.options(**{"num_cpus": 1, "max_retries": TASK_RETRIES, "scheduling_strategy": "SPREAD", **options})
    limit = in_flight or 2 * cluster_cpus()
    pending: deque = deque()
    for job in jobs:
        pending.append(remote.remote(job))
        if len(pending) >= limit:
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())


def worker_node() -> str:
    """The Ray node this code runs on ("local" outside Ray): data tasks record it, so a test can see
    that every node worked."""
    if not ray_session():
        return "local"
    import ray

    return ray.get_runtime_context().get_node_id()
