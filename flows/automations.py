"""btx's two Prefect automations, scoped to this install's deployments (those of
infra/prefect.yaml, looked up on the server by name; other teams' runs, and other btx installs
on the same server, are not touched):

1. "crash zombie flow runs" (Prefect's "Detect zombie flows" recipe): a flow run whose process
   dies with its node or pod stops reporting and would stay Running forever; with heartbeats on
   (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, at least 30 s, in every worker's environment) it is
   marked Crashed once its heartbeats stop without a final or waiting state. A waiting run
   (AwaitingRetry, Scheduled, Late, Pending, Paused, AwaitingConcurrencySlot) is left alone.
2. "reschedule crashed pipeline runs": a `btx-pipeline` run that ends Crashed (its control pod
   lost, drained or evicted, or crashed by 1.) is scheduled again in place, once it has stayed
   Crashed for 30 s. Its new
   attempt re-attaches to the children its earlier one launched (their idempotency keys hold its
   flow run id: flows/remote.py), waits on the running ones, and reuses finished stages. The
   pipeline itself fails instead of running once it has crashed more than
   `orchestration.retries` times (flows/pipeline.py), so a run that always crashes stops.

A crashed branch or stage is rescheduled by its parent, not by an automation (flows/remote.py).
Run after every `prefect deploy` (infra/work-pools.sh, compose's deploy service, docs/deploy.md):

    .venv/bin/python -m flows.automations --within 300   # on the server PREFECT_API_URL names

It creates the automations or updates them in place, and exits non-zero, saying why, when it
cannot (no server, deployments not deployed yet).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from datetime import timedelta
from pathlib import Path

ZOMBIES = "btx: crash zombie flow runs"
RESTART = "btx: reschedule crashed pipeline runs"
NAME = ZOMBIES  # the name earlier versions used for the only automation
PIPELINE_FLOW = "btx-pipeline"
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
SETTLE_S = 30.0  # a crashed pipeline run is rescheduled once it has stayed Crashed this long
PREFECT_FILE = Path(__file__).resolve().parents[1] / "infra" / "prefect.yaml"
# States a live run may sit in without heartbeats: its process has not started (again) yet.
WAITING = ("Scheduled", "AwaitingRetry", "Late", "Pending", "Paused", "Suspended", "AwaitingConcurrencySlot",
           "Cancelling")
FINAL = ("Completed", "Failed", "Cancelled", "Crashed")


class AutomationSetupError(RuntimeError):
    """The automations cannot be created: the message says what to do."""


def _of_deployments(deployment_ids):
    from prefect.events.schemas.events import ResourceSpecification

    if not deployment_ids:
        raise ValueError("an automation of btx is scoped to deployments: give at least one id")
    return ResourceSpecification({"prefect.resource.id": [f"prefect.deployment.{d}" for d in deployment_ids],
                                  "prefect.resource.role": "deployment"})


def zombie_automation(within_s: float, *, deployment_ids, name: str = ZOMBIES):
    """Runs of `deployment_ids` whose heartbeats stop for `within_s` without a final or waiting
    state are set Crashed. `within_s` should be a few heartbeat periods."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return AutomationCore(
        name=name,
        description=f"flows/automations.py: crash btx runs silent for {within_s:g} s (lost node or pod)",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in (*FINAL, *WAITING))},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=_of_deployments(deployment_ids),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=within_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within_s:g} s: its process is gone")])


def restart_automation(*, deployment_ids, settle_s: float = SETTLE_S, name: str = RESTART):
    """A run of the pipeline deployments `deployment_ids` that stays Crashed for `settle_s` is set
    AwaitingRetry. Why wait: a lost process's crash is reported twice. Prefect 3.9.1's process
    worker reports it as the process exits, and again once a subprocess that loads the flow for
    its on_crashed hooks has ended: about 1.4 s later now that flows/pipeline.py loads without
    torch, 11-17 s when it did not (two busy cores). Acting on each report would schedule the
    run twice; a report after the settle time crashed the rescheduled run again (CI, with 10 s).
    A Crashed followed by any other event of the run (another report, a state set by hand)
    starts the wait again, so the automation acts once."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return AutomationCore(
        name=name,
        description="flows/automations.py: a crashed btx pipeline run is scheduled again in place; it "
                    "re-attaches to its running children",
        trigger=EventTrigger(
            after={"prefect.flow-run.Crashed"},
            expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=_of_deployments(deployment_ids),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=settle_s)),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry", force=True,
                                    message="crashed; rescheduled by the btx automation to re-attach to its children")])


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


def install_deployments(prefect_file: Path = PREFECT_FILE) -> list[str]:
    """`flow/deployment` of every deployment in infra/prefect.yaml (the flow's name from its entrypoint)."""
    import yaml

    names = []
    for d in yaml.safe_load(prefect_file.read_text())["deployments"]:
        path, function = d["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        names.append(f"{getattr(module, function).name}/{d['name']}")
    return names


def ensure(within_s: float, deployments: list[str] | None = None, settle_s: float = SETTLE_S) -> list[str]:
    """Create both automations on the current Prefect API, or update them to these settings."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deployments = deployments or install_deployments()
    with get_client(sync_client=True) as client:
        ids, missing = {}, []
        for name in deployments:
            try:
                ids[name] = client.read_deployment_by_name(name).id
            except ObjectNotFound:
                missing.append(name)
        if missing:
            raise AutomationSetupError(f"deployment(s) {', '.join(missing)} not found on the server: run "
                                       "`prefect deploy --all --prefect-file infra/prefect.yaml` first")
        pipelines = [i for n, i in ids.items() if n.split("/")[0] == PIPELINE_FLOW]
        wanted = [zombie_automation(within_s, deployment_ids=list(ids.values()))]
        if pipelines:
            wanted.append(restart_automation(deployment_ids=pipelines, settle_s=settle_s))
        return [_put(client, automation) for automation in wanted]


def _put(client, wanted) -> str:
    existing = client.read_automations_by_name(wanted.name)
    for extra in existing[1:]:  # one is enough: two would act on each run twice
        client.delete_automation(extra.id)
    if not existing:
        return f"{wanted.name}: created ({client.create_automation(wanted)})"
    if _definition(existing[0]) == _definition(wanted):
        return f"{wanted.name}: up to date ({existing[0].id})"
    client.update_automation(existing[0].id, wanted)
    return f"{wanted.name}: updated ({existing[0].id})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--within", type=float, default=300.0,
                        help=f"seconds without a heartbeat before a run is crashed (a few x {HEARTBEAT_ENV})")
    parser.add_argument("--settle", type=float, default=SETTLE_S,
                        help="seconds a crashed pipeline run stays Crashed before it is rescheduled (one "
                             "crash may be reported twice, a second or so apart)")
    parser.add_argument("--deployment", action="append", metavar="FLOW/NAME",
                        help="scope to these deployments (default: every deployment of infra/prefect.yaml)")
    args = parser.parse_args(argv)
    try:
        for line in ensure(args.within, args.deployment, args.settle):
            print(line)
    except Exception as exc:  # noqa: BLE001 - a CLI: one line that says what failed, and a non-zero exit
        print(f"error: could not set up btx's automations: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
