"""How the flows' tasks run: results persisted as JSON, the retry policy of a branch (which
failures are worth a retry, and how long to wait), and a stage's share of the CPU cores.

Results are persisted (as JSON: they are only store locations) so that retrying a parent flow
run reuses the tasks that finished (Prefect's default cache policy includes the flow run id); a
new run of the same config finds the stages' manifests instead and trains nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from prefect.tasks import exponential_backoff

from btx_core.config.schema import Orchestration
from btx_core.errors import CheckpointMismatchError, ConfigError
from btx_core.training.stop import TrainingStopped

STAGE_TASK = dict(persist_result=True, result_serializer="json")
RETRY_JITTER = 0.5  # a retry waits up to +50 % longer (mean: the backoff), so branches do not retry in lockstep


def is_transient(task, task_run, state) -> bool:
    """Retry unless the failure is one no retry can fix (a bad config, a foreign checkpoint)."""
    try:
        state.result()
    except (ConfigError, CheckpointMismatchError, TrainingStopped):  # TrainingStopped: asked to stop
        return False
    except BaseException:  # noqa: BLE001 - everything else may be the node, the network, the store
        return True
    return True


def retry_policy(orchestration: Orchestration) -> dict:
    """`Task.with_options` arguments for the config's retries: exponential backoff with jitter,
    and no retry of a failure that `is_transient` says no retry can fix."""
    return dict(retries=orchestration.retries, retry_delay_seconds=exponential_backoff(orchestration.retry_delay_s),
                retry_jitter_factor=RETRY_JITTER, retry_condition_fn=is_transient)


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
