"""The pipeline under orchestration faults, on the deployed cluster of tests/prefect_harness.py
(PostgreSQL-backed Prefect server, process pools and workers on 127.0.0.1):
- a branch whose work pool has no worker: the parent cancels it and fails within
  `orchestration.start_timeout_s`, naming the pool (issue 14, failure 1);
- the lost-node automation: scoped to btx's runs, waiting states expected, kept up to date
  (failure 9).
The crashed branch retried by the pipeline itself (failure 2) is in tests/faults/test_process_faults.py.
"""

from __future__ import annotations

import contextlib
import copy
import time

IDLE_POOL = "btx-idle"  # a pool with a deployment and no worker
START_TIMEOUT_S = 20.0


def _pipeline_run(cluster, config: dict):
    with cluster.client() as client:
        deployment = client.read_deployment_by_name("btx-pipeline/btx")
        return client.create_flow_run_from_deployment(deployment.id, parameters={"config": config})


def _children(cluster, parent_id, branches_only: bool = True) -> list:
    """The parent's child flow runs: its branches (or with the stages on their pool too)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with cluster.client() as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
    return [c for c in children if "domain" in c.parameters or not branches_only]


def test_branch_on_a_pool_without_worker_fails_the_parent_within_the_deadline(btx_deployed, btx_pipeline_run):
    """The shared run's config (its seed is in the store) with one domain, routed to a pool that
    no worker polls: the parent gives up after the deadline, says why, and cancels the child so
    that a worker that comes later does not train it unwatched."""
    from btx_core.config.schema import BTXConfig

    cluster = btx_deployed.cluster
    btx_deployed.add_expert_pool(IDLE_POOL)
    config = copy.deepcopy(btx_pipeline_run.config)
    config["domains"] = [d for d in config["domains"] if d["name"] == "math"]
    config["orchestration"].update(domain_pools={"math": IDLE_POOL}, start_timeout_s=START_TIMEOUT_S)
    BTXConfig.model_validate(config)
    run = _pipeline_run(cluster, config)
    final = cluster.wait_flow_run(run.id, 300)
    assert final.state.is_failed(), (final.state, cluster.diagnostics())
    message = final.state.message or ""
    assert f"no worker is polling the work pool '{IDLE_POOL}'" in message, message
    assert "start_timeout_s = 20" in message, message
    (child,) = _children(cluster, run.id)
    assert child.work_pool_name == IDLE_POOL
    assert child.state.is_cancelled(), child.state
    with cluster.client() as client:
        states = sorted(client.read_flow_run_states(child.id), key=lambda s: s.timestamp)
    waited = (states[-1].timestamp - states[0].timestamp).total_seconds()
    # The deadline, plus a poll of the parent (5 s) and the API's latency on a loaded machine.
    assert START_TIMEOUT_S <= waited <= START_TIMEOUT_S + 20, ([s.name for s in states], waited)
    assert states[-1].name == "Cancelled" and "Running" not in [s.name for s in states], states


def test_automations_are_scoped_to_this_install_and_follow_their_settings(btx_deployed) -> None:
    """flows/automations.py: the zombie automation covers only the deployments of infra/prefect.yaml
    (not every `btx`-tagged run on the server), never a run waiting in AwaitingRetry or Pending;
    the restart automation only the pipeline's; `ensure` updates them when their settings change,
    and fails loudly (non-zero, saying why) when it cannot work (failure 7)."""
    import subprocess
    import sys

    from flows.automations import RESTART, ZOMBIES, install_deployments
    from tests.prefect_harness import REPO

    cluster = btx_deployed.cluster

    def ensure(*args: str, ok: bool = True) -> str:
        done = subprocess.run([sys.executable, "-m", "flows.automations", *args], cwd=REPO,
                              env=cluster.env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
        assert (done.returncode == 0) == ok, done.stdout + done.stderr
        return done.stdout + done.stderr

    assert "up to date" in ensure("--within", "300", "--settle", "20")  # the harness made them after the deploy
    assert f"{ZOMBIES}: updated" in ensure("--within", "240", "--settle", "20")
    ids = {n: btx_deployed.deployments[n].id for n in install_deployments()}
    with cluster.client() as client:
        (zombies,) = client.read_automations_by_name(ZOMBIES)
        (restart,) = client.read_automations_by_name(RESTART)
    assert zombies.trigger.within.total_seconds() == 240
    related = zombies.trigger.match_related.model_dump()
    assert sorted(related["prefect.resource.id"]) == sorted(f"prefect.deployment.{i}" for i in ids.values()), related
    assert {"prefect.flow-run.AwaitingRetry", "prefect.flow-run.Pending", "prefect.flow-run.Completed"} <= zombies.trigger.expect
    assert restart.trigger.match_related.model_dump()["prefect.resource.id"] == [
        f"prefect.deployment.{ids['btx-pipeline/btx']}"]
    assert restart.actions[0].state.value == "SCHEDULED" and restart.actions[0].name == "AwaitingRetry"
    said = ensure("--deployment", "btx-pipeline/not-deployed", ok=False)
    assert "btx-pipeline/not-deployed not found on the server" in said and "prefect deploy" in said, said
    ensure("--within", "300", "--settle", "20")


def _logs(cluster, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with cluster.client() as client:
        return "\n".join(log.message for log in client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))


def test_one_pipeline_run_per_run_name_and_a_dead_holder_blocks_it_one_lease_at_most(btx_deployed, btx_pipeline_run):
    """While a live run of the name holds its slot (here a flow run made by the test, tagged and
    holding a lease as a pipeline run does), a new pipeline run is cancelled (`on_overlap:
    cancel`) or waits (`queue`) without launching anything. The holder then dies without
    releasing the slot (Crashed, its lease left to expire): the waiting run starts within about
    one lease (`run_slot_lease_s`), and its slot is given back when it ends (failure 3)."""
    from prefect import flow
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.states import Cancelling, Crashed, Running

    from flows.pipeline import run_limit_name
    from flows.progress import artifact_key
    from flows.run_slot import LEASE_TAG, slot_tags
    from tests.prefect_harness import wait_for

    @flow(name="another-pipeline-run")
    def holder_flow():
        pass

    cluster, lease_s = btx_deployed.cluster, 60
    config = copy.deepcopy(btx_pipeline_run.config)
    config["orchestration"]["run_slot_lease_s"] = lease_s
    name = run_limit_name(config["run_name"])
    with cluster.client() as client:
        with contextlib.suppress(ObjectAlreadyExists):  # the shared run made it
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        lease = client.increment_concurrency_slots_with_lease(names=[name], slots=1, mode="concurrency",
                                                              lease_duration=lease_s).json()["lease_id"]
        holder = client.create_flow_run(holder_flow, state=Running(), tags=[
            *slot_tags(artifact_key(config["run_name"])), f"{LEASE_TAG}{lease}"])
    config["orchestration"]["on_overlap"] = "cancel"
    cancelled = cluster.wait_flow_run(_pipeline_run(cluster, config).id, 180)
    assert cancelled.state.is_cancelled(), cancelled.state
    assert "another run of" in (cancelled.state.message or ""), cancelled.state

    config["orchestration"]["on_overlap"] = "queue"
    queued = _pipeline_run(cluster, config)
    wait_for(lambda: f"flow run {holder.id} of this run name holds it" in _logs(cluster, queued.id), 180,
             "the run to queue", 1.0, cluster.death)
    time.sleep(5)
    with cluster.client() as client:
        assert client.read_flow_run(queued.id).state.is_running()
        assert not _children(cluster, queued.id, branches_only=False), "a queued run launched stages"
        client.set_flow_run_state(holder.id, Crashed(message="SIGKILLed by the test"), force=True)
    died = time.monotonic()
    wait_for(lambda: _children(cluster, queued.id, branches_only=False), lease_s + 90, "the queued run to start",
             1.0, cluster.death)
    waited = time.monotonic() - died
    assert waited <= lease_s + 60, waited  # one lease, the server's expiry loop, a poll
    # It runs as any run (test_flows_distributed.py completes one): stop it here, as a user would.
    with cluster.client() as client:
        client.set_flow_run_state(queued.id, Cancelling(message="stopped by the test"), force=True)
    assert cluster.wait_flow_run(queued.id, 120).state.is_cancelled()
    from tests.support.recovery import record

    record("a run holding the run name's slot died without releasing it", test="test_one_pipeline_run_per_run_name_"
           "and_a_dead_holder_blocks_it_one_lease_at_most", fault_to_recovered_s=round(waited, 1),
           recovered=f"the next run of the name starts (run_slot_lease_s = {lease_s})", work_lost="none")
    def free() -> bool:  # the cancelled run gave its slot back on its way out
        with cluster.client() as client:
            return client.read_global_concurrency_limit_by_name(name).active_slots == 0

    wait_for(free, 60, "the cancelled run to give its slot back", 1.0)


def test_deployed_pull_steps_read_the_code_dir_when_a_run_starts(btx_deployed) -> None:
    """`prefect deploy` ran with BTX_CODE_DIR set (tests/prefect_harness.py): none of the stored
    pull steps holds that path; each resolves it from the worker's environment at run time
    (issue 14, failure 6). The runs of the shared pipeline prove that the steps work."""
    import json

    from tests.prefect_harness import REPO

    for name, deployment in btx_deployed.deployments.items():
        steps = json.dumps(deployment.pull_steps)
        assert str(REPO) not in steps, (name, steps)
        assert "{{ code_dir.stdout }}" in steps, (name, steps)


def test_expert_process_pools_run_one_branch_at_a_time(btx_deployed) -> None:
    """infra/work-pools.sh process: one flow run at a time per expert pool (one GPU per worker),
    the control pool unlimited (the pipeline and its MiX run there together) (failure 3)."""
    from tests.prefect_harness import CONTROL_POOL, EXPERT_POOLS

    with btx_deployed.cluster.client() as client:
        assert client.read_work_pool(CONTROL_POOL).concurrency_limit is None
        for pool in EXPERT_POOLS:
            assert client.read_work_pool(pool).concurrency_limit == 1, pool


def test_cancel_from_the_api_checkpoints_at_the_step_reached(btx_deployed, btx_pipeline_run) -> None:
    """A branch cancelled from the API mid-training (its worker sends SIGTERM) writes a checkpoint
    at the step it reached, not only the last periodic one, and ends Cancelled (failure 8)."""
    import re

    from btx_core.config.schema import BTXConfig
    from btx_core.store import layout
    from btx_core.store.core import Store
    from tests.prefect_harness import EXPERT_POOLS, REPO, S3_KEY_ID, S3_SECRET, wait_for

    cluster, every = btx_deployed.cluster, 25
    config = copy.deepcopy(btx_pipeline_run.config)
    ci = __import__("yaml").safe_load((REPO / "configs" / "ci.yaml").read_text())
    config["domains"].append(next(d for d in ci["domains"] if d["name"] == "knowledge"))
    config["expert_training"].update(steps=2000, checkpoint_every=every, threads=1)
    cfg = BTXConfig.model_validate(config)
    store = Store(cfg.store, {"key": S3_KEY_ID, "secret": S3_SECRET,
                              "client_kwargs": {"endpoint_url": cluster.s3_endpoint}})
    prefix = layout.expert_checkpoints(cfg.run_root, "knowledge")
    with cluster.client() as client:
        deployment = btx_deployed.deployments[f"train-expert/{EXPERT_POOLS[0]}"]
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"config": config,
                                                                                "domain": "knowledge"})
    newest = lambda: (store.latest_checkpoint(prefix) or (0, None))[0]  # noqa: E731
    wait_for(lambda: newest() >= every, 400, "the first periodic checkpoint", 0.5, cluster.death)
    from prefect.states import Cancelling

    with cluster.client() as client:
        client.set_flow_run_state(run.id, Cancelling(message="cancelled by the test"), force=True)
    final = cluster.wait_flow_run(run.id, 180)
    assert final.state.is_cancelled(), final.state
    said = _logs(cluster, run.id) + (cluster.logs / f"worker-{EXPERT_POOLS[0]}.log").read_text(errors="replace")
    stopped = [int(s) for s in re.findall(r"training stopped at step (\d+)", said)]
    assert stopped and stopped[-1] > every, said[-3000:]
    assert newest() == stopped[-1], (newest(), stopped)  # the checkpoint of the step reached

