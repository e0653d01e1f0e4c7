"""Stages as runs of deployments on their own work pools: launch, wait, and check the store.

A child run's idempotency key is `<parent flow run id>:<name>`, so a retried parent finds the
children of its earlier attempt instead of creating new ones: a completed child is reused as it
is, a failed or crashed one is scheduled again in place (its own retry then resumes from its
checkpoints). `run_deployment` returns a failed child without raising; so the state is checked
here, and the output is read from the store (the durable result), not from the child's return.
"""

from __future__ import annotations

import time

from prefect import get_run_logger, runtime
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Scheduled

from btx_core.errors import BTXError

POLL_S = 5.0


class ChildRunFailed(BTXError):
    """A stage's deployment run ended in a state other than Completed."""


def idempotency_key(name: str) -> str:
    """`<parent flow run id>:<name>`: stable across retries of the parent flow run."""
    return f"{runtime.flow_run.id}:{name}"


def run_child(deployment: str, parameters: dict, name: str, *, poll_s: float = POLL_S) -> str:
    """Run `deployment` for the stage `name` (e.g. a domain) and wait; return the child's id."""
    logger = get_run_logger()
    try:
        child = run_deployment(deployment, parameters=parameters, idempotency_key=idempotency_key(name),
                               timeout=0, as_subflow=True)
    except ObjectNotFound:
        raise BTXError(f"deployment {deployment!r} not found on the Prefect server: deploy it "
                       "(infra/prefect.yaml), or set orchestration.expert_runner: local") from None
    with get_client(sync_client=True) as client:
        if child.state is not None and child.state.is_final() and not child.state.is_completed():
            # The child of an earlier attempt of this parent run: run it again in place.
            logger.info("%s: run %s of an earlier attempt ended %s; scheduling it again",
                        name, child.name, child.state.type.value)
            client.set_flow_run_state(child.id, Scheduled(message="Retried by its parent flow run"),
                                      force=True)
        elif child.state is not None and child.state.is_completed():
            logger.info("%s: reusing completed run %s of an earlier attempt", name, child.name)
        logger.info("%s: waiting on flow run %s (%s)", name, child.name, deployment)
        while not (child := client.read_flow_run(child.id)).state.is_final():
            time.sleep(poll_s)
    if not child.state.is_completed():
        raise ChildRunFailed(f"{name}: flow run {child.name} ({child.id}) of {deployment} ended "
                             f"{child.state.type.value}: {child.state.message or 'see its logs'}")
    return str(child.id)
