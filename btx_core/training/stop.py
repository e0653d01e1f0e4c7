"""Stopping training on request, at a step boundary, with the work kept.

SIGTERM is how everything asks a training process to stop: `kill`, a cancelled Prefect flow run
(its worker or runner sends SIGTERM, then SIGKILL after a grace period, 30 s for process
workers), Kubernetes evicting a pod, torchrun passing its own SIGTERM to its ranks, and a branch
whose parent died (see `die_with_parent`). The training loop then writes a checkpoint at the next
step boundary and raises `TrainingStopped`, so the stop costs at most one step plus one
checkpoint, and the next run resumes from the step reached, not from the last periodic checkpoint.

Python runs signal handlers only in the main thread, so `stop_on_sigterm` installs its handler
only there (and restores the previous one after); training in another thread stops when someone
calls `request_stop` (the CLI's own handler does). A second SIGTERM is passed to the previous
handler (by default: the process dies at once), unless it comes within `DUPLICATE_S` of the
first: that is the same stop asked twice, as when `btx run` is killed and each branch hears it
from its own watchdog (`die_with_parent`) and from `btx run`'s reaper, a second apart; dying
there lost the step reached.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

from btx_core.errors import BTXError

_requested = threading.Event()
_reason: list[str] = []
_orphaned = threading.Event()  # set by `die_with_parent` before it sends this process SIGTERM
DUPLICATE_S = 5.0  # a second SIGTERM sooner than this after the first repeats it


class TrainingStopped(BTXError):
    """Training was asked to stop (SIGTERM, a cancel); its state is in a checkpoint."""


def request_stop(reason: str) -> None:
    """Ask every training loop of this process to checkpoint and stop at its next step boundary."""
    if not _requested.is_set():
        _reason[:] = [reason]
        _requested.set()


def stop_requested() -> str | None:
    """Why a stop was requested, or None."""
    return _reason[0] if _requested.is_set() and _reason else None


def clear() -> None:
    _requested.clear()
    _reason.clear()


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While training: the first SIGTERM requests a stop; a second goes to the previous handler.
    A no-op outside the main thread (where Python cannot install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    first: list[float] = []  # when this handler asked for the stop

    def handler(signum, frame):
        if not _requested.is_set():
            first[:] = [time.monotonic()]
            request_stop("SIGTERM: its parent process is gone" if _orphaned.is_set() else "SIGTERM")
            return
        if first and time.monotonic() - first[0] < DUPLICATE_S:
            return
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        clear()


def die_with_parent(grace_s: float = 60.0, poll_s: float = 1.0) -> None:
    """Make this process follow its parent: when the parent is gone (killed, even by SIGKILL),
    send this process SIGTERM (training checkpoints and stops), and end it after `grace_s`.

    Linux's PR_SET_PDEATHSIG sends the signal at once, but it fires when the parent *thread*
    that started this process exits, which in a pool of threads is not the parent's death; a
    watchdog thread on the parent's pid is exact and portable, and costs one syscall a second.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        _orphaned.set()
        with contextlib.suppress(OSError):  # training checkpoints and stops; an idle process ends
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(143)

    threading.Thread(target=watch, name="btx-die-with-parent", daemon=True).start()
