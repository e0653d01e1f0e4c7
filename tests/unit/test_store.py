"""The object store: the same behaviour on a local directory (unit) and on moto S3 (integration)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path

import pytest

import btx_core.store.commit as commit_module
import btx_core.store.core as store_module
from btx_core.errors import IncompleteOutputError, IntegrityError, StoreError
from btx_core.store.core import MANIFEST, Manifest, Store, checkpoint_location
from tests.support.params import param_fixture

# the unit values of store's parameter
store_param = param_fixture("store_param", "local")

FILES = {
    "config.json": b'{"hidden_size": 32}',
    "model.safetensors": bytes(range(256)) * 64,
    "tokenizer/tokenizer.json": b'{"vocab": {}}',
}


@pytest.fixture
def store(store_param, request, tmp_path) -> Store:
    if store_param == "local":
        return Store(str(tmp_path / "store"))
    return Store(request.getfixturevalue("s3_root"))


def make_dir(root: Path, files: dict[str, bytes] = FILES) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def write(store: Store, tmp_path: Path, location: str, files=FILES, **kw) -> Manifest:
    src = make_dir(Path(tempfile.mkdtemp(dir=tmp_path, prefix="src-")), files)
    kw.setdefault("stage", "branch")
    kw.setdefault("config_hash", "cfg-1")
    return store.write_dir(src, location, **kw)


def stored_path(store: Store, location: str, rel: str) -> str:
    return f"{store.fs._strip_protocol(location)}/{rel}"


def fail_put_after_first_file(store: Store, monkeypatch) -> None:
    """Fault: the batch upload stores one file, then the disk is full."""
    real_put = store.fs.put

    def put(lpaths, rpaths, **kw):
        real_put(lpaths[:1], rpaths[:1], **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.fs, "put", put)


# -- manifest ---------------------------------------------------------------------------------


def test_manifest_hash_is_canonical_and_sensitive():
    m = Manifest(stage="s", created_at="2026-01-01T00:00:00+00:00", config_hash="c",
                 inputs={"seed": "a" * 64}, files={"a": {"size": 1, "sha256": "0" * 64}},
                 metrics={"loss": 1.5})
    assert Manifest.from_json(m.to_json()) == m
    assert Manifest.from_json(m.to_json()).hash == m.hash
    assert m.hash == hashlib.sha256(json.dumps(json.loads(m.to_json()), sort_keys=True,
                                               separators=(",", ":")).encode()).hexdigest()
    assert m.model_copy(update={"inputs": {"seed": "b" * 64}}).hash != m.hash


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a//b", MANIFEST])
def test_manifest_refuses_paths_that_escape(rel):
    with pytest.raises(ValueError, match="relative"):
        Manifest(stage="s", created_at="t", config_hash="c",
                 files={rel: {"size": 1, "sha256": "0" * 64}})


# -- locations ---------------------------------------------------------------------------------


def test_locations_stay_under_the_root(tmp_path):
    store = Store(str(tmp_path / "store"))
    assert store.child("experts", "math") == f"file://{tmp_path}/store/experts/math"
    assert checkpoint_location(store.child("ckpt"), 100).endswith("/ckpt/step-00000100")
    for bad in (("..",), ("a/../b",), ("",)):
        with pytest.raises(ValueError):
            store.child(*bad)
    with pytest.raises(ValueError, match="outside the store"):
        store.read_manifest(str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="root"):
        store.delete(store.uri)


# -- writing and reading -------------------------------------------------------------------------


def test_round_trip(store, tmp_path):
    loc = store.child("experts", "math")
    m = write(store, tmp_path, loc, inputs={"seed": "f" * 64}, metrics={"loss": 2.0},
              extra={"domain": "math"})
    assert set(m.files) == set(FILES)
    for rel, data in FILES.items():
        assert m.files[rel].size == len(data)
        assert m.files[rel].sha256 == hashlib.sha256(data).hexdigest()
    assert store.read_manifest(loc) == m
    assert store.is_complete(loc)
    assert store.verify(loc) == m
    got = store.fetch(loc, tmp_path / "cache")
    for rel, data in FILES.items():
        assert (got / rel).read_bytes() == data


def test_manifest_written_after_every_file(store, tmp_path, monkeypatch):
    events: list[str] = []
    real_put, real_pipe = store.fs.put, store.fs.pipe_file

    def put(lpaths, rpaths, **kw):
        events.extend(f"put:{r.rsplit('/', 1)[1]}" for r in rpaths)
        return real_put(lpaths, rpaths, **kw)

    def pipe_file(path, data, **kw):
        events.append(f"pipe:{path.rsplit('/', 1)[1]}")
        return real_pipe(path, data, **kw)

    monkeypatch.setattr(store.fs, "put", put)
    monkeypatch.setattr(store.fs, "pipe_file", pipe_file)
    write(store, tmp_path, store.child("out"))
    assert events.index(f"pipe:{MANIFEST}") == len(events) - 1  # once, and last
    assert len([e for e in events if e.startswith("put:")]) == len(FILES)


def test_failed_first_write_leaves_nothing_complete(store, tmp_path, monkeypatch):
    loc = store.child("out")
    fail_put_after_first_file(store, monkeypatch)
    with pytest.raises(StoreError, match="no space left"):
        write(store, tmp_path, loc)
    assert not store.is_complete(loc)
    with pytest.raises(IncompleteOutputError, match="out"):
        store.read_manifest(loc)
    # The partial upload is cleaned away (locally it only ever existed in a temp dir).
    assert store.fs.find(store.fs._strip_protocol(loc)) == []


def test_silently_truncated_upload_gets_no_manifest(store, tmp_path, monkeypatch):
    real_put = store.fs.put

    def put(lpaths, rpaths, **kw):  # "succeeds" but one object is short
        real_put(lpaths, rpaths, **kw)
        store.fs.pipe_file(rpaths[-1], b"short")

    monkeypatch.setattr(store.fs, "put", put)
    loc = store.child("out")
    with pytest.raises(StoreError, match="incomplete"):
        write(store, tmp_path, loc)
    assert not store.is_complete(loc)


def test_failed_overwrite_never_mixes_old_and_new(store, tmp_path, monkeypatch):
    loc = store.child("out")
    old = write(store, tmp_path, loc, config_hash="old")
    fail_put_after_first_file(store, monkeypatch)
    new_files = {rel: data + b"-new" for rel, data in FILES.items()}
    with pytest.raises(StoreError):
        write(store, tmp_path, loc, files=new_files, config_hash="new")
    if store.is_local:
        # Built beside and renamed into place: the old output is untouched.
        assert store.verify(loc) == old
    else:
        # No rename on S3: the old manifest went first, so nothing claims to be complete.
        assert not store.is_complete(loc)
        assert store.exists_with(loc, "old") is None
        assert store.exists_with(loc, "new") is None


def test_overwrite_replaces_files(store, tmp_path):
    loc = store.child("out")
    write(store, tmp_path, loc, files={"a.bin": b"1", "stale.bin": b"2"})
    m = write(store, tmp_path, loc, files={"a.bin": b"333"})
    assert set(m.files) == {"a.bin"}
    assert store.fs.cat_file(stored_path(store, loc, "a.bin")) == b"333"
    assert not store.fs.exists(stored_path(store, loc, "stale.bin"))


def test_directory_without_manifest_does_not_exist(store, tmp_path):
    loc = store.child("out")
    write(store, tmp_path, loc)
    store.fs.rm(stored_path(store, loc, MANIFEST))
    store.fs.invalidate_cache()
    assert not store.is_complete(loc)
    with pytest.raises(IncompleteOutputError):
        store.read_manifest(loc)


def test_invalid_or_incomplete_manifest(store, tmp_path):
    loc = store.child("out")
    write(store, tmp_path, loc)
    store.fs.rm(stored_path(store, loc, "config.json"))
    assert not store.is_complete(loc)  # a listed file is gone
    store.fs.pipe_file(stored_path(store, loc, MANIFEST), b"{not json")
    with pytest.raises(IncompleteOutputError, match="not a valid manifest"):
        store.read_manifest(loc)


def test_verify_names_the_corrupt_file(store, tmp_path):
    loc = store.child("out")
    m = write(store, tmp_path, loc)
    data = bytearray(FILES["model.safetensors"])
    data[1000] ^= 0xFF
    store.fs.pipe_file(stored_path(store, loc, "model.safetensors"), bytes(data))
    assert store.is_complete(loc)  # same size: the cheap check cannot tell
    with pytest.raises(IntegrityError) as err:
        store.verify(loc)
    message = str(err.value)
    assert "model.safetensors" in message
    assert m.files["model.safetensors"].sha256 in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    with pytest.raises(IntegrityError, match="model.safetensors"):
        store.fetch(loc, tmp_path / "cache")
    assert not (tmp_path / "cache" / m.hash).exists()


def test_exists_with_matches_config_and_inputs(store, tmp_path):
    loc = store.child("out")
    assert store.exists_with(loc, "cfg-1", {}) is None
    m = write(store, tmp_path, loc, config_hash="cfg-1", inputs={"seed": "a" * 64})
    assert store.exists_with(loc, "cfg-1", {"seed": "a" * 64}) == m
    assert store.exists_with(loc, "cfg-2", {"seed": "a" * 64}) is None
    assert store.exists_with(loc, "cfg-1", {"seed": "b" * 64}) is None
    assert store.exists_with(loc, "cfg-1", {}) is None


def test_delete_spares_siblings_sharing_a_prefix(store, tmp_path):
    a, ab = store.child("run", "a"), store.child("run", "ab")
    write(store, tmp_path, a)
    write(store, tmp_path, ab)
    store.delete(a)
    store.delete(a)  # idempotent
    assert not store.is_complete(a)
    assert store.is_complete(ab)


def test_write_dir_refuses_symlinks_empty_dirs_and_bad_metrics(tmp_path):
    store = Store(str(tmp_path / "store"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        store.write_dir(tmp_path / "empty", store.child("x"), stage="s", config_hash="c")
    src = make_dir(tmp_path / "src")
    (src / "link").symlink_to(src / "config.json")
    with pytest.raises(ValueError, match="symlink"):
        store.write_dir(src, store.child("x"), stage="s", config_hash="c")
    (src / "link").unlink()
    with pytest.raises(ValueError, match="JSON"):
        store.write_dir(src, store.child("x"), stage="s", config_hash="c", metrics={"t": object()})
    assert not store.is_complete(store.child("x"))


# -- concurrent local writers ------------------------------------------------------------------


def temp_dirs(store: Store, location: str) -> list[str]:
    parent, name = os.path.split(store.fs._strip_protocol(location))
    return [n for n in os.listdir(parent) if n.startswith((f".{name}.tmp-", f".{name}.old-"))]


def test_concurrent_local_writers_both_succeed(tmp_path, monkeypatch):
    """Two runs sharing a data cache write the same key at once: neither deletes the other's
    temp dir, both finish, and the last rename leaves one complete output."""
    store = Store(str(tmp_path / "store"))
    loc = store.child("_data", "key")
    write(store, tmp_path, loc, config_hash="earlier")
    a_uploading, b_uploading = threading.Event(), threading.Event()
    both_uploaded = threading.Barrier(2, timeout=10)
    real_put = store.fs.put

    def slow_put(lpaths, rpaths, **kw):
        # A holds its upload open (temp dir made, nothing in it yet) until B, started only now,
        # has swept for leftovers and begun its own; both then swap into place together.
        if threading.current_thread().name == "a":
            a_uploading.set()
            assert b_uploading.wait(30)
        else:
            b_uploading.set()
        real_put(lpaths, rpaths, **kw)
        both_uploaded.wait()

    monkeypatch.setattr(store.fs, "put", slow_put)  # fsspec shares the instance: undo after
    files = {w: {rel: data + w.encode() for rel, data in FILES.items()} for w in "ab"}
    results: dict[str, Manifest | BaseException] = {}

    def writer(w: str) -> None:
        try:
            results[w] = write(store, tmp_path, loc, files=files[w], config_hash=w)
        except BaseException as exc:  # reported by the asserts below
            results[w] = exc

    threads = {w: threading.Thread(target=writer, args=(w,), name=w) for w in "ab"}
    threads["a"].start()
    assert a_uploading.wait(30)
    threads["b"].start()
    for t in threads.values():
        t.join(60)
    assert all(isinstance(results.get(w), Manifest) for w in "ab"), results
    final = store.verify(loc)
    assert final in (results["a"], results["b"])
    winner = final.config_hash
    for rel, data in files[winner].items():
        assert store.fs.cat_file(stored_path(store, loc, rel)) == data
    assert temp_dirs(store, loc) == []


@pytest.mark.parametrize("same_output", [False, True])
def test_writer_overtaken_between_its_renames_still_succeeds(tmp_path, monkeypatch, same_output):
    """Another writer's output lands after this one moved the old output aside: this one
    retries and its later rename wins, or, when the output landed is this very one, stops."""
    store = Store(str(tmp_path / "store"))
    loc = store.child("out")
    write(store, tmp_path, loc, config_hash="earlier")
    path, real_rename, other = store.fs._strip_protocol(loc), os.rename, {}

    class Frozen(datetime):  # same second for both writers, so equal outputs hash the same
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 1, tzinfo=tz)

    def rename(src, dst):
        real_rename(src, dst)
        if src == path and not other:  # the old output was just moved aside: overtake
            other["started"] = True
            other["m"] = write(store, tmp_path, loc, config_hash="same" if same_output else "o")

    monkeypatch.setattr(store_module, "datetime", Frozen)
    monkeypatch.setattr(os, "rename", rename)
    mine = write(store, tmp_path, loc, config_hash="same" if same_output else "mine")
    monkeypatch.undo()
    assert (mine == other["m"]) is same_output
    assert store.verify(loc) == mine
    assert temp_dirs(store, loc) == []


def test_only_dead_writers_leftovers_are_cleaned(tmp_path):
    store = Store(str(tmp_path / "store"))
    loc = store.child("out")
    parent = Path(store.fs._strip_protocol(loc)).parent
    parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    host = commit_module._HOST

    def leftover(kind: str, tag: str, age_s: float = 0) -> Path:
        d = parent / f".out.{kind}-{tag}"
        make_dir(d, {"config.json": b"partial"})
        os.utime(d, (time.time() - age_s,) * 2)
        return d

    gone = [leftover("tmp", f"{host}-{dead.pid}-{'a' * 12}"),  # killed writer, this host
            leftover("old", f"{host}-{dead.pid}-{'b' * 12}"),
            leftover("tmp", "c" * 12, age_s=2 * 86400)]  # untagged (older btx), a day old
    kept = [leftover("tmp", f"{host}-{os.getpid()}-{'d' * 12}"),  # a live writer: this process
            leftover("tmp", f"{host}-1-{'e' * 12}"),  # alive, maybe another user's
            leftover("tmp", f"other_host-{dead.pid}-{'f' * 12}"),  # its pid cannot be checked
            leftover("tmp", "0" * 12)]  # untagged but recent: may still be filling
    m = write(store, tmp_path, loc)
    assert [d.name for d in gone if d.exists()] == []
    assert [d.name for d in kept if not d.exists()] == []
    assert store.verify(loc) == m


# -- checkpoints ---------------------------------------------------------------------------------


def test_checkpoints_ignore_incomplete_and_prune(store, tmp_path):
    prefix = store.child("experts", "math", "ckpt")
    assert store.list_checkpoints(prefix) == []
    assert store.latest_checkpoint(prefix) is None
    for step in (100, 200, 300, 50, 400):
        write(store, tmp_path, checkpoint_location(prefix, step), files={"w.bin": b"%d" % step})
    for step in (50, 400):  # killed writes: files without a manifest
        store.fs.rm(stored_path(store, checkpoint_location(prefix, step), MANIFEST))
    store.fs.invalidate_cache()
    store.fs.pipe_file(stored_path(store, prefix, "notes.txt"), b"not a checkpoint")
    assert store.list_checkpoints(prefix) == [(s, checkpoint_location(prefix, s))
                                              for s in (100, 200, 300)]
    assert store.latest_checkpoint(prefix) == (300, checkpoint_location(prefix, 300))

    deleted = store.prune_checkpoints(prefix, keep=2)
    assert sorted(deleted) == sorted(checkpoint_location(prefix, s) for s in (50, 100))
    assert [s for s, _ in store.list_checkpoints(prefix)] == [200, 300]
    # A newer incomplete one may be a write in progress: left alone.
    assert store.fs.exists(stored_path(store, checkpoint_location(prefix, 400), "w.bin"))
    assert store.prune_checkpoints(prefix, keep=5) == []

    # Another process (its own filesystem object, own listing cache) adds a checkpoint.
    other = Store(store.uri, storage_options={"skip_instance_cache": True})
    write(other, tmp_path, checkpoint_location(prefix, 500), files={"w.bin": b"500"})
    assert store.latest_checkpoint(prefix) == (500, checkpoint_location(prefix, 500))


# -- errors name the fix, never the secret ---------------------------------------------------------


def _full_text(exc: BaseException) -> str:
    return str(exc) + "".join(traceback.format_exception(exc))


def test_unreachable_endpoint_is_a_store_error(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store = Store("s3://btx-unreachable/run", storage_options={
        "skip_instance_cache": True, "config_kwargs": {"retries": {"max_attempts": 1}}})
    store.fs.retries = 1  # s3fs's own retry loop; the default waits ~2 s
    with pytest.raises(StoreError, match=f"cannot reach endpoint http://127.0.0.1:{port}"):
        store.read_manifest(store.child("out"))


def test_store_transfer_in_the_config_sets_the_policy_and_defaults_match(tmp_path, monkeypatch):
    import yaml

    from btx_core.config.execution import TransferPolicy
    from btx_core.config.schema import BTXConfig
    from btx_core.stages.common import open_store

    raw = yaml.safe_load((Path(__file__).parents[2] / "configs" / "ci.yaml").read_text())
    raw["store"] = str(tmp_path / "store")
    assert BTXConfig.model_validate(raw).store_transfer == Store.transfer  # the config's defaults
    assert open_store(BTXConfig.model_validate(raw)).transfer is Store.transfer  # unset: the default
    raw["store_transfer"] = {"files_at_once": 2, "connections": 16, "part_size_mib": 64, "attempts": 3}
    policy = open_store(BTXConfig.model_validate(raw)).transfer
    assert policy == TransferPolicy(files_at_once=2, connections=16, part_size_mib=64, attempts=3)
    assert policy.part_size == 64 << 20
    raw["store"] = "s3://btx-some-bucket/run"  # the tries configure the S3 client (no request made)
    assert open_store(BTXConfig.model_validate(raw)).fs.config_kwargs["retries"] == {
        "mode": "adaptive", "total_max_attempts": 3}
    # botocore's own environment settings, when a user sets them, win over the config's
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    raw["store"] = "s3://btx-other-bucket/run"  # not the cached filesystem of the same options
    assert open_store(BTXConfig.model_validate(raw)).fs.config_kwargs["retries"] == {
        "mode": "standard", "total_max_attempts": 2}

