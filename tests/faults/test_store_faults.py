"""Store faults: the S3 endpoint gone during a checkpoint upload, flipped bytes in a stored shard, a
disk that fills up partway through a write or a download. Each fault is real (a server that stops
answering, bytes changed in the bucket, an OSError(ENOSPC) from the filesystem layer the store
writes through) and each test asserts that nothing finished is lost and nothing partial is read:
a checkpoint cut short never gets a manifest, and a corrupt file is refused by name.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from s3fs import S3FileSystem

from btx_core.config.execution import TransferPolicy
from btx_core.errors import IntegrityError, StoreError
from btx_core.stages.common import open_store
from btx_core.stages.expert import train_expert
from btx_core.stages.mix import mix_stage
from btx_core.stages.seed import build_seed
from btx_core.store import layout
from btx_core.store.core import Store, checkpoint_location
from tests.integration.test_mix_stage import ci_config as mix_config
from tests.integration.test_stages_s3 import ci_config
from tests.support.params import param_fixture
from tests.unit.test_store import stored_path, write

# the integration values of test_disk_full_partway_through_a_write_leaves_no_output's parameter
kind = param_fixture("kind", "s3")

OUTAGE_S = 30


def _observer(s3_root: str, s3_endpoint: str) -> Store:
    """The same bucket seen through the session endpoint, which stays up during an outage."""
    return Store(s3_root, storage_options={"endpoint_url": s3_endpoint, "skip_instance_cache": True})


def _outage_during_upload_of(marker: str, start_outage, monkeypatch) -> threading.Event:
    """Start the outage as the second file whose store path holds `marker` starts uploading: the
    upload of that checkpoint is under way, its first file stored or in flight (stored, when files
    go one at a time), the others to come. The wrapper, on s3fs's per-file upload that its batched
    `put` runs for every file of every S3 filesystem, passes every call through; the fault is the
    server going away."""
    real_put_file, fired, lock, seen = S3FileSystem._put_file, threading.Event(), threading.Lock(), []

    async def put_file(self, lpath, rpath, **kw):
        with lock:
            if marker in rpath:
                seen.append(rpath)
            if len(seen) >= 2 and not fired.is_set():
                start_outage()
                fired.set()
        return await real_put_file(self, lpath, rpath, **kw)

    monkeypatch.setattr(S3FileSystem, "_put_file", put_file)
    return fired


# -- the S3 endpoint stopped during a checkpoint upload ---------------------------------------


@pytest.mark.slow  # 50 s; the default suite keeps the outage past the retries and the lost endpoint of test_data_ranged
def test_checkpoint_upload_rides_out_a_30s_endpoint_outage(restartable_s3, s3_root, s3_endpoint,
                                                           tmp_path, monkeypatch):
    # The default retries: botocore's, in adaptive mode (test_default_retries_outlast_the_outage).
    config = ci_config(s3_root, tmp_path / "cache", steps=12, checkpoint_every=4, keep_checkpoints=3)
    build_seed(config)
    prefix = layout.expert_checkpoints(config.run_root, "math")
    step8 = checkpoint_location(prefix, 8)
    fired = _outage_during_upload_of("/step-00000008/", lambda: restartable_s3.outage(OUTAGE_S), monkeypatch)
    with ThreadPoolExecutor(1) as pool:
        branch = pool.submit(train_expert, config, "math")
        assert fired.wait(120), "the branch never uploaded checkpoint 8"
        observer = _observer(s3_root, s3_endpoint)
        for at in (1, OUTAGE_S - 3):  # seconds into the outage: nothing partial is ever valid
            time.sleep(max(0.0, restartable_s3.down_at + at - time.monotonic()))
            assert not observer.is_complete(step8)
            assert [s for s, _ in observer.list_checkpoints(prefix)] == [4]
            assert not observer.is_complete(layout.expert_model(config.run_root, "math"))
        out = branch.result(timeout=120)
    assert restartable_s3.up_at - restartable_s3.down_at >= OUTAGE_S  # a real 30 s outage...
    assert time.monotonic() > restartable_s3.up_at                     # ...that the stage outlasted
    store = open_store(config)
    assert [s for s, _ in store.list_checkpoints(prefix)] == [4, 8, 12]
    for _, location in store.list_checkpoints(prefix):
        store.verify(location)  # every byte of the checkpoint written across the outage
    assert out.metrics["steps"] == 12 and store.verify(out.location) == out.manifest


def test_outage_past_the_retries_fails_cleanly_and_the_next_run_resumes(restartable_s3, s3_root, s3_endpoint,
                                                                       tmp_path, monkeypatch):
    # One file at a time, so the checkpoint cut short holds exactly its first file; few tries.
    monkeypatch.setattr(Store, "transfer", TransferPolicy(files_at_once=1, attempts=2))
    config = ci_config(s3_root, tmp_path / "cache", steps=12, checkpoint_every=4, keep_checkpoints=3)
    build_seed(config)
    prefix = layout.expert_checkpoints(config.run_root, "math")
    _outage_during_upload_of("/step-00000008/", restartable_s3.stop, monkeypatch)
    with pytest.raises(StoreError, match=rf"cannot reach endpoint {restartable_s3.endpoint} \(writing "
                                         rf"{checkpoint_location(prefix, 8)}"):
        train_expert(config, "math")
    observer = _observer(s3_root, s3_endpoint)
    partial = observer._stored_sizes(observer._path(checkpoint_location(prefix, 8)))
    assert len(partial) == 1                                         # one file of checkpoint 8...
    assert [s for s, _ in observer.list_checkpoints(prefix)] == [4]  # ...and no manifest for it
    observer.verify(checkpoint_location(prefix, 4))                  # nothing finished is lost
    assert not observer.is_complete(layout.expert_model(config.run_root, "math"))

    restartable_s3.start()  # the next run, with the default retries and botocore settings
    # The failed run could not release its writer lease (the endpoint was down). The next run is
    # another process, for which the failed run's pid is gone; in this test it is the same one.
    monkeypatch.setattr("btx_core.store.lease.pid_alive", lambda pid: pid != os.getpid())
    monkeypatch.setattr(Store, "transfer", TransferPolicy())
    S3FileSystem.clear_instance_cache()
    out = train_expert(config, "math")
    assert out.metrics["resumed_from_step"] == 4 and out.metrics["steps"] == 12
    store = open_store(config)
    assert [s for s, _ in store.list_checkpoints(prefix)] == [4, 8, 12]
    store.verify(checkpoint_location(prefix, 8))


def test_missing_buckets_and_refused_credentials_are_not_retried(s3_root, tmp_path, monkeypatch, request):
    monkeypatch.setattr(Store, "transfer", TransferPolicy(attempts=8))
    for message in ("does not exist", "access denied"):
        if message == "access denied":
            request.getfixturevalue("s3_auth_enforced")
            store = Store(s3_root, storage_options={"skip_instance_cache": True})
        else:
            store = Store("s3://btx-no-such-bucket/run")
        started = time.monotonic()
        with pytest.raises(StoreError, match=message):
            write(store, tmp_path, store.child("out"))
        assert time.monotonic() - started < 5  # no wait of the retry policy was taken


# -- flipped bytes in a stored shard --------------------------------------------------------------


def test_flipped_bytes_in_a_stored_shard_are_refused_and_mix_does_not_start(s3_root, tmp_path):
    config = mix_config(s3_root, tmp_path / "cache", domains=2, include_seed=False, top_k=1)
    build_seed(config)
    for d in config.domains:
        train_expert(config, d.name)
    store = open_store(config)
    expert = layout.expert_model(config.run_root, "code")
    shard = stored_path(store, expert, "model.safetensors")
    damaged = bytearray(store.fs.cat_file(shard))
    damaged[len(damaged) // 2] ^= 0xFF  # one bit pattern changed, size unchanged
    store.fs.pipe_file(shard, bytes(damaged))
    expected = store.read_manifest(expert).files["model.safetensors"].sha256
    names_it = (rf"{re.escape(expert)}/model.safetensors is corrupt: sha256 expected {expected}, "
                rf"actual {hashlib.sha256(damaged).hexdigest()}")
    assert store.is_complete(expert)  # sizes match: only hashing can tell
    with pytest.raises(IntegrityError, match=names_it):
        store.verify(expert)
    with pytest.raises(IntegrityError, match=names_it):
        store.fetch(expert, tmp_path / "fetched")
    assert list((tmp_path / "fetched").iterdir()) == []  # no copy of it, not even a partial one
    with pytest.raises(IntegrityError, match=names_it):
        mix_stage(config)
    assert store._stored_sizes(store._path(layout.mix_model(config.run_root))) == {}  # nothing written


# -- a disk that fills up partway ------------------------------------------------------------------

SHARDS = {f"model-0000{i}-of-00005.safetensors": bytes([i]) * 300_000 for i in range(1, 6)}


def _disk_full_at(store: Store, method: str, n: int, monkeypatch) -> list[str]:
    """The store's filesystem layer fails the `n`th file it puts (or gets) with ENOSPC after
    writing half of that file at its destination, as a filling disk does; the others go through.
    Wraps the per-file method that the batched `put`/`get` call for each file (s3fs's async one
    on S3). Returns the destinations of every file."""
    fs, calls, lock = store.fs, [], threading.Lock()

    def nth(dst: str) -> bool:
        with lock:
            calls.append(dst)
            return len(calls) == n

    def full(dst: str):
        return OSError(errno.ENOSPC, "No space left on device", dst)

    if store.is_local:
        real = getattr(fs, f"{method}_file")

        def local(src, dst, **kw):
            if not nth(dst):
                return real(src, dst, **kw)
            data = Path(src).read_bytes()
            Path(dst).write_bytes(data[: len(data) // 2])
            raise full(dst)

        monkeypatch.setattr(fs, f"{method}_file", local)
    else:
        real_async = getattr(fs, f"_{method}_file")

        async def remote(src, dst, **kw):
            if not nth(dst):
                return await real_async(src, dst, **kw)
            if method == "put":
                data = Path(src).read_bytes()
                await fs._pipe_file(dst, data[: len(data) // 2])
            else:
                data = await fs._cat_file(src)
                Path(dst).write_bytes(data[: len(data) // 2])
            raise full(dst)

        monkeypatch.setattr(fs, f"_{method}_file", remote)
    return calls


def test_disk_full_partway_through_a_write_leaves_no_output(kind, tmp_path, monkeypatch, request):
    store = Store(str(tmp_path / "store") if kind == "local" else request.getfixturevalue("s3_root"))
    loc = store.child("ckpt", "step-00000008")
    old = write(store, tmp_path, loc)  # an earlier output at the same location
    calls = _disk_full_at(store, "put", 3, monkeypatch)
    with pytest.raises(StoreError, match=rf"no space left on device \(writing {re.escape(loc)}\): free space "
                                         r"there or point `store:` at a larger disk"):
        write(store, tmp_path, loc, files=SHARDS)
    assert 3 <= len(calls) == len(set(calls))  # a full disk is not retried
    path = store._path(loc)
    if kind == "local":  # built beside the target: the old output stays whole, no debris
        assert store.verify(loc) == old and sorted(os.listdir(os.path.dirname(path))) == ["step-00000008"]
    else:  # no rename on S3: the old output went first, and the partial files after the failure
        assert not store.is_complete(loc) and store._stored_sizes(path) == {}
    monkeypatch.undo()
    again = write(store, tmp_path, loc, files=SHARDS)  # with space again
    assert store.verify(loc) == again


def test_disk_full_partway_through_a_download_leaves_nothing_in_the_cache(s3_root, tmp_path, monkeypatch):
    store, cache = Store(s3_root), tmp_path / "cache"
    loc = store.child("model")
    manifest = write(store, tmp_path, loc, files=SHARDS)
    _disk_full_at(store, "get", 2, monkeypatch)
    with pytest.raises(StoreError, match=rf"no space left on device \(downloading {re.escape(loc)} into "
                                         rf"{re.escape(str(cache))}\): free space there or point `cache_dir:`"):
        store.fetch(loc, cache)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    assert store.fetch(loc, cache) == cache / manifest.hash


# -- large files in parallel parts ------------------------------------------------------------------


def test_large_files_travel_in_parallel_parts_and_arrive_whole(s3_root, tmp_path, monkeypatch):
    monkeypatch.setattr(Store, "transfer", TransferPolicy(part_size_mib=5, connections=4))
    store = Store(s3_root)
    loc = store.child("big")
    files = {"model.safetensors": os.urandom(16 << 20), "config.json": b"{}"}  # 4 parts, 1 request
    manifest = write(store, tmp_path, loc, files=files)
    etag = store.fs.info(stored_path(store, loc, "model.safetensors"))["ETag"]
    assert etag.strip('"').endswith("-4")  # S3 marks a multipart upload's ETag with its part count
    assert not store.fs.info(stored_path(store, loc, "config.json"))["ETag"].strip('"').count("-")
    local = store.fetch(loc, tmp_path / "cache")  # ranged reads, every sha256 checked
    assert (local / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert store.verify(loc) == manifest

