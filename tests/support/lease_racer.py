"""One of several processes racing for a writer lease, round after round (tests/{unit,integration}/test_lease.py).

    python -m tests.support.lease_racer STORE PREFIX SYNC_DIR INDEX ROUNDS

Talks to the test through files in SYNC_DIR: writes `ready-INDEX` once imported; in round r
waits for `go-r`, tries to take the lease and writes `r-INDEX` ("won GENERATION" or "lost");
the winner holds the lease until `release-r` appears, then releases it and writes `released-r`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from btx_core.store.core import Store
from btx_core.store.lease import LeaseHeldError, WriterLease


def wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.001)


def say(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)  # whole or not at all for the reader


def main(store_uri: str, prefix: str, sync: str, index: str, rounds: str) -> None:
    store, sync_dir = Store(store_uri), Path(sync)
    say(sync_dir / f"ready-{index}", "")
    for r in range(int(rounds)):
        wait_for(sync_dir / f"go-{r}")
        lease = WriterLease(store, prefix, ttl_s=60, renew_s=10)
        try:
            lease.acquire()
        except LeaseHeldError:
            say(sync_dir / f"{r}-{index}", "lost")
            continue
        say(sync_dir / f"{r}-{index}", f"won {lease.generation}")
        wait_for(sync_dir / f"release-{r}")
        lease.release()
        say(sync_dir / f"released-{r}", "")


if __name__ == "__main__":
    main(*sys.argv[1:])
