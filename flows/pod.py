"""The first process of a btx pod (the Kubernetes job templates' `command`): Prefect's
`prefect flow-run execute`, under a parent that gives a training run the pod's whole grace period
to checkpoint when the kubelet stops it.

Why: the kubelet's SIGTERM (a drained node, a spot reclaim, an eviction) reaches only the pod's
first process. As that process, `prefect flow-run execute` (Prefect 3.9.1) either dies at once,
taking the flow with it, or, with the SIGTERM behaviour prefect-kubernetes sets for
`backoffLimit: 0`, reschedules the run and SIGKILLs the flow 30 s later, a grace no setting
changes: a 7B expert's checkpoint takes ~10 minutes to write (docs/deploy.md).

What this does instead: it runs `prefect flow-run execute` as its child with no SIGTERM behaviour
set, and on SIGTERM passes the signal to the processes *below* it (the flow's engine, in a process
group of its own) and not to it. Training writes a checkpoint at the step reached and the run ends
Crashed (flows/options.py); the parent flow run reschedules it and it resumes from that step. The
kubelet's `terminationGracePeriodSeconds` (900 s in the templates) is the only limit. A cancel
from the UI is Prefect's, unchanged: its supervisor stops the flow and the run ends Cancelled.

    python -m flows.pod              # PREFECT__FLOW_RUN_ID set by the worker, as for Prefect's own command
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

SIGTERM_BEHAVIOR = "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents first (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return found


def main(argv: list[str] | None = None) -> int:
    command = argv or [sys.executable, "-m", "prefect", "flow-run", "execute"]
    env = {k: v for k, v in os.environ.items() if k != SIGTERM_BEHAVIOR}  # "crash": no handler of its own
    supervisor = subprocess.Popen(command, env=env)

    def pass_below(signum, frame) -> None:
        below = descendants(supervisor.pid)
        print(f"btx pod: SIGTERM: passing it to {len(below)} flow process(es) below Prefect's supervisor, "
              "which checkpoint and end the run Crashed for its parent to reschedule", file=sys.stderr, flush=True)
        for pid in below:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, pass_below)
    code = supervisor.wait()
    while True:  # as the first process, reap what was left to it
        try:
            if os.waitpid(-1, 0)[0] <= 0:
                break
        except ChildProcessError:
            break
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))
