"""Lazy, streaming safetensors I/O for checkpoints in Hugging Face layout.

`CheckpointReader` reads one tensor at a time from a model directory (one `model.safetensors`
or shards plus `model.safetensors.index.json`): headers are parsed without loading any data.
`ShardedWriter` writes a planned list of tensors into shards of bounded size, each tensor
streamed to disk as soon as it is computed: the shard layout and every header are known before
the first byte is written (shapes and dtypes come from the inputs' headers), so no shard is
ever held in memory, and each file's sha256 is computed on the way out (no second read for the
manifest). The files are ordinary safetensors: `safe_open` and `from_pretrained` read them.
"""

from __future__ import annotations

import hashlib
import json
import queue
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from btx_core.errors import BTXError
from btx_core.store.manifest import FileEntry

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors' dtype names (its format spec) for the dtypes model weights come in.
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
               torch.uint8: "U8", torch.bool: "BOOL"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * torch.empty((), dtype=self.dtype).element_size()


class CheckpointReader:
    """The tensors of a model directory, read lazily by name."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map = None
        else:
            pickles = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt"))
            hint = (f" (it has {', '.join(pickles[:3])}: btx never loads pickle; convert with "
                    "`model.save_pretrained(dir, safe_serialization=True)`)") if pickles else ""
            raise BTXError(f"{self.directory} holds no safetensors weights{hint}")
        self._files: dict[str, object] = {}
        self.meta: dict[str, TensorMeta] = {}
        self._where: dict[str, str] = {}
        for file in sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]:
            handle = self._open(file)
            for name in handle.keys():
                piece = handle.get_slice(name)
                dtype = DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise BTXError(f"{self.directory / file}: tensor {name} has unsupported dtype "
                                   f"{piece.get_dtype()}")
                self.meta[name] = TensorMeta(dtype, tuple(piece.get_shape()))
                self._where[name] = file
        if weight_map is not None and (missing := sorted(set(weight_map) - set(self.meta))):
            raise BTXError(f"{index} lists tensors no shard holds, e.g. {missing[0]}: the "
                           "checkpoint is incomplete; copy it again")

    def _open(self, file: str):
        if file not in self._files:
            path = self.directory / file
            if not path.is_file():
                raise BTXError(f"{path} is missing: the checkpoint is incomplete; copy it again")
            self._files[file] = safe_open(str(path), framework="pt")
        return self._files[file]

    def keys(self) -> list[str]:
        return list(self.meta)

    def get(self, name: str) -> torch.Tensor:
        return self._open(self._where[name]).get_tensor(name)


def shard_plan(tensors: Iterable[tuple[str, TensorMeta]], max_bytes: int) -> list[list[tuple[str, TensorMeta]]]:
    """Split an ordered tensor list into shards of at most `max_bytes` (a larger tensor gets a
    shard of its own), keeping the order: the writer streams tensors in exactly this order."""
    shards: list[list[tuple[str, TensorMeta]]] = [[]]
    size = 0
    for name, meta in tensors:
        if shards[-1] and size + meta.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, meta))
        size += meta.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """transformers' names: one `model.safetensors`, or `model-0000i-of-0000n.safetensors`."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(entries: list[tuple[str, TensorMeta]]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, meta in entries:
        header[name] = {"dtype": DTYPE_NAMES[meta.dtype], "shape": list(meta.shape),
                        "data_offsets": [offset, offset + meta.nbytes]}
        offset += meta.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data start to 8 bytes
    return struct.pack("<Q", len(blob)) + blob


class _Worker:
    """A thread applying `fn` to queued items in order; at most `depth` items wait (memory stays
    bounded), and its first error is raised in the caller at the next `put` or `join`."""

    def __init__(self, fn, depth: int = 4):
        self.fn, self.error = fn, None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not _DONE:
            if self.error is None:
                try:
                    self.fn(item)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    self.error = exc

    def put(self, item) -> None:
        self._raise()
        self.queue.put(item)

    def join(self) -> None:
        self.queue.put(_DONE)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


_DONE = object()


class ShardedWriter:
    """Writes the planned tensors, in plan order, into `directory`; `close` writes the index and
    returns every file's size and sha256. Writing and hashing run in two threads of their own
    (both release the GIL), overlapped with the caller reading and merging the next tensors."""

    def __init__(self, directory: Path, tensors: list[tuple[str, TensorMeta]], max_bytes: int):
        self.directory = directory
        self.plan = shard_plan(tensors, max_bytes)
        self.names = shard_names(len(self.plan))
        self.entries: dict[str, FileEntry] = {}
        self._order: Iterator[tuple[int, int]] = iter(
            [(s, i) for s, shard in enumerate(self.plan) for i in range(len(shard))])
        self._file = None
        self._digest = None
        self._shard = -1
        self._writer = _Worker(lambda item: item[0].write(item[1]))
        self._hasher = _Worker(lambda item: item[0].update(item[1]))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, i = next(self._order, (None, None))
        if shard is None:
            raise ValueError(f"{name} was not planned: every tensor has been written already")
        planned, meta = self.plan[shard][i]
        if name != planned or tensor.dtype != meta.dtype or tuple(tensor.shape) != meta.shape:
            raise ValueError(f"expected {planned} {meta.dtype} {list(meta.shape)} next, got {name} "
                             f"{tensor.dtype} {list(tensor.shape)}")
        if shard != self._shard:
            self._finish_file()
            self._start_file(shard)
        self._emit(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

    def _emit(self, data) -> None:
        self._writer.put((self._file, data))
        self._hasher.put((self._digest, data))

    def _start_file(self, shard: int) -> None:
        self._shard = shard
        self._file = open(self.directory / self.names[shard], "wb")
        self._digest = hashlib.sha256()
        self._emit(_header(self.plan[shard]))

    def _drain(self) -> None:
        """Wait until everything queued is written and hashed (new workers for what follows)."""
        self._writer.join()
        self._hasher.join()
        self._writer = _Worker(self._writer.fn)
        self._hasher = _Worker(self._hasher.fn)

    def _finish_file(self) -> None:
        if self._file is None:
            return
        self._drain()
        self._file.close()
        name = self.names[self._shard]
        self.entries[name] = FileEntry(size=(self.directory / name).stat().st_size,
                                       sha256=self._digest.hexdigest())
        self._file = None

    def close(self) -> dict[str, FileEntry]:
        if next(self._order, None) is not None:
            raise ValueError("the writer was closed before every planned tensor was written")
        self._finish_file()
        if len(self.plan) > 1:
            weight_map = {name: self.names[s] for s, shard in enumerate(self.plan) for name, _ in shard}
            total = sum(meta.nbytes for shard in self.plan for _, meta in shard)
            blob = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                              indent=2).encode() + b"\n"
            (self.directory / INDEX_FILE).write_bytes(blob)
            self.entries[INDEX_FILE] = FileEntry(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
        return dict(self.entries)

    def abort(self) -> None:
        for worker in (self._writer, self._hasher):
            worker.error = worker.error or RuntimeError("aborted")  # skip what is still queued
            worker.queue.put(_DONE)
            worker.thread.join()
        if self._file is not None:
            self._file.close()
            self._file = None
