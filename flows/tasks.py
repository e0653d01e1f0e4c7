"""The pipeline's stages as Prefect tasks: each a thin typed wrapper over one btx_core call,
returning the store location of its output. Adding a stage is a task here and a line in
`flows/pipeline.py`; how the tasks persist results and retry is in `flows/options.py`.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import DEFAULT

from btx_core.config.schema import BTXConfig
from flows.options import STAGE_TASK, cores, retry_policy, crash_for_reschedule, torch_threads
from flows.progress import StageProgress, artifact_key, forward_library_logs


@task(name="seed", **STAGE_TASK)
def seed_task(config: BTXConfig) -> str:
    """Import the seed into the store, or create and pretrain the tiny one (btx_core.stages.seed)."""
    from btx_core.stages.seed import build_seed

    progress = StageProgress(artifact_key(config.run_name, "seed", "progress"), "seed")
    with torch_threads(config.seed.pretrain and config.seed.pretrain.threads or cores()), crash_for_reschedule():
        return progress.report(build_seed(config, on_progress=progress))


# `threads` is how the branch is run, not what it makes: a retried parent reuses the result
# whatever share of the cores it would give the branch now.
@task(name="train-expert", task_run_name="expert[{domain}]", cache_policy=DEFAULT - "threads", **STAGE_TASK)
def expert_task(config: BTXConfig, domain: str, seed_location: str, threads: int | None = None) -> str:
    """Branch the seed and train one domain expert, resuming from its newest checkpoint
    (btx_core.stages.branch); `threads`: its share of the cores when branches share a machine."""
    from btx_core.stages.branch import train_expert_branch

    forward_library_logs()  # in a branch's own process too
    progress = StageProgress(artifact_key(config.run_name, "expert", domain, "progress"), f"expert[{domain}]")
    with torch_threads(config.expert_training.threads or threads), crash_for_reschedule():
        # Under torchrun when `expert_training.nproc_per_node` gives the branch several processes.
        return progress.report(train_expert_branch(config, domain, seed_location=seed_location,
                                                   on_progress=progress))


def expert_task_for(config: BTXConfig):
    """The expert task with the config's retry policy: exponential backoff with jitter."""
    return expert_task.with_options(**retry_policy(config.orchestration))


@task(name="mix", **STAGE_TASK)
def mix_task(config: BTXConfig) -> str:
    """MiX: the experts (and the seed as a generalist) -> one Mixtral in the store (btx_core.stages.mix)."""
    from btx_core.stages.mix import mix_stage

    progress = StageProgress(artifact_key(config.run_name, "mix", "progress"), "mix")
    with torch_threads(cores()), crash_for_reschedule():
        return progress.report(mix_stage(config))


@task(name="finetune", **STAGE_TASK)
def finetune_task(config: BTXConfig) -> str:
    """MoE-finetune the mixed model on the mixture of all domains plus the general corpus,
    resuming from its newest checkpoint (btx_core.stages.finetune)."""
    from btx_core.stages.finetune import finetune

    progress = StageProgress(artifact_key(config.run_name, "finetune", "progress"), "finetune")
    with torch_threads(config.finetune.training.threads or cores()), crash_for_reschedule():
        return progress.report(finetune(config, "btx", on_progress=progress))


@task(name="evaluate", **STAGE_TASK)
def evaluate_task(config: BTXConfig) -> str:
    """Held-out loss of the seed, experts, BTM, MiX and BTX per domain and on mixed-domain text,
    and BTX's routing (btx_core.stages.evaluate)."""
    from btx_core.stages.evaluate import evaluate_run

    progress = StageProgress(artifact_key(config.run_name, "evaluate", "progress"), "evaluate")
    with torch_threads(cores()), crash_for_reschedule():
        return progress.report(evaluate_run(config))


@task(name="report", **STAGE_TASK)
def report_task(config: BTXConfig) -> str:
    """Publish the run's artifacts (evaluation and compute tables, loss curves, routing,
    checkpoint links) from the manifests in the store; returns the run's root location."""
    from flows.report import publish

    return publish(config)


# The heavy stages that can run on a work pool of their own (`orchestration.<stage>_pool`, the
# `btx-stage/<pool>` deployment: flows/stages.py), and where each one's output is in the store.
STAGE_TASKS = {"seed": seed_task, "mix": mix_task, "finetune": finetune_task, "evaluate": evaluate_task}
