"""The Prefect automation that marks a lost node's runs Crashed (Prefect's "Detect zombie flows"
recipe). A flow run whose process dies with its worker (a lost node, an evicted pod) stops
reporting and would stay Running forever; with heartbeats on (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`,
at least 30 s, in every worker's environment) this automation marks a run Crashed once its
heartbeats stop without a final state, and the pipeline's retry of that branch resumes it from
its newest checkpoint. `infra/work-pools.sh` creates it:

    python -m flows.automations --within 300      # on the server PREFECT_API_URL names
"""

from __future__ import annotations

import argparse
from datetime import timedelta

NAME = "btx: crash zombie flow runs"
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


def zombie_automation(within_s: float, *, deployment_id=None, name: str = NAME):
    """Runs (of one deployment, or all) whose heartbeats stop for `within_s` without a final state
    are set Crashed. `within_s` should be a few heartbeat periods."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    final = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    related = (ResourceSpecification({"prefect.resource.id": f"prefect.deployment.{deployment_id}"})
               if deployment_id else None)
    return AutomationCore(
        name=name,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *final},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            **({"match_related": related} if related else {}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=within_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within_s:g} s: its process is gone")])


def ensure(within_s: float) -> str:
    """Create the automation on the current Prefect API unless one of that name exists."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(NAME)
        if existing:
            return f"{NAME}: exists ({existing[0].id})"
        return f"{NAME}: created ({client.create_automation(zombie_automation(within_s))})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--within", type=float, default=300.0,
                        help=f"seconds without a heartbeat before a run is crashed (a few x {HEARTBEAT_ENV})")
    print(ensure(parser.parse_args().within))
