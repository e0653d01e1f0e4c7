"""Preparing a domain's corpus for training: read, split, tokenize and pack it into token shards,
in parallel and in bounded memory, with `datasets`.

The corpus streams through in chunks of about `chunk_bytes` of text. Each chunk is written to an
Arrow file, which `datasets.Dataset.map(batched=True, num_proc=...)` tokenizes on every core and
hashes for the held-out split (`packing.position`: the document's text and the salt decide its
side, so the split is the same in any order, in any stage and in any corpus that shares the
document). The main process then walks the tokenized chunk in order and appends each document's
tokens to its split's `ShardWriter` (btx_core/data/shards.py), so blocks come out exactly as
`packing.pack` makes them from the same documents. A chunk's files are deleted before the next
one is read: memory holds a batch of documents, disk a chunk.

`max_tokens` is applied as documents are packed; reading stops with the chunk in which the cap
was reached. The rule "each side of the split gets at least one document" needs the whole corpus,
so it is applied when the corpus fits in one chunk (the only case where a side can end up empty
by chance); a larger corpus with an empty side is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from btx_core.config.schema import DataSource
from btx_core.data.packing import DATA_FORMAT_VERSION, bos_eos, held_out_mask, plain_backend
from btx_core.data.shards import (
    INDEX_FILE,
    SPLIT_NAMES,
    Blocks,
    ShardIndex,
    ShardWriter,
    SplitIndex,
    TokenBlocks,
    token_dtype,
    write_index,
)
from btx_core.data.sources import iter_documents
from btx_core.errors import DataError

# Text per chunk: what one map over every core works on. Peak memory grows with it, not with
# the corpus (BENCHMARKS.md, "Peak memory as the corpus grows": 256 MiB chunks cost ~200 MB more
# than a 100 MB corpus in one chunk); each chunk's map starts its workers anew, a second or two.
CHUNK_BYTES = 128 * 2**20
SHARD_TOKENS = 2**25       # tokens per shard file (64 MB at uint16)
ENCODE_BATCH = 1000        # documents per tokenizer call in a worker


@dataclass(frozen=True)
class SplitStats:
    documents: int
    """Documents in the split."""
    tokens: int
    """Tokens before cutting into blocks, each document's EOS (and BOS, if any) included."""
    blocks: int
    """Full blocks of seq_len tokens (the ragged tail is dropped)."""


@dataclass(frozen=True)
class TokenizedSplits:
    """A domain's packed train and held-out blocks [n_blocks, seq_len]: read lazily from shards
    (`TokenBlocks`), or arrays in memory."""

    train: Blocks
    heldout: Blocks
    train_stats: SplitStats
    heldout_stats: SplitStats

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])

    def stats(self) -> dict[str, dict[str, int] | int]:
        """JSON-ready numbers for manifests and logs."""
        return {"seq_len": self.seq_len, "train": asdict(self.train_stats),
                "heldout": asdict(self.heldout_stats)}

    @classmethod
    def load(cls, directory: str | Path) -> TokenizedSplits:
        """The splits of prepared data in `directory`, opened lazily: nothing is read yet."""
        directory = Path(directory)
        index = ShardIndex.read(directory)
        return cls.from_index(index, str(directory), lambda name: TokenBlocks.open(directory, name, index))

    @classmethod
    def from_index(cls, index: ShardIndex, where: str, open_split: Callable[[str], Blocks]) -> TokenizedSplits:
        """The splits `index` describes (prepared data at `where`), each opened by `open_split`."""
        if index.format_version != DATA_FORMAT_VERSION or set(index.splits) != set(SPLIT_NAMES):
            raise DataError(f"{where} holds prepared data of format {index.format_version} (this btx "
                            f"reads {DATA_FORMAT_VERSION}): delete it and prepare the data again")
        blocks = {name: open_split(name) for name in SPLIT_NAMES}
        for name, split in index.splits.items():
            if len(blocks[name]) != split.blocks:
                raise DataError(f"{name} blocks in {where} do not match its {INDEX_FILE}: "
                                "delete it and prepare the data again")
        stats = {n: SplitStats(s.documents, s.tokens, s.blocks) for n, s in index.splits.items()}
        return cls(blocks["train"], blocks["heldout"], stats["train"], stats["heldout"])


