"""The object store: stage outputs are directories whose `_manifest.json` is written last.

A *location* is a URI under the store's root (local path, `file://`, `s3://bucket/prefix`);
build one with `Store.child` or `checkpoint_location`. A directory without a valid manifest does
not exist (DESIGN.md, "The object store is the source of truth"): writes put the manifest last,
deletes remove it first. Endpoint and credentials come only from the environment or fsspec
config (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...) and never appear in an error.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import fsspec
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from fsspec.implementations.local import LocalFileSystem

from btx_core.errors import IncompleteOutputError, IntegrityError, StoreError
from btx_core.store.manifest import MANIFEST, FileEntry, Manifest, check_hash, checkpoint_location, sha256_of
from btx_core.store.transfer import (
    RetriesExhausted,
    TransferPolicy,
    cause_chain,
    get_files,
    put_files,
    retrying,
)

__all__ = ["MANIFEST", "FileEntry", "Manifest", "Store", "checkpoint_location"]

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"step-(\d{8,})")  # 8 digits sort as text too; wider still parses
# A local write's temp dirs: `.<name>.tmp-<host>-<pid>-<hex>` (and `.old-`), so a writer can tell
# a killed process's leftovers from a live writer's work in progress.
_LEFTOVER_RE = re.compile(r"(?:tmp|old)-(?P<host>[\w.]+)-(?P<pid>\d{1,7})-[0-9a-f]{12}")
_HOST = re.sub(r"[^\w.]", "_", socket.gethostname()) or "localhost"  # no '-': parses back
_LEGACY_AGE_S = 24 * 3600  # untagged (older btx): no pid to check, so age decides
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
               "InvalidToken", "AllAccessDisabled", "403"}


def _scan_local_dir(local_dir: Path) -> dict[str, Path]:
    """Relative POSIX path -> file, refusing what an object store cannot represent faithfully."""
    if not local_dir.is_dir():
        raise ValueError(f"{local_dir} is not a directory: write_dir uploads a directory")
    files: dict[str, Path] = {}
    for path in sorted(local_dir.rglob("*")):
        rel = path.relative_to(local_dir).as_posix()
        if path.is_symlink():
            # Following it would store whatever it points at today; the manifest could not say so.
            raise ValueError(f"{path} is a symlink: copy the target into {local_dir} instead")
        if path.is_file() and rel != MANIFEST:
            files[rel] = path
        elif not path.is_dir():
            raise ValueError(f"{path}: only regular files not named {MANIFEST} can be stored")
    if not files:
        raise ValueError(f"{local_dir} holds no files: refusing to store an empty output")
    return files


def _is_dead_leftover(entry: os.DirEntry, name: str) -> bool:
    """A temp dir of a write to `name` that will never finish; other hosts' are left alone."""
    if not entry.name.startswith((f".{name}.tmp-", f".{name}.old-")):
        return False
    tagged = _LEFTOVER_RE.fullmatch(entry.name, len(name) + 2)
    try:
        if tagged is None:
            return time.time() - entry.stat(follow_symlinks=False).st_mtime > _LEGACY_AGE_S
        if tagged["host"] == _HOST:
            os.kill(int(tagged["pid"]), 0)  # signal 0 only checks that the process exists
    except OSError as exc:  # PermissionError: alive, another user's; others: removed meanwhile
        return isinstance(exc, ProcessLookupError)
    return False


