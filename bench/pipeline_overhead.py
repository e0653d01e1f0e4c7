"""Orchestration overhead: the pipeline as the `btx-pipeline` flow vs the same stages called
directly from Python, in one process, at CI size (configs/ci.yaml) or the demo's (configs/demo.yaml).

    python bench/pipeline_overhead.py [--config ci|demo] [--rounds 3] [--keep seed]
                                      [--ways direct,prefect-1,prefect] [--json out.json]

Three ways, alternating within each round, each from a fresh store that holds only the
tokenized data (and the stages named by `--keep`, e.g. the pretrained seed, which both ways then
only confirm), so that everything else runs:
- `direct`: build_seed, then train_expert for each domain, one after the other, then mix_stage,
  and with a `finetune` section finetune, evaluate_run and the report in the store;
- `prefect-1`: the flow with max_parallel_branches 1 (branches one after the other, in a
  branch process, plus the report's artifacts): the like-for-like overhead;
- `prefect`: the flow as `btx run` runs it (all branches at once, each in its own process).
The first flow run of the process (the embedded API starting, 7-17 s) is a warm-up, off the
clock (the seed and the data at full size, 2 steps of every later training stage); it is
printed apart, since a one-off `btx run` pays it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml
from pipeline_common import ROOT, ci_raw, fresh_store, load, machine, median, quiet, timed

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
    if cfg.finetune is not None:
        from btx_core.stages.evaluate import evaluate_run
        from btx_core.stages.finetune import finetune
        from flows.report import write_report

        finetune(cfg, "btx")
        evaluate_run(cfg)
        write_report(cfg)


def warm_up(raw: dict) -> dict:
    """The config of the warm-up run: the same seed and data, 2 steps of every later training
    stage (their outputs are never kept: only the data and the stages named by --keep are)."""
    raw = json.loads(json.dumps(raw))
    for settings in (raw["expert_training"], (raw.get("finetune") or {}).get("training")):
        if settings:
            settings.update(steps=2, warmup_steps=0)
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config", choices=("ci", "demo"), default="ci")
    parser.add_argument("--keep", default="", help="stages kept from the warm-up store, e.g. `seed`")
    parser.add_argument("--ways", default="direct,prefect-1,prefect")
    parser.add_argument("--json", help="also write the raw timings here")
    args = parser.parse_args()
    quiet()
    from flows.pipeline import btx_pipeline

    raw = ci_raw() if args.config == "ci" else yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    keep = tuple(k for k in args.keep.split(",") if k)
    known = {"direct": (direct, None), "prefect-1": (btx_pipeline, 1), "prefect": (btx_pipeline, None)}
    ways = {w: known[w] for w in args.ways.split(",")}
    with tempfile.TemporaryDirectory(prefix="btx-overhead-") as tmp:
        work = Path(tmp)
        startup = timed(lambda: btx_pipeline(load(warm_up(raw), work, "warm")))
        times: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(args.rounds):
            for way, (run, parallel) in ways.items():
                cfg = load({**raw, "orchestration": {"max_parallel_branches": parallel}}, work, way)
                fresh_store(work / "warm", work / way, keep=keep)
                times[way].append(timed(lambda: run(cfg)))
    base = median(times["direct"]) if "direct" in times else float("nan")
    print(f"\n{args.config} pipeline (kept: {', '.join(keep) or 'nothing'}), {machine()}; "
          f"medians of {args.rounds} rounds")
    print("| way | wall s | per round | vs direct |\n|---|---|---|---|")
    for way in ways:
        per_round = ", ".join(f"{t:.1f}" for t in times[way])
        print(f"| {way} | {median(times[way]):.1f} | {per_round} | {median(times[way]) / base:.3f}x |")
    print(f"| first flow run of a process (embedded API start + the run) | {startup:.1f} | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_s": times, "first_run_s": startup}, indent=2))


if __name__ == "__main__":
    main()
