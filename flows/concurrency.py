"""The `training` global concurrency limit: the stages that keep every core (or the GPU) busy take a
slot of it, so two flow runs on one machine (a scheduled retrain and a manual run, two demos)
queue for the cores instead of sharing them: on 2 cores, two priors side by side ran at 2k
tokens/s each instead of 12k one after the other, and a 5-minute stage took over 30.

The limit lives in the Prefect server the flow reports to, so every run against that server
shares it: `make serve`'s, or the ephemeral one a CLI run starts (whose database is the one under
PREFECT_HOME, shared by every ephemeral run of that home). A flow creates it at its start when it
is missing, with one slot per GPU, or one for a machine without; a limit that exists is left as
the user set it (`prefect gcl update training --limit 2`). Only stages that run take a slot: a
stage reused from the cache does no work.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

TRAINING_LIMIT = "training"  # taken by the stages `stage_names.COMPUTE_STAGES` names


def machine_slots() -> int:
    """One slot per GPU, one for a machine without."""
    import torch

    return max(1, torch.cuda.device_count())


def ensure_training_limit() -> int:
    """Create the `training` limit with `machine_slots()` slots unless it exists; its limit."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(TRAINING_LIMIT).limit
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=TRAINING_LIMIT,
                                                                                limit=machine_slots()))
        except ObjectAlreadyExists:  # another run created it first
            pass
        return client.read_global_concurrency_limit_by_name(TRAINING_LIMIT).limit


@contextmanager
def training_slot(stage: str) -> Iterator[float]:
    """Hold a slot of `training` for the block; yields the seconds spent waiting for it.

    The lease is renewed while the block runs and lapses 5 minutes after a crashed holder; a failed
    renewal (a server restarting) does not stop a training run half way."""
    from prefect.concurrency.sync import concurrency

    asked = time.perf_counter()
    with concurrency(TRAINING_LIMIT, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        waited = time.perf_counter() - asked
        if waited > 5:  # a hand-over between two stages of one run takes a second or two
            print(f"{stage}: waited {waited:.0f}s for a '{TRAINING_LIMIT}' slot (another run was training)", flush=True)
        yield waited
