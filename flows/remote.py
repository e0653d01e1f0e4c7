"""Stages as runs of deployments on their own work pools: launch, wait, and check the store.

A child run's idempotency key is `<parent flow run id>:<name>`, so a retried parent finds the
children of its earlier attempt instead of creating new ones: a completed child is reused as it
is, a failed or crashed one is scheduled again in place. `run_deployment` returns a failed child
without raising; so the state is checked here, and the output is read from the store (the
durable result), not from the child's return.

The parent also watches two failures that nothing inside the child can handle:
- a child that never starts (no worker polls its pool, a pod that cannot be scheduled, an image
  that cannot be pulled) stays Scheduled, Late or Pending forever: after
  `orchestration.start_timeout_s` (not counting time its pool spends at its concurrency limit:
  that run is queued, not stuck) the parent cancels it (so it cannot start later, unwatched) and
  fails with the reason, read from the pool's workers;
- a child whose process or node is lost ends Crashed, with no process left to retry it: the
  parent reschedules it in place (same flow run, same idempotency key), after the config's
  backoff, up to `orchestration.retries` times, and its retry resumes from its checkpoints.
A Failed child is not rescheduled: it has already retried its task `orchestration.retries`
times in its own process, and what fails that often is not the node.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from prefect import get_run_logger, runtime
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType, WorkerStatus, WorkPoolStatus
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import AwaitingRetry, Cancelled, Cancelling, Scheduled

from btx_core.config.execution import Orchestration
from btx_core.errors import BTXError

POLL_S = 5.0
WAITING = (StateType.SCHEDULED, StateType.PENDING)  # Late and AwaitingRetry are SCHEDULED states


class ChildRunFailed(BTXError):
    """A stage's deployment run ended in a state other than Completed."""


class ChildRunNotStarted(ChildRunFailed):
    """A stage's deployment run did not leave Scheduled/Late/Pending within the deadline."""


def idempotency_key(name: str) -> str:
    """`<parent flow run id>:<name>`: stable across retries of the parent flow run."""
    return f"{runtime.flow_run.id}:{name}"


def run_child(deployment: str, parameters: dict, name: str, orchestration: Orchestration, *,
              poll_s: float = POLL_S) -> str:
    """Run `deployment` for the stage `name` (e.g. a domain) and wait; return the child's id."""
    logger = get_run_logger()
    try:
        child = run_deployment(deployment, parameters=parameters, idempotency_key=idempotency_key(name),
                               timeout=0, as_subflow=True)
    except ObjectNotFound:
        raise BTXError(f"deployment {deployment!r} not found on the Prefect server: deploy it "
                       "(infra/prefect.yaml), or set orchestration.expert_runner: local") from None
    never_started, ran_before = 0, -1  # -1: the first crash always counts as having run
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
        waiting_since = last_line = None
        while True:
            child = client.read_flow_run(child.id)
            state = child.state
            if state.is_completed():
                break
            if state.is_final():
                # Retries count the attempts that ran. A crash before the rescheduled run ever
                # reached Running (seen with Prefect 3.9's process worker: the run it just lost,
                # resubmitted, was killed again seconds after it started) uses no retry, within
                # a budget of its own.
                if child.run_count <= ran_before:
                    never_started += 1
                attempt = max(child.run_count, 1) if never_started <= orchestration.retries else orchestration.retries + 1
                ran_before = child.run_count
                if state.type == StateType.CRASHED and attempt <= orchestration.retries:
                    wait_s = orchestration.retry_wait_s(attempt - 1)
                    logger.warning("%s: flow run %s crashed (%s); rescheduling it in place in %.0f s "
                                   "(retry %d of %d), to resume from its newest checkpoint", name,
                                   child.name, state.message or "no message", wait_s, attempt,
                                   orchestration.retries)
                    client.set_flow_run_state(child.id, AwaitingRetry(
                        scheduled_time=datetime.now(timezone.utc) + timedelta(seconds=wait_s),
                        message=f"crashed; rescheduled by its parent flow run (retry {attempt})"), force=True)
                    waiting_since = None
                    continue
                break
            now = time.monotonic()
            if state.type in WAITING:
                if waiting_since is None:
                    waiting_since = last_line = now
                    starts = state.state_details.scheduled_time
                    ahead = (starts - datetime.now(timezone.utc)).total_seconds() if starts else 0.0
                    deadline = (None if orchestration.start_timeout_s is None
                                else now + max(0.0, ahead) + orchestration.start_timeout_s)
                elif now - last_line >= orchestration.state_log_every_s:
                    logger.info("%s: flow run %s is %s after %.0f s, on work pool %s", name, child.name,
                                state.name, now - waiting_since, child.work_pool_name)
                    last_line = now
                if deadline is not None and now > deadline and _pool_full(client, child.work_pool_name):
                    logger.info("%s: flow run %s waits for a slot of the work pool %s (at its concurrency "
                                "limit): its start deadline begins again", name, child.name, child.work_pool_name)
                    deadline = now + orchestration.start_timeout_s
                if deadline is not None and now > deadline:
                    why = why_not_started(client, child)
                    _cancel(client, child, f"did not start within {orchestration.start_timeout_s:g} s: {why}")
                    raise ChildRunNotStarted(
                        f"{name}: flow run {child.name} ({child.id}) of {deployment} did not start within "
                        f"orchestration.start_timeout_s = {orchestration.start_timeout_s:g} s: {why}. "
                        "It was cancelled so that it cannot start later.")
            else:
                waiting_since = None
            time.sleep(poll_s)
    if not child.state.is_completed():
        raise ChildRunFailed(f"{name}: flow run {child.name} ({child.id}) of {deployment} ended "
                             f"{child.state.type.value}: {child.state.message or 'see its logs'}")
    return str(child.id)


