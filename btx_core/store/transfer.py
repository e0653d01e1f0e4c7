"""How the store moves files: several at once, large ones in parallel parts, transient errors retried.

On S3, `put_files` and `get_files` run `TransferPolicy.files_at_once` files concurrently (the
policy is the config's `store_transfer:`, btx_core/config/execution.py); a file of two parts or
more goes up as a multipart upload (down as ranged reads) with several parts in flight (s3fs's
`chunksize`/`max_concurrency`), a smaller one in one request. A transfer cut by a dropped
connection, a timeout or a 5xx answer is retried, the whole file again, after a wait that doubles
up to a cap; a refused signature, a missing bucket or a full disk fail at once, because waiting
does not fix them. Retrying a whole file is safe: nothing is valid until the manifest is
written, and the manifest goes last (commit.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from http.client import IncompleteRead
from typing import Any, TypeVar

from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from fsspec.implementations.local import LocalFileSystem

from btx_core.config.execution import TransferPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")

# Answers that mean "not now" rather than "never": S3 error codes, and the HTTP statuses s3fs
# reports as codes when a proxy or load balancer answers instead of S3.
_LATER_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                "500", "502", "503", "504"}


class RetriesExhausted(OSError):
    """A transient error outlasted the retries; `__cause__` is the last one."""

    def __init__(self, tries: int, seconds: float):
        super().__init__(f"gave up after {tries} tries over {seconds:.0f} s")
        self.tries, self.seconds = tries, seconds


def cause_chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed: a dropped or refused connection, a timeout, a
    5xx or SlowDown. The first error in the chain that decides either way wins, so a "no such
    bucket" that s3fs wrapped in FileNotFoundError is final."""
    for e in cause_chain(exc):
        if isinstance(e, ClientError):
            error = e.response.get("Error", {})
            return str(error.get("Code")) in _LATER_CODES
        if isinstance(e, (SSLError, NoCredentialsError, PartialCredentialsError,
                          FileNotFoundError, PermissionError)):
            return False
        if isinstance(e, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError,
                          IncompleteRead)):
            return True
    return False


def retrying(call: Callable[[], T], what: str, policy: TransferPolicy,
             stop: threading.Event | None = None) -> T:
    """`call()`, tried again after transient errors as `policy` says; `stop` cuts the waiting
    short (another file of the batch failed for good). Logs name `what` and the error's type
    only: a botocore message may carry the endpoint URL."""
    start, stop = time.monotonic(), stop or threading.Event()
    for tries, wait_s in enumerate([*policy.waits(), None], start=1):
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if wait_s is None or stop.is_set():
                raise RetriesExhausted(tries, time.monotonic() - start) from exc
            log.warning("%s: %s, try %d of %d in %.1f s", what, type(exc).__name__, tries + 1,
                        policy.attempts, wait_s)
            if stop.wait(wait_s):
                raise RetriesExhausted(tries, time.monotonic() - start) from exc
    raise AssertionError("unreachable: the last try returns or raises")


def _part_options(fs: Any, policy: TransferPolicy, size: int, files_in_flight: int) -> dict[str, int]:
    # Only s3fs takes these; other filesystems' put_file/get_file would reject them.
    if not type(fs).__module__.startswith("s3fs"):
        return {}
    parts = 1 if size < 2 * policy.part_size else max(1, policy.connections // files_in_flight)
    return {"chunksize": policy.part_size, "max_concurrency": parts}


def _run_all(jobs: Sequence[Callable[[threading.Event], None]], workers: int) -> None:
    """Run every job on up to `workers` threads; the first failure stops the rest (running
    transfers finish their current try, queued ones never start) and is raised."""
    stop = threading.Event()
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            job(stop)
        return
    with ThreadPoolExecutor(min(workers, len(jobs)), thread_name_prefix="btx-transfer") as pool:
        futures = [pool.submit(job, stop) for job in jobs]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        finally:  # a failure, or an interrupt: no new tries, no queued files
            stop.set()
            for f in futures:
                f.cancel()
        failed = next((f.exception() for f in futures if f in done and f.exception()), None)
        if failed is not None:
            raise failed


def _transfer(fs: Any, verb: str, pairs: Sequence[tuple[str, str]], sizes: Sequence[int],
              policy: TransferPolicy) -> None:
    # One file per call of the filesystem's batch method (`put`/`get`, with one-element lists:
    # no path expansion), so those two stay the only ways data moves, and a test that wraps
    # them to inject a fault sees every file.
    workers = 1 if isinstance(fs, LocalFileSystem) else policy.files_at_once
    in_flight = max(1, min(workers, len(pairs)))
    method = fs.put if verb == "uploading" else fs.get

    def job(src: str, dst: str, size: int) -> Callable[[threading.Event], None]:
        options = _part_options(fs, policy, size, in_flight)
        return lambda stop: retrying(lambda: method([src], [dst], **options),
                                     f"{verb} {src} -> {dst}", policy, stop)

    _run_all([job(src, dst, size) for (src, dst), size in zip(pairs, sizes, strict=True)], workers)


def put_files(fs: Any, pairs: Sequence[tuple[str, str]], policy: TransferPolicy) -> None:
    """Upload (local path, store path) pairs; the parents of local-store paths must exist."""
    _transfer(fs, "uploading", pairs, [os.path.getsize(src) for src, _ in pairs], policy)


def get_files(fs: Any, pairs: Sequence[tuple[str, str]], sizes: Sequence[int],
              policy: TransferPolicy) -> None:
    """Download (store path, local path) pairs of files of `sizes` bytes (from the manifest);
    the local parents must exist. A retried file is written again from its start."""
    _transfer(fs, "downloading", pairs, sizes, policy)
