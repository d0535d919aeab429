"""The automations this pipeline ships, as code: Prefect automations over its events.

- **retrain on drift**: a ``houseprice.drift.detected`` event (a scored file over the drift
  threshold) runs the training deployment with its own parameters, that is on the training
  source it serves (the living data); the promotion gate then decides whether its model
  replaces production.
- **notify on failure**: a flow run of the training or the scoring flow that fails
  (``houseprice.run.failed``, sent by the flow itself) or crashes sends a notification
  through a webhook block (Slack, Teams, or any HTTP endpoint).
- **notify on promotion**: a ``houseprice.model.promoted`` event (the gate promoted a model)
  sends one too.

``houseprice automations`` installs them (``houseprice serve`` too); installing again
replaces them, by name. The server's triggers and actions services run them: the local
server has them, as has any ``prefect server start``.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from tasks.promote import PROMOTED_EVENT
from tasks.report import FAILED_EVENT
from tasks.score import DRIFT_EVENT

RETRAIN = "houseprice: retrain on drift"
FAILED = "houseprice: notify on failure"
PROMOTED = "houseprice: notify on promotion"
WEBHOOK_BLOCK = "houseprice-webhook"
FLOWS = ["house-price", "house-price-score"]


def check_webhook(url: str | None) -> None:
    """A webhook URL must be http(s): one line before anything starts."""
    from urllib.parse import urlsplit

    from flows.commands.config import ConfigError

    if url is not None and (urlsplit(url).scheme not in ("http", "https")
                            or not urlsplit(url).netloc):
        raise ConfigError(f"webhook {url!r} is not an http(s) URL: give the endpoint's URL "
                          "(a Slack or Teams incoming webhook, or any HTTP endpoint)")


def webhook_block(url: str) -> UUID:
    """The webhook as a Prefect notification block (saved, replacing an older one): a JSON
    POST of the subject and body, which Slack's and Teams' incoming webhooks read as
    ``text``."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    check_webhook(url)
    block = CustomWebhookNotificationBlock(
        name="houseprice", url=url, method="POST",
        json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}",
                   "body": "{{body}}"})
    return block.save(WEBHOOK_BLOCK, overwrite=True)


def automations(train_deployment: UUID | None, block: UUID | None) -> list[Any]:
    """The automations for the training deployment ``train_deployment`` (none to retrain
    without it) and the webhook block ``block`` (no notifications without it)."""
    from prefect.automations import Automation, EventTrigger, RunDeployment, SendNotification

    out = []
    if train_deployment is not None:
        out.append(Automation(
            name=RETRAIN, description="Retrain when a scored file drifts; the promotion "
            "gate decides whether the new model replaces production",
            trigger=EventTrigger(expect={DRIFT_EVENT}, posture="Reactive", threshold=1),
            actions=[RunDeployment(source="selected", deployment_id=train_deployment)]))
    if block is not None:
        out.append(Automation(
            name=FAILED, description="A training or scoring run failed or crashed",
            # Failed: the flows' own event (see ``announce_failure``), at once; Crashed (a
            # process that died cannot send it): Prefect's state event, which for a served
            # run may come up to 15 minutes late.
            trigger=EventTrigger(
                expect={FAILED_EVENT, "prefect.flow-run.Crashed"},
                match_related={"prefect.resource.role": "flow",
                               "prefect.resource.name": FLOWS},
                posture="Reactive", threshold=1),
            actions=[SendNotification(
                block_document_id=block,
                subject="houseprice: flow run {{ flow_run.name }} {{ flow_run.state.name }}",
                body="Flow run {{ flow_run.name }} of {{ flow.name }} ended "
                     "{{ flow_run.state.name }}: {{ flow_run.state.message }}\n"
                     "{{ flow_run|ui_url }}")]))
        out.append(Automation(
            name=PROMOTED, description="The promotion gate promoted a model",
            trigger=EventTrigger(expect={PROMOTED_EVENT}, posture="Reactive", threshold=1),
            actions=[SendNotification(
                block_document_id=block,
                subject="houseprice: model {{ event.payload.model }} promoted",
                body="Model {{ event.payload.model }} replaces "
                     "{{ event.payload.production_before }} in production: "
                     "{{ event.payload.reason }}")]))
    return out


def install(train_deployment: str | None, webhook: str | None) -> list[str]:
    """Install (or replace) the automations on the API in use; returns what each does, one
    line each. ``train_deployment`` is a ``flow/deployment`` name, which must exist."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deployment_id = None
    if train_deployment:
        with get_client(sync_client=True) as client:
            try:
                deployment_id = client.read_deployment_by_name(train_deployment).id
            except ObjectNotFound:
                raise LookupError(f"no deployment {train_deployment!r} on this server: serve "
                                  "it first ('houseprice serve --name ...')") from None
    block = webhook_block(webhook) if webhook else None
    wanted = automations(deployment_id, block)
    with get_client(sync_client=True) as client:
        for automation in wanted:  # replaced by name: installing again is idempotent
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
    lines = []
    for automation in wanted:
        automation.create()
        lines.append(f"{automation.name}: {automation.description}")
    return lines
