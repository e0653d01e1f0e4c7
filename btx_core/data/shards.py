"""Token shards: a split's packed blocks [n, seq_len] as fixed-size raw files with a JSON index,
written as a stream and read back one block at a time.

A prepared corpus can be larger than memory (the paper trains each expert on 42-210B tokens), so
nothing here holds a split whole. `ShardWriter` appends the token stream of a split, cuts it into
full blocks and rolls over to a new file every `shard_blocks` blocks; `TokenBlocks` reads only the
blocks it is asked for, with positioned reads (`os.pread`) into a fresh array. Positioned reads
rather than `np.memmap`: a mapping keeps every page it ever touched in the process's resident
set, so a long run would look (and, under a cgroup limit, count) as if it held the corpus; a read
costs one system call per block, nothing next to a training step.

The files are raw little-endian integers (uint16 when the vocabulary fits, else int32): nothing a
loader has to execute, and a block is a plain byte range. The index says, per split, each shard's
name, shape, dtype and sha256; the store's manifest hashes the files again when they move. Beside
each shard, `<shard>.crc32` holds every block's CRC-32 (uint32, 4 bytes a block): a reader that
takes single blocks from an object store with ranged reads (btx_core/data/ranged.py) checks each
one without reading its whole shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from btx_core.errors import DataError

INDEX_FILE = "index.json"
SPLIT_NAMES = ("train", "heldout")
CHECKS_SUFFIX = ".crc32"
"""`<shard><CHECKS_SUFFIX>`: the shard's per-block CRC-32s, little-endian uint32."""
CHECKS_DTYPE = np.dtype("<u4")


def block_checks(rows: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's stored bytes (rows [n, seq_len] in the stored dtype)."""
    rows = np.ascontiguousarray(rows)
    return np.fromiter((zlib.crc32(row) for row in rows), dtype=CHECKS_DTYPE, count=len(rows))


class Blocks(Protocol):
    """What training and evaluation read token blocks from: an int array [n, seq_len] in memory,
    or a lazy one (`TokenBlocks`, `BlockMixture`) that reads only the rows it is indexed with."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, key) -> np.ndarray: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every token id: half the disk and I/O of int32 for
    vocabularies up to 65,536 (Llama 2, Mistral 7B v0.1, the demo's)."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


# --- the index ---------------------------------------------------------------------------------------

@dataclass
class Shard:
    name: str
    """File name, next to the index."""
    blocks: int
    """Rows of seq_len tokens; the file is blocks * seq_len * itemsize bytes."""
    sha256: str


@dataclass
class SplitIndex:
    documents: int = 0
    """Documents in the split."""
    tokens: int = 0
    """Tokens before cutting into blocks, each document's EOS (and BOS, if any) included."""
    blocks: int = 0
    """Full blocks of seq_len tokens (the ragged tail is dropped)."""
    shards: list[Shard] = field(default_factory=list)


@dataclass
class ShardIndex:
    format_version: int
    seq_len: int
    dtype: str
    """numpy dtype string of the stored ids ("<u2" or "<i4")."""
    tokenizer: str
    """The tokenizer's id (btx_core.data.cache.tokenizer_id); "" when not known."""
    splits: dict[str, SplitIndex]

    def to_json(self) -> str:
        out = asdict(self)
        for split in out["splits"].values():
            for shard in split["shards"]:
                shard["shape"] = [shard["blocks"], self.seq_len]
                shard["dtype"] = self.dtype
        return json.dumps(out, indent=1, sort_keys=True)

    @classmethod
    def read(cls, directory: Path) -> ShardIndex:
        path = directory / INDEX_FILE
        if not path.is_file():
            raise DataError(f"{directory} is not prepared token data: {INDEX_FILE} is missing; "
                            "prepare the data again")
        return cls.from_json(path.read_bytes(), str(path))

    @classmethod
    def from_json(cls, text: str | bytes, path: str) -> ShardIndex:
        """The index in `text`, read from `path` (named in errors)."""
        try:
            raw = json.loads(text)
            splits = {name: SplitIndex(documents=s["documents"], tokens=s["tokens"], blocks=s["blocks"],
                                       shards=[Shard(h["name"], h["blocks"], h["sha256"]) for h in s["shards"]])
                      for name, s in raw["splits"].items()}
            index = cls(raw["format_version"], raw["seq_len"], raw["dtype"], raw["tokenizer"], splits)
            np.dtype(index.dtype)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path} is unreadable ({exc}); delete the prepared data and prepare it "
                            "again") from exc
        return index


