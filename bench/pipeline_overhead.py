"""Orchestration overhead: the CI-sized pipeline (configs/ci.yaml: seed + 3 experts + mix) as the
`btx-pipeline` flow vs the same stages called directly from Python, in one process.

    python bench/pipeline_overhead.py [--rounds 3] [--json out.json]

Three ways, alternating within each round, each from a fresh store that holds only the
tokenized data (so tokenizer training, seed pretraining and the experts all run):
- `direct`: build_seed, then train_expert for each domain, one after the other, then mix_stage;
- `prefect-1`: the flow with max_parallel_branches 1 (branches one after the other, in a
  branch process, plus the report's artifacts): the like-for-like overhead (target <= 1.10x);
- `prefect`: the flow as `btx run` runs it (all branches at once, each in its own process).
The first flow run of the process (the embedded API starting, 7-17 s) is a warm-up, off the
clock; it is printed apart, since a one-off `btx run` pays it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from pipeline_common import ci_raw, fresh_store, load, machine, median, quiet, timed

from flows.options import cores


def direct(cfg) -> None:
    import torch

    from btx_core.stages.expert import train_expert
    from btx_core.stages.mix import mix_stage
    from btx_core.stages.seed import build_seed

    torch.set_num_threads(cores())  # what the flow's seed task sets; experts get the same here
    seed = build_seed(cfg)
    for d in cfg.domains:
        train_expert(cfg, d.name, seed_location=seed.location)
    mix_stage(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the raw timings here")
    args = parser.parse_args()
    quiet()
    from flows.pipeline import btx_pipeline

    raw = ci_raw()
    ways = {"direct": (direct, None), "prefect-1": (btx_pipeline, 1), "prefect": (btx_pipeline, None)}
    with tempfile.TemporaryDirectory(prefix="btx-overhead-") as tmp:
        work = Path(tmp)
        startup = timed(lambda: btx_pipeline(load(raw, work, "warm")))
        times: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(args.rounds):
            for way, (run, parallel) in ways.items():
                cfg = load({**raw, "orchestration": {"max_parallel_branches": parallel}}, work, way)
                fresh_store(work / "warm", work / way, keep=())
                times[way].append(timed(lambda: run(cfg)))
    base = median(times["direct"])
    print(f"\nCI pipeline (seed + 3 experts + mix), {machine()}; medians of {args.rounds} rounds")
    print("| way | wall s | vs direct |\n|---|---|---|")
    for way in ways:
        print(f"| {way} | {median(times[way]):.1f} | {median(times[way]) / base:.3f}x |")
    print(f"| first flow run of a process (embedded API start + the run) | {startup:.1f} | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_s": times, "first_run_s": startup}, indent=2))


if __name__ == "__main__":
    main()
