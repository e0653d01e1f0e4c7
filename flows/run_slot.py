"""One pipeline run per run name, held so that a restarted server, an API outage or a lost lease
neither kills a healthy run nor blocks the next one.

The slot is the Prefect global concurrency limit `btx-run-<run_name>` (limit 1, made on first
use; `prefect gcl inspect` shows it), taken with a lease that this module renews itself, because
Prefect's own `concurrency(..., strict=True)` terminates its holder after three failed renewals
(about ten seconds of outage) and leaves the pipeline's children training unwatched:

- A renewal the API cannot answer (no connection, 5xx) is retried with backoff for as long as it
  takes: the run goes on. A renewal answered "no such lease" (the server restarted with Prefect's
  default in-memory lease storage, or the outage outlasted the lease) takes the slot again.
- Who holds the slot is also written where a restart cannot lose it: every pipeline run tags
  itself `btx-run:<key>` when it starts, and `btx-holds:<key>` while it holds the slot. A run
  that finds the slot full waits (`on_overlap: queue`) or ends Cancelled (`cancel`) while a live
  (not final) run of the name holds it, or is older and so first in line. Otherwise the count is
  an orphan: a run ended without releasing it (SIGKILL, a lost control pod) and its lease expires
  within `run_slot_lease_s`; or the server forgot the lease (in-memory storage and a restart),
  and it would never expire. So a count that stays orphaned for longer than one lease is reset
  to zero, with a warning that says which storage to configure, and the run takes the slot.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from uuid import UUID

from flows.patience import patiently

LIVE = ("RUNNING", "PENDING", "PAUSED", "CANCELLING", "SCHEDULED")  # tagged runs have started: SCHEDULED = AwaitingRetry
POLL_S = 5.0


def slot_tags(key: str) -> tuple[str, str]:
    """(the tag of every run of the name, the tag of the run holding its slot)."""
    return f"btx-run:{key}", f"btx-holds:{key}"


LEASE_TAG = "btx-lease:"  # + the lease id: a rescheduled attempt gives its crashed attempt's slot back


@dataclass
class RunSlot:
    """The run name's slot for the flow run `run_id` (see the module docstring)."""

    limit: str
    key: str
    run_id: UUID
    lease_s: float = 120.0
    outage_s: float = 900.0
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger(__name__))
    lease_id: UUID | None = None
    orphan_since: float | None = None
    inherited: bool = False  # an earlier attempt of this flow run held the slot and crashed
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _overlap: UUID | None = None  # the other run already reported as holding the slot beside this one

    def __post_init__(self) -> None:
        self.run_id = UUID(str(self.run_id))  # prefect.runtime gives a str; the API's runs carry UUIDs

    # --- taking and releasing ---------------------------------------------------------------

    def take(self) -> bool:
        """One try: True if this run now holds the slot. A full slot whose count is an orphan
        (see the module) for longer than a lease is reset first."""
        if self._increment():
            return True
        holder, first = self._rival()
        if holder is not None or first is not None:
            self.orphan_since = None
            return False
        now = time.monotonic()
        self.orphan_since = self.orphan_since or now
        if self.inherited:  # its lease was given back (or forgotten): the count is this run's own
            self.inherited = False
            self._reset_orphan("an earlier attempt of this flow run held it, and its lease is gone")
            return self._increment()
        if now - self.orphan_since < self.lease_s:
            return False
        self._reset_orphan("no live run of this name holds it")
        return self._increment()

    def wait_reason(self) -> str:
        """Why `take` failed, for the log and the Cancelled state."""
        holder, first = self._rival()
        if holder is not None:
            return f"flow run {holder} of this run name holds it"
        if first is not None:
            return f"the older flow run {first} of this run name is first in line"
        waited = time.monotonic() - (self.orphan_since or time.monotonic())
        return (f"no live run holds it: a run ended without releasing it; its lease expires within "
                f"{self.lease_s:g} s ({waited:.0f} s waited), or the count is reset after that")

    def release(self) -> None:
        """Stop renewing, give the slot back, drop the holder tag; failures only logged (the lease
        expires by itself, and a final run's tags are not read)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            with _client() as client:
                if self.lease_id is not None:
                    client.release_concurrency_slots_with_lease(self.lease_id)
                self._tag(client, holds=False)
        except Exception as exc:  # noqa: BLE001 - the run is ending; the lease expires on its own
            self.logger.warning("could not release %s (%s); its lease expires within %g s",
                                self.limit, exc, self.lease_s)

    # --- renewal ----------------------------------------------------------------------------

    def keep(self) -> None:
        """Renew the lease every quarter of its length until `release`, in a daemon thread."""
        self._thread = threading.Thread(target=self._renew_loop, name=f"btx-slot {self.limit}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - never kill the run over its slot
                self.logger.error("%s: could not renew the run name's slot (%s); trying again", self.limit, exc)

    def renew(self) -> None:
        """Push the lease ahead; if the server has no such lease any more, take the slot again."""
        from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

        if self.lease_id is None:  # lost at an earlier renewal and not taken back yet
            self._retake()
            return
        with _client() as client:
            try:
                patiently(lambda: client.renew_concurrency_lease(self.lease_id, self.lease_s),
                          f"renewing {self.limit}", self.outage_s, logger=self.logger)
                return
            except (ObjectNotFound, PrefectHTTPStatusError) as exc:
                status = getattr(getattr(exc, "response", None), "status_code", 404)
                if status not in (404, 410):
                    raise
        self.logger.warning("%s: the server no longer knows this run's lease (restarted with in-memory "
                            "lease storage, or away longer than the lease): taking the slot again", self.limit)
        self.lease_id = None
        self._retake()

    def _retake(self) -> None:
        if self._increment():
            return
        holder, _ = self._rival()
        if holder is not None and holder != self._overlap:
            self._overlap = holder
            self.logger.error("%s: flow run %s took the slot while this run's lease was lost; both now run "
                              "(the store's writer leases keep their outputs apart)", self.limit, holder)
        if holder is not None:
            return
        self._reset_orphan("this run's own lease was lost, its count was not")
        self._increment()

    # --- the API ----------------------------------------------------------------------------

    def _increment(self) -> bool:
        from prefect.client.schemas.objects import ConcurrencyLeaseHolder
        from prefect.exceptions import PrefectHTTPStatusError

        with _client() as client:
            try:
                response = patiently(lambda: client.increment_concurrency_slots_with_lease(
                    names=[self.limit], slots=1, mode="concurrency", lease_duration=self.lease_s,
                    holder=ConcurrencyLeaseHolder(type="flow_run", id=self.run_id)),
                    f"taking {self.limit}", self.outage_s, logger=self.logger)
            except PrefectHTTPStatusError as exc:
                if exc.response.status_code == 423:  # Locked: the limit is full
                    return False
                raise
            self.lease_id = UUID(response.json()["lease_id"])
            self._tag(client, holds=True)
        self.orphan_since = None
        return True

    def _rival(self) -> tuple[UUID | None, UUID | None]:
        """(a live run of the name holding the slot, else a live older run of it), not this one."""
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
            FlowRunFilterTags,
        )
        from prefect.client.schemas.objects import StateType

        run_tag, holds_tag = slot_tags(self.key)
        with _client() as client:
            me = patiently(lambda: client.read_flow_run(self.run_id), "reading this run", self.outage_s)
            live = patiently(lambda: client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[run_tag]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(s) for s in LIVE])))),
                f"reading the runs of {self.limit}", self.outage_s)
        others = [r for r in live if r.id != self.run_id]
        holder = next((r.id for r in others if holds_tag in r.tags), None)
        older = sorted((r.created, str(r.id)) for r in others if (r.created, str(r.id)) < (me.created, str(me.id)))
        return holder, (UUID(older[0][1]) if older else None)

    def _reset_orphan(self, why: str) -> None:
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        self.logger.warning("%s: resetting its count to 0 (%s). If a server restart caused this, give the "
                            "server persistent lease storage (PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE: "
                            "docs/deploy.md)", self.limit, why)
        with _client() as client:
            patiently(lambda: client.update_global_concurrency_limit(
                self.limit, GlobalConcurrencyLimitUpdate(active_slots=0)), f"resetting {self.limit}", self.outage_s)

    def _tag(self, client, *, holds: bool) -> None:
        run_tag, holds_tag = slot_tags(self.key)
        run = client.read_flow_run(self.run_id)
        keep = [t for t in run.tags if t != holds_tag and not t.startswith(LEASE_TAG)]
        tags = keep + [run_tag] * (run_tag not in keep) + ([holds_tag, f"{LEASE_TAG}{self.lease_id}"] if holds else [])
        if set(tags) != set(run.tags):
            client.update_flow_run(self.run_id, tags=tags)

    def mark_started(self) -> None:
        """Tag this run as a run of the name (before its first `take`: rivals must see it). An
        earlier attempt of this flow run that crashed holding the slot gives its lease back now."""
        with _client() as client:
            run = patiently(lambda: client.read_flow_run(self.run_id), "reading this run", self.outage_s)
            if slot_tags(self.key)[1] in run.tags:
                self.inherited = True
                for tag in (t for t in run.tags if t.startswith(LEASE_TAG)):
                    self.logger.info("%s: giving back the lease of this run's crashed earlier attempt", self.limit)
                    patiently(lambda: client.release_concurrency_slots_with_lease(UUID(tag[len(LEASE_TAG):])),
                              f"releasing {self.limit}", self.outage_s, logger=self.logger)
            patiently(lambda: self._tag(client, holds=False), "tagging this run", self.outage_s)


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)
