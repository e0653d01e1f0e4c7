"""Recovery from a cluster's everyday failures, on the real cluster of the tests: the table of
BENCHMARKS.md "Recovery".

    .venv/bin/python bench/recovery.py [--slow] [--json FILE]

Runs the fault tests that reproduce each failure (tests/faults/test_cluster_faults.py, the
run-name slot test of tests/integration/test_orchestration.py; with --slow also the lost-node test of
tests/faults/test_process_faults.py) in one pytest session: PostgreSQL, a Prefect server on it,
moto, process workers, the deployments of infra/prefect.yaml (tests/prefect_harness.py). Each
test records, from the flow runs' state histories, the seconds from the fault to the recovery
(tests/support/recovery.py), and what work was lost or repeated. No step needs a human.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/faults/test_cluster_faults.py",
         "tests/integration/test_orchestration.py::test_one_pipeline_run_per_run_name_and_a_dead_holder_blocks_it_one_lease_at_most",
         "tests/integration/test_orchestration.py::test_cancel_from_the_api_checkpoints_at_the_step_reached"]
SLOW = ["tests/faults/test_process_faults.py::test_crashed_branch_is_retried_by_the_pipeline_itself"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", action="store_true", help="also the lost-node test (about 4 minutes more)")
    parser.add_argument("--json", help="also write the records here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="btx-recovery-") as tmp:
        out = Path(tmp) / "records.jsonl"
        env = dict(os.environ, BTX_BENCH_OUT=str(out), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
        tests = TESTS + (SLOW if args.slow else [])
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "integration",
                               *tests], cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"a fault test failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}")
        records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end")
    print("| failure | test | fault -> recovered | what recovered it | work lost or repeated |")
    print("|---|---|---:|---|---|")
    for r in records:
        seconds = r.get("fault_to_recovered_s")
        print(f"| {r['scenario']} | `{r['test']}` | {'-' if seconds is None else f'{seconds:.1f} s'} | "
              f"{r['recovered']} | {r['work_lost']} |")


if __name__ == "__main__":
    main()
