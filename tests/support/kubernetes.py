"""Kubernetes Jobs as prefect-kubernetes' own worker makes them, without a cluster: a work pool's
base job template and a flow run's job variables, through `KubernetesWorkerJobConfiguration`
(the worker's templating, env and label handling) to the Job manifest it would submit."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import uuid4


async def job_configuration(template: dict, job_variables: dict) -> Any:
    """The worker's configuration for a flow run with these job variables, prepared for the run
    (its `job_manifest` is the Job it submits). The worker's own Prefect settings (the current
    ones) go into the job's env, as they do in a real worker."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    config = await KubernetesWorkerJobConfiguration.from_template_and_values(
        template, job_variables, client=object())  # no block or variable references to resolve
    config.prepare_for_flow_run(FlowRun(id=uuid4(), name="a-run", flow_id=uuid4()))
    return config


def render_job(template: dict, job_variables: dict) -> dict:
    """The Job a Kubernetes worker would submit for a flow run with these job variables."""
    return asyncio.run(job_configuration(template, job_variables)).job_manifest
