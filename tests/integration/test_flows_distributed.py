"""The pipeline deployed for real: a Prefect server on PostgreSQL, an S3 server, the work pools and
deployments of infra/, one process worker per pool, all on 127.0.0.1 (tests/prefect_harness.py).

One run of `btx-pipeline/btx` on configs/ci.yaml with two domains, each branch a run of
`train-expert/<pool>` on its own pool, and the seed, MiX, finetune and evaluation each a run of
`btx-stage/<pool>`: the parent on the control pool only orchestrates. The `btx-experts-2` worker carries the fault hook
(tests/support/faults.py): its branch fails once after its first checkpoint. Everything below
is read back through the Prefect API (and the workers' logs, and the store).
"""

from __future__ import annotations

import re
from uuid import UUID

import pytest

from tests.prefect_harness import (
    CONTROL_POOL,
    DOMAIN_POOLS,
    EXPERT_POOLS,
    HEAVY_STAGES,
    STAGE_POOL,
    PipelineRun,
)

FAULTY_POOL = EXPERT_POOLS[1]
FAULTY = next(d for d, p in DOMAIN_POOLS.items() if p == FAULTY_POOL)
HEALTHY = [d for d in DOMAIN_POOLS if d != FAULTY]


def _children(run: PipelineRun, kind: str = "domain") -> dict[str, object]:
    """The pipeline run's child flow runs: the branches by domain (`kind="domain"`), or the
    other heavy stages by stage (`kind="stage"`)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with run.deployed.cluster.client() as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.flow_run.id])))
    by_name: dict[str, list] = {}
    for child in children:
        if kind in child.parameters:
            by_name.setdefault(child.parameters[kind], []).append(child)
    assert set(by_name) == set(DOMAIN_POOLS if kind == "domain" else HEAVY_STAGES), by_name
    for name, runs in by_name.items():
        assert len(runs) == 1, f"{name} was launched {len(runs)} times: {runs}"
    return {name: runs[0] for name, runs in by_name.items()}


def _task_runs(run: PipelineRun, flow_run_id: UUID) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with run.deployed.cluster.client() as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _state_types(states) -> list[str]:
    return [s.type.value for s in sorted(states, key=lambda s: s.timestamp)]


@pytest.fixture(scope="module")
def completed(btx_pipeline_run: PipelineRun) -> PipelineRun:
    run = btx_pipeline_run
    state = run.flow_run.state
    assert state.is_completed(), (f"pipeline ended {state.type.value}: {state.message}\n"
                                  f"{run.deployed.cluster.diagnostics()}")
    return run


def test_pipeline_completes_on_the_pools(completed: PipelineRun) -> None:
    run = completed
    print("set-up and run, seconds:", {k: round(v) for k, v in run.deployed.cluster.timings.items()})
    assert run.flow_run.deployment_id == run.deployed.deployments["btx-pipeline/btx"].id
    assert run.flow_run.work_pool_name == "btx-control"
    with run.deployed.cluster.client() as client:
        result = client.read_flow_run(run.flow_run.id).state
    assert result.is_completed()
    # The report and every stage ran in the parent (a run, not a set of disconnected children).
    names = {re.sub(r"-[0-9a-f]{3}$", "", t.name) for t in _task_runs(run, run.flow_run.id)}
    assert {"seed", "mix", "report", *(f"expert[{d}]" for d in DOMAIN_POOLS)} <= names, names


def test_each_branch_runs_on_its_own_pool(completed: PipelineRun) -> None:
    run = completed
    children = _children(run)
    logs = {pool: (run.deployed.cluster.logs / f"worker-{pool}.log").read_text()
            for pool in EXPERT_POOLS}
    for domain, child in children.items():
        pool = DOMAIN_POOLS[domain]
        assert child.state.is_completed(), (domain, child.state)
        assert child.work_pool_name == pool, (domain, child.work_pool_name)
        assert child.deployment_id == run.deployed.deployments[f"train-expert/{pool}"].id
        assert child.idempotency_key == f"{run.flow_run.id}:{domain}"
        # The worker of that pool, and no other, started it.
        assert str(child.id) in logs[pool], f"{pool}'s worker did not run expert[{domain}]"
        for other, text in logs.items():
            if other != pool:
                assert str(child.id) not in text, f"{other}'s worker ran expert[{domain}]"
    assert len({c.work_pool_name for c in children.values()}) == len(children)


def test_heavy_stages_run_on_their_pool_not_the_control_pool(completed: PipelineRun) -> None:
    run = completed
    stages = _children(run, "stage")
    logs = {pool: (run.deployed.cluster.logs / f"worker-{pool}.log").read_text()
            for pool in (CONTROL_POOL, *EXPERT_POOLS)}
    for stage, child in stages.items():
        assert child.state.is_completed(), (stage, child.state)
        assert child.work_pool_name == STAGE_POOL, (stage, child.work_pool_name)
        assert child.deployment_id == run.deployed.deployments[f"btx-stage/{STAGE_POOL}"].id
        assert child.idempotency_key == f"{run.flow_run.id}:stage:{stage}"
        assert str(child.id) in logs[STAGE_POOL], f"{STAGE_POOL}'s worker did not run {stage}"
        assert str(child.id) not in logs[CONTROL_POOL], f"the control pool's worker ran {stage}"
        # The stage's own task ran in that child flow run, not in the parent.
        ran = [re.sub(r"-[0-9a-f]{3}$", "", t.name) for t in _task_runs(run, child.id) if t.run_count]
        assert ran == [stage], (stage, ran)
    # The parent ran no stage itself: its tasks waited on the children (and wrote the report).
    from flows.tasks import STAGE_TASKS

    stage_keys = {task.task_key for task in STAGE_TASKS.values()}
    in_parent = {t.name for t in _task_runs(run, run.flow_run.id) if t.task_key in stage_keys}
    assert not in_parent, in_parent
    waited = {t.name for t in _task_runs(run, run.flow_run.id) if t.task_key.startswith("stage_on_pool_task")}
    assert waited == set(HEAVY_STAGES), waited


def test_failed_branch_retried_and_resumed_from_its_checkpoint(completed: PipelineRun) -> None:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    run = completed
    marker = run.deployed.fault_marker
    assert marker.exists(), "the fault hook never fired"
    assert f"expert[{FAULTY}]" in marker.read_text()
    child = _children(run)[FAULTY]
    (branch,) = [t for t in _task_runs(run, child.id) if t.name == f"expert[{FAULTY}]"]
    with run.deployed.cluster.client() as client:
        states = client.read_task_run_states(branch.id)
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[child.id])))
    history = [s.name for s in sorted(states, key=lambda s: s.timestamp)]
    assert branch.run_count == 2, (branch.run_count, history)
    assert "AwaitingRetry" in history and history[-1] == "Completed", history
    text = "\n".join(log.message for log in logs)
    assert "injected fault" in text, text[-3000:]
    # Resumed from a checkpoint, not from step 0: the training log says from which step.
    steps = [int(m) for m in re.findall(r"resum\w* from step (\d+)", text)]
    every = run.config["expert_training"]["checkpoint_every"]
    assert steps and all(0 < s < run.config["expert_training"]["steps"] and s % every == 0
                         for s in steps), text[-3000:]


def test_store_records_the_resume(completed: PipelineRun) -> None:
    """The finished expert's manifest in S3 says the same as the API: trained on from a checkpoint."""
    from btx_core.config.schema import BTXConfig
    from btx_core.store import layout
    from btx_core.store.core import Store
    from tests.prefect_harness import S3_KEY_ID, S3_SECRET

    run = completed
    config = BTXConfig.model_validate(run.config)
    # Explicit options, not the environment: fsspec caches filesystems by their arguments, and
    # other tests of this session may have one for another S3 endpoint.
    store = Store(config.store, {"key": S3_KEY_ID, "secret": S3_SECRET,
                                 "client_kwargs": {"endpoint_url": run.deployed.cluster.s3_endpoint}})
    metrics = {d: store.read_manifest(layout.expert_model(config.run_root, d)).metrics for d in DOMAIN_POOLS}
    assert metrics[FAULTY]["resumed_from_step"] > 0, metrics[FAULTY]
    for domain in HEALTHY:
        assert metrics[domain]["resumed_from_step"] == 0, metrics[domain]


