"""Stages as runs of deployments on their own work pools: launch, wait, and check the store.

A child run's idempotency key is `<parent flow run id>:<name>`, so a retried or rescheduled
parent finds the children of its earlier attempt instead of creating new ones: a completed child
is reused as it is, a running one is waited on again, a failed or crashed one is scheduled again
in place. `run_deployment` returns a failed child without raising; so the state is checked here,
and the output is read from the store (the durable result), not from the child's return.

The parent watches what nothing inside the child can handle:
- a child that never starts (no worker polls its pool, a pod that cannot be scheduled, an image
  that cannot be pulled) stays Scheduled, Late or Pending: after `orchestration.start_timeout_s`
  the parent cancels it (so it cannot start later, unwatched) and fails with the reason, read
  from the pool's workers. Time its pool spends full with *other* runs (the pool's
  `active_slots` counts a Pending child itself) does not count: that child is queued, not stuck;
  `orchestration.queue_timeout_s` caps the whole wait all the same;
- a child whose process or node is lost ends Crashed, with no process left to retry it, and so
  does one whose pod got the kubelet's SIGTERM (drain, spot reclaim, eviction: it checkpoints
  first, flows/options.py). The parent reschedules it in place (same flow run, same idempotency
  key), after the config's backoff, up to `orchestration.retries` times; it resumes from its
  checkpoints;
- a child that reports steps and then stops reporting them for `orchestration.stall_timeout_s`
  (a hung collective) is cancelled, so its infrastructure is torn down, then rescheduled the same way.
A Failed child is not rescheduled: it has already retried its task `orchestration.retries` times
in its own process, and what fails that often is not the node. A child cancelled by a person
fails the parent. Every API call rides out an outage of up to `orchestration.api_outage_s`.
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
from flows.patience import patiently

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
              progress_key: str | None = None, poll_s: float = POLL_S) -> str:
    """Run `deployment` for the stage `name` (e.g. a domain) and wait; return the child's id."""
    o, logger = orchestration, get_run_logger()
    try:
        child = patiently(lambda: run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=True,
                                                 idempotency_key=idempotency_key(name)),
                          f"{name}: launching {deployment}", o.api_outage_s, logger=logger)
    except ObjectNotFound:
        raise BTXError(f"deployment {deployment!r} not found on the Prefect server: deploy it "
                       "(infra/prefect.yaml), or set orchestration.expert_runner: local") from None
    with get_client(sync_client=True) as client:
        watch = _Watch(client, name, deployment, o, progress_key, logger)
        watch.adopt(child)
        while True:
            child = watch.api(lambda: client.read_flow_run(child.id), "reading its state")
            if child.state.is_completed():
                return str(child.id)
            if child.state.is_final():
                watch.reschedule_or_raise(child)
            elif child.state.type in WAITING:
                watch.check_start(child)
            else:
                watch.check_progress(child)
            time.sleep(poll_s)


