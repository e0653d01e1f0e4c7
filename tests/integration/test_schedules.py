"""Schedules: deploying infra/prefect.yaml creates the pipeline's cron schedule, and the runs the
server's scheduler creates from it carry the schedule's parameters, which the flow accepts as its
typed config. Against the real server of tests/prefect_harness.py (PostgreSQL, scheduler on)."""

from __future__ import annotations

from datetime import timezone

import yaml

from tests.prefect_harness import PREFECT_FILE, REPO, Deployed, jsonable, wait_for


def _declared_schedule() -> dict:
    """The pipeline deployment's schedule as infra/prefect.yaml declares it (anchors resolved)."""
    data = yaml.safe_load((REPO / PREFECT_FILE).read_text())
    (pipeline,) = [d for d in data["deployments"] if d["entrypoint"] == "flows/pipeline.py:btx_pipeline"]
    (schedule,) = pipeline["schedules"]
    return schedule


def _pipeline_deployment(deployed: Deployed):
    return deployed.deployments["btx-pipeline/btx"]


def test_deploying_creates_the_cron_schedule(btx_deployed: Deployed) -> None:
    declared = _declared_schedule()
    with btx_deployed.cluster.client() as client:
        schedules = client.read_deployment_schedules(_pipeline_deployment(btx_deployed).id)
    assert len(schedules) == 1, schedules
    (created,) = schedules
    assert created.active is False  # shipped paused: a first-time user turns it on
    assert created.slug == declared["slug"]
    assert created.schedule.cron == declared["cron"]
    assert created.schedule.timezone == declared["timezone"]
    assert created.parameters == jsonable(declared["parameters"])


def test_scheduled_runs_receive_the_schedule_parameters(btx_deployed: Deployed) -> None:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.flows import load_flow_from_entrypoint

    from btx_core.config.schema import BTXConfig

    declared = _declared_schedule()
    deployment = _pipeline_deployment(btx_deployed)

    def scheduled_runs():
        with btx_deployed.cluster.client() as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
            )

    # Shipped paused: turn it on (as a user would once a run by hand worked), and off again after.
    with btx_deployed.cluster.client() as client:
        (schedule,) = client.read_deployment_schedules(deployment.id)
        client.update_deployment_schedule(deployment.id, schedule.id, active=True)
        (resumed,) = client.read_deployment_schedules(deployment.id)
    # Prefect 3.9.1 empties a schedule's parameters when it is resumed; the deployment's default
    # parameters (the same config, infra/prefect.yaml) are what its runs then receive.
    assert resumed.active and resumed.parameters in ({}, jsonable(declared["parameters"])), resumed
    try:
        # The scheduler service (every few seconds on the test server) fills in the next runs.
        runs = wait_for(lambda: [r for r in scheduled_runs() if r.auto_scheduled], 90,
                        "the scheduler to create runs of btx-pipeline/btx")
    finally:
        with btx_deployed.cluster.client() as client:
            client.update_deployment_schedule(deployment.id, schedule.id, active=False)
            for run in scheduled_runs():  # nothing of this test waits on the pools after it
                client.delete_flow_run(run.id)
    for run in runs:
        assert run.parameters == jsonable(declared["parameters"]), run.name
        assert run.work_pool_name == "btx-control"
        start = run.expected_start_time.astimezone(timezone.utc)
        # cron "0 2 * * *" in UTC: every run at 02:00 on some day
        minute, hour = declared["cron"].split()[:2]
        assert (start.hour, start.minute) == (int(hour), int(minute)), start
    # What the flow receives: the engine validates the run's parameters against its signature.
    flow = load_flow_from_entrypoint(str(REPO / "flows" / "pipeline.py") + ":btx_pipeline")
    received = flow.validate_parameters(runs[0].parameters)["config"]
    assert isinstance(received, BTXConfig)
    assert received == BTXConfig.model_validate(declared["parameters"]["config"])
    assert received.orchestration.expert_runner == "deployments"


def test_a_redeploy_keeps_the_schedule_as_an_operator_left_it(btx_deployed: Deployed) -> None:
    """`prefect deploy` again (compose's deploy service does on every `up`) neither pauses a
    schedule an operator turned on nor turns on one left paused: infra/prefect.yaml's build step
    gives `active` the server's state. The schedule is updated in place, its parameters restored."""
    declared = _declared_schedule()
    deployment = _pipeline_deployment(btx_deployed)
    cluster = btx_deployed.cluster

    def schedule():
        with cluster.client() as client:
            (found,) = client.read_deployment_schedules(deployment.id)
        return found

    first = schedule()
    try:
        for wanted in (True, False):
            with cluster.client() as client:
                client.update_deployment_schedule(deployment.id, first.id, active=wanted)
            cluster.prefect("--no-prompt", "deploy", "--name", deployment.name, "--prefect-file", PREFECT_FILE)
            after = schedule()
            assert (after.id, after.active) == (first.id, wanted), after
            assert after.parameters == jsonable(declared["parameters"])
    finally:
        with cluster.client() as client:
            client.update_deployment_schedule(deployment.id, first.id, active=False)

