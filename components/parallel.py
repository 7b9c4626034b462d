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
Tasks read and write the stage's files where the driver names them, so on a cluster of several nodes
those paths must be on a file system every node mounts: `require_shared` refuses a stage, before any
work, when a node sees them otherwise (a task there would write its shard to that node's own disk).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .storage import StorePath

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


def cluster_nodes() -> int:
    """How many alive nodes with CPUs or GPUs the Ray session's cluster has (1 without a session)."""
    if not ray_session():
        return 1
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive")
               and (node["Resources"].get("CPU", 0) or node["Resources"].get("GPU", 0))) or 1


def worker_node() -> str:
    """The Ray node this code runs on ("local" outside Ray): data tasks record it, so a test can see
    that every node worked."""
    if not ray_session():
        return "local"
    import ray

    return ray.get_runtime_context().get_node_id()


class NotShared(ValueError):
    """A path the tasks of a stage read or write that some node of the Ray cluster does not see as this one does."""


_seen_shared: set[tuple[str, str]] = set()  # (path, node id) found shared: checked once a process
SHARED_CHECK_TIMEOUT_S = 120.0


def require_shared(paths: dict[str, Path | StorePath], writes: Path | StorePath | None = None) -> None:
    """Refuse, before any work, paths that a node of the Ray cluster other than this one cannot see: `paths`
    (by what they are, e.g. "the source") must exist there as here (a file of the same size, or a folder), and
    `writes`, a folder the stage's tasks write, must show them a file this process just wrote into it. Without
    this, a task on a node with a disk of its own wrote its shard there, where this process never saw it (a
    batch missing its shards). A path on an object store (`StorePath`), read or written, is every node's: not
    asked. Nothing without a Ray session, or on one node; a node that does not answer in SHARED_CHECK_TIMEOUT_S
    is named in a warning and trusted."""
    if not ray_session():
        return
    import secrets

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    paths = {what: Path(path).expanduser().resolve() for what, path in paths.items()  # as a task elsewhere sees it
             if not isinstance(path, StorePath)}  # an object store is every node's: read where it lies
    writes = None if writes is None or isinstance(writes, StorePath) else Path(writes).expanduser().resolve()
    here = ray.get_runtime_context().get_node_id()
    nodes = {node["NodeID"]: node.get("NodeManagerAddress", "?") for node in ray.nodes()
             if node.get("Alive") and node["NodeID"] != here
             and (node["Resources"].get("CPU", 0) or node["Resources"].get("GPU", 0))}
    expected = {str(path): _path_state(path) for path in paths.values()}
    probe = None
    if writes is not None:
        writes.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        probe = writes / f".shared-probe-{token}"
        probe.write_text(token)
        expected[str(probe)] = ("probe", token)
    try:
        asked = {node: [path for path in expected if (path, node) not in _seen_shared] for node in nodes}
        remote = ray.remote(_path_states)
        calls = {node: remote.options(num_cpus=0, max_retries=0,
                                      scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                 .remote(wanted, probe and str(probe)) for node, wanted in asked.items() if wanted}
        unseen: dict[str, list[str]] = {}
        for node, call in calls.items():
            try:
                states = ray.get(call, timeout=SHARED_CHECK_TIMEOUT_S)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as error:
                ray.cancel(call, force=True)
                print(f"could not check that Ray node {node[:8]} ({nodes[node]}) sees {sorted(asked[node])}: "
                      f"{type(error).__name__}", flush=True)
                continue
            for path, state in zip(asked[node], states):
                if state == expected[path]:
                    if path != str(probe):
                        _seen_shared.add((path, node))
                else:
                    unseen.setdefault(path, []).append(f"{node[:8]} ({nodes[node]})")
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
    if unseen:
        named = {str(path): f"{what} ({path})" for what, path in paths.items()}
        if probe is not None:
            named[str(probe)] = f"the folder {writes}, which the stage writes,"
        problems = "; ".join(f"{named[path]} on node{'s' * (len(on) > 1)} {', '.join(on)}"
                             for path, on in unseen.items())
        raise NotShared(f"nodes of the Ray cluster that run this stage's tasks do not see what they read and write: "
                        f"{problems}. Stage folders and sources must lie on a file system every node mounts (NFS, "
                        "a shared volume): give DALLE_HOME such a folder, or DALLE_CACHE where the root is an object "
                        "store")


def _path_state(path: Path) -> tuple[str, int | None] | None:
    """What a node sees at `path`: a folder, a file and its size, or nothing."""
    if path.is_dir():
        return ("folder", None)
    if path.is_file():
        return ("file", path.stat().st_size)
    return None


def _path_states(paths: list[str], probe: str | None) -> list:
    """What a node sees at each path (`_path_state`); at the probe file, what it holds."""
    return [_probe_state(Path(path)) if path == probe else _path_state(Path(path)) for path in paths]


def _probe_state(probe: Path) -> tuple[str, str] | None:
    try:
        return ("probe", probe.read_text())
    except OSError:
        return None
