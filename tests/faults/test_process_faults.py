"""Process-level faults: a branch process killed with SIGKILL, and a Prefect worker killed under a
running branch. Each fault is real (a signal to a real process) and each test asserts that nothing
finished is lost (the run resumes from its newest complete checkpoint) and nothing partial is read
(the resumed checkpoint is a complete one; a killed run leaves no model manifest).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from btx_core.store.core import Store
from tests.integration.test_cli_e2e import BTX, btx, seeded, write_config  # noqa: F401 - `seeded` is a fixture

# The kill points are random but reproducible; BTX_FAULT_SEED draws others.
FAULT_SEED = int(os.environ.get("BTX_FAULT_SEED", "6"))


# ---------------------------------------------------------------------------------------------
# A branch process killed three times


STEPS, EVERY, KILLS = 160, 10, 3
DOMAIN = "code"


def _expert_config(work: Path, seeded_store: Path, name: str) -> Path:
    """configs/ci.yaml with STEPS expert steps, a checkpoint every EVERY, progress every step (so
    a kill can land on any step), in a store of its own holding the CI seed. One torch thread:
    the same in every run (a sum's order, and so its bits, may change with the thread count),
    and no threads spinning against each other on a loaded machine."""
    store = work / name
    shutil.copytree(seeded_store / "ci" / "seed", store / "ci" / "seed")
    path = write_config(work, store, expert_steps=STEPS, checkpoint_every=EVERY)
    raw = yaml.safe_load(path.read_text())
    raw["expert_training"].update(log_every=1, threads=1)
    path.write_text(yaml.safe_dump(raw))
    return path


def _checkpoints(config: Path) -> str:
    return str(Path(yaml.safe_load(config.read_text())["store"]) / "ci" / "experts" / DOMAIN / "checkpoints")


def _run_and_kill_at(config: Path, cwd: Path, target: int, timeout: float = 300) -> tuple[int, str]:
    """`btx train-expert` as a subprocess, SIGKILLed as soon as its progress bar passes `target`;
    (the step the bar showed, the process's output)."""
    tmp = cwd / "tmp-killed"  # the checkpoint a kill interrupts is staged here, not in /tmp
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1", TMPDIR=str(tmp))
    proc = subprocess.Popen([*BTX, "train-expert", str(config), "--domain", DOMAIN], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    output, shown = b"", 0
    try:
        while chunk := proc.stdout.read1(65536):
            output += chunk
            # tqdm redraws "expert[code]:  27%|##7  | 54/200 [..." in place, with '\r'.
            steps = re.findall(rb"(\d+)/%d \[" % STEPS, output[-4096:])
            shown = int(steps[-1]) if steps else shown
            if shown >= target:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
        proc.stdout.close()
    text = output.decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL and shown >= target, (
        f"train-expert ended with {proc.returncode} before step {target}:\n{text[-3000:]}")
    return shown, text


def _resumed_from(output: str) -> int | None:
    found = set(re.findall(r"resumed from step (\d+)", output))  # the bar's line, and the log's
    assert len(found) <= 1, output[-3000:]
    return int(found.pop()) if found else None


@pytest.mark.slow
def test_expert_killed_three_times_resumes_each_time_and_ends_with_the_uninterrupted_weights(seeded):
    work, seeded_store, _ = seeded
    rng = random.Random(FAULT_SEED)
    killed = _expert_config(work, seeded_store, "faults-killed")
    store = Store(str(Path(yaml.safe_load(killed.read_text())["store"])))
    model = Path(store.root) / "ci" / "experts" / DOMAIN / "model"

    history, newest = [], 0
    for kill in range(KILLS):
        # Past the next checkpoint, so every run adds one (the training loop reports step s+1 only
        # after the checkpoint of step s is stored); and anywhere up to three checkpoints later,
        # so a kill may land mid-step or mid-upload.
        target = rng.randint(newest + EVERY + 1, newest + 4 * EVERY)
        if kill == KILLS - 1:  # on a checkpoint's step: its progress comes just before its save
            target = -(-target // EVERY) * EVERY
        shown, output = _run_and_kill_at(killed, work, target)
        resumed = _resumed_from(output)
        assert resumed == (newest or None), (kill, history, resumed, output[-3000:])
        assert not (model / "_manifest.json").exists(), "a killed run left a model manifest"
        # Nothing partial is offered: the newest checkpoint the store lists is a complete one.
        latest = store.latest_checkpoint(_checkpoints(killed))
        assert latest is not None and latest[0] > newest and latest[0] % EVERY == 0, (latest, history)
        store.verify(latest[1])
        history.append({"target": target, "killed_at_bar_step": shown, "resumed_from": resumed,
                        "newest_checkpoint": latest[0],
                        "half-written": sorted(p.name for p in Path(_checkpoints(killed)).iterdir()
                                               if not (p / "_manifest.json").exists()),
                        "left in TMPDIR": sorted(p.name for p in (work / "tmp-killed").iterdir())})
        newest = latest[0]

    out = btx("train-expert", str(killed), "--domain", DOMAIN, cwd=work)
    assert _resumed_from(out.stdout + out.stderr) == newest, (history, out.stdout + out.stderr)

    reference = _expert_config(work, seeded_store, "faults-reference")
    btx("train-expert", str(reference), "--domain", DOMAIN, cwd=work)
    expected = load_file(Path(yaml.safe_load(reference.read_text())["store"]) / "ci" / "experts" / DOMAIN
                         / "model" / "model.safetensors")
    actual = load_file(model / "model.safetensors")
    assert expected.keys() == actual.keys()
    differ = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not differ, f"weights differ after kills {history}: {differ}"
    manifest = store.read_manifest(str(model))
    assert manifest.metrics["resumed_from_step"] == newest, manifest.metrics
    print("kills:", history)


# ---------------------------------------------------------------------------------------------
# A branch's process killed, then its whole node lost: the pipeline retries it by itself


FAULT_POOL = "btx-faults"
BRANCH = "knowledge"  # a domain the shared pipeline run did not train: a branch from scratch
HEARTBEAT_S = 30  # Prefect's minimum
ZOMBIE_AFTER_S = 40  # no heartbeat (nor final state) for this long: the run is crashed


def _pipeline_config(run) -> dict:
    """The shared pipeline run's config as a pipeline of its own (its own run name, so it writes
    nothing of the shared run's) with one domain on FAULT_POOL, whose branch is long enough to be
    killed twice; no finetune."""
    import copy

    from btx_core.config.schema import BTXConfig
    from tests.prefect_harness import REPO

    config = copy.deepcopy(run.config)
    ci = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
    config["run_name"] = f"{config['run_name']}-faults"
    config["domains"] = [next(d for d in ci["domains"] if d["name"] == BRANCH)]
    config["finetune"] = None
    config["expert_training"].update(steps=120, checkpoint_every=10, threads=1)
    # The default backoff (10 s): a worker re-running the flow run it just lost within a second
    # was seen to kill the new process too (-9). Three retries for two faults: slack for that.
    config["orchestration"].update(domain_pools={BRANCH: FAULT_POOL}, retries=3, retry_delay_s=10.0)
    return BTXConfig.model_validate(config).model_dump(mode="json")


def _zombie_automation(deployment_id):
    """The shipped automation (flows/automations.py), limited to runs of one deployment."""
    from flows.automations import zombie_automation

    return zombie_automation(ZOMBIE_AFTER_S, deployment_ids=[deployment_id],
                             name=f"crash zombie runs of {deployment_id}")


class _Branch:
    """The `train-expert/btx-faults` flow run of a pipeline run, watched through the API and the store."""

    def __init__(self, cluster, config: dict, parent_id):
        from btx_core.config.schema import BTXConfig
        from btx_core.store import layout
        from tests.prefect_harness import S3_KEY_ID, S3_SECRET

        self.cluster, self.parent_id, self.id = cluster, parent_id, None
        cfg = BTXConfig.model_validate(config)
        # Explicit options: fsspec caches filesystems by arguments, not by environment.
        self.store = Store(cfg.store, {"key": S3_KEY_ID, "secret": S3_SECRET,
                                       "client_kwargs": {"endpoint_url": cluster.s3_endpoint}})
        self.checkpoints = layout.expert_checkpoints(cfg.run_root, BRANCH)
        self.model = layout.expert_model(cfg.run_root, BRANCH)

    def run(self):
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        with self.cluster.client() as client:
            if self.id is None:
                children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[self.parent_id])))
                children = [c for c in children if c.parameters.get("domain") == BRANCH]  # not the stages
                if not children:
                    return None
                (child,) = children
                self.id = child.id
            return client.read_flow_run(self.id)

    def newest_checkpoint(self) -> int:
        return (self.store.latest_checkpoint(self.checkpoints) or (0, None))[0]

    def wait_past(self, step: int, run_count: int, timeout: float = 400) -> int:
        """Wait until attempt `run_count` of the run is Running and has stored a checkpoint newer
        than `step`."""
        from tests.prefect_harness import wait_for

        def past():
            run = self.run()
            if run is None:
                return None
            assert not run.state.is_final() or run.state.is_crashed(), f"the branch ended {run.state}"
            newest = self.newest_checkpoint()
            ok = newest > step and run.state.is_running() and run.run_count >= run_count
            return newest if ok else None

        return wait_for(past, timeout, f"attempt {run_count} past step {step}", 0.2, self.cluster.death)

    def wait_crashed(self, timeout: float):
        from tests.prefect_harness import wait_for

        return wait_for(lambda: (r := self.run()).state.is_crashed() and r.state, timeout,
                        "the branch to be marked Crashed", 0.5, self.cluster.death)


def _kill(cluster, worker, rng: random.Random, *, with_worker: bool) -> list[int]:
    """SIGKILL the worker's flow-run processes at a random moment within 0.3 s; with
    `with_worker`, the worker too, first (stopped first, so that no one can report the death):
    the node is gone. Returns the flow runs' PIDs."""
    import time

    from tests.prefect_harness import descendants

    time.sleep(rng.uniform(0.0, 0.3))
    flow_runs = descendants(worker.proc.pid)
    assert flow_runs, "the worker runs no flow run"
    if with_worker:
        cluster.services.pop(worker.name)  # its death is the point, not a reason to give up
        for pid in flow_runs:
            os.kill(pid, signal.SIGSTOP)
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait()
    for pid in flow_runs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return flow_runs


def _now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def restart_timeline(states, kill_times) -> list[dict[str, float]]:
    """For each kill (a wall-clock time, same clock as the server's on 127.0.0.1), seconds from
    it to the child run marked Crashed, rescheduled (AwaitingRetry), and Running again; and the
    backoff the parent chose (the AwaitingRetry's scheduled time minus its own)."""
    ordered = sorted(states, key=lambda s: s.timestamp)
    timeline = []
    for kill in kill_times:
        after = [s for s in ordered if s.timestamp >= kill]
        crashed = next(s for s in after if s.name == "Crashed")
        retry = next(s for s in after if s.name == "AwaitingRetry" and s.timestamp >= crashed.timestamp)
        running = next(s for s in after if s.name == "Running" and s.timestamp >= retry.timestamp)
        since = lambda s: round((s.timestamp - kill).total_seconds(), 1)  # noqa: E731
        backoff = (retry.state_details.scheduled_time - retry.timestamp).total_seconds()
        timeline.append({"crashed_s": since(crashed), "rescheduled_s": since(retry), "running_s": since(running),
                         "backoff_s": round(backoff, 1), "running_minus_backoff_s": round(since(running) - backoff, 1)})
    return timeline


def _gone(pids: list[int]) -> bool:
    from tests.prefect_harness import _alive

    return not any(_alive(pid) for pid in pids)


@pytest.mark.slow
def test_crashed_branch_is_retried_by_the_pipeline_itself(btx_deployed, btx_pipeline_run):
    """Two real faults on the branch of a running pipeline, and no human action: (1) SIGKILL to
    the branch's flow-run process (its worker reports it Crashed); (2) SIGKILL to the worker and
    its flow run at once (a lost node: only the missing heartbeats tell, through the automation
    of flows/automations.py). Each time the pipeline reschedules the same child flow run in place
    (AwaitingRetry), a worker runs it again, and it resumes from the newest complete checkpoint;
    the pipeline completes."""
    import time

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from tests.prefect_harness import stop_groups, wait_for

    cluster, rng = btx_deployed.cluster, random.Random(FAULT_SEED)
    deployment = btx_deployed.add_expert_pool(FAULT_POOL)
    config = _pipeline_config(btx_pipeline_run)
    # Heartbeats every 30 s (3.9.1 defaults to 180) so that the automation may wait only 40 s.
    worker_env = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
    with cluster.client() as client:
        automation_id = client.create_automation(_zombie_automation(deployment.id))
    leftovers: list[int] = []
    workers = []
    try:
        worker = cluster.start_worker(FAULT_POOL, **worker_env)
        workers.append(worker)
        with cluster.client() as client:
            pipeline = client.create_flow_run_from_deployment(
                client.read_deployment_by_name("btx-pipeline/btx").id, parameters={"config": config})
        branch, measured, resumes = _Branch(cluster, config, pipeline.id), {}, []

        # 1. The branch's process is killed; its worker reports it Crashed.
        branch.wait_past(0, run_count=1)
        leftovers += _kill(cluster, worker, rng, with_worker=False)
        killed, kill_times = time.monotonic(), [_now()]
        branch.wait_crashed(120)
        resumes.append(branch.newest_checkpoint())
        assert not branch.store.is_complete(branch.model)

        # 2. The node is lost: worker and flow run die at once, and nobody reports.
        step = branch.wait_past(resumes[-1], run_count=branch.run().run_count + 1)
        measured["process killed -> training again"] = round(time.monotonic() - killed, 1)
        assert step > resumes[-1]
        leftovers += _kill(cluster, worker, rng, with_worker=True)
        killed = time.monotonic()
        kill_times.append(_now())
        worker = cluster.start_worker(FAULT_POOL, **worker_env)
        workers.append(worker)
        time.sleep(3)
        assert branch.run().state.is_running(), "without heartbeats, nothing marks a dead run"
        branch.wait_crashed(ZOMBIE_AFTER_S + 90)
        resumes.append(branch.newest_checkpoint())
        branch.wait_past(resumes[-1], run_count=branch.run().run_count + 1)
        measured["node lost -> training again"] = round(time.monotonic() - killed, 1)

        final = cluster.wait_flow_run(pipeline.id, 600)
        assert final.state.is_completed(), (final.state, cluster.diagnostics())
        wait_for(lambda: _gone(leftovers), 60, "the killed flow runs to be gone")
        child = branch.run()
        with cluster.client() as client:
            history = [s.name for s in sorted(client.read_flow_run_states(child.id), key=lambda s: s.timestamp)]
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[child.id])))
            parent_logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[pipeline.id])))
        print("seconds:", measured, "resumed from:", resumes, "history:", history)
        with cluster.client() as client:
            timeline = restart_timeline(client.read_flow_run_states(child.id), kill_times)
        print("from each kill to the restart:", timeline)
        if os.environ.get("BTX_BENCH_OUT"):  # bench/crash_restart.py collects these
            with open(os.environ["BTX_BENCH_OUT"], "a") as out:
                out.write(json.dumps({"faults": ["process killed", "node lost"], "timeline": timeline,
                                      "heartbeat_s": HEARTBEAT_S, "zombie_after_s": ZOMBIE_AFTER_S}) + "\n")
        crashes = history.count("Crashed")
        assert 2 <= crashes <= 3 and history[-1] == "Completed", history  # 3: the kernel killed one more
        assert history.count("AwaitingRetry") == crashes, history  # each crash rescheduled, by the pipeline
        said = "\n".join(log.message for log in parent_logs)
        assert said.count("rescheduling it in place") == crashes, said[-3000:]
        # Each attempt trained on from the checkpoint that was newest when it started: the
        # worker's output says so (a lost node loses the log lines its flow run had not sent to
        # the API yet), and the API's logs for the last one.
        output = "".join((cluster.logs / f"worker-{FAULT_POOL}.log").read_text(errors="replace"))
        resumed = [int(s) for s in re.findall(r"resuming from step (\d+)", output)]
        assert resumed[0] == resumes[0] and resumed[-1] == resumes[-1], (resumed, resumes, output[-3000:])
        text = "\n".join(log.message for log in logs)
        assert f"resuming from step {resumes[-1]} " in text, text[-3000:]
        manifest = branch.store.verify(branch.model)
        assert manifest.metrics["resumed_from_step"] == resumes[-1] > resumes[0] > 0, (manifest.metrics, resumes)
    finally:
        with cluster.client() as client:
            client.delete_automation(automation_id)
        stop_groups({f"{w.name} #{i}": w.proc for i, w in enumerate(workers)})
        for worker in workers:
            if cluster.services.get(worker.name) is worker:
                cluster.services.pop(worker.name)
        for pid in leftovers:
            if not _gone([pid]):
                os.kill(pid, signal.SIGKILL)

