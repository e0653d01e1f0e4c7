"""The writer lease of a stage prefix (btx_core/store/lease.py, lease_slot.py; issues 14 and 23):
of any number of racing takers exactly one holds it; a stale holder stops itself and its late
commit is refused by the generation fence; expiry is the store's clock's verdict; a holder is
taken over only once provably gone; a store that ignores conditional writes is refused; every
stage commits its outputs under its prefix's lease."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from btx_core.config.execution import LeasePolicy
from btx_core.store import lease as lease_module
from btx_core.store.core import Manifest, Store
from btx_core.store.lease import (
    LeaseGenerationError,
    LeaseHeldError,
    LeaseLostError,
    LeaseRecord,
    WriterLease,
)
from tests.conftest_s3 import S3_BUCKET

ROOT = Path(__file__).parents[2]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    return Store(request.getfixturevalue("s3_root"))


@pytest.fixture
def atomic_moto(monkeypatch):
    """moto checks a PUT's condition and then stores the object without a lock, so two
    concurrent conditional PUTs can both pass (S3 itself applies them atomically). Serialised
    here, so that the races below test btx's protocol against S3's guarantee."""
    from moto.s3.responses import S3Response

    lock, put = threading.Lock(), S3Response.put_object

    def atomic_put(self, *args, **kwargs):
        with lock:
            return put(self, *args, **kwargs)

    monkeypatch.setattr(S3Response, "put_object", atomic_put)


def age_lease(store: Store, prefix: str, seconds: float) -> None:
    """Make the store's record of the lease's last write `seconds` older."""
    path = store._path(f"{prefix}/_writer.json")
    if store.is_local:
        stamp = Path(path).stat().st_mtime - seconds
        os.utime(path, (stamp, stamp))
        return
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    key = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].get_object(S3_BUCKET, path.split("/", 1)[1])
    key.last_modified -= timedelta(seconds=seconds)


def dies(lease: WriterLease) -> None:
    """The holder's process stops dead: no more renewals, no release."""
    lease._stop.set()
    lease._thread.join()


def test_a_second_writer_is_refused_naming_the_first(store):
    prefix = store.child("run", "experts", "math")
    with WriterLease(store, prefix, flow_run="run-a") as first:
        with pytest.raises(LeaseHeldError, match=r"experts/math is being written by pid \d+ on .*flow run run-a"):
            WriterLease(store, prefix, flow_run="run-b").acquire()
        first.check()
    with WriterLease(store, prefix, flow_run="run-b") as second:  # released: free again
        assert second.generation == first.generation + 1
    record = LeaseRecord.parse(second.slot.read().data)
    assert record.released and record.generation == 2  # kept, so generations only grow


def race(store: Store, prefix: str, takers: int, rounds: int) -> list[list[int | None]]:
    """`takers` threads try to take the lease at once, `rounds` times; the winner of a round holds
    it until everyone has tried, then releases it. -> the generation each taker won, by round."""
    barrier, won = threading.Barrier(takers, timeout=60), [[None] * takers for _ in range(rounds)]
    errors = []

    def taker(i: int) -> None:
        try:
            for r in range(rounds):
                lease = WriterLease(store, prefix, ttl_s=60, renew_s=10)
                barrier.wait()
                try:
                    won[r][i] = lease.acquire().generation
                except LeaseHeldError:
                    pass
                barrier.wait()  # all have tried while the winner holds it
                if won[r][i] is not None:
                    lease.release()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=taker, args=(i,)) for i in range(takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return won


def test_racing_threads_exactly_one_holds_the_lease_each_round(store, atomic_moto):
    won = race(store, store.child("run", "mix"), takers=12, rounds=8)
    for r, generations in enumerate(won):
        assert [g for g in generations if g is not None] == [r + 1], (r, generations)


def test_racing_processes_exactly_one_holds_the_lease_each_round(store, atomic_moto, tmp_path):
    takers, rounds, sync = 6, 4, tmp_path / "sync"
    sync.mkdir()
    prefix = store.child("run", "experts", "code")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.support.lease_racer", store.uri, prefix, str(sync),
                               str(i), str(rounds)], cwd=ROOT) for i in range(takers)]
    try:
        def wait(*names: str) -> None:
            deadline = time.monotonic() + 120
            while not all((sync / n).exists() for n in names):
                assert time.monotonic() < deadline and all(p.poll() in (None, 0) for p in procs), names
                time.sleep(0.005)

        wait(*(f"ready-{i}" for i in range(takers)))
        for r in range(rounds):
            (sync / f"go-{r}").touch()
            wait(*(f"{r}-{i}" for i in range(takers)))
            said = sorted((sync / f"{r}-{i}").read_text() for i in range(takers))
            assert said == ["lost"] * (takers - 1) + [f"won {r + 1}"], (r, said)
            (sync / f"release-{r}").touch()
            wait(f"released-{r}")
        assert [p.wait(timeout=60) for p in procs] == [0] * takers
    finally:
        for p in procs:
            p.kill()


