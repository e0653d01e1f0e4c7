"""Where a training stage's progress goes while it runs: a keyed Prefect progress artifact (the
UI's bar), the run's log, and, under `btx run`, a terminal display.

The training loop calls back every `log_every` steps; the artifact and the log are throttled so a
fast stage does not turn into a stream of API calls. A failed update is logged, never raised:
a flaky API must not kill hours of training.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from btx_core.store.outputs import StageOutput

if TYPE_CHECKING:  # the pipeline imports this module, and must load without torch (flows/pipeline.py)
    from btx_core.training.loop import Progress

ProgressCallback = Callable[["Progress"], None]
DisplayFactory = Callable[[str], ProgressCallback]

_display: DisplayFactory | None = None
_display_lock = threading.Lock()


def current_display() -> DisplayFactory | None:
    """The display every stage in this process shows on, if any (see `display`)."""
    return _display


def set_display(factory: DisplayFactory | None) -> DisplayFactory | None:
    """Show every stage that runs in this process from now on `factory(label)`; returns the
    factory it replaces."""
    global _display
    with _display_lock:
        previous, _display = _display, factory
    return previous


@contextlib.contextmanager
def display(factory: DisplayFactory) -> Iterator[None]:
    """Show every stage that runs in this process on `factory(label)` (the CLI's tqdm bars).
    Process-local: branches on other machines (deployments) report through artifacts only."""
    previous = set_display(factory)
    try:
        yield
    finally:
        set_display(previous)


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from names such as the run's and
    a domain's; the same names give the same key, so the Artifacts page keeps each one's history."""
    key = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")
    if not key:
        raise ValueError(f"no artifact key can be made from {parts!r}")
    return key


class StageProgress:
    """The progress callback of one training stage inside a flow or task run."""

    def __init__(self, key: str, label: str, *, every_s: float = 2.0, log_every_s: float = 30.0):
        from prefect import get_run_logger
        from prefect.artifacts import create_progress_artifact

        self.label, self.every_s, self.log_every_s = label, every_s, log_every_s
        self.logger = get_run_logger()
        self.artifact_id = None
        self.last_update = self.last_log = float("-inf")
        with self._tolerant("create"):
            self.artifact_id = create_progress_artifact(0.0, key=key, description=f"{label}: starting")
        factory = current_display()
        self.show = factory(label) if factory is not None else None

    def __call__(self, p: Progress) -> None:
        if self.show is not None:
            self.show(p)
        now, done = time.monotonic(), p.step >= p.total_steps
        text = (f"{self.label}: step {p.step}/{p.total_steps}, loss {p.loss:.4f}, "
                f"{p.tokens_per_s:,.0f} tokens/s, eta {p.eta_s:,.0f} s")
        if done or now - self.last_update >= self.every_s:
            self._update(100.0 * p.step / p.total_steps, text)
            self.last_update = now
        if done or now - self.last_log >= self.log_every_s:
            self.logger.info(text)
            self.last_log = now

    def finish(self, note: str) -> None:
        self._update(100.0, f"{self.label}: {note}")

    def report(self, out: StageOutput) -> str:
        """Close the bar and log what the stage did (ran, or found its output complete and
        reused it); returns the output's store location, the task's result."""
        note = "already complete (same config and inputs): reused" if out.skipped else "done"
        self.finish(f"{note}; {out.location}")
        self.logger.info("%s: %s -> %s %s", self.label, note, out.location, "; ".join(out.notes))
        return out.location

    def _update(self, percent: float, description: str) -> None:
        from prefect.artifacts import update_progress_artifact

        if self.artifact_id is not None:
            with self._tolerant("update"):
                update_progress_artifact(self.artifact_id, percent, description=description)

    @contextlib.contextmanager
    def _tolerant(self, doing: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # the API is down or slow: training goes on, the bar lags
            self.logger.warning("could not %s the progress artifact of %s: %s", doing, self.label, exc)


def run_name(*parts: str):
    """A flow run namer: the config's run name, then each part, or the value of the parameter
    it names (`run_name("expert", "domain")` -> `ci-expert-math`). The config parameter is a
    model in a local call and plain JSON in a deployment's run: both work."""

    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.parameters
        config = params.get("config")
        run = config.get("run_name") if isinstance(config, dict) else getattr(config, "run_name", "btx")
        return "-".join([str(run), *(str(params.get(p, p)) for p in parts)])

    return name


def forward_library_logs(logger_name: str = "btx_core") -> None:
    """Send btx_core's log records to the run's logs in the Prefect UI (what
    PREFECT_LOGGING_EXTRA_LOGGERS does, without depending on the worker's environment)."""
    target = logging.getLogger(logger_name)
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in target.handlers:
            target.addHandler(handler)
    if target.level == logging.NOTSET:
        target.setLevel(logging.INFO)
