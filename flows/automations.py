"""The Prefect automation that marks a lost node's runs Crashed (Prefect's "Detect zombie flows"
recipe), limited to btx's runs. A flow run whose process dies with its worker (a lost node, an
evicted pod) stops reporting and would stay Running forever; with heartbeats on
(`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, at least 30 s, in every worker's environment) this
automation marks a run Crashed once its heartbeats stop without a final or waiting state, and the
pipeline reschedules that branch in place (flows/remote.py), resuming from its newest checkpoint.

Scope: only runs tagged `btx` (every deployment of infra/prefect.yaml carries the tag, and a
deployment's runs inherit its tags), or of the given deployments: other teams' runs on the same
server are not touched. A run that stops heartbeating because it is waiting (AwaitingRetry,
Scheduled, Late, Pending, Paused, AwaitingConcurrencySlot) is not crashed either. After the
deploy step (infra/work-pools.sh runs it, and it can be rerun at any time):

    .venv/bin/python -m flows.automations --within 300   # on the server PREFECT_API_URL names

It creates the automation, or updates it in place when its settings changed.
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta

NAME = "btx: crash zombie flow runs"
TAG = "btx"
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
# States a live run may sit in without heartbeats: its process has not started (again) yet.
WAITING = ("Scheduled", "AwaitingRetry", "Late", "Pending", "Paused", "Suspended", "AwaitingConcurrencySlot",
           "Cancelling")
FINAL = ("Completed", "Failed", "Cancelled", "Crashed")


def zombie_automation(within_s: float, *, deployment_ids=None, tag: str = TAG, name: str = NAME):
    """Runs tagged `tag` (or of `deployment_ids`) whose heartbeats stop for `within_s` without a
    final or waiting state are set Crashed. `within_s` should be a few heartbeat periods."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    if deployment_ids:
        related = ResourceSpecification({"prefect.resource.id": [f"prefect.deployment.{d}" for d in deployment_ids],
                                         "prefect.resource.role": "deployment"})
    else:
        related = ResourceSpecification({"prefect.resource.id": f"prefect.tag.{tag}",
                                         "prefect.resource.role": "tag"})
    return AutomationCore(
        name=name,
        description=f"flows/automations.py: crash btx runs silent for {within_s:g} s (lost node or pod)",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in (*FINAL, *WAITING))},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=related,
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=within_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within_s:g} s: its process is gone")])


def _definition(automation) -> dict:
    """What the automation does (not its ids), to compare the server's with the wanted one; sets
    (a trigger's `after`, `expect`) come out of JSON as lists in any order, so lists are sorted."""
    def canonical(value):
        if isinstance(value, dict):
            return {k: canonical(v) for k, v in value.items() if k != "id"}
        if isinstance(value, list):
            items = [canonical(v) for v in value]
            return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
        return value

    return canonical(automation.model_dump(mode="json", include={"name", "description", "enabled", "trigger",
                                                                 "actions"}))


def ensure(within_s: float) -> str:
    """Create the automation on the current Prefect API, or update it to these settings."""
    from prefect.client.orchestration import get_client

    wanted = zombie_automation(within_s)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(NAME)
        for extra in existing[1:]:  # one is enough: two would crash each run twice
            client.delete_automation(extra.id)
        if not existing:
            return f"{NAME}: created ({client.create_automation(wanted)})"
        if _definition(existing[0]) == _definition(wanted):
            return f"{NAME}: up to date ({existing[0].id})"
        client.update_automation(existing[0].id, wanted)
        return f"{NAME}: updated ({existing[0].id})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--within", type=float, default=300.0,
                        help=f"seconds without a heartbeat before a run is crashed (a few x {HEARTBEAT_ENV})")
    print(ensure(parser.parse_args().within))
