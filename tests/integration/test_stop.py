"""The integration tests of tests/unit/test_stop.py, which holds their helpers and fixtures."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.integration.test_cli_e2e import seeded  # noqa: F401 - a fixture
from tests.unit.test_stop import _descendants, re_step


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGKILL],
                         ids=["SIGTERM", "SIGKILL"])
def test_killed_btx_run_leaves_no_process_behind(seeded, tmp_path, sig):
    """`btx run` (embedded Prefect) on two domains, each branch in a process of its own, killed
    mid-training: every process it started (branches, Prefect's temporary server) is gone within
    the bound, and each branch left a checkpoint at the step it reached (SIGTERM), not only at
    its last periodic one."""
    import shutil

    import yaml

    from btx_core.cli.reaper import _running
    from tests.integration.test_cli_e2e import BTX, write_config

    work, seeded_store, _ = seeded
    store = tmp_path / "store"
    shutil.copytree(seeded_store / "ci" / "seed", store / "ci" / "seed")
    config = write_config(tmp_path, store, expert_steps=4000, checkpoint_every=1000)
    raw = yaml.safe_load(config.read_text())
    raw["domains"] = [d for d in raw["domains"] if d["name"] in ("math", "code")]
    raw["expert_training"].update(log_every=1, keep_checkpoints=5)
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "btx-run.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    with open(out, "wb") as sink:
        proc = subprocess.Popen([*BTX, "run", str(config)], cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
                                env=dict(env, OMP_NUM_THREADS="1", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180"),
                                start_new_session=True)
    try:
        # Both branches training: each has written its first checkpoint... at step 1000 would take
        # long; instead wait for both progress bars to pass step 20.
        def training() -> bool:
            text = out.read_text(errors="replace")
            return all(re_step(text, d) >= 20 for d in ("math", "code"))

        deadline = time.monotonic() + 300
        while not training():
            assert proc.poll() is None, out.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, out.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        started = _descendants(proc.pid)
        assert len(started) >= 3, started  # two branches and the temporary API server at least
        proc.send_signal(sig)
        killed = time.monotonic()
        proc.wait(120)
        deadline = killed + 90
        while any(_running(p, s) for p, s in started.items()) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [p for p, s in started.items() if _running(p, s)]
        assert not left, (left, out.read_text(errors="replace")[-3000:])
        took = time.monotonic() - killed
        print(f"{sig.name}: {len(started)} processes gone {took:.1f} s after the signal")
        for domain in ("math", "code"):
            steps = sorted(int(p.name.split("-")[-1]) for p in
                           (store / "ci" / "experts" / domain / "checkpoints").glob("step-*")
                           if (p / "_manifest.json").is_file())
            assert steps and 20 <= steps[-1] < 1000, (domain, steps)  # the step reached, not a periodic one
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_torchrun_branch_dies_with_its_parent(seeded, tmp_path, sig):
    """A parent (standing in for a worker's flow-run process) trains a branch on two gloo
    processes through `train_expert_torchrun`, as flows/expert.py does; the parent is killed
    mid-training: torchrun (in a session of its own, so no process-group signal reaches it) and
    both ranks are gone within the bound, and the ranks checkpointed at the step they reached."""
    import shutil

    import yaml

    from btx_core.cli.reaper import _running
    from tests.integration.test_cli_e2e import write_config

    work, seeded_store, _ = seeded
    store = tmp_path / "store"
    shutil.copytree(seeded_store / "ci" / "seed", store / "ci" / "seed")
    config = write_config(tmp_path, store, expert_steps=4000, checkpoint_every=1000)
    raw = yaml.safe_load(config.read_text())
    raw["expert_training"].update(batch_size=2, nproc_per_node=2, log_every=1, keep_checkpoints=5)
    config.write_text(yaml.safe_dump(raw))
    log = tmp_path / "parent.log"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from btx_core.config.load import load_config
        from btx_core.stages.branch import train_expert_torchrun

        def show(progress):
            print("step", progress.step, flush=True)

        train_expert_torchrun(load_config({str(config)!r}), "math", 2, on_progress=show, poll_s=0.2)
    """)], stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"})
    started: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 240
        while not any(int(s) >= 10 for s in re.findall(r"step (\d+)", log.read_text())):
            assert parent.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        started = _descendants(parent.pid)
        assert len(started) >= 3, started  # torchrun and its two ranks
        parent.send_signal(sig)
        parent.wait(30)
        killed = time.monotonic()
        while any(_running(p, s) for p, s in started.items()) and time.monotonic() < killed + 90:
            time.sleep(0.2)
        left = [p for p, s in started.items() if _running(p, s)]
        assert not left, (left, log.read_text()[-3000:])
        print(f"{sig.name}: torchrun and its ranks gone {time.monotonic() - killed:.1f} s after the parent")
        steps = sorted(int(p.name.split("-")[-1]) for p in
                       (store / "ci" / "experts" / "math" / "checkpoints").glob("step-*")
                       if (p / "_manifest.json").is_file())
        assert steps and 10 <= steps[-1] < 1000, steps  # the step reached, not a periodic one
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid, since in started.items():
            if _running(pid, since):
                os.kill(pid, signal.SIGKILL)

