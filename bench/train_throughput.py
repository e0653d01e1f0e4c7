"""Expert-training throughput: btx's training loop vs a bare PyTorch loop, same model, data, batch.

    python bench/train_throughput.py [--rounds 5] [--steps 20] [--threads 2]

Both sides train the demo seed's shape (Llama, vocab 4096, hidden 256, FFN 1024, 6 layers, tied
embeddings) on the same token blocks with AdamW, the same LR schedule, gradient clipping and,
for bf16, the same autocast. Runs alternate btx/bare within each round so machine noise hits
both; the table reports medians over rounds and the ratio of the medians. Timing covers the
whole call (optimizer and schedule set-up included), after one untimed warm-up run per side.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from btx_core.config.schema import TrainSettings
from btx_core.training.loop import train


def demo_shaped_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=2048)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def bare_loop(model, blocks: np.ndarray, s: TrainSettings) -> float:
    """The reference: the smallest correct loop a practitioner would write. Returns seconds."""
    start = time.perf_counter()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, s.warmup_steps, s.steps, min_lr_rate=s.min_lr_ratio)
    data = torch.from_numpy(blocks.astype(np.int64))
    gen = torch.Generator().manual_seed(s.seed)
    for _ in range(s.steps):
        ids = data[torch.randint(len(data), (s.batch_size,), generator=gen)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.precision == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def btx_loop(model, blocks: np.ndarray, s: TrainSettings) -> float:
    start = time.perf_counter()
    train(model, blocks, s)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the raw timings here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    blocks = np.random.default_rng(0).integers(0, 4096, size=(512, 256), dtype=np.int32)
    rows, raw = [], {}
    for precision in ("fp32", "bf16"):
        s = TrainSettings(steps=args.steps, lr=1e-3, warmup_steps=2, seq_len=256, batch_size=8,
                          precision=precision, device="cpu", log_every=10_000)
        tokens = args.steps * s.tokens_per_step
        for fn in (btx_loop, bare_loop):  # warm-up: first-call costs (kernels, allocator) off the clock
            fn(demo_shaped_llama(), blocks, s.model_copy(update={"steps": 2}))
        times = {"btx": [], "bare": []}
        for r in range(args.rounds):
            order = (("btx", btx_loop), ("bare", bare_loop)) if r % 2 == 0 else (("bare", bare_loop), ("btx", btx_loop))
            for name, fn in order:
                times[name].append(fn(demo_shaped_llama(), blocks, s))
        btx_tps = tokens / statistics.median(times["btx"])
        bare_tps = tokens / statistics.median(times["bare"])
        rows.append((precision, btx_tps, bare_tps, btx_tps / bare_tps))
        raw[precision] = times
        print(f"{precision}: btx {btx_tps:,.0f} tok/s, bare {bare_tps:,.0f} tok/s, ratio {btx_tps / bare_tps:.3f}",
              file=sys.stderr)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"batch 8 x 256, {args.steps} steps per run, median of {args.rounds} rounds\n")
    print("| precision | btx tok/s | bare PyTorch tok/s | btx / bare |")
    print("|---|---:|---:|---:|")
    for precision, b, p, ratio in rows:
        print(f"| {precision} | {b:,.0f} | {p:,.0f} | {ratio:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
