"""The `watch-data` flow: retraining on a change of the data, not only on a schedule.

Deployed every 5 minutes (prefect.yaml), it reads the data source the `train-dalle/retrain`
deployment is set to (its `overrides.data.source`: the one place the source is stated), takes the
source's fingerprint (`components/sources/fingerprint.py`: every file's path, size and time) and
compares it with the one it saw last (a Prefect variable per source). On a change it emits the
event `dalle.data.changed`; the retrain deployment's trigger runs it once on that event, and
not again for 10 minutes, so changes in quick succession (a list written in two steps, files
copied in over a few looks) start one retrain. The first look at a source only records it: the
champion's own run may have trained on it. Imports are absolute (Prefect loads this file by path).
"""

from __future__ import annotations

from prefect import flow
from prefect.events import emit_event
from prefect.variables import Variable

from dalle_pipeline.components.environment import use_defaults
from dalle_pipeline.components.sources.fingerprint import source_fingerprint, source_id

DATA_CHANGED = "dalle.data.changed"
RETRAIN_DEPLOYMENT = "train-dalle/retrain"


def watched_source(deployment: str) -> str | None:
    """The `overrides.data.source` a deployment runs with, None when it has none."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        parameters = client.read_deployment_by_name(deployment).parameters or {}
    return ((parameters.get("overrides") or {}).get("data") or {}).get("source")


def data_resource(source: str) -> dict[str, str]:
    """The event resource of a data source: `dalle.data-source.<id of its path>`, named by the path."""
    return {"prefect.resource.id": f"dalle.data-source.{source_id(source)}", "prefect.resource.name": source}


@flow(name="watch-data", log_prints=True)
def watch_data(deployment: str = RETRAIN_DEPLOYMENT) -> dict:
    """Emit `dalle.data.changed` when the data source of `deployment` changed since the last look."""
    use_defaults()
    source = watched_source(deployment)
    if not source:
        print(f"{deployment} has no overrides.data.source: nothing to watch")
        return {"source": None, "changed": False}
    seen_name = f"dalle-data-{source_id(source)}"
    fingerprint, previous = source_fingerprint(source), Variable.get(seen_name)
    changed = previous is not None and previous != fingerprint
    if changed:
        emit_event(DATA_CHANGED, resource=data_resource(source),
                   payload={"source": source, "fingerprint": fingerprint, "previous": previous})
        print(f"{source} changed: emitted {DATA_CHANGED} (the {deployment} deployment runs on it)")
    elif previous is None:
        print(f"{source}: first look, fingerprint recorded; a later change starts {deployment}")
    else:
        print(f"{source}: unchanged")
    if fingerprint != previous:
        Variable.set(seen_name, fingerprint, overwrite=True)
    return {"source": source, "changed": changed, "fingerprint": fingerprint}