def test_a_stale_holder_stops_itself_and_its_late_commit_is_fenced(store, tmp_path, monkeypatch):
    prefix, ttl = store.child("run", "experts", "math"), 1.5
    stalled = WriterLease(store, prefix, ttl_s=ttl, renew_s=0.25).acquire()
    time.sleep(0.4)
    assert stalled.record.renewal >= 1
    tries: list[float] = []

    def store_down(data, version):
        tries.append(time.monotonic())
        raise ConnectionRefusedError("endpoint down")

    monkeypatch.setattr(stalled.slot, "replace", store_down)  # every renewal fails from now on
    expiry = stalled._deadline  # ttl after its last successful renewal was sent
    while True:
        try:
            stalled.check()
        except LeaseLostError as exc:
            stopped = time.monotonic()
            assert "could not renew its lease for 1.5 s" in str(exc)
            break
        time.sleep(0.01)
    assert expiry <= stopped < expiry + 0.1
    stalled._thread.join(timeout=2)
    assert not stalled._thread.is_alive() and len(tries) >= 3  # retried until its expiry, then gave up
    tried = len(tries)

    taker = WriterLease(store, prefix, ttl_s=ttl, renew_s=0.25)
    while True:  # refused until the store's clock says the stalled one expired
        try:
            taker.acquire()
            break
        except LeaseHeldError:
            assert time.monotonic() < expiry + ttl + 3
            time.sleep(0.1)
    assert time.monotonic() > expiry  # the takeover came after the stalled holder had stopped itself
    assert len(tries) == tried  # the stalled holder wrote nothing more

    model = store.child("run", "experts", "math", "model")
    for name in ("new", "old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.bin").write_text(name)
    written = store.write_dir(tmp_path / "new", model, stage="expert", config_hash="h", fence=taker)
    assert written.lease_generation == taker.generation == stalled.generation + 1
    stalled._deadline = float("inf")  # a writer that woke up and has not noticed its expiry
    with pytest.raises(LeaseGenerationError, match=rf"refusing to commit .*model: this writer holds generation "
                                                   rf"{stalled.generation} .* now at generation {taker.generation}"):
        store.write_dir(tmp_path / "old", model, stage="expert", config_hash="h", fence=stalled)
    assert store.verify(model) == written  # the new holder's output is untouched
    stalled.release()  # leaves the new holder's lease alone
    taker.check_commit(model)
    taker.release()


def test_a_failed_renewal_is_retried_and_the_holder_keeps_the_lease(store, monkeypatch):
    holder = WriterLease(store, store.child("run", "mix"), ttl_s=3, renew_s=0.2).acquire()
    failures, replace_ = [], holder.slot.replace

    def flaky(data, version):
        if len(failures) < 3:
            failures.append(time.monotonic())
            raise ConnectionResetError("connection reset")
        return replace_(data, version)

    monkeypatch.setattr(holder.slot, "replace", flaky)
    renewals = holder.record.renewal
    time.sleep(1.2)
    assert len(failures) == 3 and holder.record.renewal > renewals  # retried, then renewed again
    holder.check()
    holder.release()


def test_expiry_is_judged_by_the_stores_clock_not_this_hosts(store, monkeypatch):
    prefix = store.child("run", "trained", "btx")

    def skew(seconds: float) -> None:  # this host's wall clock, as the lease module sees it
        clock = type("SkewedTime", (), {"time": staticmethod(lambda: time.time() + seconds),
                                        "monotonic": staticmethod(time.monotonic), "sleep": staticmethod(time.sleep)})
        monkeypatch.setattr(lease_module, "time", clock)

    skew(-3600)  # the holder's clock an hour behind: a wall-clock expiry would look long past
    dead = WriterLease(store, prefix, ttl_s=30, renew_s=5).acquire()
    dies(dead)
    for hours in (+1, -1):  # just written: live, whatever this host's clock says
        skew(hours * 3600)
        with pytest.raises(LeaseHeldError, match=r"renewed [01] s ago by the store's clock"):
            WriterLease(store, prefix).acquire()
    age_lease(store, prefix, 32)  # the store stamped its last write 32 s ago: past its ttl of 30 s
    for hours in (+1, -1):
        skew(hours * 3600)
        taker = WriterLease(store, prefix, ttl_s=30, renew_s=5).acquire()
        assert taker.generation == dead.generation + 1
        dies(taker)
        age_lease(store, prefix, 32)
        dead = taker


