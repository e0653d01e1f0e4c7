"""MoE-finetuning as its own flow, `finetune`: what the deployment `finetune/<pool>` runs when the
pipeline's `orchestration.finetune_pool` is set (the GPU pool big enough for the whole MoE)."""

from __future__ import annotations

from prefect import flow

from btx_core.config.schema import BTXConfig
from flows.progress import forward_library_logs, run_name
from flows.tasks import finetune_task


@flow(name="finetune", flow_run_name=run_name("finetune"))
def finetune_flow(config: BTXConfig) -> str:
    """Finetune the run's mixed MoE; returns the finetuned model's store location."""
    forward_library_logs()
    return finetune_task(config)
