"""Automations that tell you what happened without a look at the UI: a webhook called when a run of
the pipeline fails (or crashes) and when the `champion` alias moves to a new model version.

`python -m dalle_pipeline.flows.notifications URL` (infra/serve.sh runs it when DALLE_WEBHOOK_URL
is set) saves URL as the Prefect webhook block `dalle-webhook` and creates the two automations,
replacing ones of the same names, so running it again with another URL moves both. The webhook
receives a JSON body: `{"event": ..., "flow_run": ..., "message": ...}`. The champion event is
emitted by the flow's register stage (`CHAMPION_MOVED`, flows/stages.py).
"""

from __future__ import annotations

import sys

WEBHOOK_BLOCK = "dalle-webhook"
CHAMPION_MOVED = "dalle.model.champion-moved"
FLOWS = ["train-dalle", "watch-data"]
RUN_FAILED_AUTOMATION = "dalle: a pipeline run failed"
CHAMPION_AUTOMATION = "dalle: the champion moved"
# the body each call posts; Jinja, filled in by the Prefect server from the triggering event
FAILED_PAYLOAD = ('{"event": "{{ event.event }}", "flow_run": "{{ flow_run.name }}", '
                  '"flow_run_id": "{{ flow_run.id }}", "message": {{ flow_run.state.message | tojson }}}')
CHAMPION_PAYLOAD = ('{"event": "{{ event.event }}", "flow_run": "{{ event.payload.flow_run }}", '
                    '"version": "{{ event.payload.version }}", "message": {{ event.payload.decision | tojson }}}')


def champion_resource(model_name: str) -> dict[str, str]:
    """The resource of the champion event: the registered model."""
    return {"prefect.resource.id": f"mlflow.registered-model.{model_name}", "prefect.resource.name": model_name}


def configure(url: str) -> list[str]:
    """Save `url` as the webhook block and (re)create both automations; their names."""
    from prefect.automations import Automation, CallWebhook, EventTrigger, Posture
    from prefect.blocks.webhook import Webhook

    if not url.startswith(("http://", "https://")):
        raise ValueError(f"webhook URL {url!r}: give an http:// or https:// URL")
    block_id = Webhook(url=url).save(WEBHOOK_BLOCK, overwrite=True)
    wanted = {
        RUN_FAILED_AUTOMATION: (
            EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                         match={"prefect.resource.id": "prefect.flow-run.*"},
                         match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOWS},
                         posture=Posture.Reactive, threshold=1, within=0),
            FAILED_PAYLOAD),
        CHAMPION_AUTOMATION: (
            EventTrigger(expect={CHAMPION_MOVED}, match={"prefect.resource.id": "mlflow.registered-model.*"},
                         posture=Posture.Reactive, threshold=1, within=0),
            CHAMPION_PAYLOAD),
    }
    for name, (trigger, payload) in wanted.items():
        _delete_automations(name)
        Automation(name=name, trigger=trigger,
                   actions=[CallWebhook(block_document_id=block_id, payload=payload)]).create()
    return list(wanted)


def _delete_automations(name: str) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for automation in client.read_automations_by_name(name):
            client.delete_automation(automation.id)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dalle_pipeline.flows.notifications WEBHOOK_URL")
    from dalle_pipeline.components.environment import use_defaults

    use_defaults()
    print("automations: " + ", ".join(configure(sys.argv[1])) + f" -> webhook block {WEBHOOK_BLOCK}")
