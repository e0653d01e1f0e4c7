"""What a fault test measured about a recovery, for bench/recovery.py and BENCHMARKS.md: each
record is printed, and appended as a JSON line to `$BTX_BENCH_OUT` when that is set."""

from __future__ import annotations

import json
import os


def record(scenario: str, **measured) -> None:
    line = {"scenario": scenario, **measured}
    print("RECOVERY", json.dumps(line))
    if os.environ.get("BTX_BENCH_OUT"):
        with open(os.environ["BTX_BENCH_OUT"], "a") as out:
            out.write(json.dumps(line) + "\n")


def seconds_between(states, after, first: str, then: str | None = None) -> float | None:
    """Seconds from `after` (a datetime) to the first state named `first` at or after it (then, if
    given, to the first `then` after that one), from a flow run's state history."""
    ordered = sorted(states, key=lambda s: s.timestamp)
    hit = next((s for s in ordered if s.timestamp >= after and s.name == first), None)
    if hit is not None and then is not None:
        hit = next((s for s in ordered if s.timestamp >= hit.timestamp and s.name == then), None)
    return None if hit is None else round((hit.timestamp - after).total_seconds(), 1)