# --- writing -----------------------------------------------------------------------------------------

class ShardWriter:
    """Appends a split's token stream; writes full blocks into shards of `shard_blocks` blocks."""

    def __init__(self, directory: Path, split: str, seq_len: int, dtype: np.dtype, shard_blocks: int):
        if shard_blocks <= 0 or seq_len <= 0:
            raise ValueError(f"shard_blocks and seq_len must be positive, got {shard_blocks}, {seq_len}")
        self.directory, self.split, self.seq_len = directory, split, seq_len
        self.dtype, self.shard_blocks = np.dtype(dtype), shard_blocks
        self.index = SplitIndex()
        self._tail = np.zeros(0, dtype=self.dtype)  # tokens short of a full block
        self._file = None
        self._hash = None
        self._checks: list[np.ndarray] = []
        self._in_shard = 0

    def add(self, tokens: np.ndarray, documents: int) -> None:
        """Append `documents` documents' tokens (already in stream order, BOS/EOS included)."""
        self.index.documents += documents
        self.index.tokens += len(tokens)
        stream = np.concatenate([self._tail, tokens.astype(self.dtype, copy=False)])
        full = len(stream) // self.seq_len
        rows = stream[: full * self.seq_len].reshape(full, self.seq_len)
        self._tail = stream[full * self.seq_len:].copy()
        while len(rows):
            if self._file is None:
                self._open()
            take = min(len(rows), self.shard_blocks - self._in_shard)
            chunk = np.ascontiguousarray(rows[:take])
            data = chunk.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._checks.append(block_checks(chunk))
            self._in_shard += take
            rows = rows[take:]
            if self._in_shard == self.shard_blocks:
                self._close_shard()

    def close(self) -> SplitIndex:
        """Finish the last shard; the tail short of a block is dropped."""
        if self._file is not None:
            self._close_shard()
        self._tail = self._tail[:0]
        return self.index

    def _open(self) -> None:
        name = f"{self.split}-{len(self.index.shards):05d}.tokens"
        self._file = open(self.directory / name, "xb")
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self.index.shards.append(Shard(name, 0, ""))

    def _close_shard(self) -> None:
        self._file.close()
        checks = np.concatenate(self._checks) if self._checks else np.zeros(0, CHECKS_DTYPE)
        (self.directory / (self.index.shards[-1].name + CHECKS_SUFFIX)).write_bytes(checks.tobytes())
        self._checks = []
        shard = self.index.shards[-1]
        shard.blocks, shard.sha256 = self._in_shard, self._hash.hexdigest()
        self.index.blocks += self._in_shard
        self._file = None


def write_index(directory: Path, index: ShardIndex) -> None:
    (directory / INDEX_FILE).write_text(index.to_json())


# --- reading -----------------------------------------------------------------------------------------

class RowIndexed:
    """Indexing shared by the lazy block arrays: an int, a slice, an integer array, a boolean mask,
    or `[rows, columns]`, all validated here; subclasses read rows (`_take`), and contiguous
    runs (`_read_range`) when they can do better than row by row."""

    ndim = 2
    dtype = np.dtype(np.int32)
    shape: tuple[int, int]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):  # blocks[rows, columns]: the rows, then numpy's indexing
            rows = self[key[0]]
            return rows[key[1:]] if rows.ndim == 1 else rows[(slice(None), *key[1:])]
        n = len(self)
        if isinstance(key, (int, np.integer)):
            row = int(key) + n if key < 0 else int(key)
            if not 0 <= row < n:
                raise IndexError(f"block {key} out of range for {n} blocks")
            return self._read_range(row, row + 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._read_range(start, max(start, stop))
            key = np.arange(start, stop, step)
        rows = np.asarray(key)
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise IndexError(f"boolean index of shape {rows.shape} for {n} blocks")
            rows = np.flatnonzero(rows)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise IndexError(f"index blocks with an int, a slice or a 1-d integer array, not {key!r}")
        rows = np.where(rows < 0, rows + n, rows).astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"block index out of range for {n} blocks")
        return self._take(rows)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """Every block, read whole: for small splits; training and evaluation never call it."""
        whole = self._read_range(0, len(self))
        return whole if dtype is None else whole.astype(dtype)

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        return self._take(np.arange(start, stop, dtype=np.int64))

    def _take(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OpenFiles:
    """File descriptors opened on first use (`_fds`), closed by `close()` or when the object is
    dropped, and left out when it is pickled (descriptors do not cross processes)."""

    _fds: dict

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError, TypeError):  # interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}


