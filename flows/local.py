"""Expert branches on this machine: each in a process of its own, on its share of the cores,
reporting to this process's Prefect API and terminal display.

Processes, not threads: transformers' `from_pretrained` patches module globals (torch's init
functions, `tie_weights`) while it loads, so two branches loading in threads of one process
corrupt each other's models (measured with transformers 5.24: meta tensors, "newly initialized"
weights); torch's thread count is per process too, and the GIL is not shared.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner

from btx_core.logs import quiet_libraries
from flows import progress


def _branch_process(queue) -> None:
    """ProcessPoolTaskRunner initializer: a branch process dies with its parent (see
    btx_core.training.stop.die_with_parent), and, with a display, shows its progress and its log
    on its parent's (printing them itself would garble the parent's bars)."""
    from btx_core.training.stop import die_with_parent

    die_with_parent()
    if queue is not None:
        _show_through(queue)


def _show_through(queue) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    progress.set_display(lambda label: (lambda p: queue.put(("progress", label, p))))
    handler = logging.handlers.QueueHandler(_Tagged(queue))
    handler.setFormatter(logging.Formatter("%(message)s"))  # a user handler: Prefect keeps it
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    quiet_libraries()  # else every API request of the branch reaches the parent's console


class _Tagged:
    def __init__(self, queue):
        self.queue = queue

    def put_nowait(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", record.name, record))


@contextlib.contextmanager
def branch_processes(max_workers: int) -> Iterator[ProcessPoolTaskRunner]:
    """A ProcessPoolTaskRunner whose tasks report to the API this flow run uses (an embedded
    API's address is passed down; otherwise each process would start a server of its own) and
    whose progress callbacks reach this process's display through a queue."""
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    factory = progress.current_display()
    queue = multiprocessing.get_context("spawn").Queue() if factory else None
    options = dict(initializer=_branch_process, initargs=(queue,))
    reader = None
    if queue is not None:
        reader = threading.Thread(target=_pump, args=(queue, factory), name="btx-progress", daemon=True)
        reader.start()
    try:
        with temporary_settings({PREFECT_API_URL: api_url}), \
                ProcessPoolTaskRunner(max_workers=max_workers, **options) as runner:
            try:
                yield runner
            except BaseException:  # SIGTERM (Prefect's TerminationSignal), Ctrl-C, a failure
                _stop_branches(runner)  # else leaving the runner waits for them to finish training
                raise
    finally:
        if queue is not None:
            queue.put(None)
            reader.join(timeout=10)


def _stop_branches(runner: ProcessPoolTaskRunner) -> None:
    """SIGTERM to every branch process: each writes a checkpoint at its next step and stops."""
    executor = getattr(runner, "_executor", None)
    for process in list(getattr(executor, "_processes", {}).values()):
        with contextlib.suppress(OSError, ValueError):
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)


def _pump(queue, factory: progress.DisplayFactory) -> None:
    shows: dict[str, progress.ProgressCallback] = {}
    while (item := queue.get()) is not None:
        kind, name, payload = item
        if kind == "log":  # to this process's console only: the branch sent it to the API itself
            for handler in logging.getLogger().handlers:
                if payload.levelno >= handler.level:
                    handler.handle(payload)
            continue
        if name not in shows:
            shows[name] = factory(name)
        shows[name](payload)