class _Watch:
    """What the parent knows of one child while it waits: deadlines, retries used, progress."""

    def __init__(self, client, name: str, deployment: str, o: Orchestration, progress_key: str | None, logger):
        self.client, self.name, self.deployment, self.o = client, name, deployment, o
        self.progress_key, self.logger = progress_key, logger
        self.never_started, self.ran_before = 0, -1  # -1: the first crash always counts as having run
        self.waiting_since = self.deadline = self.cap = self.last_line = None
        self.progress: tuple | None = None
        self.progress_since, self.stalled = 0.0, False

    def api(self, call, doing: str):
        return patiently(call, f"{self.name}: {doing}", self.o.api_outage_s, logger=self.logger)

    def adopt(self, child) -> None:
        """The child of an earlier attempt of this parent run: reuse it, wait on it, or run it again."""
        if child.state is not None and child.state.is_final() and not child.state.is_completed():
            self.logger.info("%s: run %s of an earlier attempt ended %s; scheduling it again", self.name,
                             child.name, child.state.type.value)
            self._set(child, Scheduled(message="Retried by its parent flow run"))
        elif child.state is not None and child.state.is_completed():
            self.logger.info("%s: reusing completed run %s of an earlier attempt", self.name, child.name)
        elif child.state is not None and child.run_count > 0:
            self.logger.info("%s: run %s of an earlier attempt is %s: waiting on it again", self.name,
                             child.name, child.state.name)
        self.logger.info("%s: waiting on flow run %s (%s)", self.name, child.name, self.deployment)

    # --- a final state -----------------------------------------------------------------------

    def reschedule_or_raise(self, child) -> None:
        """Reschedule a Crashed child, or one the watchdog cancelled, within the retries; else raise.
        Retries count the attempts that ran: a crash before the rescheduled run ever reached
        Running (seen with Prefect 3.9's process worker: the run it just lost, resubmitted, was
        killed again seconds after it started) uses no retry, within a budget of its own."""
        state, o = child.state, self.o
        stalled, self.stalled = state.type == StateType.CANCELLED and self.stalled, False
        if child.run_count <= self.ran_before:
            self.never_started += 1
        attempt = max(child.run_count, 1) if self.never_started <= o.retries else o.retries + 1
        self.ran_before = child.run_count
        if (state.type == StateType.CRASHED or stalled) and attempt <= o.retries:
            wait_s = o.retry_wait_s(attempt - 1)
            self.logger.warning("%s: flow run %s %s (%s); rescheduling it in place in %.0f s (retry %d of %d), "
                                "to resume from its newest checkpoint", self.name, child.name,
                                "stalled" if stalled else "crashed", state.message or "no message", wait_s,
                                attempt, o.retries)
            self._set(child, AwaitingRetry(
                scheduled_time=datetime.now(timezone.utc) + timedelta(seconds=wait_s),
                message=f"{'stalled' if stalled else 'crashed'}; rescheduled by its parent flow run (retry {attempt})"))
            self.waiting_since, self.progress = None, None
            return
        raise ChildRunFailed(f"{self.name}: flow run {child.name} ({child.id}) of {self.deployment} ended "
                             f"{state.type.value}: {state.message or 'see its logs'}")

    # --- waiting to start --------------------------------------------------------------------

    def check_start(self, child) -> None:
        """The start deadline, restarted while the pool is full with other runs, capped in all."""
        now, o, state = time.monotonic(), self.o, child.state
        if self.waiting_since is None:
            self.waiting_since = self.last_line = now
            starts = state.state_details.scheduled_time
            ahead = max(0.0, (starts - datetime.now(timezone.utc)).total_seconds()) if starts else 0.0
            self.deadline = None if o.start_timeout_s is None else now + ahead + o.start_timeout_s
            self.cap = None if o.queue_timeout_s is None else now + ahead + o.queue_timeout_s
        elif now - self.last_line >= o.state_log_every_s:
            self.logger.info("%s: flow run %s is %s after %.0f s, on work pool %s", self.name, child.name,
                             state.name, now - self.waiting_since, child.work_pool_name)
            self.last_line = now
        if self.deadline is not None and now > self.deadline and (self.cap is None or now < self.cap):
            others = self._others_in_pool(child)
            if others is not None:
                self.logger.info("%s: flow run %s waits for a slot of the work pool %s (%d other run(s) hold its "
                                 "%d): its start deadline begins again", self.name, child.name,
                                 child.work_pool_name, others[0], others[1])
                self.deadline = now + o.start_timeout_s
        capped = self.cap is not None and now > self.cap
        if capped or (self.deadline is not None and now > self.deadline):
            why = self.api(lambda: why_not_started(self.client, child), "asking why it has not started")
            limit = (f"orchestration.queue_timeout_s = {o.queue_timeout_s:g} s (queued on a full pool included)"
                     if capped else f"orchestration.start_timeout_s = {o.start_timeout_s:g} s")
            self._cancel(child, f"did not start within {limit}: {why}")
            raise ChildRunNotStarted(
                f"{self.name}: flow run {child.name} ({child.id}) of {self.deployment} is {state.name} and did "
                f"not start within {limit}: {why}. It was cancelled so that it cannot start later.")

    def _others_in_pool(self, child) -> tuple[int, int] | None:
        """(runs other than `child` holding the pool's slots, its limit) if they fill it, else None."""
        try:
            pool = self.api(lambda: self.client.read_work_pool(child.work_pool_name), "reading its work pool")
        except ObjectNotFound:
            return None
        limit, busy = pool.concurrency_limit, pool.active_slots
        if limit is None or busy is None:
            return None
        others = busy - (1 if child.state.type == StateType.PENDING else 0)  # a Pending child holds a slot
        return (others, limit) if others >= limit else None

    # --- running -----------------------------------------------------------------------------

    def check_progress(self, child) -> None:
        """Cancel a Running child whose step counter stopped moving for `stall_timeout_s`."""
        self.waiting_since = None
        if self.o.stall_timeout_s is None or self.progress_key is None or child.state.type != StateType.RUNNING:
            return
        now, seen = time.monotonic(), self._progress()
        if seen is None or seen[0] is None or seen[0] <= 0:  # no step reported yet: loading, preparing
            return
        if seen != self.progress:
            self.progress, self.progress_since = seen, now
            return
        if now - self.progress_since > self.o.stall_timeout_s:
            message = (f"stalled: no training step for {now - self.progress_since:.0f} s "
                       f"(orchestration.stall_timeout_s = {self.o.stall_timeout_s:g}); last: {seen[1]}")
            self.logger.error("%s: flow run %s %s: cancelling it", self.name, child.name, message)
            self._cancel(child, message, tear_down=True)
            self.progress, self.stalled = None, True

    def _progress(self) -> tuple | None:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
        from prefect.client.schemas.sorting import ArtifactSort

        found = self.api(lambda: self.client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[self.progress_key])),
            sort=ArtifactSort.CREATED_DESC, limit=1), "reading its progress")
        return (found[0].data, found[0].description, found[0].id) if found else None

    # --- setting states ----------------------------------------------------------------------

    def _set(self, child, state) -> None:
        self.api(lambda: self.client.set_flow_run_state(child.id, state, force=True), f"setting it {state.name}")

    def _cancel(self, child, message: str, *, tear_down: bool = False) -> None:
        """Pending or running: Cancelling, so that its worker tears down what it started; else Cancelled."""
        live = tear_down or child.state.type == StateType.PENDING
        self._set(child, Cancelling(message=message) if live else Cancelled(message=message))


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
