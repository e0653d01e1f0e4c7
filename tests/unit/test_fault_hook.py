"""The fault hook the fault tests rely on (tests/support/faults.py): it fails a branch exactly
once, and a process started with its environment arms it at startup."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.support import faults


def report(step: int) -> SimpleNamespace:
    return SimpleNamespace(step=step, total_steps=12)  # what the hook reads of a Progress


def test_the_hook_fails_the_first_report_past_the_first_checkpoint_once(tmp_path, monkeypatch):
    marker = tmp_path / "fault"
    seen = []
    record = seen.append
    assert faults.fail_once(record, 4, "math") is record  # not armed
    monkeypatch.setenv(faults.FAULT_ENV, str(marker))
    callback = faults.fail_once(record, 4, "math")
    callback(report(4))
    with pytest.raises(faults.InjectedFault, match=r"expert\[math\]: injected fault at step 5"):
        callback(report(5))
    assert [p.step for p in seen] == [4, 5] and marker.read_text().startswith("expert[math] failed")
    callback(report(6))  # the marker exists: the others (and the retry) train on
    assert faults.fail_once(record, 4, "math") is record


def test_a_process_started_with_its_environment_arms_it_without_importing_torch(tmp_path):
    code = ("import sys; print(sorted(type(f).__name__ for f in sys.meta_path if 'Patch' in type(f).__name__),"
            " 'torch' in sys.modules)")
    env = dict(os.environ, **faults.process_env(tmp_path / "fault"))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["['_PatchOnImport']", "False"], out.stdout + out.stderr

