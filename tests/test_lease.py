"""The writer lease of a stage prefix (btx_core/store/lease.py; issue 14, failure 3): two writers
on one prefix never both train; the second refuses, naming the first; a dead or expired writer's
lease is taken over; nothing a refused writer does touches the first one's manifests."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import yaml

from btx_core.store.core import Store
from btx_core.store.lease import LeaseHeldError, LeaseLostError, WriterLease
from tests.test_cli_e2e import BTX, seeded, write_config  # noqa: F401 - `seeded` is a fixture


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    return Store(request.getfixturevalue("s3_root"))


@pytest.mark.unit
def test_a_second_writer_is_refused_naming_the_first(store):
    prefix = store.child("run", "experts", "math")
    with WriterLease(store, prefix, flow_run="run-a", settle_s=0.1) as first:
        with pytest.raises(LeaseHeldError, match=r"experts/math is being written by pid \d+ on .*flow run run-a"):
            WriterLease(store, prefix, flow_run="run-b", settle_s=0.1).acquire()
        first.check()
    with WriterLease(store, prefix, flow_run="run-b", settle_s=0.1):  # released: free again
        pass
    assert not store.fs.exists(f"{store._path(prefix)}/_writer.json")


@pytest.mark.unit
def test_expired_and_same_flow_run_leases_are_taken_over_and_the_loser_stops(store):
    prefix = store.child("run", "experts", "code")
    stalled = WriterLease(store, prefix, flow_run="run-a", ttl_s=0.5, renew_s=3600, settle_s=0.1).acquire()
    time.sleep(1.0)  # not renewed in time: expired
    new = WriterLease(store, prefix, flow_run="run-b", settle_s=0.1).acquire()
    assert stalled.renew() is False  # the stalled writer notices at its next renewal...
    with pytest.raises(LeaseLostError, match="taken over by pid"):
        stalled.check()  # ...and writes no checkpoint or model from then on
    stalled.release()  # leaves the new owner's lease alone
    assert new.read().token == new.record.token
    new.release()
    # A crashed attempt of a flow run, rescheduled in place, takes its own lease back at once.
    crashed = WriterLease(store, prefix, flow_run="run-c", settle_s=0.1).acquire()
    crashed._stop.set()  # "dies": never releases
    WriterLease(store, prefix, flow_run="run-c", settle_s=0.1).acquire().release()


@pytest.mark.integration
def test_two_btx_processes_on_one_expert_one_trains_the_other_refuses(seeded, tmp_path):
    """Two `btx train-expert` at once on the same config and store: one trains to the end, the
    other stops with an error naming the first (its pid), and the expert's manifest verifies."""
    _, seeded_store, _ = seeded
    store = tmp_path / "store"
    shutil.copytree(seeded_store / "ci" / "seed", store / "ci" / "seed")
    config = write_config(tmp_path, store, expert_steps=300, checkpoint_every=50)
    raw = yaml.safe_load(config.read_text())
    raw["expert_training"].update(threads=1)
    config.write_text(yaml.safe_dump(raw))
    command = [*BTX, "train-expert", str(config), "--domain", "math"]
    procs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], (codes, outs)
    winner, loser = (procs[0], procs[1]) if codes[0] == 0 else (procs[1], procs[0])
    said = outs[procs.index(loser)]
    assert f"is being written by pid {winner.pid} on" in said, said[-2000:]
    manifest = Store(str(store)).verify(str(store / "ci" / "experts" / "math" / "model"))
    assert manifest.metrics["steps"] == 300
    assert not (store / "ci" / "experts" / "math" / "_writer.json").exists()  # released
