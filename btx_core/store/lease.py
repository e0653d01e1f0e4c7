"""A writer lease per stage prefix in the store: at most one process trains into a prefix.

Two writers on one prefix (an overrunning nightly and the next one, a rerun started by hand
while the first still trains) would interleave checkpoints and race to write the model's
manifest. So a training stage first takes the lease `<prefix>/_writer.json`: owner (host, pid,
Prefect flow run), a random token, and an expiry `ttl_s` ahead, renewed every `renew_s` while it
trains. A live lease of another owner is refused with a message naming it; an expired one, one
of a dead process on this host, or one of an earlier attempt of the same flow run (a crashed
branch rescheduled in place) is taken over.

Writing is atomic for readers on every backend (a local file is renamed into place, an object
PUT is all or nothing). Taking a free lease is exact on a local store (exclusive create); on an
object store two writers who both found it free both write it, and each reads it back after
`settle_s`: the later write wins and the other refuses (the window is a read and a write, a few
ms, against a settle time of a second). A writer that finds its lease taken over when renewing
stops writing checkpoints (`check` raises).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from btx_core.errors import StoreError

log = logging.getLogger(__name__)
LEASE = "_writer.json"
FLOW_RUN_ENV = "PREFECT__FLOW_RUN_ID"  # set by Prefect's workers in a flow run's process


class LeaseHeldError(StoreError):
    """Another live writer holds the prefix's lease."""


class LeaseLostError(StoreError):
    """This writer's lease was taken over (it expired while this writer was stalled)."""


@dataclass(frozen=True)
class LeaseRecord:
    token: str
    host: str
    pid: int
    flow_run: str | None
    expires_at: float  # unix time
    acquired_at: float

    @property
    def owner(self) -> str:
        run = f", Prefect flow run {self.flow_run}" if self.flow_run else ""
        return f"pid {self.pid} on {self.host}{run}"


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLease:
    """`with WriterLease(store, prefix):` hold the prefix's lease while the block runs."""

    def __init__(self, store, prefix: str, *, ttl_s: float = 120.0, renew_s: float = 30.0,
                 settle_s: float = 1.0, flow_run: str | None = None):
        self.store, self.prefix = store, prefix.rstrip("/")
        self.ttl_s, self.renew_s, self.settle_s = ttl_s, renew_s, settle_s
        self.location = f"{self.prefix}/{LEASE}"
        self.path = store._path(self.location)
        self.record = LeaseRecord(token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                                  flow_run=flow_run if flow_run is not None else os.environ.get(FLOW_RUN_ENV),
                                  expires_at=0.0, acquired_at=time.time())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: LeaseRecord | None = None

    # --- reading and writing the record ---------------------------------------------------

    def read(self) -> LeaseRecord | None:
        with self.store._errors(self.location, "reading the writer lease of"):
            try:
                data = self.store.fs.cat_file(self.path)
            except FileNotFoundError:
                return None
        try:
            return LeaseRecord(**json.loads(data))
        except (ValueError, TypeError):
            return None  # unreadable: a torn write of an old btx; treat as free

    def _write(self, *, exclusive: bool = False) -> bool:
        record = LeaseRecord(**{**asdict(self.record), "expires_at": time.time() + self.ttl_s})
        data = json.dumps(asdict(record)).encode()
        with self.store._errors(self.location, "writing the writer lease of"):
            if self.store.is_local:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                if exclusive:
                    try:
                        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    except FileExistsError:
                        return False
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                else:
                    tmp = f"{self.path}.{record.token[:8]}.tmp"
                    with open(tmp, "wb") as f:
                        f.write(data)
                    os.replace(tmp, self.path)
            else:
                self.store.fs.pipe_file(self.path, data)
        self.record = record
        return True

    def _free_or_ours(self, current: LeaseRecord | None) -> str | None:
        """None if this writer may take the lease, else why not."""
        if current is None or current.token == self.record.token:
            return None
        if current.expires_at < time.time():
            log.info("%s: taking over the expired writer lease of %s", self.prefix, current.owner)
            return None
        if current.flow_run and current.flow_run == self.record.flow_run:
            log.info("%s: taking over the lease of an earlier attempt of this flow run (%s)",
                     self.prefix, current.owner)
            return None
        if current.host == self.record.host and not pid_alive(current.pid):
            log.info("%s: taking over the lease of %s, which is no longer running", self.prefix, current.owner)
            return None
        until = datetime.fromtimestamp(current.expires_at, timezone.utc).isoformat(timespec="seconds")
        return (f"{self.prefix} is being written by {current.owner} (its lease, renewed while it "
                f"trains, runs until {until}): two writers would corrupt its checkpoints. Wait for that "
                "run to finish or stop it; if it is dead, its lease expires within "
                f"{self.ttl_s:g} s of its last renewal, or delete {self.location}")

    # --- the lease's life -------------------------------------------------------------------

    def acquire(self) -> WriterLease:
        current = self.read()
        if (why := self._free_or_ours(current)) is not None:
            raise LeaseHeldError(why)
        if current is None and self.store.is_local:
            if not self._write(exclusive=True):
                return self.acquire()  # someone created it meanwhile: judge theirs
        else:
            self._write()
            if not self.store.is_local:
                time.sleep(self.settle_s)  # let a racing writer's PUT land, then see who won
                winner = self.read()
                if winner is None or winner.token != self.record.token:
                    raise LeaseHeldError(self._free_or_ours(winner) or
                                         f"{self.prefix}: another writer took the lease at the same moment")
        self._thread = threading.Thread(target=self._renew, name=f"btx-lease {self.prefix}", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s) and self.renew():
            pass

    def renew(self) -> bool:
        """Push the expiry ahead; False (and `check` raises from now on) if it was taken over."""
        try:
            current = self.read()
            if current is not None and current.token != self.record.token:
                self.lost = current
                log.error("%s: the writer lease was taken over by %s", self.prefix, current.owner)
                return False
            self._write()
        except StoreError as exc:  # the store is down for a moment: try again next time
            log.warning("%s: could not renew the writer lease: %s", self.prefix, exc)
        return True

    def check(self) -> None:
        """Raise if the lease was taken over: this writer must stop writing."""
        if self.lost is not None:
            raise LeaseLostError(f"{self.prefix}: this writer's lease was taken over by {self.lost.owner} "
                                 "(it was not renewed in time); stopping so as not to overwrite its work")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            current = self.read()
            if current is not None and current.token == self.record.token:
                self.store.fs.rm_file(self.path)
        except (StoreError, OSError) as exc:  # it expires by itself
            log.warning("%s: could not release the writer lease: %s", self.prefix, exc)

    def __enter__(self) -> WriterLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
