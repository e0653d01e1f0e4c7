"""The integration tests of tests/unit/test_bad_input.py, which holds their helpers and fixtures."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from tests.support.params import param_fixture
from tests.unit.test_bad_input import (  # noqa: F401 - fixtures, and tests that run here too
    CASES,
    ROOT,
    models,
    test_bad_input_gets_one_clear_message_and_writes_nothing,
)

# the integration values of test_bad_input_gets_one_clear_message_and_writes_nothing's parameter
case = param_fixture("case", *(c.param() for c in CASES if c.s3))


def test_one_case_through_a_real_process(tmp_path):
    """The same contract across a process boundary: exit status, one message on stderr, nothing
    on stdout, no traceback, no store."""
    raw = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    raw.update(store=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"))
    raw["expert_training"]["lr"] = "fast"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "btx_core.cli", "seed", "c.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: invalid config: 1 problem(s)") and "expert_training.lr" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "store").exists()

