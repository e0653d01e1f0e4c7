"""The pipeline's tasks: each a thin typed wrapper over one btx_core call, returning the store
location of its output. Adding a stage is a task here and a line in `flows/pipeline.py`.

Results are persisted (as JSON: they are only locations) so that retrying a parent flow run
reuses the tasks that finished (Prefect's default cache policy includes the flow run id); a new
run of the same config finds the stages' manifests instead and trains nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from prefect import task
from prefect.cache_policies import DEFAULT
from prefect.tasks import exponential_backoff

from btx_core.config.schema import BTXConfig
from btx_core.errors import CheckpointMismatchError, ConfigError
from btx_core.stages import common as stages
from flows.progress import StageProgress, artifact_key, forward_library_logs

STAGE_TASK = dict(persist_result=True, result_serializer="json")
RETRY_JITTER = 0.5  # a retry waits up to +50 % longer (mean: the backoff), so branches do not retry in lockstep


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


def _report(progress: StageProgress, out: stages.StageOutput) -> str:
    note = "already complete (same config and inputs): reused" if out.skipped else "done"
    progress.finish(f"{note}; {out.location}")
    progress.logger.info("%s: %s -> %s %s", progress.label, note, out.location, "; ".join(out.notes))
    return out.location


@task(name="seed", **STAGE_TASK)
def seed_task(config: BTXConfig) -> str:
    """Import the seed into the store, or create and pretrain the tiny one (btx_core build_seed)."""
    progress = StageProgress(artifact_key(config.run_name, "seed", "progress"), "seed")
    with torch_threads(config.seed.pretrain and config.seed.pretrain.threads or cores()):
        return _report(progress, stages.build_seed(config, on_progress=progress))


def _transient(task, task_run, state) -> bool:
    """Retry unless the failure is one no retry can fix (a bad config, a foreign checkpoint)."""
    try:
        state.result()
    except (ConfigError, CheckpointMismatchError):
        return False
    except BaseException:  # noqa: BLE001 - everything else may be the node, the network, the store
        return True
    return True


# `threads` is how the branch is run, not what it makes: a retried parent reuses the result
# whatever share of the cores it would give the branch now.
@task(name="train-expert", task_run_name="expert[{domain}]", cache_policy=DEFAULT - "threads", **STAGE_TASK)
def expert_task(config: BTXConfig, domain: str, seed_location: str, threads: int | None = None) -> str:
    """Branch the seed and train one domain expert, resuming from its newest checkpoint
    (btx_core train_expert); `threads`: its share of the cores when branches share a machine."""
    from btx_core.stages.branch import train_expert_branch
    from flows.expert import with_fault_hook

    forward_library_logs()  # in a branch's own process too
    progress = StageProgress(artifact_key(config.run_name, "expert", domain, "progress"), f"expert[{domain}]")
    callback = with_fault_hook(progress, config.expert_training.checkpoint_every, domain)
    with torch_threads(config.expert_training.threads or threads):
        # Under torchrun when `expert_training.nproc_per_node` gives the branch several processes.
        return _report(progress, train_expert_branch(config, domain, seed_location=seed_location,
                                                     on_progress=callback))


def expert_task_for(config: BTXConfig):
    """The expert task with the config's retry policy: exponential backoff with jitter."""
    o = config.orchestration
    return expert_task.with_options(retries=o.retries, retry_delay_seconds=exponential_backoff(o.retry_delay_s),
                                    retry_jitter_factor=RETRY_JITTER, retry_condition_fn=_transient)


@task(name="mix", **STAGE_TASK)
def mix_task(config: BTXConfig) -> str:
    """MiX: the experts (and the seed as a generalist) -> one Mixtral in the store (btx_core mix_stage)."""
    from btx_core.stages.mix import mix_stage

    progress = StageProgress(artifact_key(config.run_name, "mix", "progress"), "mix")
    with torch_threads(cores()):
        return _report(progress, mix_stage(config))


@task(name="finetune", **STAGE_TASK)
def finetune_task(config: BTXConfig) -> str:
    """MoE-finetune the mixed model on the mixture of all domains plus the general corpus,
    resuming from its newest checkpoint (btx_core finetune)."""
    from btx_core.stages.finetune import finetune

    progress = StageProgress(artifact_key(config.run_name, "finetune", "progress"), "finetune")
    with torch_threads(config.finetune.training.threads or cores()):
        return _report(progress, finetune(config, "btx", on_progress=progress))


@task(name="evaluate", **STAGE_TASK)
def evaluate_task(config: BTXConfig) -> str:
    """Held-out loss of the seed, experts, BTM, MiX and BTX per domain and on mixed-domain text,
    and BTX's routing (btx_core evaluate_run)."""
    from btx_core.stages.evaluate import evaluate_run

    progress = StageProgress(artifact_key(config.run_name, "evaluate", "progress"), "evaluate")
    with torch_threads(cores()):
        return _report(progress, evaluate_run(config))


@task(name="report", **STAGE_TASK)
def report_task(config: BTXConfig) -> str:
    """Publish the run's artifacts (evaluation and compute tables, loss curves, routing,
    checkpoint links) from the manifests in the store; returns the run's root location."""
    from flows.report import publish

    return publish(config)
