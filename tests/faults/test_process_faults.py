"""Process-level faults: a branch process killed with SIGKILL, and a Prefect worker killed under a
running branch. Each fault is real (a signal to a real process) and each test asserts that nothing
finished is lost (the run resumes from its newest complete checkpoint) and nothing partial is read
(the resumed checkpoint is a complete one; a killed run leaves no model manifest).
"""

from __future__ import annotations

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
from tests.test_cli_e2e import BTX, btx, seeded, write_config  # noqa: F401 - `seeded` is a fixture

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


@pytest.mark.integration
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
# A Prefect worker killed under a running branch


FAULT_POOL = "btx-faults"
BRANCH = "knowledge"  # a domain the shared pipeline run did not train: a branch from scratch
HEARTBEAT_S = 30  # Prefect's minimum
ZOMBIE_AFTER_S = 40  # no heartbeat (nor final state) for this long: the run is crashed


def _branch_config(run) -> dict:
    """The shared pipeline run's config (its seed is in the store) with one more domain, whose
    branch is long enough to be killed twice."""
    import copy

    from btx_core.config.schema import BTXConfig
    from tests.prefect_harness import REPO

    config = copy.deepcopy(run.config)
    ci = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
    config["domains"].append(next(d for d in ci["domains"] if d["name"] == BRANCH))
    config["expert_training"].update(steps=120, checkpoint_every=10, threads=1)
    BTXConfig.model_validate(config)
    return config


def _zombie_automation(deployment_id):
    """The shipped automation (flows/automations.py), limited to runs of one deployment."""
    from flows.automations import zombie_automation

    return zombie_automation(ZOMBIE_AFTER_S, deployment_id=deployment_id,
                             name=f"crash zombie runs of {deployment_id}")


class _Branch:
    """One `train-expert/btx-faults` flow run, watched through the API and the store."""

    def __init__(self, cluster, config: dict, flow_run_id):
        from btx_core.config.schema import BTXConfig
        from btx_core.store import layout
        from tests.prefect_harness import S3_KEY_ID, S3_SECRET

        self.cluster, self.id = cluster, flow_run_id
        cfg = BTXConfig.model_validate(config)
        # Explicit options: fsspec caches filesystems by arguments, not by environment.
        self.store = Store(cfg.store, {"key": S3_KEY_ID, "secret": S3_SECRET,
                                       "client_kwargs": {"endpoint_url": cluster.s3_endpoint}})
        self.checkpoints = layout.expert_checkpoints(cfg, BRANCH)
        self.model = layout.expert_model(cfg, BRANCH)

    def state(self):
        with self.cluster.client() as client:
            return client.read_flow_run(self.id).state

    def newest_checkpoint(self) -> int:
        return (self.store.latest_checkpoint(self.checkpoints) or (0, None))[0]

    def wait_past(self, step: int, timeout: float = 300) -> int:
        """Wait until the run is Running and has stored a checkpoint newer than `step`."""
        from tests.prefect_harness import wait_for

        def past():
            state = self.state()
            assert not state.is_final(), f"the branch ended {state.type.value} before its fault"
            newest = self.newest_checkpoint()
            return newest if newest > step and state.is_running() else None

        return wait_for(past, timeout, f"a checkpoint past step {step}", 0.2, self.cluster.death)

    def wait_final(self, timeout: float):
        return self.cluster.wait_flow_run(self.id, timeout).state

    def retry(self) -> None:
        """What `prefect flow-run retry` does to a deployment's run (prefect/cli/flow_run.py),
        without a CLI start-up: schedule it again, in place."""
        from prefect.states import Scheduled

        with self.cluster.client() as client:
            result = client.set_flow_run_state(self.id, Scheduled(message="Retried via CLI"), force=True)
        assert result.state is not None and result.state.is_scheduled(), result


