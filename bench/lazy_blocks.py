"""Training steps/s reading token shards lazily vs the same blocks as one in-memory array.

    PYTHONPATH=. .venv/bin/python bench/lazy_blocks.py [--blocks 200000] [--rounds 5] [--steps 50]
        [--model pico|demo] [--precision fp32|bf16]

Writes `--blocks` random blocks of 256 uint16 token ids into shard files of 16,384 blocks (what
preparation writes), then trains with `btx_core.training.loop.train` on them two ways,
alternating within each round. The model is a pico Llama (hidden 64, 2 layers, vocab 4096) by
default, where the data side weighs most against the compute of a step, or the demo seed's shape
(bench/train_throughput.py) with `--model demo`:

- lazy: `TokenBlocks` over the shard files, each micro-batch's rows read on demand (what
  training does since issue 13);
- memory: the same blocks read whole into one int32 numpy array first (what training held
  before), not counting the time to read them.

Reports steps/s medians over rounds and lazy / memory. Also times `batch_indices`, the data
order, at this corpus size: a permutation of every block per micro-batch (before this benchmark)
against one per epoch (now).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import demo_shaped_llama  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from btx_core.config.schema import TrainSettings  # noqa: E402
from btx_core.data.shards import TokenBlocks  # noqa: E402
from btx_core.training.distributed import Dist  # noqa: E402
from btx_core.training.loop import batch_indices, epoch_order, train  # noqa: E402

SEQ_LEN, SHARD_BLOCKS = 256, 16_384


def pico_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def write_shards(directory: Path, blocks: int, seed: int = 0) -> TokenBlocks:
    rng, paths, counts = np.random.default_rng(seed), [], []
    for i, start in enumerate(range(0, blocks, SHARD_BLOCKS)):
        n = min(SHARD_BLOCKS, blocks - start)
        path = directory / f"train-{i:05d}.tokens"
        path.write_bytes(rng.integers(0, 4096, size=(n, SEQ_LEN), dtype=np.uint16).tobytes())
        paths.append(path)
        counts.append(n)
    return TokenBlocks(paths, counts, SEQ_LEN, np.dtype("<u2"))


def order_cost(n_blocks: int, s: TrainSettings, calls: int = 20) -> tuple[float, float]:
    """Seconds per batch_indices call: the permutation made every call, and cached per epoch."""
    uncached = epoch_order.__wrapped__
    start = time.perf_counter()
    for step in range(calls):
        uncached(s.seed, 0, n_blocks)[step * s.batch_size:(step + 1) * s.batch_size]
    before = (time.perf_counter() - start) / calls
    epoch_order.cache_clear()
    batch_indices(n_blocks, 0, 0, s, Dist())  # the epoch's one permutation
    start = time.perf_counter()
    for step in range(1, calls + 1):
        batch_indices(n_blocks, step, 0, s, Dist())
    return before, (time.perf_counter() - start) / calls


def access_cost(sides: dict, s: TrainSettings, rounds: int = 7, calls: int = 200) -> dict[str, float]:
    """Median seconds to fetch one micro-batch as the loop does (`np.asarray(data[indices])`),
    per side, alternating: the only work that differs between the sides."""
    n, out = len(next(iter(sides.values()))), {name: [] for name in sides}
    for r in range(rounds):
        for name in (sides if r % 2 == 0 else list(sides)[::-1]):
            start = time.perf_counter()
            for step in range(r * calls, (r + 1) * calls):
                np.asarray(sides[name][batch_indices(n, step, 0, s, Dist())])
            out[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(t) for name, t in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--model", choices=("pico", "demo"), default="pico")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    make_model = pico_llama if args.model == "pico" else demo_shaped_llama
    s = TrainSettings(steps=args.steps, lr=1e-3, warmup_steps=2, seq_len=SEQ_LEN, batch_size=8, grad_accum=1,
                      precision=args.precision, device="cpu", log_every=10_000)
    with tempfile.TemporaryDirectory(prefix="btx-lazybench-") as tmp:
        lazy = write_shards(Path(tmp), args.blocks)
        memory = np.asarray(lazy)
        before, after = order_cost(args.blocks, s)
        sides = {"lazy": lazy, "memory": memory}
        access = access_cost(sides, s)
        for data in sides.values():  # warm-up: first-call costs off the clock
            train(make_model(), data, s.model_copy(update={"steps": 2}))
        times: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for name in (sides if r % 2 == 0 else list(sides)[::-1]):
                model = make_model()
                start = time.perf_counter()
                train(model, sides[name], s)
                times[name].append(time.perf_counter() - start)
                print(f"round {r + 1} {name:>6}: {args.steps / times[name][-1]:.3f} steps/s", file=sys.stderr)
        rows_read = lazy.rows_read
    med = {name: args.steps / statistics.median(t) for name, t in times.items()}
    print(f"\n{args.model} Llama, {platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.precision}, "
          f"{args.blocks:,} blocks x {SEQ_LEN} (shards of {SHARD_BLOCKS:,}), batch 8, {args.steps} steps "
          f"per run, {args.rounds} rounds; lazy side read {rows_read:,} rows in all\n")
    print("| side | steps/s (median) | per-round seconds |")
    print("|---|---:|---|")
    for name in sides:
        print(f"| {name} | {med[name]:.3f} | {', '.join(f'{t:.2f}' for t in times[name])} |")
    print(f"\nlazy / memory: **{med['lazy'] / med['memory']:.3f}x**")
    step_s = 1 / med["memory"]
    print(f"one micro-batch's blocks (8 x {SEQ_LEN}): lazy {access['lazy'] * 1e6:.0f} us, memory "
          f"{access['memory'] * 1e6:.0f} us; the difference is {(access['lazy'] - access['memory']) / step_s:.3%} "
          "of a step")
    print(f"batch_indices at {args.blocks:,} blocks: {before * 1e3:.2f} ms a call with a permutation per call, "
          f"{after * 1e3:.3f} ms with one per epoch")


if __name__ == "__main__":
    main()
