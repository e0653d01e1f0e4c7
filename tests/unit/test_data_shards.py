"""Corpora bigger than memory: preparation in parallel chunks into token shards, lazy reading,
rank slices, exact resume on shards, caps that stop reading, streamed sources and bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from btx_core.config.schema import DataSource, TrainSettings
from btx_core.data.builtin.corpora import builtin_documents
from btx_core.data.packing import pack, split_documents
from btx_core.data.prepare import TokenizedSplits, prepare_domain_data
from btx_core.data.shards import BlockMixture
from btx_core.data.sources import load_documents
from btx_core.errors import DataError
from btx_core.model.tokenizer import train_tokenizer
from btx_core.training.distributed import Dist
from btx_core.training.loop import batch_indices, train
from tests.unit.test_data import with_specials, write_jsonl
from tests.unit.test_train import DirSink, weights

DOCS = builtin_documents("general", max_documents=600)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return train_tokenizer(builtin_documents("general", max_bytes=300_000), 300, tmp_path_factory.mktemp("tok"))


def pico(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DOCS as three jsonl files."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        write_jsonl(root / f"part-{i}.jsonl", [{"text": d} for d in DOCS[i::3][:200]])
    return root


def corpus_docs(root: Path) -> list[str]:
    return [json.loads(line)["text"] for p in sorted(root.glob("*.jsonl")) for line in p.open()]


@pytest.fixture(scope="module")
def prepared(tokenizer, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> TokenizedSplits:
    """Small chunks, batches and shards, two workers: every boundary is crossed."""
    return prepare_domain_data(DataSource(path=str(corpus)), tokenizer, 16, 0.1, "salt",
                               tmp_path_factory.mktemp("prep") / "out", chunk_bytes=60_000,
                               shard_tokens=16 * 500, batch_size=50, num_proc=2)


# --- preparation = the reference split and pack ------------------------------------------------------

def test_prepare_equals_the_reference_split_and_pack_and_leaks_nothing(prepared, tokenizer, corpus) -> None:
    docs = corpus_docs(corpus)
    train_docs, held_docs = split_documents(docs, 0.1, "salt")
    assert np.array_equal(np.asarray(prepared.train), pack(train_docs, tokenizer, 16))
    assert np.array_equal(np.asarray(prepared.heldout), pack(held_docs, tokenizer, 16))
    assert prepared.train_stats.documents == len(train_docs) and prepared.heldout_stats.documents == len(held_docs)
    assert len(prepared.train._paths) > 2  # several shards
    # No held-out document's text reaches the training stream.
    train_stream = np.asarray(prepared.train).reshape(-1).tolist()
    text = tokenizer.decode(train_stream)
    assert not any(d in text for d in held_docs if len(d) > 200)


def test_prepare_with_a_distinct_bos_and_one_worker(tokenizer, corpus, tmp_path) -> None:
    llama = with_specials(tokenizer, "<s>", "</s>")
    out = prepare_domain_data(DataSource(path=str(corpus)), llama, 32, 0.2, "x", tmp_path / "o",
                              chunk_bytes=100_000, num_proc=1)
    train_docs, held_docs = split_documents(corpus_docs(corpus), 0.2, "x")
    assert np.array_equal(np.asarray(out.train), pack(train_docs, llama, 32))
    assert np.array_equal(np.asarray(out.heldout), pack(held_docs, llama, 32))


def test_prepare_refuses_a_non_empty_directory(tokenizer, tmp_path) -> None:
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        prepare_domain_data(DataSource(builtin="math", max_documents=50), tokenizer, 16, 0.1, "s", tmp_path / "o")
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep"


# --- lazy reading ------------------------------------------------------------------------------------

def test_token_blocks_read_only_the_rows_asked_for(prepared) -> None:
    blocks = TokenizedSplits.load(Path(prepared.train._paths[0]).parent).train
    assert blocks.rows_read == 0 and not blocks._fds  # opening reads nothing, opens no file
    held_arrays = [v for v in vars(blocks).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in held_arrays) < 1024  # only shard offsets in memory
    whole = np.asarray(prepared.train)
    rows = np.array([0, 499, 500, 1001, len(whole) - 1, 3, 3])  # across shard boundaries, repeated
    assert np.array_equal(blocks[rows], whole[rows]) and blocks.rows_read == len(rows)
    assert np.array_equal(blocks[498:503], whole[498:503]) and blocks.rows_read == len(rows) + 5
    assert np.array_equal(blocks[-1], whole[-1]) and np.array_equal(blocks[10:0:-3], whole[10:0:-3])
    assert np.array_equal(blocks[rows, :4], whole[rows, :4])
    assert set(blocks._fds) <= {0, 1, 2, len(blocks._paths) - 1}  # shards never asked for stay closed
    with pytest.raises(IndexError):
        blocks[np.array([len(whole)])]
    assert blocks[np.array([], dtype=np.int64)].shape == (0, 16)


def test_training_reads_only_its_batches_and_matches_memory_bit_for_bit(prepared, tmp_path) -> None:
    settings = TrainSettings(steps=6, lr=3e-3, warmup_steps=2, seq_len=16, batch_size=4, grad_accum=2,
                             precision="fp32", device="cpu", checkpoint_every=3, log_every=1, seed=7)
    directory = Path(prepared.train._paths[0]).parent
    lazy = TokenizedSplits.load(directory).train
    in_memory = np.asarray(prepared.train)
    from_memory, from_shards = pico(), pico()
    a = train(from_memory, in_memory, settings)
    b = train(from_shards, lazy, settings)
    assert a.losses == b.losses
    assert all(torch.equal(t, weights(from_shards)[k]) for k, t in weights(from_memory).items())
    assert lazy.rows_read == settings.steps * settings.grad_accum * settings.batch_size  # nothing else

    # Killed after 4 steps and resumed in a "new process" on freshly opened shards: same weights.
    sink = DirSink(tmp_path / "ckpt")
    train(pico(), TokenizedSplits.load(directory).train, settings, checkpoints=sink, stop_after=4)
    resumed = pico(seed=5)
    again = train(resumed, TokenizedSplits.load(directory).train, settings, checkpoints=sink)
    assert again.resumed_from == 3 and again.losses == b.losses
    assert all(torch.equal(t, weights(resumed)[k]) for k, t in weights(from_shards).items())


def test_block_mixture_reads_from_its_sources_on_demand(prepared) -> None:
    directory = Path(prepared.train._paths[0]).parent
    splits = TokenizedSplits.load(directory)
    mix = BlockMixture([splits.train, splits.heldout], np.array([0, 1, 0, 1]), np.array([5, 0, 7, 1]))
    expected = np.stack([prepared.train[5], prepared.heldout[0], prepared.train[7], prepared.heldout[1]])
    assert np.array_equal(mix[:], expected)
    assert splits.train.rows_read == 2 and splits.heldout.rows_read == 2
    assert np.array_equal(mix[np.array([3, 0])], expected[[3, 0]])
    assert np.array_equal(mix[:, 0], expected[:, 0]) and np.array_equal(mix[2], expected[2])


RANK_SCRIPT = r"""
import json, os, sys
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, {root!r})
from tests.unit.test_data_shards import pico
from btx_core.config.schema import TrainSettings
from btx_core.training.loop import train
{open_blocks}

