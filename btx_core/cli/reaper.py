"""`btx run`'s reaper: a small process of its own that outlives `btx run` by a few seconds and
ends whatever `btx run` started (branch processes, Prefect's temporary API server) once it is
gone, however it went: SIGTERM, SIGKILL, a crash. Linux (/proc); elsewhere it is not started.

It watches the descendants of `btx run` every second, remembering each by pid and start time
(so a reused pid is never hit); when `btx run` has exited it sends the remembered ones that
still run SIGTERM (a training branch checkpoints at its next step and stops), then SIGKILL after
the grace period.

    python -m btx_core.cli.reaper PID [GRACE_S]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 1.0


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of `pid`, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def _running(pid: int, started: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] != "Z" and stat[2] == started


def _descendants(root: int) -> dict[int, int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))):
            children.setdefault(stat[0], []).append(int(entry))
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if (stat := _stat(child)) is not None:
                found[child] = stat[2]
                todo.append(child)
    return found


def reap(pid: int, grace_s: float) -> None:
    me = _stat(pid)
    if me is None:
        return
    seen: dict[int, int] = {}
    while _running(pid, me[2]):
        seen |= _descendants(pid)
        seen.pop(os.getpid(), None)
        time.sleep(POLL_S)
    left = {p: s for p, s in seen.items() if _running(p, s)}
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
        for p, s in left.items():
            if _running(p, s):
                try:
                    os.kill(p, sig)
                except OSError:
                    pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_running(p, s) for p, s in left.items()):
            time.sleep(0.2)


def start(grace_s: float = 45.0) -> subprocess.Popen | None:
    """Start the reaper of this process (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    return subprocess.Popen([sys.executable, "-m", "btx_core.cli.reaper", str(os.getpid()), str(grace_s)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True,  # not in our group: a signal to the group spares it
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})


if __name__ == "__main__":
    reap(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 45.0)