def _is_cached_copy(dest: Path, manifest: Manifest) -> bool:
    """`dest` holds a finished fetch of `manifest`: same manifest, every file at its size."""
    try:
        return (Manifest.from_json((dest / MANIFEST).read_bytes()).hash == manifest.hash
                and all((dest / r).stat().st_size == e.size for r, e in manifest.files.items()))
    except (OSError, ValueError):
        return False


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception (s3fs chains the botocore ClientError)."""
    return next((str(e.response.get("Error", {}).get("Code")) for e in cause_chain(exc)
                 if isinstance(e, ClientError)), None)


@contextlib.contextmanager
def _if_present() -> Iterator[None]:
    """Ignore "no such file"; a missing bucket is a misconfiguration and still raises."""
    try:
        yield
    except FileNotFoundError as exc:
        if _error_code(exc) == "NoSuchBucket":
            raise


class Store:
    """An fsspec filesystem rooted at `uri`, holding stage outputs.

    Attributes: `uri`, the normalised root (`file:///abs/path` for local stores; every location
    starts with it); `root`, the same as a filesystem path; `is_local`; and `fs`, the fsspec
    filesystem every operation goes through, so tests can wrap or monkeypatch it to inject
    faults (a failing `put`, ENOSPC).

    Local stores replace an output by building it beside the target and renaming it into place;
    object stores (no rename) delete the old manifest first and write the new one last.
    `transfer` sets how files move (several at once, multipart, retries of transient errors;
    transfer.py): the class default, or per instance.
    """

    transfer: TransferPolicy = TransferPolicy()

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None):
        self.fs, root = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.uri = self.fs.unstrip_protocol(self.root)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def child(self, *parts: str) -> str:
        """The location `uri/part/...`; parts may hold '/', never '.', '..' or empty names."""
        segments = [s for part in parts for s in str(part).split("/")]
        if not segments or any(s in ("", ".", "..") for s in segments):
            raise ValueError(f"bad location parts {parts!r}: use non-empty names without '.'/'..'")
        return f"{self.uri}/{'/'.join(segments)}"

    def _path(self, location: str, *, allow_root: bool = True) -> str:
        """The filesystem path of `location`, which must lie under the root."""
        path = self.fs._strip_protocol(location).rstrip("/")
        if path != self.root and not path.startswith(self.root + "/"):
            raise ValueError(f"{location} is outside the store {self.uri}: use store.child(...)")
        if path == self.root and not allow_root:
            raise ValueError(f"refusing to write or delete the store root {self.uri} itself")
        return path

    @contextlib.contextmanager
    def _errors(self, location: str, doing: str, *, into: Path | None = None) -> Iterator[None]:
        """Re-raise backend errors as StoreError naming the location and the fix, never a secret.
        `into`: the local directory (cache_dir) a download writes to."""
        try:
            yield
        except StoreError:
            raise
        except (OSError, BotoCoreError, ClientError) as exc:
            where = f"{doing} {location}" + (f" into {into}" if into else "")
            message, chain_cause = self._explain(exc, where, location, into)
            raise StoreError(message) from (exc if chain_cause else None)

    def _explain(self, exc: BaseException, where: str, location: str,
                 into: Path | None = None) -> tuple[str, bool]:
        """(message, whether to chain the original error) for a backend error."""
        code, chain = _error_code(exc), list(cause_chain(exc))
        if any(getattr(e, "errno", None) == errno.ENOSPC for e in chain):
            setting = "`cache_dir:`" if into else "`store:`"
            return (f"no space left on device ({where}): free space there or point {setting} "
                    "at a larger disk"), True
        gave_up = next((f"; {e}" for e in chain if isinstance(e, RetriesExhausted)), "")
        if code == "NoSuchBucket":
            bucket = self._path(location).split("/")[0]
            return f"bucket {bucket!r} does not exist ({where}): create it or fix `store:`", True
        if any(isinstance(e, (NoCredentialsError, PartialCredentialsError)) for e in chain):
            return (f"no S3 credentials found ({where}): set AWS_ACCESS_KEY_ID/"
                    "AWS_SECRET_ACCESS_KEY in the environment"), False
        if code in _AUTH_CODES or any(isinstance(e, PermissionError) for e in chain):
            if self.is_local:
                return f"permission denied ({where}): check the directory's owner and mode", True
            # The server's answer to a refused signature echoes the request's signing material,
            # so the original error stays out of tracebacks and logs.
            return (f"access denied ({where}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in "
                    "the environment and the bucket's permissions"), False
        if down := [e for e in chain
                    if isinstance(e, (BotoConnectionError, HTTPClientError, ConnectionError))]:
            u = urlsplit(next((e.kwargs["endpoint_url"] for e in down
                               if getattr(e, "kwargs", {}).get("endpoint_url")), None)
                         or os.environ.get("AWS_ENDPOINT_URL_S3", ""))
            host = f"{u.scheme}://{u.hostname}:{u.port}" if u.hostname else "(AWS default)"
            return (f"cannot reach endpoint {host} ({where}{gave_up}): check AWS_ENDPOINT_URL_S3 "
                    "and that the server is up"), True  # host:port only: a URL may hold a password
        last = next((e for e in chain if not isinstance(e, RetriesExhausted)), exc)
        return f"{where} failed{gave_up}: {type(last).__name__}: {last}", True

    def read_manifest(self, location: str) -> Manifest:
        """The manifest at `location`; IncompleteOutputError if it is missing or invalid."""
        data = None
        with self._errors(location, "reading the manifest of"), _if_present():
            data = self.fs.cat_file(f"{self._path(location)}/{MANIFEST}")
        if data is None:
            raise IncompleteOutputError(f"{location} has no {MANIFEST}: it was never completely "
                                        "written (or was deleted); run the stage that makes it")
        try:
            return Manifest.from_json(data)
        except ValueError as exc:
            raise IncompleteOutputError(f"{location}/{MANIFEST} is not a valid manifest; delete "
                                        f"{location} and rerun its stage. {exc}") from None

    def _stored_sizes(self, path: str) -> dict[str, int]:
        """Relative path -> size of every file under `path`, from one fresh listing."""
        self.fs.invalidate_cache(path)  # s3fs caches listings; another writer may have changed them
        found = {}
        with _if_present():
            found = self.fs.find(path, detail=True)
        return {p[len(path) + 1:]: int(info["size"]) for p, info in found.items()
                if p.startswith(path + "/")}

    def _complete_manifest(self, location: str) -> Manifest | None:
        try:
            manifest = self.read_manifest(location)
        except IncompleteOutputError:
            return None
        with self._errors(location, "listing"):
            sizes = self._stored_sizes(self._path(location))
        return manifest if all(sizes.get(r) == e.size for r, e in manifest.files.items()) else None

    def is_complete(self, location: str) -> bool:
        """Manifest valid and every listed file present with its size. Cheap: nothing is hashed.
        A missing bucket or bad credentials raise StoreError rather than answer False, so a
        misconfigured run fails before its work, not after."""
        return self._complete_manifest(location) is not None

    def exists_with(self, location: str, config_hash: str,
                    inputs: Mapping[str, str] | None = None) -> Manifest | None:
        """The manifest if `location` is complete and was made from this config and these inputs."""
        m = self._complete_manifest(location)
        return m if m and m.config_hash == config_hash and m.inputs == dict(inputs or {}) else None

    def verify(self, location: str) -> Manifest:
        """Hash every stored file against the manifest; IntegrityError names the first mismatch."""
        manifest = self.read_manifest(location)
        path = self._path(location)
        with self._errors(location, "verifying"):
            for rel, entry in manifest.files.items():
                try:
                    with self.fs.open(f"{path}/{rel}", "rb") as f:
                        check_hash(location, rel, entry.sha256, sha256_of(f))
                except FileNotFoundError:
                    raise IntegrityError(f"{location}/{rel} is in the manifest but missing: "
                                         "delete the output and rerun its stage") from None
        return manifest

    def write_dir(self, local_dir: str | os.PathLike, location: str, *, stage: str,
                  config_hash: str, inputs: Mapping[str, str] | None = None,
                  metrics: Mapping[str, Any] | None = None,
                  extra: Mapping[str, Any] | None = None,
                  known: Mapping[str, FileEntry] | None = None, move: bool = False) -> Manifest:
        """Store `local_dir` at `location`, replacing any older output; return its manifest.
        Files are hashed, uploaded (several at once, large ones in parallel parts, each retried
        after a dropped connection: `transfer`), their stored sizes checked by one listing, and
        only then is the manifest written: a failure anywhere leaves none. Empty
        subdirectories are not kept (object stores have no directories).
        `known`: entries the caller computed while writing the files (checked by size, not
        hashed again). `move`: a local store takes the files by rename (a staging directory on
        the same filesystem: no copy of large outputs); `local_dir` is consumed."""
        path = self._path(location, allow_root=False)
        files = _scan_local_dir(Path(local_dir))
        entries = {}
        for rel, src in files.items():
            with open(src, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if known and rel in known and known[rel].size == size:
                    entries[rel] = known[rel]
                else:
                    entries[rel] = FileEntry(size=size, sha256=sha256_of(f))
        manifest = Manifest(stage=stage, config_hash=config_hash, files=entries,
                            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            inputs=inputs or {}, metrics=metrics or {}, extra=extra or {})
        try:
            data = manifest.to_json()
        except ValueError as exc:
            raise ValueError(f"metrics and extra must be JSON data (convert tensors with .item() "
                             f"or .tolist()): {exc}") from exc
        write = self._write_local if self.is_local else self._write_remote
        with self._errors(location, "writing"):
            write(files, entries, path, location, data, move=move and self.is_local)
        log.info("wrote %s: %d files, %d bytes, manifest %s", location, len(entries),
                 sum(e.size for e in entries.values()), manifest.hash[:12])
        return manifest

    def _upload(self, files: dict[str, Path], entries: dict[str, FileEntry], dest: str,
                location: str, manifest_data: bytes, move: bool = False) -> None:
        """Put the files (concurrently on object stores, each retried on transient errors),
        check their stored sizes, then write the manifest."""
        rels, policy = sorted(files), self.transfer
        if self.is_local:  # LocalFileSystem.put_file does not create parents
            for parent in {os.path.dirname(f"{dest}/{rel}") for rel in rels}:
                os.makedirs(parent, exist_ok=True)
        if move:
            for r in rels:
                shutil.move(files[r], f"{dest}/{r}")  # a rename on one filesystem, else a copy
        else:
            put_files(self.fs, [(str(files[r]), f"{dest}/{r}") for r in rels], policy)
        sizes = retrying(lambda: self._stored_sizes(dest), f"listing {location}", policy)
        for rel in rels:
            if sizes.get(rel) != entries[rel].size:
                raise StoreError(f"upload to {location} incomplete: {rel} stored with "
                                 f"{sizes.get(rel)} bytes, expected {entries[rel].size}; retry")
        retrying(lambda: self.fs.pipe_file(f"{dest}/{MANIFEST}", manifest_data),
                 f"writing the manifest of {location}", policy)
        self.fs.invalidate_cache(dest)

    def _write_local(self, files, entries, path: str, location: str, data: bytes,
                     move: bool = False) -> None:
        # Built beside the target and renamed into place: the old output stays whole until the
        # swap, and the new one appears with its manifest. Others may write it at once (runs
        # sharing a data cache, a retry): only dead writers' temp dirs go, never a live one's.
        parent, name = os.path.split(path)
        os.makedirs(parent, exist_ok=True)
        for entry in os.scandir(parent):
            if _is_dead_leftover(entry, name):
                shutil.rmtree(entry.path, ignore_errors=True)
        tag = f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp, old = f"{parent}/.{name}.tmp-{tag}", f"{parent}/.{name}.old-{tag}"
        try:
            self._upload(files, entries, tmp, location, data, move)
            for _ in range(5):  # a concurrent writer may rename its output in between: retry
                with contextlib.suppress(FileNotFoundError):  # none, or another writer moved it
                    os.rename(path, old)  # os.replace cannot replace a non-empty directory
                try:
                    return os.rename(tmp, path)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        with contextlib.suppress(OSError):  # fails if another output landed
                            os.rename(old, path)
                        raise
                with contextlib.suppress(OSError):  # another output landed: the last rename wins
                    if Path(path, MANIFEST).read_bytes() == data:
                        return None  # ...but it is this very output, so nothing to replace
                shutil.rmtree(old, ignore_errors=True)
            raise StoreError(f"{location} kept being replaced by other writers (5 tries): "
                             "let one run at a time write it, then retry")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)

    def _write_remote(self, files, entries, path: str, location: str, data: bytes,
                      move: bool = False) -> None:
        # No rename on S3: the old manifest goes first so the old output stops being valid, then
        # its files (none may survive as stale), then the upload, and the new manifest last.
        self._remove(path)
        try:
            self._upload(files, entries, path, location, data)
        except Exception:
            # Best effort, so a failed write leaves no paid-for garbage; without a manifest the
            # files are invisible anyway, and the original error is the one to report.
            with contextlib.suppress(Exception):
                self._remove(path)
            raise

    def _remove(self, path: str) -> None:
        """Manifest first, so a delete cut short leaves an incomplete output, not a wrong one."""
        try:
            with _if_present():
                self.fs.rm(f"{path}/{MANIFEST}")
            with _if_present():
                self.fs.rm(path, recursive=True)
        finally:
            self.fs.invalidate_cache(path)

    @contextlib.contextmanager
    def staging_dir(self, location: str, scratch: str | os.PathLike) -> Iterator[Path]:
        """A private directory to build an output in before `write_dir(..., move=True)`: beside
        the target for local stores (same filesystem: committing is a rename; a killed writer's
        leftover is removed by the next write), under `scratch` for object stores. Removed on exit."""
        if self.is_local:
            parent, name = os.path.split(self._path(location, allow_root=False))
            base = Path(parent)
            prefix = f".{name}.tmp-{_HOST}-{os.getpid()}-"
            path = base / f"{prefix}{uuid.uuid4().hex[:12]}"
        else:
            base = Path(scratch)
            path = base / f".staging-{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def delete(self, location: str) -> None:
        """Delete the output at `location` (manifest first); a missing one is not an error."""
        path = self._path(location, allow_root=False)
        with self._errors(location, "deleting"):
            self._remove(path)

    def fetch(self, location: str, cache_dir: str | os.PathLike) -> Path:
        """A verified local copy of the output at `location`.
        Local stores: every file is hashed and the store's own directory is returned in place
        (`cache_dir` is unused); do not modify it. Remote stores: the output is downloaded as
        `write_dir` uploads (in parallel, retried) into `cache_dir/<manifest hash>/`, each file's
        sha256 checked, and `_manifest.json` written last; a later fetch of the same manifest
        reuses that copy if its manifest and file sizes still match (sizes only: re-hashing
        gigabytes on every reuse is not cheap). A damaged copy is downloaded again. A failed
        fetch (a corrupt file, a full disk, an endpoint that stayed away) leaves nothing there."""
        if self.is_local:
            self.verify(location)
            return Path(self._path(location))
        manifest = self.read_manifest(location)
        cache, rels, path = Path(cache_dir), sorted(manifest.files), self._path(location)
        dest = cache / manifest.hash
        if _is_cached_copy(dest, manifest):
            return dest
        tmp = cache / f".{manifest.hash}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with self._errors(location, "downloading", into=cache):
                for parent in {tmp, *((tmp / rel).parent for rel in rels)}:
                    parent.mkdir(parents=True, exist_ok=True)
                get_files(self.fs, [(f"{path}/{r}", str(tmp / r)) for r in rels],
                          [manifest.files[r].size for r in rels], self.transfer)
                for rel in rels:
                    with open(tmp / rel, "rb") as f:
                        check_hash(location, rel, manifest.files[rel].sha256, sha256_of(f))
                (tmp / MANIFEST).write_bytes(manifest.to_json())
                if dest.exists():
                    if _is_cached_copy(dest, manifest):  # another process fetched it meanwhile
                        return dest
                    shutil.rmtree(dest)  # a damaged earlier copy
                os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def _step_children(self, prefix: str) -> list[tuple[int, str]]:
        """(step, location) of every `step-NNNNNNNN` child of `prefix`, complete or not."""
        path, names = self._path(prefix), []
        with self._errors(prefix, "listing"), _if_present():
            self.fs.invalidate_cache(path)  # s3fs caches listings; other writers add checkpoints
            names = self.fs.ls(path, detail=False)
        matches = [(_STEP_RE.fullmatch(PurePosixPath(n).name), n.rstrip("/")) for n in names]
        return sorted((int(m.group(1)), self.fs.unstrip_protocol(n)) for m, n in matches if m)

    def list_checkpoints(self, prefix: str) -> list[tuple[int, str]]:
        """(step, location) of the complete checkpoints under `prefix`, oldest first."""
        return [(s, loc) for s, loc in self._step_children(prefix) if self.is_complete(loc)]

    def latest_checkpoint(self, prefix: str) -> tuple[int, str] | None:
        """The newest complete checkpoint under `prefix`, or None."""
        return (self.list_checkpoints(prefix) or [None])[-1]

    def prune_checkpoints(self, prefix: str, keep: int) -> list[str]:
        """Delete all but the newest `keep` complete checkpoints; return the deleted locations.
        Incomplete ones older than the newest complete one are debris of killed writes and go
        too; newer incomplete ones may be a write in progress and are left alone."""
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        children = [(s, loc, self.is_complete(loc)) for s, loc in self._step_children(prefix)]
        complete = [loc for _, loc, ok in children if ok]
        newest = max((s for s, _, ok in children if ok), default=-1)  # none complete: prune none
        kept = set(complete[-keep:]) if keep else set()
        doomed = [loc for s, loc, ok in children
                  if (ok and loc not in kept) or (not ok and s < newest)]
        for loc in doomed:
            self.delete(loc)
        return doomed
