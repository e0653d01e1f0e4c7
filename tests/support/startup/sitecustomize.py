"""Run by Python at the start of every process whose PYTHONPATH names this directory (only those
that `tests.support.faults.process_env` sets up): arms the fault hook when its variable is set."""

import os

if os.environ.get("BTX_FAULT_AFTER_CHECKPOINT"):
    from tests.support.faults import patch_on_import

    patch_on_import()
