"""The next micro-batch's rows, read while the current one trains.

Blocks read from an object store (btx_core/data/ranged.py) cost a round trip per micro-batch:
milliseconds on loopback, tens of milliseconds to a remote S3. One background thread reads the
micro-batch that comes next in the data order (a pure function of step and micro-batch), so the
step does not wait on it. The rows are the same as a read in place, only earlier: the order,
exact resume and each rank's slice do not change. A failed read is raised where its rows are
asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from btx_core.data.shards import Blocks

Key = tuple[int, int]  # (step, micro-batch)


class ReadAhead:
    """`rows(step, micro)` returns `blocks[indices(step, micro)]` and starts reading the next
    micro-batch (up to step `last_step`, exclusive); use as a context manager."""

    def __init__(self, blocks: Blocks, indices: Callable[[int, int], np.ndarray], grad_accum: int,
                 last_step: int):
        self.blocks, self.indices = blocks, indices
        self.grad_accum, self.last_step = grad_accum, last_step
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="btx-read-ahead")
        self._pending: tuple[Key, Future] | None = None

    def rows(self, step: int, micro: int) -> np.ndarray:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == (step, micro):
            out = pending[1].result()
        else:
            if pending is not None and not pending[1].cancel():
                pending[1].exception()  # one reader at a time: let the stale read finish
            out = self._read((step, micro))
        following = (step, micro + 1) if micro + 1 < self.grad_accum else (step + 1, 0)
        if following[0] < self.last_step:
            self._pending = (following, self._pool.submit(self._read, following))
        return out

    def _read(self, key: Key) -> np.ndarray:
        return np.asarray(self.blocks[self.indices(*key)])

    def close(self) -> None:
        """Stop: a read in flight is waited for, its result (or error) dropped."""
        self._pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
