"""The filter's duplicate index spread over the nodes of the Ray cluster, one partition on each.

On one machine the index of what was kept lives in the filter's driver (`dedup.KeptIndex`); its lookups
are the one part of the filter that runs in corpus order, so on a cluster they would bound the whole
stage by one core (89 us a query against 100M hashes: 2.5 h). With more than one node, the index is
split by key (`dedup.partition_of` of each band value and digest) into one `IndexPartition` actor per
node, each holding its share of every table in its own node's temporary space. A lookup's candidates
(the filter asks for about 16k at a time, `filter.run.LOOKUP_ROWS`) go to every partition in one call,
with the samples kept since the last lookup to add first; each probes only its share and answers which
candidates it found near or seen; the driver takes the union. The verdicts are those of one index
holding everything: equal keys always fall in one partition, and a partition answers the calls in the
order the driver made them. The lookup's arrays are put in the object store once for all partitions:
the driver's part is about 2 us an item whatever their number (bench/RESULTS.md).

A partition lost (its node gone, its process killed) takes its share with it: the stage fails naming
that, and run again it resumes from the shards it wrote, rebuilding the index from their report parts.
The actors ask for no CPU: an index lookup is a small part of a sample's cost next to decoding and
hashing it (the tasks that do that keep every CPU), and an actor holding a CPU would idle one.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from ..parallel import ray_session, worker_node
from .dedup import KeptIndex, choose_bands


def alive_nodes() -> list[str]:
    """The Ray nodes that can run work, by id."""
    import ray

    return sorted(node["NodeID"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0)


def index_partitions(wanted: int | None) -> int:
    """How many partitions the kept index is split into: `wanted`, or one per node of a cluster of more than
    one (None); 0 (the index in this process) without a Ray session or on a single node."""
    if not ray_session():
        return 0
    if wanted is not None:
        if wanted < 0:
            raise ValueError(f"index_partitions must be at least 0, not {wanted}")
        return wanted
    nodes = len(alive_nodes())
    return nodes if nodes > 1 else 0


class IndexPartition:
    """One partition of the kept index, a Ray actor: its share of every table, runs past 64k entries in files
    in its node's temporary space (removed by `close`)."""

    def __init__(self, exact: bool, max_distance: int | None, bands: int | None, share: tuple[int, int]) -> None:
        self.spill = Path(tempfile.mkdtemp(prefix="dalle-kept-index-"))
        self.index = KeptIndex(exact, max_distance, bands=bands, spill_dir=self.spill, share=share)

    def node(self) -> str:
        return worker_node()

    def lookup(self, kept: Keys | None, asked: Keys) -> tuple[np.ndarray, np.ndarray]:
        """Add the samples the previous shard kept (if any), then answer for this shard's candidates."""
        if kept is not None:
            self.add(kept)
        return self.index.lookup(*asked)

    def add(self, kept: Keys) -> None:
        self.index.add(*kept)

    def close(self) -> None:
        self.index.close()
        shutil.rmtree(self.spill, ignore_errors=True)


Keys = tuple[np.ndarray, np.ndarray, np.ndarray]  # digests' high and low 64 bits, pHashes (dedup.KeptIndex)
SEND_KEPT = 1 << 16  # kept entries held back for the next lookup at most; past them, sent on their own


class PartitionLost(RuntimeError):
    pass


class PartitionedIndex:
    """`partitions` IndexPartition actors, the i-th on the i-th alive node (round the nodes again past their
    count), answering together as one `KeptIndex` of everything would."""

    def __init__(self, exact: bool, max_distance: int | None, expected_items: int, partitions: int) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.exact_duplicates, self.max_distance = exact, max_distance
        bands = None if max_distance is None else choose_bands(max_distance, expected_items)  # one layout for all
        nodes = alive_nodes()
        actor = ray.remote(IndexPartition)
        self.partitions = [actor.options(
            num_cpus=0, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[part % len(nodes)], soft=False),
        ).remote(exact, max_distance, bands, (part, partitions)) for part in range(partitions)]
        self._kept: list[Keys] = []  # kept samples not sent yet: they go with the next shard's lookup
        self._adding: list = []  # adds sent on their own (many kept at once): waited for with the next lookup

    def nodes(self) -> dict[str, int]:
        """How many partitions each node holds."""
        return dict(sorted(Counter(self._get([part.node.remote() for part in self.partitions])).items()))

    def lookup(self, high: np.ndarray, low: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The partitions' answers together, each partition first adding the samples kept since the last lookup
        (one call a partition for both)."""
        import ray

        kept, asked = ray.put(self._pending()), ray.put((high, low, hashes))  # serialised once for all partitions
        answers = self._get([part.lookup.remote(kept, asked) for part in self.partitions])
        seen, near = zip(*answers)
        return np.logical_or.reduce(seen), np.logical_or.reduce(near)

    def add(self, high: np.ndarray, low: np.ndarray, hashes: np.ndarray) -> None:
        """Kept samples, added by every partition before it answers the next lookup (a stage ends with its
        last shard decided: what no later shard asks about is never needed). Past SEND_KEPT of them (a
        rerun's earlier parts, remembered one after another) they are sent on their own."""
        import ray

        self._kept.append((high, low, hashes))
        if sum(len(kept[0]) + len(kept[2]) for kept in self._kept) >= SEND_KEPT:
            kept = ray.put(self._pending())
            self._adding += [part.add.remote(kept) for part in self.partitions]

    def _pending(self) -> Keys | None:
        if not self._kept:
            return None
        kept, self._kept = self._kept, []
        return tuple(np.concatenate(column) for column in zip(*kept))

    def close(self) -> None:
        """Remove every partition's files and end its actor (a lost one is past caring)."""
        import ray

        try:
            ray.get([part.close.remote() for part in self.partitions])
        except ray.exceptions.RayError:
            pass
        for part in self.partitions:
            ray.kill(part)

    def _get(self, refs: list) -> list:
        import ray

        try:
            waited, self._adding = self._adding, []
            return ray.get(waited + refs)[len(waited):]
        except ray.exceptions.RayActorError as error:
            raise PartitionLost(f"a partition of the filter's duplicate index was lost ({type(error).__name__}: "
                                f"its node or process is gone); run the stage again: it resumes from the shards "
                                f"it wrote") from error


def open_index(exact: bool, max_distance: int | None, expected_items: int, spill_dir: Path,
               partitions: int | None = None) -> KeptIndex | PartitionedIndex:
    """The kept index: on the cluster's nodes (`index_partitions`), or in this process, runs spilled to
    `spill_dir`."""
    count = index_partitions(partitions)
    if count:
        return PartitionedIndex(exact, max_distance, expected_items, count)
    return KeptIndex(exact, max_distance, expected_items, spill_dir=spill_dir)
