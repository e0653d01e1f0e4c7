"""The one small object a writer lease lives in, changed only by compare-and-swap, and aged by
the store's own clock (lease.py decides what to write; this module only makes each write exact).

`read` returns the bytes, a version (S3: the ETag; local: the content's sha256) and the
object's age as the store measures it. `create` writes only if there is no object; `replace`
only if the object is still at the version the caller read. Both return the new version, or
None when another writer got there first.

- S3: `PutObject` with `If-None-Match: *` (create) or `If-Match: <ETag>` (replace), which S3
  applies atomically (AWS since 2024, MinIO, moto 5). The age is the response's `Date` header
  minus the object's `LastModified`, both stamped by the server, so no two hosts' clocks are
  ever compared. botocore and s3fs retry a request whose answer was lost; a retry of a PUT that
  had landed is answered 412, so a 412 (or a 409 conflict) is followed by a read: an object
  holding exactly the bytes this writer sent is its own write. A server that ignores the
  conditions would let two writers both "win": `check_conditional_writes` asks it to refuse
  two writes it must refuse, and raises `NoConditionalWritesError` when it does not.
- Local: every operation holds `flock` on `<lease>.lock` (released by the kernel when its holder
  dies); create is a hard link of a finished temp file (exclusive like O_EXCL, and never seen
  half written), replace an `os.replace` after comparing the version. The age is measured
  against the lock file's mtime set to "now" by the filesystem (the server's clock on NFS).
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import hashlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from fsspec.asyn import sync

from btx_core.errors import StoreError
from btx_core.store.faults import error_code

# What S3 answers a conditional write that lost: 412 (the condition failed), 409 (another
# conditional write to the key was in flight), 404 (If-Match on a key that is gone).
_LOST = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"}
_NO_SUCH_ETAG = '"00000000000000000000000000000000"'


class NoConditionalWritesError(StoreError):
    """The store ignores conditional writes, so it cannot guarantee one writer per stage."""


@dataclass(frozen=True)
class Seen:
    data: bytes
    version: str
    age_s: float
    """Seconds since the object was last written, by the store's clock."""


class S3Slot:
    """The lease object `path` ("bucket/key") of an s3fs filesystem."""

    resolution_s = 1.0  # HTTP dates (Date, Last-Modified) carry whole seconds

    def __init__(self, fs, path: str, probe_path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)
        self.probe_key = fs.split_path(probe_path)[1]

    def read(self) -> Seen | None:
        return sync(self.fs.loop, self._get)

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def check_conditional_writes(self, store_uri: str) -> None:
        """Raise NoConditionalWritesError unless the store refuses a create over an existing
        object and a replace of a version that never existed (one probe object per store)."""
        self._raw_put(self.probe_key, b"btx", lost_ok=True, IfNoneMatch="*")  # exists from here on
        ignored = [header for header, value in (("If-None-Match", "*"), ("If-Match", _NO_SUCH_ETAG))
                   if self._raw_put(self.probe_key, b"btx", lost_ok=True,
                                    **{header.replace("-", ""): value}) is not None]
        if ignored:
            raise NoConditionalWritesError(
                f"the store {store_uri} ignored a conditional write ({' and '.join(ignored)} on "
                "an existing object succeeded), so it cannot guarantee a single writer per stage: "
                "two runs could both write one checkpoint prefix. Use a store with conditional "
                "writes (AWS S3, MinIO, moto >= 5), or, if you make sure yourself that one "
                "run at a time writes each stage, set `store_lease: {conditional_writes: unchecked}`")

    def _put(self, data: bytes, **condition: str) -> str | None:
        version = self._raw_put(self.key, data, lost_ok=True, **condition)
        if version is None:  # lost, or a retry of our own PUT that had landed: look
            seen = self.read()
            return seen.version if seen is not None and seen.data == data else None
        return version

    def _raw_put(self, key: str, data: bytes, *, lost_ok: bool, **condition: str) -> str | None:
        try:
            return sync(self.fs.loop, self.fs._call_s3, "put_object", Bucket=self.bucket, Key=key,
                        Body=data, **condition)["ETag"]
        except OSError as exc:  # s3fs translates botocore's ClientError, chained
            if lost_ok and error_code(exc) in _LOST:
                return None
            raise

    async def _get(self) -> Seen | None:
        try:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None
        try:
            data = await resp["Body"].read()
        finally:
            resp["Body"].close()
        now = _date_header(resp) or await self._probe_now()
        return Seen(data, resp["ETag"], (now - resp["LastModified"]).total_seconds())

    async def _probe_now(self) -> datetime:
        """The store's "now" where its answers carry no Date header: a fresh write's LastModified."""
        await self.fs._call_s3("put_object", Bucket=self.bucket, Key=f"{self.probe_key}.clock", Body=b"")
        head = await self.fs._call_s3("head_object", Bucket=self.bucket, Key=f"{self.probe_key}.clock")
        return head["LastModified"]


def _date_header(resp: dict) -> datetime | None:
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return email.utils.parsedate_to_datetime(date) if date else None
    except ValueError:
        return None


class LocalSlot:
    """The lease file `path` of a local (or network-mounted) store."""

    resolution_s = 0.0

    def __init__(self, path: str):
        self.path, self.lock = path, f"{path}.lock"

    def read(self) -> Seen | None:
        with self._locked() as fd:
            return self._seen(fd)

    def create(self, data: bytes) -> str | None:
        with self._locked(), self._staged(data) as tmp:
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return None
        return _digest(data)

    def replace(self, data: bytes, version: str) -> str | None:
        with self._locked() as fd:
            seen = self._seen(fd)
            if seen is None or seen.version != version:
                return None
            with self._staged(data) as tmp:
                os.replace(tmp, self.path)
        return _digest(data)

    def check_conditional_writes(self, store_uri: str) -> None:
        """Local stores always have them (flock, link, rename)."""

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # releases the flock

    @contextlib.contextmanager
    def _staged(self, data: bytes) -> Iterator[str]:
        tmp = f"{self.path}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            yield tmp
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _seen(self, lock_fd: int) -> Seen | None:
        try:
            with open(self.path, "rb") as f:
                data, written = f.read(), os.fstat(f.fileno()).st_mtime_ns
        except FileNotFoundError:
            return None
        os.utime(lock_fd)  # "now" by the filesystem's clock
        return Seen(data, _digest(data), (os.fstat(lock_fd).st_mtime_ns - written) / 1e9)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