def test_an_earlier_attempt_of_the_same_flow_run_is_taken_over_only_once_gone(store):
    prefix, ttl = store.child("run", "experts", "knowledge"), 1.5
    alive = WriterLease(store, prefix, flow_run="run-1", ttl_s=ttl, renew_s=0.3).acquire()
    started = time.monotonic()
    with pytest.raises(LeaseHeldError, match="earlier attempt of this flow run, still alive"):
        WriterLease(store, prefix, flow_run="run-1", ttl_s=ttl).acquire()
    assert time.monotonic() - started < ttl  # it saw a renewal: no need to wait out the ttl
    alive.check()
    dies(alive)  # a crash, or a lost node that stopped
    crashed = time.monotonic()
    retry = WriterLease(store, prefix, flow_run="run-1", ttl_s=ttl).acquire()  # waits for the expiry
    waited = time.monotonic() - crashed
    assert ttl - 0.3 <= waited < ttl + 4 and retry.generation == alive.generation + 1
    retry.release()


def test_a_lease_of_a_process_gone_from_this_machine_is_taken_over_at_once(store):
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                              capture_output=True, text=True).stdout)
    here, elsewhere = store.child("run", "a"), store.child("run", "b")
    for prefix, machine in ((here, lease_module.this_machine()), (elsewhere, "vm/another-boot/4026531836")):
        holder = WriterLease(store, prefix, ttl_s=600)
        holder.record = replace(holder.record, pid=gone, machine=machine)
        dies(holder.acquire())
    assert WriterLease(store, here).acquire().generation == 2
    # Same pid on another machine (or in another container's pid namespace): says nothing.
    with pytest.raises(LeaseHeldError, match=f"pid {gone}"):
        WriterLease(store, elsewhere).acquire()


def test_a_retried_put_whose_first_try_landed_is_recognised_as_ours(s3_root, monkeypatch):
    store = Store(s3_root)
    prefix = store.child("run", "seed")
    call = store.fs._call_s3

    async def answer_lost_then_retried(method, *args, **kwargs):
        if method == "put_object" and kwargs["Key"].endswith("_writer.json"):
            await call(method, *args, **kwargs)  # lands, but its answer never arrives...
        return await call(method, *args, **kwargs)  # ...so botocore sends it again: 412

    monkeypatch.setattr(store.fs, "_call_s3", answer_lost_then_retried)
    lease = WriterLease(store, prefix, ttl_s=60, renew_s=10).acquire()
    assert lease.generation == 1 and lease.renew() and lease.record.renewal == 1
    lease.check_commit(prefix)
    with pytest.raises(LeaseHeldError):
        WriterLease(store, prefix).acquire()  # a real loser is still a loser
    lease.release()


def test_lease_settings_are_checked():
    with pytest.raises(ValueError, match=r"renew_s \(50\) must be at most a third of ttl_s \(120\)"):
        LeasePolicy(renew_s=50)
    with pytest.raises(ValueError, match="conditional_writes"):
        LeasePolicy(conditional_writes="maybe")


def test_manifests_without_a_lease_generation_read_and_hash_as_before():
    old = {"format_version": 1, "stage": "seed", "created_at": "2026-01-01T00:00:00+00:00", "config_hash": "h",
           "inputs": {}, "files": {"a": {"size": 1, "sha256": "0" * 64}}, "metrics": {}, "extra": {}}
    manifest = Manifest.from_json(json.dumps(old))
    assert manifest.lease_generation is None
    assert manifest.hash == hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert b"lease_generation" not in manifest.to_json()
    fenced = manifest.model_copy(update={"lease_generation": 3})
    assert Manifest.from_json(fenced.to_json()).lease_generation == 3 and fenced.hash != manifest.hash


def test_every_stage_commit_passes_its_writer_lease():
    """Each `write_dir` / `save_model` call of a stage passes `fence=` (the lease it holds):
    the commit path can only fence what it is given. MiX of directories outside a run
    (`mix_dirs`, `btx mix --expert`) writes where the user says, not into a stage prefix."""
    unfenced = []
    for path in sorted((ROOT / "btx_core" / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                    "write_dir", "save_model") and not any(k.arg == "fence" for k in node.keywords):
                unfenced.append(f"{path.name}:{node.lineno}")
    assert [u.split(":")[0] for u in unfenced] == ["mix_dirs.py"], unfenced