def _kill(cluster, worker, rng: random.Random, *, with_flow_run: bool) -> list[int]:
    """SIGKILL the worker's process group at a random moment within 0.3 s; with
    `with_flow_run`, its flow runs too (they run in sessions of their own): the node is gone.
    Returns the flow runs' PIDs."""
    import time

    from tests.prefect_harness import descendants

    time.sleep(rng.uniform(0.0, 0.3))
    cluster.services.pop(worker.name)  # its death is the point, not a reason to give up
    flow_runs = descendants(worker.proc.pid)
    assert flow_runs, "the worker runs no flow run"
    if with_flow_run:  # stopped first, so that none can report its worker's death
        for pid in flow_runs:
            os.kill(pid, signal.SIGSTOP)
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait()
    if with_flow_run:
        for pid in flow_runs:
            os.kill(pid, signal.SIGKILL)
    return flow_runs


def _gone(pids: list[int]) -> bool:
    from tests.prefect_harness import _alive

    return not any(_alive(pid) for pid in pids)


@pytest.mark.integration
def test_killed_worker_crashes_its_branch_and_a_retry_completes_it(btx_deployed, btx_pipeline_run):
    """Two real faults on one `train-expert` flow run, each followed by a retry (as `prefect
    flow-run retry` does it) on a fresh worker: (1) SIGKILL to the worker's process group; (2) SIGKILL to the worker and
    its flow-run process (a lost node). Each time the run is marked Crashed through the API and
    the retry resumes from the newest complete checkpoint; the last one completes the branch."""
    import time

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from tests.prefect_harness import stop_groups, wait_for

    cluster, rng = btx_deployed.cluster, random.Random(FAULT_SEED)
    deployment = btx_deployed.add_expert_pool(FAULT_POOL)
    config = _branch_config(btx_pipeline_run)
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
            run = client.create_flow_run_from_deployment(
                deployment.id, parameters={"config": config, "domain": BRANCH})
        branch, measured, resumes = _Branch(cluster, config, run.id), {}, []

        # 1. The worker is killed; its flow run (in a session of its own) outlives it until its
        # next write to the worker's pipe fails, and then reports itself Crashed.
        branch.wait_past(0)
        leftovers += _kill(cluster, worker, rng, with_flow_run=False)
        killed = time.monotonic()
        worker = cluster.start_worker(FAULT_POOL, **worker_env)  # boots while we wait
        workers.append(worker)
        state = branch.wait_final(180)
        measured["worker killed -> Crashed"] = round(time.monotonic() - killed, 1)
        assert state.is_crashed(), (state, cluster.diagnostics())
        wait_for(lambda: _gone(leftovers), 60, "the orphaned flow run to exit")
        assert not branch.store.is_complete(branch.model)
        resumes.append(branch.newest_checkpoint())
        branch.retry()

        # 2. The node is lost: worker and flow run die at once, and nobody reports. Only the
        # missing heartbeats tell, through the automation.
        branch.wait_past(resumes[-1])
        leftovers += _kill(cluster, worker, rng, with_flow_run=True)
        killed = time.monotonic()
        workers.append(cluster.start_worker(FAULT_POOL, **worker_env))
        time.sleep(3)
        assert branch.state().is_running(), "without heartbeats, nothing marks a dead run"
        state = branch.wait_final(ZOMBIE_AFTER_S + 90)
        measured["node lost -> Crashed"] = round(time.monotonic() - killed, 1)
        assert state.is_crashed() and "heartbeat" in (state.message or ""), state
        assert not branch.store.is_complete(branch.model)
        resumes.append(branch.newest_checkpoint())
        branch.retry()

        state = branch.wait_final(300)
        assert state.is_completed(), (state, cluster.diagnostics())
        with cluster.client() as client:
            history = [s.type.value for s in sorted(client.read_flow_run_states(run.id), key=lambda s: s.timestamp)]
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        print("seconds:", measured, "resumed from:", resumes)
        assert [t for t in history if t in ("CRASHED", "COMPLETED")] == ["CRASHED", "CRASHED", "COMPLETED"], history
        # Each retry trained on from the checkpoint that was newest when it started: the
        # workers' output says so for each attempt (a lost node loses the log lines its flow run
        # had not sent to the API yet), and the API's logs for the last one.
        said = (cluster.logs / f"worker-{FAULT_POOL}.log").read_text(errors="replace")
        assert [int(s) for s in re.findall(r"resuming from step (\d+)", said)] == resumes, said[-3000:]
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
