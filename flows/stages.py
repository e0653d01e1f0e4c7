"""The heavy stages other than the expert branches, as one flow, `btx-stage`: what a work pool's
deployment `btx-stage/<pool>` runs when the pipeline's `orchestration.<stage>_pool` names that
pool. The pipeline (on the control pool) then only orchestrates: the seed's pretraining, MiX,
the MoE finetune and the evaluation run where the config sends them.

The stage is one task of flows/tasks.py, as in embedded mode: the same progress artifact, the
same output in the store, found by its manifest when it is already complete.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow

from btx_core.config.schema import BTXConfig
from flows.progress import forward_library_logs, run_name
from flows.tasks import STAGE_TASKS

Stage = Literal["seed", "mix", "finetune", "evaluate"]


@flow(name="btx-stage", flow_run_name=run_name("stage"))
def stage_flow(config: BTXConfig, stage: Stage) -> str:
    """Run one stage of the run (`seed`, `mix`, `finetune` or `evaluate`); returns its store location."""
    forward_library_logs()
    if stage == "finetune" and config.finetune is None:
        raise ValueError("stage 'finetune' needs a `finetune` section in the config")
    return STAGE_TASKS[stage](config)
