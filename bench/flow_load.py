"""How long a fresh process takes to load the pipeline flow, here and at an earlier revision.

    .venv/bin/python bench/flow_load.py [--against fa0a00e] [--rounds 5] [--json FILE]

Prefect 3.9's process worker reports a lost flow-run process as Crashed twice: as the process
exits, and again once a subprocess that loads the flow (for its on_crashed hooks) has ended.
The restart automation (flows/automations.py) must see both within its settle time, or the late
report crashes the rescheduled run again. This measures that subprocess's main cost: a new
Python process that imports prefect and loads `flows/pipeline.py:btx_pipeline` from its
entrypoint with `prefect.flows.load_flow_from_entrypoint`, as the hook runner does. The earlier
revision is checked out in a temporary git worktree; the rounds alternate between the two trees,
so both see the same machine load. Reported: each tree's median wall time and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOAD = ("import sys; from prefect.flows import load_flow_from_entrypoint; "
        "load_flow_from_entrypoint('flows/pipeline.py:btx_pipeline'); "
        "print(int('torch' in sys.modules))")


def load_once(tree: Path) -> tuple[float, bool]:
    """Seconds for a fresh process to load the flow in `tree`, and whether it imported torch."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LOAD], cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin",
                                                                         "DO_NOT_TRACK": "1"},
                          capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"loading the flow in {tree} failed:\n{done.stderr[-3000:]}")
    return took, done.stdout.strip().endswith("1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="fa0a00e", help="the earlier revision (a git ref)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="btx-flow-load-") as tmp:
        old = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.against], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            times: dict[str, list[float]] = {"here": [], args.against: []}
            torch: dict[str, bool] = {}
            load_once(ROOT)  # warm the page cache for both trees before timing
            load_once(old)
            for _ in range(args.rounds):
                for name, tree in (("here", ROOT), (args.against, old)):
                    took, imported = load_once(tree)
                    times[name].append(took)
                    torch[name] = imported
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {"rounds": args.rounds, "median_s": medians, "imports_torch": torch,
              "ratio": medians[args.against] / medians["here"], "all_s": times}
    for name, median in medians.items():
        print(f"{name:>10}: median {median:.2f} s over {args.rounds} (torch imported: {torch[name]})")
    print(f"ratio {args.against} / here: {result['ratio']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