def test_other_branches_ran_exactly_once(completed: PipelineRun) -> None:
    run = completed
    children = _children(run)
    with run.deployed.cluster.client() as client:
        for domain in HEALTHY:
            child = children[domain]
            assert child.run_count == 1, (domain, child.run_count)
            history = _state_types(client.read_flow_run_states(child.id))
            assert history.count("RUNNING") == 1 and "FAILED" not in history, (domain, history)
            for task_run in _task_runs(run, child.id):
                assert task_run.run_count == 1, (domain, task_run.name, task_run.run_count)
        # The failure stayed inside its branch: no flow-level retry anywhere.
        assert children[FAULTY].run_count == 1
        assert client.read_flow_run(run.flow_run.id).run_count == 1
    # In the parent, every task that ran (the stages; run_deployment's bookkeeping runs never run)
    # ran once: the branch's failure was retried inside its own flow run.
    ran = [t for t in _task_runs(run, run.flow_run.id) if t.run_count]
    assert {t.name for t in ran} >= {f"expert[{d}]" for d in DOMAIN_POOLS}
    for task_run in ran:
        assert task_run.run_count == 1, (task_run.name, task_run.run_count)


def test_kubernetes_pools_render_gpu_jobs(prefect_cluster) -> None:
    """`infra/work-pools.sh kubernetes`: the server accepts the job templates (it checks that every
    placeholder is a declared variable), they keep everything of prefect-kubernetes' own default
    template, and its worker renders them into Jobs with the image asked for, GPUs for the
    expert pools only, and per-deployment overrides."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from prefect_kubernetes.worker import KubernetesWorker

    from tests.prefect_harness import REPO
    from tests.support.kubernetes import render_job

    cluster = prefect_cluster
    image = "registry.example.com/btx-worker:1.2.3"
    env = cluster.env(BTX_POOL_PREFIX="k8s-check", BTX_IMAGE=image,
                      PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "infra/work-pools.sh", "kubernetes"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    with cluster.client() as client:
        pools = {p.name: p for p in client.read_work_pools() if p.name.startswith("k8s-check-")}
    assert set(pools) == {"k8s-check-control", "k8s-check-experts", "k8s-check-experts-2"}
    # The JSON in git keeps its default image; the script only fills in BTX_IMAGE.
    assert '"default": "btx-worker:latest"' in (REPO / "infra/kubernetes/gpu-job-template.json").read_text()

    upstream = KubernetesWorker.get_default_base_job_template()
    for name, pool in pools.items():
        template = pool.base_job_template
        assert pool.type == "kubernetes"
        assert set(upstream["variables"]["properties"]) <= set(template["variables"]["properties"])
        assert set(upstream["job_configuration"]) == set(template["job_configuration"])
        job = render_job(template, {"env": {"EXTRA": "1"}})
        assert "{{" not in json.dumps(job), job  # every placeholder filled in or dropped
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == image
        assert job["metadata"]["namespace"] == "btx"  # BTX_NAMESPACE's default
        assert container["args"] == ["python", "-m", "flows.pod"]  # the kubelet's SIGTERM reaches the flow (flows/pod.py)
        assert {"name": "EXTRA", "value": "1"} in container["env"]
        assert container["envFrom"] == [{"secretRef": {"name": "btx-store", "optional": False}}]
        assert {"name": "scratch", "mountPath": "/scratch"} in container["volumeMounts"]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        if name == "k8s-check-control":
            assert gpus is None and "tolerations" not in pod
            continue
        assert gpus == 1 and container["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])
        big = render_job(template, {"gpu_count": 8, "node_selector": {"gpu": "h100"}})
        big_pod = big["spec"]["template"]["spec"]
        assert big_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert big_pod["nodeSelector"] == {"gpu": "h100"}

