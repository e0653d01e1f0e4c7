"""A writer lease per stage prefix in the store: at most one process writes a stage's outputs.

Two writers on one prefix (an overrunning nightly and the next one, a rerun started by hand
while the first still trains) would interleave checkpoints and race to write the model's
manifest. So a stage first takes the lease `<prefix>/_writer.json`: owner (host, pid, Prefect
flow run), a random token, its `ttl_s`, and a *generation*, one more than the last holder's.
Every write of it is a compare-and-swap (lease_slot.py: S3 conditional writes, or flock on a
local store), so of any number of racing takers exactly one wins.

- Taking it: a free lease (none yet, or released) is taken at once. A held one is taken over
  only when its holder is provably gone: not renewed for its `ttl_s` *by the store's clock*
  (the object's age as the store stamps it: no two hosts' clocks are compared), or held by a
  process of this very machine (same host, boot and pid namespace) that no longer runs. An
  earlier attempt of the same Prefect flow run is no exception: a crashed attempt may still be
  running (a lost node keeps training), so the new one waits up to the old lease's `ttl_s` for
  it to expire, and refuses if it is renewed meanwhile. Anyone else is refused at once, by name.
- Holding it: a thread renews it every `renew_s` (a conditional write of the version last
  written). A failed renewal is retried until the holder's own expiry: `ttl_s` after its last
  successful renewal was *sent* (a monotonic clock), which is before the store stamped it, so
  the holder stops before any taker may judge it expired. From then on, or once it finds the
  lease taken over, the thread stops writing and `check` raises `LeaseLostError`.
- Fencing: the generation is written into every manifest its holder commits, and the commit
  path (`check_commit`, called by `Store.write_dir` before it deletes or commits anything)
  refuses with `LeaseGenerationError` when the lease has moved to a newer generation: a stale
  writer that woke up after a takeover commits nothing. The lease object is never deleted
  (release marks it released), so generations only grow.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from btx_core.errors import StaleWriterError, StoreError
from btx_core.store.lease_slot import LocalSlot, NoConditionalWritesError, S3Slot, Seen

__all__ = ["LeaseGenerationError", "LeaseHeldError", "LeaseLostError", "NoConditionalWritesError",
           "WriterLease", "pid_alive"]
log = logging.getLogger(__name__)
LEASE = "_writer.json"
PROBE = "_btx/conditional-writes-probe"  # under the store root: one per store
FLOW_RUN_ENV = "PREFECT__FLOW_RUN_ID"  # set by Prefect's workers in a flow run's process


class LeaseHeldError(StoreError):
    """Another live writer holds the prefix's lease."""


class LeaseLostError(StaleWriterError):
    """This writer's lease lapsed or was taken over: it stopped itself."""


class LeaseGenerationError(StaleWriterError):
    """A commit under an older lease generation than the lease's current one."""


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_machine() -> str:
    """Host, boot and pid namespace: where two equal pids are the same process (containers
    share a kernel's boot id but not its pid namespace; a hostname alone can repeat)."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: str(os.stat("/proc/self/ns/pid").st_ino)):
        try:
            parts.append(read())
        except OSError:
            pass
    return "/".join(parts)


@dataclass(frozen=True)
class LeaseRecord:
    token: str
    host: str
    pid: int
    machine: str | None = None
    flow_run: str | None = None
    generation: int = 0
    renewal: int = 0
    """Bumped by every write, so no two writes of one holder have the same bytes (or ETag)."""
    ttl_s: float = 120.0
    released: bool = False

    @property
    def owner(self) -> str:
        run = f", Prefect flow run {self.flow_run}" if self.flow_run else ""
        return f"pid {self.pid} on {self.host}{run}"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord:
        """Also an older btx's record (no machine, generation or ttl); unreadable -> owner unknown."""
        try:
            raw = json.loads(data)
            return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        except (ValueError, TypeError, KeyError):
            return cls(token="?", host="an unknown host (unreadable lease)", pid=0)


