"""How the store moves files: s3fs's own batched transfers and botocore's retries, configured.

Uploads are `fs.put(local paths, store paths)` and downloads `fs.get(store paths, local paths)`,
one call per group of files. BENCHMARKS.md "S3 transfer" measured the thread pool and retry
loop this module used to hand-write against s3fs's batched transfers tuned by hand, on the
same files: they were no faster, so the store now only configures s3fs. `TransferPolicy` (the
config's `store_transfer:`) sets s3fs's `batch_size` (files at once), `chunksize` (the part
size) and `max_concurrency` (parts in flight per file): a file of two parts or more goes up as
a multipart upload and comes down as ranged reads; a smaller one goes in one request and comes
down as one stream, because s3fs opens a GET before it decides on ranges, and a server that
reads a whole object per GET (moto) then pays for the object two or three times.

Transient errors (a refused or dropped connection, a timeout, a 5xx, SlowDown) are retried per
request by botocore in its adaptive mode (`s3_options`: jittered exponential backoff, and a
client-side rate limit after throttling), `TransferPolicy.attempts` tries in all; a refused
signature, a missing bucket or a full disk fail at once. A transfer that still fails fails
the write or fetch whole and leaves nothing valid: the manifest goes last (commit.py), and
Prefect's task retries (flows/options.py) run the stage again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from btx_core.config.execution import TransferPolicy


def s3_options(storage_options: dict[str, Any] | None, policy: TransferPolicy) -> dict[str, Any]:
    """s3fs options with botocore's adaptive retries, `policy.attempts` tries a request, and
    `policy.upload_checksums` / `download_checksums` as its checksum settings, unless the caller
    chose them in `config_kwargs`, or the environment does (`AWS_MAX_ATTEMPTS`, `AWS_RETRY_MODE`,
    `AWS_REQUEST_CHECKSUM_CALCULATION`, `AWS_RESPONSE_CHECKSUM_VALIDATION`: botocore would let an
    explicit config override them, but a user who set them meant them)."""
    options = dict(storage_options or {})
    config = dict(options.get("config_kwargs") or {})
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or policy.attempts)
    mode = os.environ.get("AWS_RETRY_MODE") or "adaptive"
    config.setdefault("retries", {"mode": mode, "total_max_attempts": attempts})
    for setting, value in (("request_checksum_calculation", policy.upload_checksums),
                           ("response_checksum_validation", policy.download_checksums)):
        config.setdefault(setting, (os.environ.get(f"AWS_{setting.upper()}") or value).lower())
    options["config_kwargs"] = config
    return options


def _groups(fs: Any, sizes: Sequence[int], policy: TransferPolicy) -> list[tuple[list[int], dict[str, int]]]:
    """(positions, s3fs options) per call: the files under two parts, then the larger ones, whose
    files in flight share `policy.connections` for their parts. Other filesystems' put/get take
    no such options, and a local store copies one file at a time: one call."""
    if not type(fs).__module__.startswith("s3fs"):
        return [(list(range(len(sizes))), {})] if sizes else []
    small = [i for i, size in enumerate(sizes) if size < 2 * policy.part_size]
    large = [i for i, size in enumerate(sizes) if size >= 2 * policy.part_size]
    out = []
    for group in (small, large):
        if group:
            batch = min(policy.files_at_once, len(group))
            parts = 1 if group is small else max(1, policy.connections // batch)
            out.append((group, {"batch_size": batch, "chunksize": policy.part_size, "max_concurrency": parts}))
    return out


def put_files(fs: Any, pairs: Sequence[tuple[str, str]], policy: TransferPolicy) -> None:
    """Upload (local path, store path) pairs; the parents of local-store paths must exist. The
    first failure stops the files not yet started and is raised."""
    for positions, options in _groups(fs, [os.path.getsize(src) for src, _ in pairs], policy):
        fs.put([pairs[i][0] for i in positions], [pairs[i][1] for i in positions], **options)


def get_files(fs: Any, pairs: Sequence[tuple[str, str]], sizes: Sequence[int],
              policy: TransferPolicy) -> None:
    """Download (store path, local path) pairs of files of `sizes` bytes (from the manifest);
    the local parents must exist."""
    for positions, options in _groups(fs, sizes, policy):
        fs.get([pairs[i][0] for i in positions], [pairs[i][1] for i in positions], **options)
