"""Data preparation and lazy reading: throughput, peak memory as the corpus grows, training speed.

    python bench/data_prep.py [--sizes 0.1,0.5,2] [--rounds 3] [--throughput-mb 20] [--json out.json]

1. Throughput: `btx_core.data.prepare.prepare_domain_data` (read jsonl, split, tokenize with
   `datasets.map(num_proc=cores)`, pack, write shards) against raw `tokenizers` `encode_batch_fast`
   of the same documents, already in memory, on the same cores (the Rust thread pool on, one
   process). Both in fresh processes, alternating, `--rounds` times; medians and their ratio.
   Tokenizer: the demo's byte-level BPE (btx_core.model.tokenizer), vocab 8192.
2. Peak RSS of preparation (the whole process tree: the main process and `datasets`' workers,
   sampled every 50 ms) and of a training run on the lazily read shards (pico Llama, 20 steps of
   8 x 256 tokens), at each corpus size in `--sizes` GB of text. The corpus is generated on the fly
   into a temporary directory (the built-in corpora, each document numbered so none repeats,
   64 MB jsonl files) and deleted afterwards. The tokenizer here is a word-level one (vocab 8192)
   so that 2 GB prepare in minutes on 2 shared cores; memory does not depend on it.
3. Training steps/s reading shards lazily (`TokenBlocks`) against the same blocks as one array in
   memory (the 0.1 GB corpus): a pico Llama (hidden 64, 2 layers, vocab 8192), where the data
   side weighs most, or the demo seed's shape with `--demo-shape`; `--speed-steps` steps of
   8 x 256 tokens, fp32, alternating, `--rounds` times.
4. The data access alone: microseconds to read one micro-batch (8 random blocks of 256) from
   shards and from memory, alternating, `--rounds` times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILE_BYTES = 64 * 2**20


# --- corpus and tokenizers ---------------------------------------------------------------------------

def write_corpus(directory: Path, total_bytes: int) -> int:
    """jsonl files of numbered built-in documents until `total_bytes` of text; returns documents."""
    from btx_core.data.builtin.corpora import builtin_documents

    docs = builtin_documents("general")
    directory.mkdir(parents=True, exist_ok=True)
    written = count = part = 0
    f = None
    while written < total_bytes:
        for doc in docs:
            if f is None or f.tell() >= FILE_BYTES:
                if f:
                    f.close()
                f = open(directory / f"part-{part:05d}.jsonl", "w")
                part += 1
            text = f"#{count}\n{doc}"
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text.encode())
            count += 1
            if written >= total_bytes:
                break
    f.close()
    return count


def word_level_tokenizer(directory: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from btx_core.data.builtin.corpora import builtin_documents

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(builtin_documents("general", max_bytes=5_000_000),
                            trainers.WordLevelTrainer(vocab_size=8192, special_tokens=["<unk>", "<|endoftext|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<unk>")
    fast.save_pretrained(directory)
    return directory


def bpe_tokenizer(directory: Path):
    from btx_core.data.builtin.corpora import builtin_documents
    from btx_core.model.tokenizer import train_tokenizer

    train_tokenizer(builtin_documents("general", max_bytes=5_000_000), 8192, directory)
    return directory


# --- children: one measurement each, in a fresh process ------------------------------------------------

def child_raw(args) -> dict:
    """Raw encode_batch_fast over the corpus's documents (read into memory first, not timed)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from tokenizers import Tokenizer

    docs = [json.loads(line)["text"] for p in sorted(Path(args.corpus).glob("*.jsonl")) for line in open(p)]
    tok = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(docs), 1000):
        tokens += sum(len(e.ids) for e in tok.encode_batch_fast(docs[i:i + 1000], add_special_tokens=False))
    return {"seconds": time.perf_counter() - start, "tokens": tokens,
            "bytes": sum(len(d.encode()) for d in docs)}