def why_not_started(client, child) -> str:
    """Why `child` is still waiting, from its state and its work pool's workers."""
    pool, state = child.work_pool_name, child.state
    try:
        work_pool = client.read_work_pool(pool)
    except ObjectNotFound:
        return f"it is {state.name} and its work pool {pool!r} does not exist: create it (infra/work-pools.sh)"
    if work_pool.is_paused or work_pool.status == WorkPoolStatus.PAUSED:
        return f"it is {state.name} and the work pool {pool!r} is paused: resume it (prefect work-pool resume {pool})"
    workers = client.read_workers_for_work_pool(pool)
    online = sorted(w.name for w in workers if w.status == WorkerStatus.ONLINE)
    if state.type == StateType.PENDING:
        return (f"it is stuck in Pending on the work pool {pool!r}: a worker took it but its "
                "infrastructure never started (a pod that cannot be scheduled, an image that cannot be "
                "pulled, no free GPU): see the worker's log and the job's events")
    if not online:
        seen = "; ".join(f"{w.name} last seen {w.last_heartbeat_time}" for w in workers)
        return (f"it is {state.name}: no worker is polling the work pool {pool!r} "
                f"({seen or 'none ever did'}): start one, e.g. `prefect worker start --pool {pool}`")
    return (f"it is {state.name} although the work pool {pool!r} has worker(s) online ({', '.join(online)}): "
            "they may be busy, or the pool or its queue at its concurrency limit")


def _pool_full(client, pool: str) -> bool:
    """Whether `pool` is at its concurrency limit: a run waiting for a slot is queued, not stuck."""
    try:
        work_pool = client.read_work_pool(pool)
    except ObjectNotFound:
        return False
    limit, busy = work_pool.concurrency_limit, work_pool.active_slots
    return limit is not None and busy is not None and busy >= limit


def _cancel(client, child, message: str) -> None:
    """Pending: Cancelling, so that its worker tears down what it started; else Cancelled."""
    state = Cancelling(message=message) if child.state.type == StateType.PENDING else Cancelled(message=message)
    client.set_flow_run_state(child.id, state, force=True)
