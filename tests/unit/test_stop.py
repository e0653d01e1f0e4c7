"""SIGTERM and cancel (issue 14, failure 8): training checkpoints at the next step boundary and
stops; the handler lives only while training, only in the main thread; a branch process dies
with its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from btx_core.training.loop import train
from btx_core.training.stop import TrainingStopped, request_stop
from tests.unit.test_train import SETTINGS, DirSink, blocks, pico_llama, weights


def test_sigterm_checkpoints_at_the_next_step_and_the_rerun_resumes_there(tmp_path):
    """SIGTERM at step 5 (checkpoints every 3): a checkpoint at step 5, not only 3, and the rerun
    ends with the weights of an uninterrupted run."""
    data, sink, before = blocks(), DirSink(tmp_path / "ckpt"), signal.getsignal(signal.SIGTERM)

    def kill_at_5(p):
        if p.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingStopped, match=r"stopped at step 5/8 \(SIGTERM\)"):
        train(pico_llama(), data, SETTINGS, checkpoints=sink, on_progress=kill_at_5)
    assert sink.saved == [3, 5]
    assert signal.getsignal(signal.SIGTERM) is before  # restored
    resumed_model, straight = pico_llama(seed=1), pico_llama()
    resumed = train(resumed_model, data, SETTINGS, checkpoints=sink)
    assert resumed.resumed_from == 5
    train(straight, data, SETTINGS)
    for name, tensor in weights(straight).items():
        assert __import__("torch").equal(tensor, weights(resumed_model)[name]), name


def test_a_repeated_sigterm_still_checkpoints_and_a_late_one_is_passed_on(tmp_path, monkeypatch):
    """`btx run` SIGKILLed: each branch gets SIGTERM from its own watchdog and from the reaper, a
    second apart (tests/integration/test_stop.py lost a branch's checkpoint to the second one,
    which killed the process before the step boundary). A SIGTERM within `DUPLICATE_S` of the
    first is the same stop; a later one goes to the previous handler (a person insisting)."""
    from btx_core.training import stop

    passed_on = []
    before = signal.signal(signal.SIGTERM, lambda *_: passed_on.append(time.monotonic()))
    try:
        def twice_at_5(p):
            if p.step == 5:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)

        sink = DirSink(tmp_path / "ckpt")
        with pytest.raises(TrainingStopped, match=r"stopped at step 5/8 \(SIGTERM\)"):
            train(pico_llama(), blocks(), SETTINGS, checkpoints=sink, on_progress=twice_at_5)
        assert sink.saved == [3, 5] and passed_on == []
        monkeypatch.setattr(stop, "DUPLICATE_S", 0.0)
        sink = DirSink(tmp_path / "again")
        with pytest.raises(TrainingStopped, match=r"stopped at step 5/8"):
            train(pico_llama(), blocks(), SETTINGS, checkpoints=sink, on_progress=twice_at_5)
        assert len(passed_on) == 1 and sink.saved == [3, 5]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_training_in_a_thread_stops_on_request_and_leaves_signals_alone(tmp_path):
    sink, seen, out = DirSink(tmp_path / "ckpt"), [], {}
    before = signal.getsignal(signal.SIGTERM)

    def progress(p):
        seen.append(p.step)
        if p.step == 2:
            request_stop("cancelled")
            seen.append(signal.getsignal(signal.SIGTERM) is before)  # no handler from a thread

    def run():
        try:
            train(pico_llama(), blocks(), SETTINGS, checkpoints=sink, on_progress=progress)
        except TrainingStopped as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert "stopped at step 2/8 (cancelled)" in str(out["error"]) and sink.saved == [2]
    assert seen[:3] == [1, 2, True]
    from btx_core.training.stop import clear, stop_requested
    clear()
    assert stop_requested() is None


CHILD = textwrap.dedent("""
    import os, sys, time
    from btx_core.training.stop import die_with_parent, stop_on_sigterm, stop_requested
    die_with_parent(grace_s=5, poll_s=0.1)
    with stop_on_sigterm():  # as while training
        print("ready", flush=True)
        while stop_requested() is None:
            time.sleep(0.05)
        print("stopping:", stop_requested(), flush=True)
        time.sleep(60)  # a step that never ends: the grace period ends the process
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_branch_process_dies_with_its_parent(tmp_path, sig):
    """A parent (standing in for `btx run`) starts a child that calls `die_with_parent`; the parent
    is killed; the child is asked to stop, then ends within its grace period."""
    log = tmp_path / "child.log"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], stdout=open({str(log)!r}, "w"),
                                 start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 60
    while "ready" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    parent.send_signal(sig)
    parent.wait(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), "the child outlived its parent"
    assert "stopping: SIGTERM: its parent process is gone" in log.read_text()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# `btx run` killed: nothing left behind


def _descendants(pid: int) -> dict[int, int]:
    from btx_core.cli.reaper import _descendants as below

    return below(pid)


def re_step(text: str, domain: str) -> int:
    import re

    found = re.findall(rf"expert\[{domain}\].*?(\d+)/4000", text)
    return int(found[-1]) if found else 0


# ---------------------------------------------------------------------------------------------
# A branch under torchrun: torchrun and its ranks die with the process that started it

