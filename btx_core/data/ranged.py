"""Prepared token shards read from the store block by block (`store_transfer.prepared_data: ranged`).

Training draws its blocks in a random order over the whole corpus, so each rank of a
data-parallel run touches every shard but reads only its share of the blocks. Downloading the
corpus first (`download`) costs every machine the whole corpus, in local disk and in time before
the first step. Here a process reads exactly the rows it is indexed with: each run of consecutive
rows of one shard is one ranged read, and all of a call's reads are in flight at once
(`Store.read_ranges`). The training loop asks for the next micro-batch while the current one
trains (btx_core/training/read_ahead.py).

Every block read is checked against its CRC-32 in the shard's `.crc32` file (btx_core/data/shards.py),
which is fetched the first time the shard is touched, its sha256 checked against the manifest,
and kept in `cache_dir` (4 bytes a block); it is read back with positioned reads, so memory does not
grow with the corpus. A block that fails its check is read once more (a transfer damaged in
flight), then it is an error that names the shard and the fix.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numpy as np

from btx_core.data.prepare import TokenizedSplits
from btx_core.data.shards import (
    CHECKS_DTYPE,
    CHECKS_SUFFIX,
    INDEX_FILE,
    OpenFiles,
    RowIndexed,
    ShardIndex,
    block_checks,
)
from btx_core.errors import DataError, IntegrityError
from btx_core.store.core import Manifest, Store


def open_ranged(store: Store, location: str, manifest: Manifest, cache_dir: Path) -> TokenizedSplits:
    """The splits of the prepared corpus at `location`, read from the store on demand. Only the
    index is read now; the shards' checks go to `cache_dir/<manifest hash>-checks/`."""
    index = ShardIndex.from_json(store.read_file(location, INDEX_FILE, manifest), f"{location}/{INDEX_FILE}")
    checks = ShardChecks(store, location, manifest, Path(cache_dir) / f"{manifest.hash}-checks")
    return TokenizedSplits.from_index(
        index, location, lambda split: RangedTokenBlocks.open(store, location, manifest, split, index, checks))


