"""One expert branch as its own flow, `train-expert`: what each work pool's deployment
`train-expert/<pool>` runs when the pipeline dispatches branches with `run_deployment`.

The branch is one task with the config's retry policy (exponential backoff with jitter); a retry
resumes from the branch's newest checkpoint in the store, and a finished branch is found by its
manifest and not trained again. Its progress artifact is `<run>-expert-<domain>-progress`.

Several GPUs: when `expert_training.nproc_per_node` gives the branch more than one process, the
task relaunches it under torchrun (btx_core/stages/branch.py).
"""

from __future__ import annotations

import os

from prefect import flow, task
from prefect.cache_policies import DEFAULT
from prefect.tasks import exponential_backoff

from btx_core.config.schema import BTXConfig
from btx_core.errors import BTXError
from btx_core.stages.branch import processes_for, train_expert_torchrun
from btx_core.store import layout
from flows.progress import ProgressCallback, StageProgress, artifact_key, forward_library_logs, run_name
from flows.tasks import RETRY_JITTER, STAGE_TASK, _report, _transient, expert_task_for

# Test hook, used by the fault-injection tests (tests/test_flows_*.py); never set it in
# production. When BTX_FAULT_AFTER_CHECKPOINT names a file that does not exist yet, the first
# expert branch whose training passes its first checkpoint creates that file and fails. The file
# makes it fail once: the retry (or a retried parent run) finds it and trains on, resuming from
# the checkpoint. The training loop reports progress before it saves the checkpoint of the same
# step, so the first report past `checkpoint_every` comes after that checkpoint is in the store.
FAULT_ENV = "BTX_FAULT_AFTER_CHECKPOINT"


class InjectedFault(BTXError):
    """The failure BTX_FAULT_AFTER_CHECKPOINT asked for."""


def with_fault_hook(callback: ProgressCallback, checkpoint_every: int, domain: str) -> ProgressCallback:
    """`callback`, failing once after the first checkpoint when the test hook is armed."""
    path = os.environ.get(FAULT_ENV)
    if not path or os.path.exists(path):
        return callback

    def armed(p) -> None:
        callback(p)
        if p.step > checkpoint_every:
            try:  # O_EXCL: of branches running at once, exactly one fails
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, f"expert[{domain}] failed on purpose at step {p.step}\n".encode())
            os.close(fd)
            raise InjectedFault(f"expert[{domain}]: injected fault at step {p.step} ({FAULT_ENV}={path})")

    return armed


@task(name="train-expert", task_run_name="expert[{domain}]", cache_policy=DEFAULT - "nproc", **STAGE_TASK)
def expert_torchrun_task(config: BTXConfig, domain: str, nproc: int) -> str:
    """Train one domain expert on `nproc` GPUs of this node under torchrun (DDP or FSDP),
    resuming from its newest checkpoint; `nproc` is how it runs, not what it makes."""
    forward_library_logs()
    progress = StageProgress(artifact_key(config.run_name, "expert", domain, "progress"), f"expert[{domain}]")
    callback = with_fault_hook(progress, config.expert_training.checkpoint_every, domain)
    return _report(progress, train_expert_torchrun(config, domain, nproc, on_progress=callback))


def expert_torchrun_task_for(config: BTXConfig):
    """The torchrun expert task with the config's retry policy (as `flows.tasks.expert_task_for`)."""
    o = config.orchestration
    return expert_torchrun_task.with_options(
        retries=o.retries, retry_delay_seconds=exponential_backoff(o.retry_delay_s),
        retry_jitter_factor=RETRY_JITTER, retry_condition_fn=_transient)


@flow(name="train-expert", flow_run_name=run_name("expert", "domain"))
def train_expert_flow(config: BTXConfig, domain: str) -> str:
    """Train one domain expert (resuming from its newest checkpoint); returns its store location.
    On a node with several GPUs for the branch (`expert_training.nproc_per_node`), under torchrun."""
    forward_library_logs()
    config.domain(domain)  # an unknown domain fails here, not after the retries
    nproc = processes_for(config.expert_training)
    if nproc > 1:
        return expert_torchrun_task_for(config)(config, domain, nproc)
    return expert_task_for(config)(config, domain, seed_location=layout.seed_model(config))