def prepare_domain_data(source: DataSource, tokenizer, seq_len: int, held_out_fraction: float,
                        salt: str, directory: str | Path, *, tokenizer_id: str = "",
                        cache_dir: str | None = None, num_proc: int | None = None,
                        chunk_bytes: int = CHUNK_BYTES, shard_tokens: int = SHARD_TOKENS,
                        batch_size: int = ENCODE_BATCH) -> TokenizedSplits:
    """Read, split, tokenize and pack one domain's data into shards in `directory` (created; it
    must not exist or be empty), and open them. On any error the directory is removed: nothing
    half-written stays. `num_proc` defaults to the CPUs this process may use; `cache_dir` holds
    the temporary chunk files (default: the system's temporary directory)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be between 0 and 1, got {held_out_fraction}")
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} is not empty: prepare into a new directory")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        splits = _prepare(source, tokenizer, seq_len, held_out_fraction, salt, directory,
                          cache_dir=cache_dir, num_proc=num_proc or len(os.sched_getaffinity(0)),
                          chunk_bytes=chunk_bytes, shard_blocks=max(1, shard_tokens // seq_len),
                          batch_size=batch_size)
        write_index(directory, ShardIndex(DATA_FORMAT_VERSION, seq_len, token_dtype(len(tokenizer)).str,
                                          tokenizer_id, splits))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return TokenizedSplits.load(directory)


def _prepare(source: DataSource, tokenizer, seq_len: int, fraction: float, salt: str, directory: Path, *,
             cache_dir: str | None, num_proc: int, chunk_bytes: int, shard_blocks: int,
             batch_size: int) -> dict[str, SplitIndex]:
    head, eos = bos_eos(tokenizer)
    dtype = token_dtype(len(tokenizer))
    encoder = Encoder(plain_backend(tokenizer) or tokenizer, head, eos, salt, dtype)
    writers = {name: ShardWriter(directory, name, seq_len, dtype, shard_blocks) for name in SPLIT_NAMES}
    cap = _TokenCap(source.max_tokens)
    docs = iter_documents(source, cache_dir=cache_dir)
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="btx-prepare-", dir=cache_dir) as work, _quiet_datasets():
        exhausted, chunk = False, 0
        while not exhausted and not cap.done:
            text_file = Path(work) / f"text-{chunk}.arrow"
            count, exhausted = _write_chunk(docs, text_file, chunk_bytes)
            if count == 0:
                break
            tokens = _tokenize(text_file, encoder, num_proc, batch_size, Path(work) / f"tokens-{chunk}.arrow")
            lengths = np.concatenate([np.diff(b.column("ids").offsets.to_numpy()) for b in tokens.to_batches()])
            positions = np.concatenate([b.column("position").to_numpy() for b in tokens.to_batches()])
            keep = cap.take(lengths)
            # One chunk is the whole corpus: the rule that each side gets a document can apply.
            whole = chunk == 0 and (exhausted or cap.done)
            held = np.zeros(len(keep), dtype=bool)
            held[keep] = held_out_mask(positions[keep], fraction, both_sides=whole)
            _pack_chunk(tokens, keep, held, writers)
            del tokens
            for path in Path(work).iterdir():
                path.unlink()
            chunk += 1
    docs.close()  # a cap may stop reading early: close the file being read
    splits = {name: w.close() for name, w in writers.items()}
    _check(source, splits, seq_len, cap)
    return splits


def _write_chunk(docs: Iterator[str], path: Path, chunk_bytes: int) -> tuple[int, bool]:
    """Up to about `chunk_bytes` of documents into an Arrow stream file: (documents, exhausted)."""
    import pyarrow as pa

    schema = pa.schema([("text", pa.large_string())])
    count, size, batch, batch_size = 0, 0, [], 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for doc in docs:
            batch.append(doc)
            batch_size += len(doc)
            if batch_size >= 2**22 or len(batch) >= 4096 or size + batch_size >= chunk_bytes:
                writer.write_batch(pa.record_batch([pa.array(batch, pa.large_string())], schema=schema))
                count, size, batch, batch_size = count + len(batch), size + batch_size, [], 0
                if size >= chunk_bytes:
                    return count, False
        if batch:
            writer.write_batch(pa.record_batch([pa.array(batch, pa.large_string())], schema=schema))
            count += len(batch)
    return count, True


def _tokenize(text_file: Path, encoder: Encoder, num_proc: int, batch_size: int, cache_file: Path):
    """The chunk's (ids, position) per document, in order, as a memory-mapped Arrow table."""
    import datasets

    texts = datasets.Dataset.from_file(str(text_file))
    # No idle workers: a small chunk gets as many as it has batches.
    procs = min(num_proc, -(-len(texts) // batch_size))
    with _tokenizers_single_threaded(procs > 1):
        out = texts.with_format("arrow").map(
            encoder, batched=True, batch_size=batch_size, num_proc=procs if procs > 1 else None,
            remove_columns=["text"], cache_file_name=str(cache_file), load_from_cache_file=False,
            new_fingerprint=uuid.uuid4().hex)
    return out.data.table


def _pack_chunk(tokens, keep: np.ndarray, held: np.ndarray, writers: dict[str, ShardWriter]) -> None:
    """Each kept document's tokens onto its split's stream, in corpus order."""
    row = 0
    for batch in tokens.to_batches():
        ids = batch.column("ids")
        n = len(ids)
        offsets = ids.offsets.to_numpy()
        lengths = np.diff(offsets)
        flat = ids.values.to_numpy()[offsets[0]:offsets[-1]]
        k, h = keep[row:row + n], held[row:row + n]
        for name, mine in (("train", k & ~h), ("heldout", k & h)):
            if mine.any():
                part = flat if mine.all() else flat[np.repeat(mine, lengths)]
                writers[name].add(part, documents=int(mine.sum()))
        row += n


class Encoder:
    """The map function: a batch of documents -> each one's token ids ([BOS,] tokens, EOS) and its
    position in [0, 1) for the held-out split. Runs in `datasets`' worker processes."""

    def __init__(self, tokenizer, head: tuple[int, ...], eos: int, salt: str, dtype: np.dtype):
        self.tokenizer, self.head, self.eos, self.dtype = tokenizer, head, eos, np.dtype(dtype)
        self.salted = salt.encode() + b"\0"

    def __call__(self, batch):
        import pyarrow as pa

        texts = batch.column("text").to_pylist()
        if hasattr(self.tokenizer, "encode_batch_fast"):  # the Rust tokenizer, without offsets
            ids = [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        else:
            ids = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                 verbose=False)["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + len(self.head) + 1
        offsets = np.zeros(len(ids) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        stream = np.empty(int(offsets[-1]), dtype=self.dtype)
        body = np.ones(len(stream), dtype=bool)
        body[offsets[1:] - 1] = False
        stream[offsets[1:] - 1] = self.eos
        if self.head:
            body[offsets[:-1]] = False
            stream[offsets[:-1]] = self.head[0]
        stream[body] = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype,
                                   count=int(body.sum()))
        positions = [_position(self.salted, t) for t in texts]
        return pa.table({"ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(stream)),
                         "position": pa.array(positions, pa.float64())})


def _position(salted: bytes, text: str) -> float:
    # Must equal packing.position(text, salt): the split of the reference implementation.
    return int.from_bytes(hashlib.sha256(salted + text.encode("utf-8")).digest()[:8], "big") / 2**64


class _TokenCap:
    """`max_tokens`, as `max_bytes` (sources._capped): packing, and reading, stop at the first
    document that does not fit in what is left; one longer than the whole cap is skipped."""

    def __init__(self, cap: int | None):
        self.cap, self.left, self.done, self.skipped = cap, cap, False, 0

    def take(self, lengths: np.ndarray) -> np.ndarray:
        if self.cap is None:
            return np.ones(len(lengths), dtype=bool)
        keep = np.zeros(len(lengths), dtype=bool)
        for i, n in enumerate(lengths.tolist()):
            if n > self.cap:
                self.skipped += 1
            elif n > self.left:
                self.done = True
                break
            else:
                keep[i] = True
                self.left -= n
        return keep


def _check(source: DataSource, splits: dict[str, SplitIndex], seq_len: int, cap: _TokenCap) -> None:
    described = _describe(source)
    documents = sum(s.documents for s in splits.values())
    if documents == 0 and cap.skipped:
        raise DataError(f"{described}: every document is longer than max_tokens ({cap.cap}): raise max_tokens")
    if documents < 2:
        raise DataError(f"{described} has {documents} document; a held-out split needs at least 2 (one "
                        "text file is one document: split it into several files, or use jsonl with one "
                        "document per line)")
    for name, split in splits.items():
        label = "held-out" if name == "heldout" else name
        if split.documents == 0:
            raise DataError(f"the {label} split of {described} is empty ({documents} documents): change "
                            "held_out_fraction")
        if split.blocks == 0:
            raise DataError(f"the {label} split of {described} has {split.documents} documents and "
                            f"{split.tokens} tokens, not one full block of seq_len {seq_len}: lower "
                            "seq_len, add data (raise max_bytes or max_tokens), or change held_out_fraction")


def _describe(source: DataSource) -> str:
    if source.builtin is not None:
        return f"built-in corpus {source.builtin!r}"
    return f"path {source.path!r}" if source.path is not None else f"Hub dataset {source.hub!r}"


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or cache chatter from `datasets` inside a btx stage (ours report progress)."""
    import datasets.utils as ds_tqdm
    from datasets.utils import logging as ds_logging

    bars = ds_tqdm.are_progress_bars_disabled()
    level = ds_logging.get_verbosity()
    ds_tqdm.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if not bars:
            ds_tqdm.enable_progress_bars()


@contextlib.contextmanager
def _tokenizers_single_threaded(forking: bool):
    """Worker processes each tokenize on one thread; `tokenizers` would otherwise warn, in every
    fork, that it disables its thread pool after the parent used it."""
    if not forking:
        yield
        return
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
