"""Making an output appear in one step, whole or not at all: in the store, and in the fetch cache.

Local stores build the output beside its target and rename it into place; object stores (no
rename) delete the old manifest first and write the new one last. A commit made under a
writer lease is fenced: its `guard` (the lease's `check_commit`) runs before anything is
deleted and again just before the manifest is written, and a writer it refuses leaves the
prefix alone (its files are the new holder's from then on). A fetched copy is built in a
temp dir of the cache and renamed to its manifest hash. A killed local writer leaves temp dirs
tagged with its host and pid, so the next writer can tell them from a live writer's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from btx_core.errors import StaleWriterError, StoreError
from btx_core.store.faults import if_present
from btx_core.store.manifest import MANIFEST, FileEntry, Manifest, check_hash, sha256_of
from btx_core.store.transfer import TransferPolicy, get_files, put_files

# A local write's temp dirs: `.<name>.tmp-<host>-<pid>-<hex>` (and `.old-`), so a writer can tell
# a killed process's leftovers from a live writer's work in progress.
_LEFTOVER_RE = re.compile(r"(?:tmp|old)-(?P<host>[\w.]+)-(?P<pid>\d{1,7})-[0-9a-f]{12}")
_HOST = re.sub(r"[^\w.]", "_", socket.gethostname()) or "localhost"  # no '-': parses back
_LEGACY_AGE_S = 24 * 3600  # untagged (older btx): no pid to check, so age decides


def writer_tag() -> str:
    """`<host>-<pid>-<hex>`: names this writer's temp dirs, so its leftovers can be told apart."""
    return f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def scan_local_dir(local_dir: Path) -> dict[str, Path]:
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


def file_entries(files: dict[str, Path], known: Mapping[str, FileEntry] | None) -> dict[str, FileEntry]:
    """Each file's size and sha256; an entry in `known` (computed while the caller wrote the
    file) is taken as it is when the size matches, not hashed again."""
    entries = {}
    for rel, src in files.items():
        with open(src, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if known and rel in known and known[rel].size == size:
                entries[rel] = known[rel]
            else:
                entries[rel] = FileEntry(size=size, sha256=sha256_of(f))
    return entries


def stored_sizes(fs: Any, path: str) -> dict[str, int]:
    """Relative path -> size of every file under `path`, from one fresh listing."""
    fs.invalidate_cache(path)  # s3fs caches listings; another writer may have changed them
    found = {}
    with if_present():
        found = fs.find(path, detail=True)
    return {p[len(path) + 1:]: int(info["size"]) for p, info in found.items()
            if p.startswith(path + "/")}


def remove(fs: Any, path: str) -> None:
    """Manifest first, so a delete cut short leaves an incomplete output, not a wrong one."""
    try:
        with if_present():
            fs.rm(f"{path}/{MANIFEST}")
        with if_present():
            fs.rm(path, recursive=True)
    finally:
        fs.invalidate_cache(path)


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


@dataclass(frozen=True)
class Commit:
    """One output on its way to `location`: the local files, their entries, the manifest."""

    fs: Any
    policy: TransferPolicy
    location: str
    """Named in messages; the target's filesystem path is given to each method."""
    files: dict[str, Path]
    entries: dict[str, FileEntry]
    manifest: bytes
    guard: Callable[[], None] = lambda: None
    """Raises StaleWriterError when this writer may no longer commit (the writer lease's fence)."""

    def upload(self, dest: str, *, local: bool, move: bool = False) -> None:
        """Put the files (concurrently on object stores; botocore retries transient errors),
        check their stored sizes, then write the manifest."""
        rels, policy = sorted(self.files), self.policy
        if local:  # LocalFileSystem.put_file does not create parents
            for parent in {os.path.dirname(f"{dest}/{rel}") for rel in rels}:
                os.makedirs(parent, exist_ok=True)
        if move:
            for r in rels:
                shutil.move(self.files[r], f"{dest}/{r}")  # a rename on one filesystem, else a copy
        else:
            put_files(self.fs, [(str(self.files[r]), f"{dest}/{r}") for r in rels], policy)
        sizes = stored_sizes(self.fs, dest)
        for rel in rels:
            if sizes.get(rel) != self.entries[rel].size:
                raise StoreError(f"upload to {self.location} incomplete: {rel} stored with "
                                 f"{sizes.get(rel)} bytes, expected {self.entries[rel].size}; retry")
        self.guard()
        self.fs.pipe_file(f"{dest}/{MANIFEST}", self.manifest)
        self.fs.invalidate_cache(dest)

    def to_local(self, path: str, *, move: bool = False) -> None:
        # Built beside the target and renamed into place: the old output stays whole until the
        # swap, and the new one appears with its manifest. Others may write it at once (runs
        # sharing a data cache, a retry): only dead writers' temp dirs go, never a live one's.
        parent, name = os.path.split(path)
        os.makedirs(parent, exist_ok=True)
        for entry in os.scandir(parent):
            if _is_dead_leftover(entry, name):
                shutil.rmtree(entry.path, ignore_errors=True)
        tag = writer_tag()
        tmp, old = f"{parent}/.{name}.tmp-{tag}", f"{parent}/.{name}.old-{tag}"
        try:
            self.upload(tmp, local=True, move=move)
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
                    if Path(path, MANIFEST).read_bytes() == self.manifest:
                        return None  # ...but it is this very output, so nothing to replace
                shutil.rmtree(old, ignore_errors=True)
            raise StoreError(f"{self.location} kept being replaced by other writers (5 tries): "
                             "let one run at a time write it, then retry")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)

    def to_remote(self, path: str) -> None:
        # No rename on S3: the old manifest goes first so the old output stops being valid, then
        # its files (none may survive as stale), then the upload, and the new manifest last.
        self.guard()
        remove(self.fs, path)
        try:
            self.upload(path, local=False)
        except StaleWriterError:
            raise  # another writer holds the prefix now: what lies there is not ours to delete
        except Exception:
            # Best effort, so a failed write leaves no paid-for garbage; without a manifest the
            # files are invisible anyway, and the original error is the one to report.
            with contextlib.suppress(Exception):
                remove(self.fs, path)
            raise


def is_cached_copy(dest: Path, manifest: Manifest) -> bool:
    """`dest` holds a finished fetch of `manifest`: same manifest, every file at its size."""
    try:
        return (Manifest.from_json((dest / MANIFEST).read_bytes()).hash == manifest.hash
                and all((dest / r).stat().st_size == e.size for r, e in manifest.files.items()))
    except (OSError, ValueError):
        return False


def download(fs: Any, policy: TransferPolicy, manifest: Manifest, location: str, path: str,
             cache: Path) -> Path:
    """The output at store path `path` as `cache/<manifest hash>/`: every file's sha256 checked
    and the manifest written last in a temp dir, then renamed into place (or left to another
    process's finished copy). A failure leaves nothing."""
    rels, dest = sorted(manifest.files), cache / manifest.hash
    tmp = cache / f".{manifest.hash}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        for parent in {tmp, *((tmp / rel).parent for rel in rels)}:
            parent.mkdir(parents=True, exist_ok=True)
        get_files(fs, [(f"{path}/{r}", str(tmp / r)) for r in rels],
                  [manifest.files[r].size for r in rels], policy)
        for rel in rels:
            with open(tmp / rel, "rb") as f:
                check_hash(location, rel, manifest.files[rel].sha256, sha256_of(f))
        (tmp / MANIFEST).write_bytes(manifest.to_json())
        if dest.exists():
            if is_cached_copy(dest, manifest):  # another process fetched it meanwhile
                return dest
            shutil.rmtree(dest)  # a damaged earlier copy
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