class WriterLease:
    """`with WriterLease(store, prefix):` hold the prefix's lease while the block runs."""

    def __init__(self, store, prefix: str, *, ttl_s: float = 120.0, renew_s: float = 30.0,
                 flow_run: str | None = None, conditional_writes: bool = True):
        self.store, self.prefix = store, prefix.rstrip("/")
        self.ttl_s, self.renew_s, self.conditional_writes = ttl_s, renew_s, conditional_writes
        self.location = f"{self.prefix}/{LEASE}"
        path = store._path(self.location)
        self.slot = LocalSlot(path) if store.is_local else S3Slot(store.fs, path, f"{store.root}/{PROBE}")
        self.record = LeaseRecord(token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                                  machine=this_machine(), ttl_s=ttl_s,
                                  flow_run=flow_run if flow_run is not None else os.environ.get(FLOW_RUN_ENV))
        self.lost: LeaseRecord | None = None
        self._version: str | None = None
        self._deadline = -float("inf")  # time.monotonic() past which this holder must stop
        self._io = threading.Lock()  # one write of the lease at a time (renewal, release)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def generation(self) -> int:
        return self.record.generation

    # --- taking it ---------------------------------------------------------------------------

    def acquire(self) -> WriterLease:
        with self.store._errors(self.location, "taking the writer lease of"):
            if self.conditional_writes:
                self.slot.check_conditional_writes(self.store.uri)
            for _ in range(8):  # each pass wins, refuses, waits, or saw another writer move first
                seen = self.slot.read()
                current = LeaseRecord.parse(seen.data) if seen else None
                if (why := self._why_not(current, seen)) is None:
                    if self._take(seen, current):
                        break
                elif current.flow_run is not None and current.flow_run == self.record.flow_run:
                    self._await_earlier_attempt(current, seen, why)
                else:
                    raise LeaseHeldError(why)
            else:
                raise LeaseHeldError(f"{self.prefix}: the writer lease kept changing hands; retry")
        log.info("%s: writer lease taken (generation %d)", self.prefix, self.generation)
        self._thread = threading.Thread(target=self._renew_until_stopped, name=f"btx-lease {self.prefix}",
                                        daemon=True)
        self._thread.start()
        return self

    def _why_not(self, current: LeaseRecord | None, seen: Seen | None) -> str | None:
        """None if its holder is provably gone (or there is none), else why it may not be taken."""
        if current is None or current.released:
            return None
        if seen.age_s - self.slot.resolution_s > current.ttl_s:
            log.info("%s: taking over the writer lease of %s, not renewed for %.0f s by the store's "
                     "clock", self.prefix, current.owner, seen.age_s)
            return None
        if current.machine == self.record.machine and not pid_alive(current.pid):
            log.info("%s: taking over the lease of %s, which is no longer running", self.prefix,
                     current.owner)
            return None
        return (f"{self.prefix} is being written by {current.owner} (its lease was renewed "
                f"{seen.age_s:.0f} s ago by the store's clock; it expires {current.ttl_s:g} s after its "
                "last renewal): two writers would corrupt its checkpoints. Wait for that run to finish "
                "or stop it; if it is dead, its lease expires by itself")

    def _await_earlier_attempt(self, current: LeaseRecord, seen: Seen, why: str) -> None:
        """An earlier attempt of this flow run holds it. It may have crashed, or still run (on a
        node that lost contact): return once it expired, was released or taken by another
        writer (to be judged again); refuse if it is renewed, which only a live holder does."""
        log.warning("%s: an earlier attempt of this flow run (%s) holds the writer lease; waiting "
                    "up to %.0f s for it to expire", self.prefix, current.owner, current.ttl_s)
        give_up = time.monotonic() + current.ttl_s + 2 * self.slot.resolution_s + 5
        while time.monotonic() < give_up:
            time.sleep(min(2.0, current.ttl_s / 10))
            now = self.slot.read()
            if now is not None and now.version == seen.version:
                if self._why_not(current, now) is None:
                    return  # expired, or its process is gone
                continue
            record = LeaseRecord.parse(now.data) if now is not None else None
            if record is None or record.released or record.token != current.token:
                return
            break  # renewed: it is alive
        raise LeaseHeldError(f"{why}. It is an earlier attempt of this flow run, still alive (its lease "
                             "was renewed, or did not expire, while this attempt waited): is its node still "
                             "running?")

    def _take(self, seen: Seen | None, current: LeaseRecord | None) -> bool:
        record = replace(self.record, generation=(current.generation if current else 0) + 1, renewal=0,
                         released=False)
        sent = time.monotonic()
        version = (self.slot.create(record.to_json()) if seen is None
                   else self.slot.replace(record.to_json(), seen.version))
        if version is None:
            return False  # another writer changed it first: judge again
        self.record, self._version, self._deadline = record, version, sent + self.ttl_s
        return True

    # --- holding it --------------------------------------------------------------------------

    def _renew_until_stopped(self) -> None:
        wait = self.renew_s
        while not self._stop.wait(wait):
            try:
                if not self.renew():  # taken over, or past its own expiry: write nothing more
                    if self.lost is None:
                        log.error("%s: the writer lease could not be renewed for %g s: this writer stops",
                                  self.prefix, self.ttl_s)
                    return
                wait = self.renew_s
            except StoreError as exc:  # the store is away: retry until this holder's own expiry
                left = self._deadline - time.monotonic()
                log.warning("%s: could not renew the writer lease (%s); retrying for %.0f s more",
                            self.prefix, exc, max(left, 0))
                wait = min(self.renew_s, max(0.05, left / 4))

    def renew(self) -> bool:
        """Push the expiry ahead; False (and `check` raises from now on) once the lease was taken
        over or this holder is past its own expiry. A StoreError is left to the caller to retry."""
        with self._io, self.store._errors(self.location, "renewing the writer lease of"):
            if self.lost is not None or time.monotonic() >= self._deadline:
                return False
            record = replace(self.record, renewal=self.record.renewal + 1)
            sent = time.monotonic()
            version = self.slot.replace(record.to_json(), self._version)
            if version is None:
                seen = self.slot.read()
                self.lost = LeaseRecord.parse(seen.data) if seen else replace(self.record, token="?")
                log.error("%s: the writer lease was taken over by %s", self.prefix, self.lost.owner)
                return False
            self.record, self._version, self._deadline = record, version, sent + self.ttl_s
            return True

    def check(self) -> None:
        """Raise LeaseLostError if this writer must stop writing: its lease was taken over, or
        it is past its own expiry (no renewal succeeded for `ttl_s`)."""
        if self.lost is not None:
            raise LeaseLostError(f"{self.prefix}: this writer's lease was taken over by {self.lost.owner} "
                                 "(it was not renewed in time); stopping so as not to overwrite its work")
        if time.monotonic() >= self._deadline:
            raise LeaseLostError(f"{self.prefix}: this writer could not renew its lease for {self.ttl_s:g} s "
                                 "(is the store reachable?), so another writer may have taken over; "
                                 "stopping. Rerun the stage: it resumes from its last checkpoint")

    def check_commit(self, location: str) -> None:
        """The fence of a commit to `location`: raise unless this writer still holds the lease at
        its generation (a writer stalled past a takeover refuses here, even if it has not
        noticed yet)."""
        self.check()
        with self.store._errors(self.location, "reading the writer lease of"):
            seen = self.slot.read()
        current = LeaseRecord.parse(seen.data) if seen else None
        if current is None or current.generation > self.generation or current.token != self.record.token:
            now = f"at generation {current.generation}, held by {current.owner}" if current else "gone"
            raise LeaseGenerationError(
                f"refusing to commit {location}: this writer holds generation {self.generation} of the "
                f"lease of {self.prefix}, but the lease is now {now}: another writer took the stage over "
                "while this one was stalled. Nothing was committed; rerun the stage if it is needed")

    # --- letting go --------------------------------------------------------------------------

    def release(self) -> None:
        """Mark the lease released (a conditional write: a lease taken over stays its new holder's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._io:
            if self._version is None or self.lost is not None:
                return
            record = replace(self.record, renewal=self.record.renewal + 1, released=True)
            try:
                with self.store._errors(self.location, "releasing the writer lease of"):
                    self.slot.replace(record.to_json(), self._version)
            except StoreError as exc:  # it expires by itself
                log.warning("%s: could not release the writer lease: %s", self.prefix, exc)
            self._version = None

    def __enter__(self) -> WriterLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
