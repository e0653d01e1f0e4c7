"""MiX as its own flow, `mix`: what the deployment `mix/<pool>` runs when the pipeline's
`orchestration.mix_pool` is set (a machine with fast disk and memory close to the store)."""

from __future__ import annotations

from prefect import flow

from btx_core.config.schema import BTXConfig
from flows.progress import forward_library_logs, run_name
from flows.tasks import mix_task


@flow(name="mix", flow_run_name=run_name("mix"))
def mix_flow(config: BTXConfig) -> str:
    """Mix the run's trained experts into one Mixtral; returns its store location."""
    forward_library_logs()
    return mix_task(config)