def child_prepare(args) -> dict:
    import datasets  # noqa: F401 - imported before the clock starts, as in any long-lived process

    from btx_core.config.schema import DataSource
    from btx_core.data.prepare import prepare_domain_data
    from btx_core.model.dense import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    splits = prepare_domain_data(DataSource(path=args.corpus), tok, args.seq_len, 0.01, "btx-split-1", out,
                                 cache_dir=str(out.parent / "work"))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "stats": splits.stats(),
            "maxrss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child_train(args) -> dict:
    """Train a pico Llama for a few steps on the shards (lazily), or on them loaded into memory."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from btx_core.config.schema import TrainSettings
    from btx_core.data.prepare import TokenizedSplits
    from btx_core.training.loop import train

    torch.set_num_threads(2)
    rss_before = _rss_mb()
    splits = TokenizedSplits.load(args.out)
    blocks = splits.train if args.mode == "lazy" else np.asarray(splits.train)
    if args.demo_shape:
        config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             max_position_embeddings=2048)
    else:
        config = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    settings = TrainSettings(steps=args.steps, seq_len=args.seq_len, batch_size=8, lr=1e-3, warmup_steps=2,
                             precision="fp32", device="cpu", log_every=1000, seed=0)
    warm = train(LlamaForCausalLM(config), blocks, settings.model_copy(update={"steps": 2}))  # untimed
    del warm
    start = time.perf_counter()
    result = train(model, blocks, settings)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps_per_s": args.steps / seconds, "final_loss": result.final_loss,
            "blocks": len(blocks), "rss_before_data_mb": rss_before,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rows_read": getattr(blocks, "rows_read", None)}


def access_bench(work: Path, rounds: int, batches: int = 5000) -> dict:
    """Microseconds per micro-batch read (8 random rows of 256 uint16 tokens out of 100,000),
    from `TokenBlocks` and from the same blocks as an array in memory, alternating."""
    import numpy as np

    from btx_core.data.shards import ShardWriter, TokenBlocks

    directory = work / "access"
    directory.mkdir()
    writer = ShardWriter(directory, "train", 256, np.dtype("<u2"), 2**25 // 256)
    writer.add(np.random.default_rng(0).integers(0, 8192, 100_000 * 256, dtype=np.uint16), 1)
    index = writer.close()
    lazy = TokenBlocks([directory / s.name for s in index.shards], [s.blocks for s in index.shards], 256,
                       np.dtype("<u2"))
    memory = np.asarray(lazy)
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, len(memory), 8) for _ in range(batches)]
    times: dict[str, list[float]] = {"lazy": [], "memory": []}
    for _ in range(rounds):
        for name, data in (("lazy", lazy), ("memory", memory)):
            start = time.perf_counter()
            for r in rows:
                data[r]
            times[name].append((time.perf_counter() - start) / batches * 1e6)
    return {"us_per_batch": times, "lazy_median_us": statistics.median(times["lazy"]),
            "memory_median_us": statistics.median(times["memory"])}


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# --- the parent: runs children, samples their memory ------------------------------------------------------

def run_child(kind: str, **kwargs) -> dict:
    """Run `kind` in a fresh process; adds the peak RSS of its whole process tree (MB)."""
    import psutil

    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, __file__, "--child", kind, "--result", str(out)]
    for key, value in kwargs.items():
        if value is True:
            cmd.append(f"--{key.replace('_', '-')}")
        elif value is not None and value is not False:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", DO_NOT_TRACK="1")
    proc = subprocess.Popen(cmd, env=env)
    peak = 0.0
    stop = threading.Event()

    def sample():
        nonlocal peak
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                break
            peak = max(peak, total / 2**20)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    stop.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"child {kind} failed with status {code}")
    result = json.loads(out.read_text())
    out.unlink()
    result["peak_tree_rss_mb"] = round(peak, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.1,0.5,2", help="corpus sizes in GB of text (RSS benchmark)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--throughput-mb", type=float, default=20)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="training steps of the RSS runs")
    parser.add_argument("--speed-steps", type=int, default=50, help="training steps of the speed runs")
    parser.add_argument("--skip", default="", help="comma list of: throughput,rss,speed,access")
    parser.add_argument("--json")
    parser.add_argument("--workdir", default=None)
    # child-process arguments
    parser.add_argument("--child")
    parser.add_argument("--result")
    parser.add_argument("--corpus")
    parser.add_argument("--tokenizer")
    parser.add_argument("--out")
    parser.add_argument("--mode")
    parser.add_argument("--demo-shape", action="store_true")
    args = parser.parse_args()
    if args.child:
        result = {"raw": child_raw, "prepare": child_prepare, "train": child_train}[args.child](args)
        Path(args.result).write_text(json.dumps(result))
        return

    skip = set(args.skip.split(","))
    report: dict = {"python": platform.python_version(), "cores": len(os.sched_getaffinity(0)),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:]}
    work = Path(tempfile.mkdtemp(prefix="btx-bench-data-", dir=args.workdir))
    try:
        if "throughput" not in skip:
            bpe = bpe_tokenizer(work / "bpe")
            corpus = work / "tp-corpus"
            write_corpus(corpus, int(args.throughput_mb * 1e6))
            raw, ours = [], []
            for r in range(args.rounds):
                raw.append(run_child("raw", corpus=corpus, tokenizer=bpe))
                ours.append(run_child("prepare", corpus=corpus, tokenizer=bpe, out=work / "tp-out",
                                      seq_len=args.seq_len))
                print(f"throughput round {r}: raw {raw[-1]['seconds']:.1f} s, btx {ours[-1]['seconds']:.1f} s",
                      flush=True)
            mb = raw[0]["bytes"] / 1e6
            report["throughput"] = {
                "mb": mb, "raw_s": [x["seconds"] for x in raw], "btx_s": [x["seconds"] for x in ours],
                "raw_mb_s": mb / statistics.median(x["seconds"] for x in raw),
                "btx_mb_s": mb / statistics.median(x["seconds"] for x in ours),
                "raw_tokens": raw[0]["tokens"], "btx_stats": ours[0]["stats"]}
            report["throughput"]["ratio"] = report["throughput"]["btx_mb_s"] / report["throughput"]["raw_mb_s"]
            print(json.dumps(report["throughput"]), flush=True)
            shutil.rmtree(corpus)
        words = word_level_tokenizer(work / "words")
        if "rss" not in skip:
            report["rss"] = []
            for gb in [float(x) for x in args.sizes.split(",")]:
                corpus = work / f"corpus-{gb}"
                start = time.perf_counter()
                documents = write_corpus(corpus, int(gb * 1e9))
                generated = time.perf_counter() - start
                prep = run_child("prepare", corpus=corpus, tokenizer=words, out=work / "out", seq_len=args.seq_len)
                shutil.rmtree(corpus)
                trained = run_child("train", tokenizer=words, out=work / "out", seq_len=args.seq_len,
                                    steps=args.steps, mode="lazy")
                row = {"gb": gb, "documents": documents, "generate_s": generated, "prepare": prep, "train": trained}
                report["rss"].append(row)
                print(json.dumps(row), flush=True)
                if gb != min(float(x) for x in args.sizes.split(",")):
                    shutil.rmtree(work / "out")
                else:
                    shutil.copytree(work / "out", work / "small-out")
                    shutil.rmtree(work / "out")
        if "speed" not in skip:
            small = work / "small-out"
            if not small.exists():
                corpus = work / "corpus-speed"
                write_corpus(corpus, int(0.1e9))
                run_child("prepare", corpus=corpus, tokenizer=words, out=small, seq_len=args.seq_len)
                shutil.rmtree(corpus)
            lazy, memory = [], []
            for r in range(args.rounds):
                lazy.append(run_child("train", tokenizer=words, out=small, seq_len=args.seq_len,
                                      steps=args.speed_steps, mode="lazy", demo_shape=args.demo_shape))
                memory.append(run_child("train", tokenizer=words, out=small, seq_len=args.seq_len,
                                        steps=args.speed_steps, mode="memory", demo_shape=args.demo_shape))
                print(f"speed round {r}: lazy {lazy[-1]['steps_per_s']:.3f} steps/s, "
                      f"memory {memory[-1]['steps_per_s']:.3f} steps/s", flush=True)
            report["speed"] = {"lazy": [x["steps_per_s"] for x in lazy], "memory": [x["steps_per_s"] for x in memory],
                               "lazy_median": statistics.median(x["steps_per_s"] for x in lazy),
                               "memory_median": statistics.median(x["steps_per_s"] for x in memory),
                               "lazy_losses": [x["final_loss"] for x in lazy],
                               "memory_losses": [x["final_loss"] for x in memory],
                               "blocks": lazy[0]["blocks"]}
            report["speed"]["ratio"] = report["speed"]["lazy_median"] / report["speed"]["memory_median"]
            print(json.dumps(report["speed"]), flush=True)
        if "access" not in skip:
            report["access"] = access_bench(work, args.rounds)
            print(json.dumps(report["access"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
