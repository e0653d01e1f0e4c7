"""One expert branch as its own flow, `train-expert`: what each work pool's deployment
`train-expert/<pool>` runs when the pipeline dispatches branches with `run_deployment`.

The branch is one task with the config's retry policy (exponential backoff with jitter); a retry
resumes from the branch's newest checkpoint in the store, and a finished branch is found by its
manifest and not trained again. Its progress artifact is `<run>-expert-<domain>-progress`.
"""

from __future__ import annotations

import os

from prefect import flow

from btx_core import layout
from btx_core.config import BTXConfig
from btx_core.errors import BTXError
from flows.progress import ProgressCallback, forward_library_logs, run_name
from flows.tasks import expert_task_for

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


@flow(name="train-expert", flow_run_name=run_name("expert", "domain"))
def train_expert_flow(config: BTXConfig, domain: str) -> str:
    """Train one domain expert (resuming from its newest checkpoint); returns its store location."""
    forward_library_logs()
    config.domain(domain)  # an unknown domain fails here, not after the retries
    return expert_task_for(config)(config, domain, seed_location=layout.seed_model(config))
