"""The object store: stage outputs are directories whose `_manifest.json` is written last.

A *location* is a URI under the store's root (local path, `file://`, `s3://bucket/prefix`);
build one with `Store.child` or `checkpoint_location`. A directory without a valid manifest does
not exist (DESIGN.md, "The object store is the source of truth"): writes put the manifest last,
deletes remove it first. Endpoint and credentials come only from the environment or fsspec
config (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...) and never appear in an error.

`Store` is the public entry point; it delegates committing outputs (commit.py), translating
backend errors (faults.py), checkpoint listing and pruning (checkpoints.py) and moving files
(transfer.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

from btx_core.errors import IncompleteOutputError, IntegrityError, StoreError
from btx_core.store.checkpoints import checkpoint_location, steps_in, to_prune
from btx_core.store.commit import (
    Commit,
    download,
    file_entries,
    is_cached_copy,
    remove,
    scan_local_dir,
    stored_sizes,
    writer_tag,
)
from btx_core.store.faults import if_present, store_errors
from btx_core.store.manifest import MANIFEST, FileEntry, Manifest, check_hash, sha256_of
from btx_core.store.transfer import TransferPolicy, s3_options

__all__ = ["MANIFEST", "FileEntry", "Manifest", "Store", "checkpoint_location"]

log = logging.getLogger(__name__)


class Fence(Protocol):
    """A writer lease as the commit path sees it (lease.py's WriterLease)."""

    generation: int

    def check_commit(self, location: str) -> None:
        """Raise StaleWriterError unless this writer may still commit `location`."""


class Store:
    """An fsspec filesystem rooted at `uri`, holding stage outputs.

    Attributes: `uri`, the normalised root (`file:///abs/path` for local stores; every location
    starts with it); `root`, the same as a filesystem path; `is_local`; and `fs`, the fsspec
    filesystem every operation goes through, so tests can wrap or monkeypatch it to inject
    faults (a failing `put`, ENOSPC).

    Local stores replace an output by building it beside the target and renaming it into place;
    object stores (no rename) delete the old manifest first and write the new one last.
    `transfer` sets how files move (s3fs's batched transfers: files at once, part size, parts
    in flight; botocore's retries of transient errors; transfer.py): the class default, or per
    instance, given when the store is made (its retries configure the S3 client then).
    """

    transfer: TransferPolicy = TransferPolicy()

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None,
                 transfer: TransferPolicy | None = None):
        self.transfer = transfer or type(self).transfer
        options = dict(storage_options or {})
        if fsspec.core.split_protocol(uri)[0] in ("s3", "s3a"):
            options = s3_options(options, self.transfer)  # botocore's retries (transfer.py)
        self.fs, root = fsspec.core.url_to_fs(uri, **options)
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

    def _errors(self, location: str, doing: str, *, into: Path | None = None):
        """Backend errors of the block as StoreError (faults.py); `into`: a download's cache_dir.
        Every location lies under the root, so the bucket is the root's first name."""
        return store_errors(location, doing, bucket=self.root.split("/")[0], local=self.is_local,
                            into=into)

    def read_manifest(self, location: str) -> Manifest:
        """The manifest at `location`; IncompleteOutputError if it is missing or invalid."""
        data = None
        with self._errors(location, "reading the manifest of"), if_present():
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
        return stored_sizes(self.fs, path)

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
                  known: Mapping[str, FileEntry] | None = None, move: bool = False,
                  fence: Fence | None = None) -> Manifest:
        """Store `local_dir` at `location`, replacing any older output; return its manifest.
        Files are hashed, uploaded (several at once, large ones in parallel parts, each retried
        after a dropped connection: `transfer`), their stored sizes checked by one listing, and
        only then is the manifest written: a failure anywhere leaves none. Empty
        subdirectories are not kept (object stores have no directories).
        `known`: entries the caller computed while writing the files (checked by size, not
        hashed again). `move`: a local store takes the files by rename (a staging directory on
        the same filesystem: no copy of large outputs); `local_dir` is consumed. `fence`: the
        writer lease of the output's stage prefix, checked before anything is hashed or deleted
        and again just before the manifest (commit.py); its generation goes into the manifest."""
        if fence is not None:
            fence.check_commit(location)
        path = self._path(location, allow_root=False)
        files = scan_local_dir(Path(local_dir))
        entries = file_entries(files, known)
        manifest = Manifest(stage=stage, config_hash=config_hash, files=entries,
                            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            inputs=inputs or {}, metrics=metrics or {}, extra=extra or {},
                            lease_generation=fence and fence.generation)
        try:
            data = manifest.to_json()
        except ValueError as exc:
            raise ValueError(f"metrics and extra must be JSON data (convert tensors with .item() "
                             f"or .tolist()): {exc}") from exc
        commit = Commit(self.fs, self.transfer, location, files, entries, data,
                        **({"guard": lambda: fence.check_commit(location)} if fence else {}))
        with self._errors(location, "writing"):
            if self.is_local:
                commit.to_local(path, move=move)
            else:
                commit.to_remote(path)
        log.info("wrote %s: %d files, %d bytes, manifest %s", location, len(entries),
                 sum(e.size for e in entries.values()), manifest.hash[:12])
        return manifest

    def amend(self, location: str, files: Mapping[str, bytes], *, fence: Fence | None = None) -> Manifest:
        """Replace (or add) a few small files of a complete output, its other files, config hash,
        inputs and metrics kept: a model card that gains the run's evaluation. The old manifest
        goes first and the new one comes last, so no reader sees a file its manifest does not
        describe; a writer killed in between leaves the output incomplete, and its stage runs again
        (a training stage from its newest checkpoint, which the store keeps).
        Returns the new manifest (a new hash: record it where this output is an input)."""
        old = self.read_manifest(location)
        entries = {**old.files, **{rel: FileEntry(size=len(data), sha256=hashlib.sha256(data).hexdigest())
                                   for rel, data in files.items()}}
        manifest = Manifest(**{**old.model_dump(), "files": entries,
                               "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "lease_generation": fence.generation if fence else old.lease_generation})
        path = self._path(location, allow_root=False)
        with self._errors(location, "amending"):
            if fence is not None:
                fence.check_commit(location)
            self.fs.rm(f"{path}/{MANIFEST}")
            for rel, data in files.items():
                self.fs.pipe_file(f"{path}/{rel}", data)
            sizes = self._stored_sizes(path)
            if any(sizes.get(rel) != len(data) for rel, data in files.items()):
                raise StoreError(f"amending {location}: a file was not stored whole; rerun its stage")
            if fence is not None:
                fence.check_commit(location)
            self.fs.pipe_file(f"{path}/{MANIFEST}", manifest.to_json())
            self.fs.invalidate_cache(path)
        log.info("amended %s: %s, manifest %s", location, ", ".join(sorted(files)), manifest.hash[:12])
        return manifest

    @contextlib.contextmanager
    def staging_dir(self, location: str, scratch: str | os.PathLike) -> Iterator[Path]:
        """A private directory to build an output in before `write_dir(..., move=True)`: beside
        the target for local stores (same filesystem: committing is a rename; a killed writer's
        leftover is removed by the next write), under `scratch` for object stores. Removed on exit."""
        if self.is_local:
            parent, name = os.path.split(self._path(location, allow_root=False))
            path = Path(parent) / f".{name}.tmp-{writer_tag()}"
        else:
            path = Path(scratch) / f".staging-{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def delete(self, location: str) -> None:
        """Delete the output at `location` (manifest first); a missing one is not an error."""
        path = self._path(location, allow_root=False)
        with self._errors(location, "deleting"):
            remove(self.fs, path)

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
        manifest, cache = self.read_manifest(location), Path(cache_dir)
        if is_cached_copy(cache / manifest.hash, manifest):
            return cache / manifest.hash
        with self._errors(location, "downloading", into=cache):
            return download(self.fs, self.transfer, manifest, location, self._path(location), cache)

    def read_file(self, location: str, rel: str, manifest: Manifest) -> bytes:
        """One small file of the output at `location`, whole, its sha256 checked against `manifest`."""
        entry = manifest.files.get(rel)
        if entry is None:
            raise IntegrityError(f"{location} has no {rel} in its manifest: delete the output and rerun "
                                 "its stage")
        with self._errors(location, "reading"):
            data = self.fs.cat_file(f"{self._path(location)}/{rel}")
        check_hash(location, rel, entry.sha256, hashlib.sha256(data).hexdigest())
        return data

    def read_ranges(self, location: str, ranges: Sequence[tuple[str, int, int]]) -> list[bytes]:
        """Byte ranges `(file, start, end)` (end exclusive) of files of the output at `location`,
        read concurrently, up to `transfer.connections` requests in flight (ranged GETs on S3,
        each retried by botocore). Nothing is hashed: the caller checks what it reads."""
        path = self._path(location)
        with self._errors(location, "reading"):
            return self.fs.cat_ranges([f"{path}/{rel}" for rel, _, _ in ranges], [s for _, s, _ in ranges],
                                      [e for _, _, e in ranges], on_error="raise",
                                      **({"batch_size": self.transfer.connections} if self.fs.async_impl else {}))

    def _step_children(self, prefix: str) -> list[tuple[int, str]]:
        """(step, location) of every `step-NNNNNNNN` child of `prefix`, complete or not."""
        path, names = self._path(prefix), []
        with self._errors(prefix, "listing"), if_present():
            self.fs.invalidate_cache(path)  # s3fs caches listings; other writers add checkpoints
            names = self.fs.ls(path, detail=False)
        return sorted((step, self.fs.unstrip_protocol(n)) for step, n in steps_in(names))

    def list_checkpoints(self, prefix: str) -> list[tuple[int, str]]:
        """(step, location) of the complete checkpoints under `prefix`, oldest first."""
        return [(s, loc) for s, loc in self._step_children(prefix) if self.is_complete(loc)]

    def latest_checkpoint(self, prefix: str) -> tuple[int, str] | None:
        """The newest complete checkpoint under `prefix`, or None."""
        return (self.list_checkpoints(prefix) or [None])[-1]

    def prune_checkpoints(self, prefix: str, keep: int) -> list[str]:
        """Delete all but the newest `keep` complete checkpoints and older incomplete ones (a
        newer one may be a write in progress); return the deleted locations (checkpoints.py)."""
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        doomed = to_prune([(s, loc, self.is_complete(loc)) for s, loc in self._step_children(prefix)],
                          keep)
        for loc in doomed:
            self.delete(loc)
        return doomed