class Recording(type(blocks)):
    seen = []
    def __getitem__(self, key):
        self.seen.append(np.asarray(key).tolist())
        return super().__getitem__(key)

torch.set_num_threads(1)
blocks.__class__ = Recording
settings = TrainSettings(steps=3, lr=1e-3, warmup_steps=1, seq_len=16, batch_size=4, grad_accum=2,
                         precision="fp32", device="cpu", log_every=100, seed=3, nproc_per_node=2)
train(pico(), blocks, settings)
with open({out!r} + os.environ["RANK"], "w") as f:
    json.dump({{"seen": Recording.seen, "rows_read": blocks.rows_read, **extra()}}, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_on_two_ranks(tmp_path: Path, open_blocks: str) -> list[dict]:
    """Three steps (batch 4 = 2 per rank, grad_accum 2, seq_len 16) on two gloo processes, whose
    blocks the Python code `open_blocks` opens (it defines `blocks`, and `extra()`: more to
    report); per rank, the keys it indexed the blocks with, its rows_read and extra()."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(root=str(Path(__file__).parents[2]), open_blocks=open_blocks,
                                         out=str(tmp_path / "r")))
    for _ in range(2):  # a port taken between probe and bind: one more try
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script)],
                              env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                              timeout=180)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"r{r}").read_text()) for r in (0, 1)]


def check_rank_slices(ranks: list[dict], n_blocks: int) -> list[list[list[int]]]:
    """Each rank indexed exactly its share of every global micro-batch, in order, and together
    they indexed the global batch; returns each rank's micro-batches."""
    per_process = TrainSettings(steps=3, seq_len=16, batch_size=2, grad_accum=2, seed=3)
    expected = [[batch_indices(n_blocks, step, micro, per_process, Dist(rank=r, world_size=2)).tolist()
                 for step in range(3) for micro in range(2)] for r in (0, 1)]
    assert [got["seen"] for got in ranks] == expected
    one = TrainSettings(steps=3, seq_len=16, batch_size=4, grad_accum=2, seed=3)
    for i, (step, micro) in enumerate((s, m) for s in range(3) for m in range(2)):
        assert expected[0][i] + expected[1][i] == batch_indices(n_blocks, step, micro, one, Dist()).tolist()
    return expected


# --- caps and streaming ---------------------------------------------------------------------------------

def test_caps_stop_reading(tmp_path, tokenizer) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"document {i} " * 5} for i in range(100)])
    (tmp_path / "b.jsonl").write_text("not json: reading it would fail\n")
    docs = load_documents(DataSource(path=str(tmp_path), max_bytes=2_000))  # b.jsonl is never opened
    assert 2_000 - 70 < sum(len(d) for d in docs) <= 2_000
    out = prepare_domain_data(DataSource(path=str(tmp_path), max_tokens=500), tokenizer, 8, 0.2, "s",
                              tmp_path / "out", chunk_bytes=1_000)
    used = out.train_stats.tokens + out.heldout_stats.tokens
    longest = max(len(tokenizer(f"document {i} " * 5)["input_ids"]) + 1 for i in range(100))
    assert 500 - longest < used <= 500
    with pytest.raises(DataError, match="could not load .*b.jsonl"):
        load_documents(DataSource(path=str(tmp_path)))
    with pytest.raises(DataError, match="longer than max_tokens"):
        prepare_domain_data(DataSource(path=str(tmp_path / "a.jsonl"), max_tokens=2), tokenizer, 8, 0.2, "s",
                            tmp_path / "none")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("field", ["max_tokens", "max_bytes", "max_documents"])
