"""Backend errors (botocore, s3fs, the OS) as StoreError: what failed, where, and the fix.

A message names the location and the setting to change, never a secret: a refused signature's
answer echoes the request's signing material, so that error is not chained, and an endpoint is
named by scheme, host and port only (a URL may hold a password).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    FlexibleChecksumError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from btx_core.errors import StoreError

_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
               "InvalidToken", "AllAccessDisabled", "403"}


def cause_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc`, then what caused it, and so on (s3fs wraps botocore's errors)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception (s3fs chains the botocore ClientError)."""
    return next((str(e.response.get("Error", {}).get("Code")) for e in cause_chain(exc)
                 if isinstance(e, ClientError)), None)


@contextlib.contextmanager
def if_present() -> Iterator[None]:
    """Ignore "no such file"; a missing bucket is a misconfiguration and still raises."""
    try:
        yield
    except FileNotFoundError as exc:
        if error_code(exc) == "NoSuchBucket":
            raise


@contextlib.contextmanager
def store_errors(location: str, doing: str, *, bucket: str, local: bool,
                 into: Path | None = None) -> Iterator[None]:
    """Re-raise backend errors as StoreError naming the location and the fix, never a secret.
    `bucket`: the store's (its root's first name); `local`: a local store (permissions are the
    directory's, not the bucket's); `into`: the local directory (cache_dir) a download writes to."""
    try:
        yield
    except StoreError:
        raise
    except (OSError, BotoCoreError, ClientError) as exc:
        where = f"{doing} {location}" + (f" into {into}" if into else "")
        message, chain_cause = explain(exc, where, bucket=bucket, local=local, into=into)
        raise StoreError(message) from (exc if chain_cause else None)


def explain(exc: BaseException, where: str, *, bucket: str, local: bool,
            into: Path | None = None) -> tuple[str, bool]:
    """(message, whether to chain the original error) for a backend error."""
    code, chain = error_code(exc), list(cause_chain(exc))
    if any(getattr(e, "errno", None) == errno.ENOSPC for e in chain):
        setting = "`cache_dir:`" if into else "`store:`"
        return (f"no space left on device ({where}): free space there or point {setting} "
                "at a larger disk"), True
    if code == "NoSuchBucket":
        return f"bucket {bucket!r} does not exist ({where}): create it or fix `store:`", True
    if any(isinstance(e, (NoCredentialsError, PartialCredentialsError)) for e in chain):
        return (f"no S3 credentials found ({where}): set AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY in the environment"), False
    if code in _AUTH_CODES or any(isinstance(e, PermissionError) for e in chain):
        if local:
            return f"permission denied ({where}): check the directory's owner and mode", True
        # The server's answer to a refused signature echoes the request's signing material,
        # so the original error stays out of tracebacks and logs.
        return (f"access denied ({where}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in "
                "the environment and the bucket's permissions"), False
    if any(isinstance(e, FlexibleChecksumError) for e in chain):
        # S3-compatible servers answer botocore's checksums their own way (tests/integration/test_store_rclone.py)
        return (f"botocore's checksum check (FlexibleChecksumError) rejected a download ({where}): "
                "if the server is S3-compatible rather than AWS, set store_transfer.download_checksums: "
                "when_required (the default: every fetch checks sha256 against the manifest), and "
                "upload_checksums: when_required for files that other tools will read"), True
    if down := [e for e in chain
                if isinstance(e, (BotoConnectionError, HTTPClientError, ConnectionError))]:
        u = urlsplit(next((e.kwargs["endpoint_url"] for e in down
                           if getattr(e, "kwargs", {}).get("endpoint_url")), None)
                     or os.environ.get("AWS_ENDPOINT_URL_S3", ""))
        host = f"{u.scheme}://{u.hostname}:{u.port}" if u.hostname else "(AWS default)"
        return (f"cannot reach endpoint {host} ({where}): check AWS_ENDPOINT_URL_S3 "
                "and that the server is up"), True  # host:port only: a URL may hold a password
    return f"{where} failed: {type(exc).__name__}: {exc}", True
