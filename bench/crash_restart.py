"""From a branch's crash to its automatic restart, on the real cluster of the tests.

    .venv/bin/python bench/crash_restart.py [--rounds 2] [--json FILE]

Each round runs tests/faults/test_process_faults.py::test_crashed_branch_is_retried_by_the_pipeline_itself
in a pytest session of its own: PostgreSQL, a Prefect server on it, moto, process workers, the
deployments of infra/prefect.yaml (tests/prefect_harness.py), and a pipeline whose branch is
killed twice with no human action:
- **process killed**: SIGKILL to the branch's flow-run process; its worker reports it Crashed;
- **node lost**: SIGKILL to the worker and the flow run at once; only the missing heartbeats tell
  (heartbeats every 30 s, the automation of flows/automations.py marks a run silent for 40 s
  Crashed; production defaults: heartbeat 60 s, 300 s).
For each, the seconds from the kill to the run marked Crashed, rescheduled in place by the
pipeline (AwaitingRetry, with the config's backoff: `retry_delay_s` 10 s x 2^retry, +0-50 %
jitter) and Running again, read from the flow run's state history. The bar (issue 14): from the
crash to the restart at most 60 s plus the configured backoff. For a lost node, the crash is
only known once the automation's window has passed: that window is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/faults/test_process_faults.py::test_crashed_branch_is_retried_by_the_pipeline_itself"


def one_round(out: Path) -> None:
    env = dict(os.environ, BTX_BENCH_OUT=str(out), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", TEST],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the fault test failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the raw timelines here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="btx-crash-") as tmp:
        out = Path(tmp) / "timelines.jsonl"
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds} ...", flush=True)
            one_round(out)
        records = [json.loads(line) for line in out.read_text().splitlines()]
    print(f"\n{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end; {len(records)} rounds; medians")
    print("| fault | kill -> Crashed s | -> rescheduled s | -> Running s | backoff s | Running - backoff s |")
    print("|---|---:|---:|---:|---:|---:|")
    for i, fault in enumerate(records[0]["faults"]):
        rows = [rec["timeline"][i] for rec in records]
        cols = ("crashed_s", "rescheduled_s", "running_s", "backoff_s", "running_minus_backoff_s")
        cells = " | ".join(f"{statistics.median(r[c] for r in rows):.1f}" for c in cols)
        print(f"| {fault} | {cells} |")
        print("|   per round | " + " | ".join(", ".join(f"{r[c]:.1f}" for r in rows) for c in cols) + " |")
    print(f"(node lost: heartbeats every {records[0]['heartbeat_s']} s, marked Crashed after "
          f"{records[0]['zombie_after_s']} s without one)")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
