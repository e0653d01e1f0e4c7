"""How the flows' tasks run: results persisted as JSON, the retry policy of a branch (which
failures are worth a retry, and how long to wait), what a SIGTERM that is not a cancel or a broken
CUDA context makes of a deployment run, and a stage's share of the CPU cores.

Results are persisted (as JSON: they are only store locations) so that retrying a parent flow
run reuses the tasks that finished (Prefect's default cache policy includes the flow run id); a
new run of the same config finds the stages' manifests instead and trains nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

from prefect.tasks import exponential_backoff

from btx_core.config.schema import Orchestration
from btx_core.errors import BTXError, CheckpointMismatchError, ConfigError
from btx_core.training.stop import TrainingStopped

STAGE_TASK = dict(persist_result=True, result_serializer="json")
RETRY_JITTER = 0.5  # a retry waits up to +50 % longer (mean: the backoff), so branches do not retry in lockstep


# What a CUDA context says once it is broken (an illegal address, a device-side assert, an ECC
# error, a collective that timed out): every later call in the process fails too.
BROKEN_DEVICE = re.compile(r"CUDA error|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|NCCL error|device-side assert|"
                           r"CUDA driver error|ECC error", re.IGNORECASE)


def broken_device(exc: BaseException) -> bool:
    """Whether `exc` comes from a broken accelerator context, which no retry in this process fixes."""
    import torch

    kinds = tuple(k for k in (getattr(torch, "AcceleratorError", None), getattr(torch.cuda, "CudaError", None)) if k)
    return isinstance(exc, kinds) or (isinstance(exc, RuntimeError) and bool(BROKEN_DEVICE.search(str(exc))))


def is_transient(task, task_run, state) -> bool:
    """Retry unless the failure is one no retry in this process can fix: a bad config, a foreign
    checkpoint, a stop that was asked for, a broken CUDA context (`crash_on_broken_device` ends
    the process instead, so that the retry gets a fresh one)."""
    try:
        state.result()
    except (ConfigError, CheckpointMismatchError, TrainingStopped):  # TrainingStopped: asked to stop
        return False
    except BaseException as exc:  # noqa: BLE001 - everything else may be the node, the network, the store
        return not broken_device(exc)
    return True


def retry_policy(orchestration: Orchestration) -> dict:
    """`Task.with_options` arguments for the config's retries: exponential backoff with jitter,
    and no retry of a failure that `is_transient` says no retry can fix."""
    return dict(retries=orchestration.retries, retry_delay_seconds=exponential_backoff(orchestration.retry_delay_s),
                retry_jitter_factor=RETRY_JITTER, retry_condition_fn=is_transient)


def is_transient_wait(task, task_run, state) -> bool:
    """For the parent's tasks that wait on a child run: retry (re-attaching to the same child
    through its idempotency key) unless the failure is btx's verdict on the child."""
    try:
        state.result()
    except BTXError:  # the child failed, never started, or left no output: a retry changes nothing
        return False
    except BaseException:  # noqa: BLE001 - the parent's own process or the API
        return True
    return True


def waiting_retry_policy(orchestration: Orchestration) -> dict:
    """`Task.with_options` arguments of a task that waits on a child run."""
    return dict(retries=orchestration.retries, retry_delay_seconds=exponential_backoff(orchestration.retry_delay_s),
                retry_jitter_factor=RETRY_JITTER, retry_condition_fn=is_transient_wait)


@contextlib.contextmanager
def crash_for_reschedule() -> Iterator[None]:
    """End a deployment run Crashed where its own retries cannot help, so that its parent
    reschedules it in place, in a new process (flows/remote.py):
    - training stopped by a SIGTERM that is not a cancel (the kubelet draining a node, a spot
      reclaim, an eviction), after its checkpoint at the step reached, so the retry resumes from
      that step. A cancel (Prefect's runner says so on its control channel; a cancel from the UI
      leaves the run Cancelling on the server) still ends Cancelled;
    - a broken CUDA context (`broken_device`).
    Outside a deployment run (`btx run`, embedded) nothing changes: the stop is the user's."""
    try:
        yield
    except TrainingStopped as stop:
        if _in_deployment_run() and not _cancel_requested():
            import signal

            from prefect.exceptions import TerminationSignal

            raise TerminationSignal(signal.SIGTERM) from stop  # the engine reports it as a crash
        raise
    except Exception as exc:
        if _in_deployment_run() and broken_device(exc):
            # Retried in this process, every attempt would fail the same way: end it Crashed, and
            # the parent reschedules the run in a new process (on a node the scheduler picks).
            raise SystemExit(f"the accelerator context is broken ({type(exc).__name__}: {exc}); ending this "
                             "process so that the retry starts in a fresh one") from exc
        raise


def _in_deployment_run() -> bool:
    from prefect.runtime import deployment

    return deployment.id is not None


def _cancel_requested() -> bool:
    from prefect import runtime
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    try:  # private in Prefect 3.9: read it where it exists, else ask the server alone
        from prefect._internal.control_listener import get_intent
    except ImportError:
        get_intent = lambda: None  # noqa: E731
    if get_intent() == "cancel":
        return True
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(runtime.flow_run.id).state
    except Exception:  # noqa: BLE001 - unknown: a crash is rescheduled, and resumes; the safer guess
        return False
    return state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED)


def cores() -> int:
    """CPU cores this process may use (its affinity mask, as under taskset or a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a stage on `n` torch threads (process-wide in torch). Concurrent branches each have
    a process of their own; a stage alone in a process sets its own count, so a reused pool
    thread or process inherits nothing from the stage before."""
    import torch

    if n is not None:
        torch.set_num_threads(n)
    yield