class ShardChecks(OpenFiles):
    """The per-block CRC-32s of a prepared corpus's shards, fetched on first use into `directory`
    (shared by the processes of a machine: each file is written whole, then renamed)."""

    def __init__(self, store: Store, location: str, manifest: Manifest, directory: Path):
        self.store, self.location, self.manifest, self.directory = store, location, manifest, directory
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, shard: str, start: int, stop: int) -> np.ndarray:
        """The checks of rows [start, stop) of `shard`."""
        size = (stop - start) * CHECKS_DTYPE.itemsize
        data = os.pread(self._fd(shard), size, start * CHECKS_DTYPE.itemsize)
        if len(data) != size:
            raise DataError(f"{self.directory / (shard + CHECKS_SUFFIX)} is shorter than its shard: "
                            "delete it (it is fetched again)")
        return np.frombuffer(data, dtype=CHECKS_DTYPE)

    def _fd(self, shard: str) -> int:
        with self._lock:
            if shard not in self._fds:
                self._fds[shard] = os.open(self._fetched(shard + CHECKS_SUFFIX), os.O_RDONLY)
            return self._fds[shard]

    def _fetched(self, rel: str) -> Path:
        path = self.directory / rel
        entry = self.manifest.files.get(rel)
        if entry is None:
            raise IntegrityError(f"{self.location} has no {rel}: delete the prepared data and run again "
                                 "(it is prepared again, with its checks)")
        if not (path.is_file() and path.stat().st_size == entry.size):
            data = self.store.read_file(self.location, rel, self.manifest)
            partial = path.with_name(f".{rel}.{os.getpid()}-{threading.get_ident()}")
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                partial.write_bytes(data)
                os.replace(partial, path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    partial.unlink()
                raise DataError(f"cannot keep the block checks of {self.location} in {self.directory} "
                                f"({exc.strerror or exc}): point cache_dir at a writable local disk with room "
                                "(4 bytes a block)") from exc
        return path

    def close(self) -> None:
        with self._lock:
            super().close()

    def __getstate__(self) -> dict:
        return {k: v for k, v in super().__getstate__().items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())


class RangedTokenBlocks(RowIndexed):
    """A split's blocks [n, seq_len] in the store's shard files, read on demand with ranged reads
    and checked block by block; indexing as `TokenBlocks` (int32 rows)."""

    def __init__(self, store: Store, location: str, shards: list[tuple[str, int]], seq_len: int,
                 stored: np.dtype, checks: ShardChecks):
        self.store, self.location, self.checks = store, location, checks
        self._names = [name for name, _ in shards]
        self._starts = np.concatenate([[0], np.cumsum([n for _, n in shards], dtype=np.int64)])
        self._stored = np.dtype(stored)
        self._row_bytes = seq_len * self._stored.itemsize
        self.shape = (int(self._starts[-1]), int(seq_len))
        self.rows_read = 0
        """Rows read so far (tests and benchmarks: nothing is read that was not asked for)."""
        self.requests = 0
        """Ranged reads made so far."""

    @classmethod
    def open(cls, store: Store, location: str, manifest: Manifest, split: str, index: ShardIndex,
             checks: ShardChecks) -> RangedTokenBlocks:
        shards = index.splits[split].shards
        itemsize = np.dtype(index.dtype).itemsize
        for shard in shards:
            expected = shard.blocks * index.seq_len * itemsize
            entry = manifest.files.get(shard.name)
            if entry is None or entry.size != expected or entry.sha256 != shard.sha256:
                found = "missing" if entry is None else f"{entry.size} bytes, sha256 {entry.sha256[:12]}"
                raise DataError(f"shard {location}/{shard.name} is {found} in the manifest, the index says "
                                f"{expected} bytes, sha256 {shard.sha256[:12]}: delete {location} and "
                                "prepare the data again")
        return cls(store, location, [(s.name, s.blocks) for s in shards], index.seq_len,
                   np.dtype(index.dtype), checks)

    def _take(self, rows: np.ndarray) -> np.ndarray:
        wanted, inverse = np.unique(rows, return_inverse=True)
        found = np.empty((len(wanted), self.shape[1]), dtype=np.int32)
        bad = self._read(self._runs(wanted), found)
        if bad:  # damaged in flight? once more, then it is the stored object
            bad = self._read(bad, found)
        if bad:
            shard, first, stop, _ = bad[0]
            raise IntegrityError(
                f"{self.location}/{self._names[shard]}: blocks {first}..{stop - 1} do not match their CRC-32s "
                f"in {self._names[shard]}{CHECKS_SUFFIX} (read twice): the stored shard is damaged; delete "
                f"{self.location} and run again to prepare the data again")
        self.rows_read += len(wanted)
        return found[inverse.reshape(-1)]

    def _runs(self, wanted: np.ndarray) -> list[tuple[int, int, int, int]]:
        """(shard, first row in it, stop row in it, position in `wanted`) per run of consecutive
        rows of one shard."""
        shard = np.searchsorted(self._starts, wanted, side="right") - 1
        breaks = np.flatnonzero((np.diff(wanted) != 1) | (np.diff(shard) != 0)) + 1
        runs = []
        for lo, hi in zip(np.concatenate([[0], breaks]).tolist(), np.concatenate([breaks, [len(wanted)]]).tolist(),
                          strict=True):
            s = int(shard[lo])
            first = int(wanted[lo] - self._starts[s])
            runs.append((s, first, first + hi - lo, lo))
        return runs

    def _read(self, runs: list[tuple[int, int, int, int]], found: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Read `runs` into `found`; return those whose blocks failed their checks."""
        datas = self.store.read_ranges(self.location, [(self._names[s], a * self._row_bytes, b * self._row_bytes)
                                                       for s, a, b, _ in runs])
        self.requests += len(runs)
        bad = []
        for (s, a, b, at), data in zip(runs, datas, strict=True):
            if len(data) != (b - a) * self._row_bytes:
                raise DataError(f"{self.location}/{self._names[s]} is shorter than its index says: delete "
                                f"{self.location} and prepare the data again")
            stored = np.frombuffer(data, dtype=self._stored).reshape(b - a, self.shape[1])
            if not np.array_equal(block_checks(stored), self.checks(self._names[s], a, b)):
                bad.append((s, a, b, at))
                continue
            found[at:at + b - a] = stored
        return bad

    def close(self) -> None:
        self.checks.close()