class TokenBlocks(OpenFiles, RowIndexed):
    """A split's blocks [n, seq_len] in shard files, read on demand.

    Indexing with an int, a slice, an integer array or a boolean mask reads just those rows and
    returns int32 (what packing always produced); `len()` and `shape` cost nothing. The files are
    opened on first use, so a process (a rank) that never asks for a shard never opens it.
    """

    def __init__(self, paths: Sequence[Path], counts: Sequence[int], seq_len: int, stored: np.dtype):
        self._paths = [Path(p) for p in paths]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._stored = np.dtype(stored)
        self._row_bytes = seq_len * self._stored.itemsize
        self.shape = (int(self._starts[-1]), int(seq_len))
        self._fds: dict[int, int] = {}
        self.rows_read = 0
        """Rows read so far (for tests and benchmarks: nothing is read that was not asked for)."""

    @classmethod
    def open(cls, directory: Path, split: str, index: ShardIndex) -> TokenBlocks:
        shards = index.splits[split].shards
        paths = [directory / s.name for s in shards]
        itemsize = np.dtype(index.dtype).itemsize
        for shard, path in zip(shards, paths, strict=True):
            expected = shard.blocks * index.seq_len * itemsize
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                raise DataError(f"shard {path} is {'missing' if size is None else f'{size} bytes'}, "
                                f"the index says {expected}: delete {directory} and prepare the data again")
        return cls(paths, [s.blocks for s in shards], index.seq_len, np.dtype(index.dtype))

    def _take(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.shape[1]), dtype=np.int32)
        for i, row in enumerate(rows.tolist()):
            out[i] = self._read_range(row, row + 1)[0]
        return out

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.shape[1]), dtype=np.int32)
        row = start
        while row < stop:
            shard = int(np.searchsorted(self._starts, row, side="right")) - 1
            end = min(stop, int(self._starts[shard + 1]))
            offset = (row - int(self._starts[shard])) * self._row_bytes
            size = (end - row) * self._row_bytes
            data = os.pread(self._fd(shard), size, offset)
            if len(data) != size:
                raise DataError(f"shard {self._paths[shard]} is shorter than its index says: delete "
                                "the prepared data and prepare it again")
            out[row - start:end - start] = np.frombuffer(data, dtype=self._stored).reshape(-1, self.shape[1])
            row = end
        self.rows_read += stop - start
        return out

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self._paths[shard], os.O_RDONLY)
        return fd



class BlockMixture(RowIndexed):
    """Rows of several block arrays in a given order, read on demand: `sources[which[i]][rows[i]]`
    is row i. The finetuning mixture, built from index arrays (a few bytes per block) instead of a
    copy of every source's blocks."""

    def __init__(self, sources: Sequence[Blocks], which: np.ndarray, rows: np.ndarray):
        seq_lens = {s.shape[1] for s in sources}
        if len(seq_lens) != 1:
            raise ValueError(f"mixed sources have different block lengths {sorted(seq_lens)}")
        if len(which) != len(rows):
            raise ValueError("which and rows must have the same length")
        self._sources = list(sources)
        self._which = np.asarray(which, dtype=np.int32)
        self._rows = np.asarray(rows, dtype=np.int64)
        self.shape = (len(self._rows), seq_lens.pop())

    def _take(self, positions: np.ndarray) -> np.ndarray:
        which, rows = self._which[positions], self._rows[positions]
        out = np.empty((len(positions), self.shape[1]), dtype=np.int32)
        for s in np.unique(which).tolist():
            mask = which == s
            out[mask] = self._sources[s][rows[mask]]
        return out