def test_a_cap_of_zero_is_refused(field) -> None:
    with pytest.raises(ValidationError, match="greater than 0"):
        DataSource(builtin="math", **{field: 0})


def test_hub_dataset_streamed(tmp_path) -> None:
    """`streaming` reads a datasets-loadable dataset row by row (a local one here: no network)."""
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"text": f"row {i}"} for i in range(30)])
    streamed = load_documents(DataSource(hub=str(tmp_path / "ds"), streaming=True, max_documents=7))
    assert streamed == [f"row {i}" for i in range(7)]
    assert load_documents(DataSource(hub=str(tmp_path / "ds"))) == [f"row {i}" for i in range(30)]
    with pytest.raises(DataError, match="no column 'body'"):
        load_documents(DataSource(hub=str(tmp_path / "ds"), streaming=True, text_column="body"))


# --- bad input ------------------------------------------------------------------------------------------

def test_bad_files_name_the_file_and_write_nothing(tmp_path, tokenizer) -> None:
    cases = {
        "latin1.txt": ("Caf\xe9 au lait, " * 50).encode("latin-1"),
        "latin1.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
        "empty.jsonl": b"",
        "nocolumn.jsonl": b'{"body": "a document"}\n',
    }
    expected = {"latin1.txt": "not UTF-8 text", "latin1.jsonl": "not UTF-8 text .*line 2",
                "empty.jsonl": "no non-empty documents", "nocolumn.jsonl": "no column 'text'.*set `text_column`"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=expected[name]) as info:
            prepare_domain_data(DataSource(path=str(tmp_path / name)), tokenizer, 16, 0.1, "s", tmp_path / "out")
        assert name in str(info.value)
        assert not (tmp_path / "out").exists()


def test_unreachable_s3_path_is_a_clear_error(monkeypatch, tmp_path, tokenizer) -> None:
    import s3fs

    port = _free_port()  # nobody listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(DataError, match=r"cannot list 's3://btx-nowhere/corpus'.*endpoint"):
            prepare_domain_data(DataSource(path="s3://btx-nowhere/corpus", storage_options={"config_kwargs": {"retries": {"max_attempts": 1}}}),
                                tokenizer, 16, 0.1, "s", tmp_path / "out")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert not (tmp_path / "out").exists()

