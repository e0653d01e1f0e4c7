"""One training step of the demo's model in fp32 vs bf16 autocast on this CPU, alternating.

    .venv/bin/python bench/precision.py [--rounds 2] [--steps 3]

What `precision: auto` decides on: where the CPU has no native bf16 (no AMX or AVX512-BF16),
torch emulates it and a bf16 step is several times slower than an fp32 one. The model is
configs/demo.yaml's seed (6 layers, hidden 256, FFN 1024, vocab 4096), a batch of 8 x 256 tokens,
forward and backward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from btx_core.training.distributed import native_bf16


def step_s(model, ids, bf16: bool, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024,
                                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 4096, (8, 256))
    times = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for side in times:
            times[side].append(step_s(model, ids, side == "bf16", args.steps))
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
          f"{native_bf16(torch.device('cpu'))}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    for side, ts in times.items():
        print(f"{side}: {statistics.median(ts):.2f} s/step (rounds: {', '.join(f'{t:.2f}' for t in ts)})")
    print(f"bf16 / fp32: {statistics.median(times['bf16']) / statistics.median(times['fp32']):.2f}x")


if __name__ == "__main__":
    main()
