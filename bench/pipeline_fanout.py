"""Fan-out: two expert branches at once vs the same two one after the other, 1 thread each,
both through the pipeline's fan-out code (`flows.pipeline.local_branches`, after its seed task;
MiX and the report, the same in both modes, are left out) in embedded mode, in one process.

    python bench/pipeline_fanout.py [--rounds 3] [--steps 100] [--json out.json]

The model is the FACTS tiny Llama (hidden 256, 4 layers, vocab 4096; seq 256 x batch 8), so a
step is compute, not Python. The seed is made once (a few steps: quality is not measured);
every round starts from a fresh store holding the seed and the tokenized data, so it times
what fan-out changes: each branch's process start, model load, training, evaluation, save.
Modes alternate within a round; the table gives medians and the ratio of the medians
(target <= 0.55: two branches on two cores nearly halve the wall time). Sequential branches
run in the flow's own process; parallel ones each start a process (importing torch,
transformers and Prefect: seconds), a fixed cost that 100 steps (~a minute at 1 thread) amortise
as real branches (hours) do; the table also gives the branches' own training seconds. The first flow run of
the process (the embedded API starting) is a warm-up, off the clock.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from pipeline_common import ci_raw, fresh_store, load, machine, median, quiet, timed


def bench_raw(steps: int) -> dict:
    raw = ci_raw()
    raw["run_name"] = "fanout"
    raw["seed"]["create"].update(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_layers=4,
                                 num_heads=4, num_kv_heads=2, tokenizer_max_bytes=2_000_000)
    raw["seed"]["pretrain_data"]["max_bytes"] = 2_000_000
    raw["seed"]["pretrain"].update(steps=4, seq_len=256, batch_size=8, checkpoint_every=100)
    raw["domains"] = [{"name": n, "data": {"builtin": n, "max_bytes": 2_000_000}} for n in ("math", "code")]
    raw["expert_training"].update(steps=steps, seq_len=256, batch_size=8, precision="fp32", threads=1,
                                  checkpoint_every=10_000, log_every=10, eval_blocks=8)
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="training steps per expert")
    parser.add_argument("--json", help="also write the raw timings here")
    args = parser.parse_args()
    quiet()
    from prefect import flow

    from flows.pipeline import local_branches
    from flows.tasks import seed_task

    @flow(name="btx-fan-out")
    def btx_pipeline(config):
        """The pipeline's own fan-out (seed, then `local_branches`), without mix and report."""
        return local_branches(config, seed_task.submit(config))

    raw = bench_raw(args.steps)
    with tempfile.TemporaryDirectory(prefix="btx-fanout-") as tmp:
        work = Path(tmp)
        warm = load(raw, work, "warm")
        btx_pipeline(warm)  # seed, tokenized data, and the embedded API's start: off the clock
        times: dict[str, list[float]] = {"sequential": [], "parallel": []}
        train_s: dict[str, list[float]] = {"sequential": [], "parallel": []}
        for _ in range(args.rounds):
            for mode, parallel in (("sequential", 1), ("parallel", 2)):
                run = {**raw, "orchestration": {"max_parallel_branches": parallel}}
                cfg = load(run, work, mode)
                fresh_store(work / "warm", work / mode, keep=("seed",))
                times[mode].append(timed(lambda: btx_pipeline(cfg)))
                manifests = [json.loads(Path(work / mode / "fanout" / "experts" / d / "model" / "_manifest.json").read_text())
                             for d in ("math", "code")]
                train_s[mode].append(sum(m["metrics"]["wall_s"] for m in manifests))
    seq, par = median(times["sequential"]), median(times["parallel"])
    print(f"\nFan-out, 2 expert branches x {args.steps} steps, 1 thread each ({machine()}); "
          f"medians of {args.rounds} rounds")
    print("| mode | wall s | sum of branches' training s |\n|---|---|---|")
    for mode in times:
        print(f"| {mode} | {median(times[mode]):.1f} | {median(train_s[mode]):.1f} |")
    print(f"| parallel / sequential | {par / seq:.3f} | target <= 0.55 |")
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_s": times, "train_s": train_s, "steps": args.steps,
                                               "ratio": par / seq}, indent=2))


if __name__ == "__main__":
    main()
