"""A real cluster's everyday failures, each reproduced on the deployed cluster of
tests/prefect_harness.py (PostgreSQL-backed Prefect server, process pools and workers, S3 on
127.0.0.1), and each recovered with no human action:

- a child stuck in Pending on a work pool at its concurrency limit (its own slot is the one the
  pool counts): the start deadline fires, naming the pool and the state;
- the kubelet's SIGTERM to a branch mid-training (no cancel): the branch checkpoints at the step
  reached, ends Crashed, is rescheduled by its pipeline and resumes from that step; then the
  pipeline's own process is killed: the automation reschedules it and its new attempt waits on
  the running branch instead of launching another; the other branch runs exactly once;
- the Prefect server, then PostgreSQL, restarted mid-run: the pipeline finishes, no branch is
  trained twice, the run name's slot is not leaked, and the next run of the name starts.

The rules behind each recovery, in isolation: tests/unit/test_recovery_logic.py.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import sys
import time
from datetime import datetime, timezone

import yaml

from tests.integration.test_orchestration import _children, _logs, _pipeline_run
from tests.prefect_harness import EXPERT_POOLS, REPO, descendants, stop_groups, wait_for
from tests.support.recovery import record, seconds_between


def _config(run, name: str, domains: dict[str, str], steps: int = 120, every: int = 10, batch_size: int | None = None,
            **orchestration) -> dict:
    """The shared run's config under a run name of its own, `domains` (name -> pool), no finetune;
    branches long enough to be interrupted (~30 ms a step), a checkpoint every `every` steps, one thread."""
    from btx_core.config.schema import BTXConfig

    from btx_core.config.schema import BTXConfig as Config
    from btx_core.store import layout

    config = copy.deepcopy(run.config)
    ci = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
    # The shared run's pretrained seed, imported from the store (seconds) rather than trained again.
    shared_seed = layout.seed_model(Config.model_validate(run.config).run_root)
    config["seed"] = {"model": shared_seed, "pretrain_data": config["seed"]["pretrain_data"]}
    config["run_name"] = f"{config['run_name']}-{name}"
    config["domains"] = [d for d in ci["domains"] if d["name"] in domains]
    config["finetune"] = None
    config["expert_training"].update(steps=steps, checkpoint_every=every, threads=1)
    if batch_size:
        config["expert_training"]["batch_size"] = batch_size
    config["orchestration"].update(domain_pools=domains, retries=3, retry_delay_s=2.0, **orchestration)
    return BTXConfig.model_validate(config).model_dump(mode="json")


def _store(cluster, config):
    from btx_core.config.schema import BTXConfig
    from btx_core.store.core import Store
    from tests.prefect_harness import S3_KEY_ID, S3_SECRET

    cfg = BTXConfig.model_validate(config)
    return cfg, Store(cfg.store, {"key": S3_KEY_ID, "secret": S3_SECRET,
                                  "client_kwargs": {"endpoint_url": cluster.s3_endpoint}})


def _child(cluster, parent_id, domain: str):
    found = [c for c in _children(cluster, parent_id) if c.parameters.get("domain") == domain]
    assert len(found) <= 1, f"{len(found)} child runs for {domain}: a rescheduled parent launched another"
    return found[0] if found else None


def _states(cluster, flow_run_id) -> list:
    with cluster.client() as client:
        return sorted(client.read_flow_run_states(flow_run_id), key=lambda s: s.timestamp)


def _history(cluster, flow_run_id) -> list[str]:
    return [s.name for s in _states(cluster, flow_run_id)]


def _timeline(cluster, flow_run_id) -> str:
    """Every state of the run with its time and message, for an assertion's message (a list
    would be cut at 240 characters)."""
    states = _states(cluster, flow_run_id)
    start = states[0].timestamp if states else None
    return "\n".join(f"  +{(s.timestamp - start).total_seconds():7.1f} s {s.name}: {s.message or ''}"[:300]
                     for s in states)


def _slot_count(cluster, run_name: str) -> int:
    from flows.pipeline import run_limit_name

    with cluster.client() as client:
        return client.read_global_concurrency_limit_by_name(run_limit_name(run_name)).active_slots


def test_a_pending_child_on_a_pool_at_its_limit_meets_its_deadline(btx_deployed, btx_pipeline_run):
    """A pool of limit 1 whose runs never leave Pending (their command never starts Prefect's
    engine: as an image that cannot be pulled). The pool is full, but only with the child itself:
    the old rule restarted the deadline forever."""
    cluster, pool = btx_deployed.cluster, "btx-stuck"
    btx_deployed.add_expert_pool(pool, limit=1, job_variables={"command": "sleep 600"})
    worker = cluster.start_worker(pool)
    try:
        config = _config(btx_pipeline_run, "stuck", {"math": pool}, start_timeout_s=20)
        run = _pipeline_run(cluster, config)
        final = cluster.wait_flow_run(run.id, 300)
        message = final.state.message or ""
        assert final.state.is_failed(), (final.state, cluster.diagnostics())
        assert f"stuck in Pending on the work pool '{pool}'" in message, message
        assert "start_timeout_s = 20" in message, message
        child = _child(cluster, run.id, "math")
        # Cancelling, then Cancelled once its worker has stopped the process it started
        wait_for(lambda: _history(cluster, child.id)[-1] == "Cancelled", 60, "the child to be Cancelled", 1.0)
        assert "Running" not in _history(cluster, child.id), _history(cluster, child.id)
        pending = next(s.timestamp for s in _states(cluster, child.id) if s.type.value == "PENDING")
        record("a child stuck in Pending on a pool at its limit", test="test_a_pending_child_on_a_pool_at_its_limit",
               fault_to_recovered_s=round((_states(cluster, run.id)[-1].timestamp - pending).total_seconds(), 1),
               recovered="the pipeline fails, naming the pool and the state; the child is cancelled",
               start_timeout_s=20, work_lost="none (nothing had started)")
        with cluster.client() as client:
            assert client.read_work_pool(pool).concurrency_limit == 1
    finally:
        stop_groups({worker.name: worker.proc})
        cluster.services.pop(worker.name, None)


def _first_process(worker, timeout: float = 60) -> int:
    """The process a process worker started for its flow run: here, as in a pod, `python -m
    flows.pod` (the job templates' command), the process the kubelet signals."""
    return wait_for(lambda: next(iter(descendants(worker.proc.pid)), None), timeout, "the flow-run process")


def test_a_killed_pipeline_and_a_sigterm_to_its_branch_recover_by_themselves(btx_deployed, btx_pipeline_run):
    """Two branches on two pools. While the math branch trains, the pipeline's own process is
    SIGKILLed (its control pod lost): the automation of flows/automations.py reschedules the
    pipeline run, and its new attempt waits on the math branch it launched before, launching no
    other. Then the math branch gets a SIGTERM with no cancel, as a drained or preempted pod does
    (to its first process, flows/pod.py, under which run Prefect's supervisor and the flow): it
    checkpoints at the step reached, ends Crashed, and the pipeline reschedules it; it resumes from
    that step. The code branch runs once."""
    cluster, pool = btx_deployed.cluster, "btx-sigterm"
    # The branch's process tree as in a pod: flows/pod.py, Prefect's supervisor, the flow's engine.
    btx_deployed.add_expert_pool(pool, job_variables={"command": f"{sys.executable} -m flows.pod"})
    workers = [cluster.start_worker(pool)]
    try:
        # 2048 tokens a step: the math branch trains for 1-2 minutes, through both faults.
        config = _config(btx_pipeline_run, "sigterm", {"math": pool, "code": EXPERT_POOLS[1]}, steps=300, every=50,
                         batch_size=32)
        cfg, store = _store(cluster, config)
        from btx_core.store import layout

        newest = lambda: (store.latest_checkpoint(layout.expert_checkpoints(cfg.run_root, "math")) or (0, None))[0]  # noqa: E731
        parent = _pipeline_run(cluster, config)
        wait_for(lambda: (c := _child(cluster, parent.id, "math")) and c.state.is_running() and newest() >= 50,
                 400, "the math branch past its first checkpoint", 0.5, cluster.death)

        # 1. The pipeline's process is lost.
        control = cluster.services["worker-btx-control"]
        pipeline_pids = descendants(control.proc.pid)
        assert pipeline_pids, "the control worker runs no pipeline"
        for pid in pipeline_pids:
            os.kill(pid, signal.SIGKILL)
        killed_at = datetime.now(timezone.utc)
        wait_for(lambda: "re-attaching to the children of its earlier attempts" in _logs(cluster, parent.id), 240,
                 "the pipeline run rescheduled by the automation", 1.0, cluster.death)
        wait_for(lambda: "is Running: waiting on it again" in _logs(cluster, parent.id), 120,
                 "its new attempt to wait on the running branch", 1.0, cluster.death)
        assert _child(cluster, parent.id, "math").state.is_running(), "the branch stopped with its pipeline"

        # 2. The branch's pod gets the kubelet's SIGTERM.
        os.kill(_first_process(workers[0]), signal.SIGTERM)
        sigterm_at = datetime.now(timezone.utc)
        child = wait_for(lambda: (c := _child(cluster, parent.id, "math")).state.is_crashed() and c, 120,
                         "the branch to end Crashed", 0.5, cluster.death)
        # The worker's copy of the flow's output: a process ending on SIGTERM may not ship its last
        # lines to the API.
        output = lambda: (cluster.logs / f"worker-{pool}.log").read_text(errors="replace")  # noqa: E731
        stopped = wait_for(lambda: [int(s) for s in re.findall(r"training stopped at step (\d+)", output())],
                           60, "the branch's output", 1.0)
        assert newest() == stopped[-1] > 50, (stopped, newest())  # a checkpoint of the step reached

        final = cluster.wait_flow_run(parent.id, 600)
        assert final.state.is_completed(), (final.state, _history(cluster, parent.id), cluster.diagnostics())
        pipeline = _history(cluster, parent.id)
        # one crash (its worker may report it twice), one reschedule, two attempts
        reports = _crash_report_gap(cluster.logs / "worker-btx-control.log", parent.id)
        timeline = f"the pipeline's states ({reports}):\n{_timeline(cluster, parent.id)}"
        assert "Crashed" in pipeline and pipeline.count("AwaitingRetry") == 1, timeline
        assert pipeline.count("Running") == 2, timeline
        math, code = _child(cluster, parent.id, "math"), _child(cluster, parent.id, "code")
        history = _history(cluster, math.id)
        assert "Crashed" in history and history.count("AwaitingRetry") == 1 and history[-1] == "Completed", \
            f"the math branch's states:\n{_timeline(cluster, math.id)}"
        assert f"resuming from step {stopped[-1]} " in output(), output()[-3000:]
        assert store.verify(layout.expert_model(cfg.run_root, "math")).metrics["resumed_from_step"] == stopped[-1]
        assert code.run_count == 1 and _history(cluster, code.id).count("Running") == 1, _history(cluster, code.id)
        test = "test_a_killed_pipeline_and_a_sigterm_to_its_branch_recover_by_themselves"
        branch, run = _states(cluster, math.id), _states(cluster, parent.id)
        record("the pipeline's own process killed (its control pod lost)", test=test,
               fault_to_crashed_s=seconds_between(run, killed_at, "Crashed"),
               fault_to_recovered_s=seconds_between(run, killed_at, "AwaitingRetry", "Running"),
               recovered="rescheduled by the automation (20 s to settle here, 30 s by default); re-attached to its running branch",
               crash_reports=reports,
               work_lost="none: the branch trained on (one child run per domain)")
        record("the kubelet's SIGTERM to a branch (drain, spot reclaim, eviction)", test=test,
               fault_to_crashed_s=seconds_between(branch, sigterm_at, "Crashed"),
               fault_to_recovered_s=seconds_between(branch, sigterm_at, "AwaitingRetry", "Running"),
               recovered="rescheduled by its pipeline; resumed from the step the SIGTERM reached",
               work_lost=f"none: checkpoint at step {stopped[-1]}, resumed from it", other_branch_runs=code.run_count)
        assert _slot_count(cluster, config["run_name"]) == 0
        wait_for(lambda: not any(map(_alive_pid, pipeline_pids)), 30, "the killed processes to be gone")
        assert child.id == math.id
    finally:
        stop_groups({w.name: w.proc for w in workers})
        for w in workers:
            cluster.services.pop(w.name, None)


def _crash_report_gap(worker_log, flow_run_id) -> str:
    """The process worker's reports of the run as Crashed that the server took, and the seconds
    between the first and the last. A late report (after the automation rescheduled the run)
    is taken and crashes the run again; one that comes while the run is still Crashed is
    refused, silently."""
    times = [datetime.strptime(t, "%H:%M:%S.%f") for t in
             re.findall(rf"^(\d\d:\d\d:\d\d\.\d+) .*Reported flow run '{flow_run_id}' as crashed",
                        worker_log.read_text(errors="replace"), re.M)]
    gap = (times[-1] - times[0]).total_seconds() if times else 0.0
    return f"{len(times)} crash report(s) taken, {gap:.1f} s apart"


def _alive_pid(pid: int) -> bool:
    from tests.prefect_harness import _alive

    return _alive(pid)


def test_restarted_server_and_database_neither_stop_the_pipeline_nor_leak_its_slot(btx_deployed, btx_pipeline_run):
    """Mid-run, the Prefect server is stopped and started again (a rolled server pod; Prefect's
    default in-memory lease storage forgets the run name's lease), then PostgreSQL. The pipeline
    rides both out and completes; no branch runs twice; the slot's count is back to 0; and the
    next run of the same name starts (and reuses every stage) instead of being cancelled."""
    cluster = btx_deployed.cluster
    config = _config(btx_pipeline_run, "restart", {"knowledge": EXPERT_POOLS[0]}, steps=250, every=50,
                     batch_size=32, on_overlap="cancel")  # 2048 tokens a step: 1-2 minutes of training
    parent = _pipeline_run(cluster, config)
    wait_for(lambda: (c := _child(cluster, parent.id, "knowledge")) and c.state.is_running(), 400,
             "the branch to run", 1.0, cluster.death)
    before = _logs(cluster, child_id := _child(cluster, parent.id, "knowledge").id)
    down = {"server": cluster.restart_server(down_s=10)}
    time.sleep(3)
    down["postgres"] = cluster.restart_postgres(down_s=5)
    with cluster.client() as client:  # both restarts happened while it trained
        assert client.read_flow_run(child_id).state.is_running(), client.read_flow_run(child_id).state
    final = cluster.wait_flow_run(parent.id, 600)
    print("down for", down)
    assert final.state.is_completed(), (final.state, _history(cluster, parent.id), cluster.diagnostics())
    child = _child(cluster, parent.id, "knowledge")
    assert child.run_count == 1 and _history(cluster, child.id).count("Running") == 1, _history(cluster, child.id)
    assert _history(cluster, parent.id).count("Running") == 1, _history(cluster, parent.id)
    assert _slot_count(cluster, config["run_name"]) == 0
    for what, seconds in down.items():
        record(f"the Prefect {'server' if what == 'server' else 'database (PostgreSQL)'} restarted mid-run",
               test="test_restarted_server_and_database_neither_stop_the_pipeline_nor_leak_its_slot",
               fault_to_recovered_s=round(seconds, 1), recovered="the API is back; nothing had stopped",
               work_lost="none: the branch trained on through it (one attempt)")
    assert before and child_id
    nxt = cluster.wait_flow_run(_pipeline_run(cluster, config).id, 300)
    assert nxt.state.is_completed(), (nxt.state, _logs(cluster, nxt.id)[-3000:])
    again = _child(cluster, nxt.id, "knowledge")  # its branch found its output and trained nothing
    assert "already complete (same config and inputs): reused" in _logs(cluster, again.id), _logs(cluster, again.id)

