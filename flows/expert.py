"""One expert branch as its own flow, `train-expert`: what each work pool's deployment
`train-expert/<pool>` runs when the pipeline dispatches branches with `run_deployment`.

The branch is one task with the config's retry policy (exponential backoff with jitter); a retry
resumes from the branch's newest checkpoint in the store, and a finished branch is found by its
manifest and not trained again. Its progress artifact is `<run>-expert-<domain>-progress`.

Several GPUs: when `expert_training.nproc_per_node` gives the branch more than one process, the
task relaunches it under torchrun (btx_core/stages/branch.py).
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import DEFAULT

from btx_core.config.schema import BTXConfig
from btx_core.stages.branch import processes_for, train_expert_torchrun
from btx_core.store import layout
from flows.options import STAGE_TASK, retry_policy, crash_for_reschedule
from flows.progress import StageProgress, artifact_key, forward_library_logs, run_name
from flows.tasks import expert_task_for


@task(name="train-expert", task_run_name="expert[{domain}]", cache_policy=DEFAULT - "nproc", **STAGE_TASK)
def expert_torchrun_task(config: BTXConfig, domain: str, nproc: int) -> str:
    """Train one domain expert on `nproc` GPUs of this node under torchrun (DDP or FSDP),
    resuming from its newest checkpoint; `nproc` is how it runs, not what it makes."""
    forward_library_logs()
    progress = StageProgress(artifact_key(config.run_name, "expert", domain, "progress"), f"expert[{domain}]")
    with crash_for_reschedule():
        return progress.report(train_expert_torchrun(config, domain, nproc, on_progress=progress))


@flow(name="train-expert", flow_run_name=run_name("expert", "domain"))
def train_expert_flow(config: BTXConfig, domain: str) -> str:
    """Train one domain expert (resuming from its newest checkpoint); returns its store location.
    On a node with several GPUs for the branch (`expert_training.nproc_per_node`), under torchrun."""
    forward_library_logs()
    config.domain(domain)  # an unknown domain fails here, not after the retries
    nproc = processes_for(config.expert_training)
    if nproc > 1:
        return expert_torchrun_task.with_options(**retry_policy(config.orchestration))(config, domain, nproc)
    return expert_task_for(config)(config, domain, seed_location=layout.seed_model(config.run_root))
