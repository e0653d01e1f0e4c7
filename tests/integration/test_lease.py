"""The integration tests of tests/unit/test_lease.py, which holds their helpers and fixtures."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from btx_core.store.core import Store
from btx_core.store.lease import LeaseHeldError, LeaseRecord, NoConditionalWritesError, WriterLease
from tests.integration.test_cli_e2e import BTX, seeded, write_config  # noqa: F401 - `seeded` is a fixture
from tests.integration.test_store_rclone import rclone_s3  # noqa: F401 - a fixture
from tests.unit.test_lease import store  # noqa: F401 - fixtures


def test_a_store_that_ignores_conditional_writes_is_refused_with_the_fix(rclone_s3):  # noqa: F811
    # rclone serve s3 accepts If-None-Match and If-Match, and ignores them. Its own client: s3fs
    # caches filesystems by their options, and one may still point at the session's moto.
    store = Store(f"{rclone_s3}/run", {"skip_instance_cache": True})
    prefix = store.child("experts", "math")
    with pytest.raises(NoConditionalWritesError, match=r"ignored a conditional write \(If-None-Match and "
                                                       r"If-Match .*cannot guarantee a single writer.*"
                                                       r"conditional_writes: unchecked"):
        WriterLease(store, prefix).acquire()
    assert not store.fs.exists(store._path(f"{prefix}/_writer.json"))
    with WriterLease(store, prefix, conditional_writes=False):  # the escape hatch, as documented
        with pytest.raises(LeaseHeldError):
            WriterLease(store, prefix, conditional_writes=False).acquire()


def test_every_stage_is_refused_while_another_writer_holds_its_prefix(tmp_path, monkeypatch):
    """Seed (created, then imported), expert, MiX, finetune and evaluate, run for real on the CI
    config: each refuses while a rival holds its prefix's lease, writing nothing; then commits
    every output (checkpoints included) under a lease of its own, held at the time."""
    from btx_core.stages.common import open_store, stage_prefix
    from btx_core.stages.compare import seed_config
    from btx_core.stages.evaluate import evaluate_run
    from btx_core.stages.expert import train_expert
    from btx_core.stages.finetune import finetune
    from btx_core.stages.mix import mix_stage
    from btx_core.stages.seed import build_seed
    from btx_core.store import layout
    from tests.integration.test_mix_stage import ci_config

    config = ci_config(str(tmp_path / "store"), tmp_path / "cache", domains=1)
    imported = seed_config(config, config.expert_training.seed + 1)  # imports the run's seed
    commits, write_dir = [], Store.write_dir

    def spy(self, local_dir, location, **kwargs):
        if "/_data/" not in location:  # prepared corpora: shared by runs, content-addressed
            lease = kwargs.get("fence")
            assert lease is not None and location.startswith(f"{lease.prefix}/"), location
            held = LeaseRecord.parse(lease.slot.read().data)
            assert held.token == lease.record.token and not held.released, location
            commits.append(location)
        return write_dir(self, local_dir, location, **kwargs)

    monkeypatch.setattr(Store, "write_dir", spy)
    store = open_store(config)
    for run, location in ((lambda: build_seed(config), layout.seed_model(config.run_root)),
                          (lambda: train_expert(config, "math"), layout.expert_model(config.run_root, "math")),
                          (lambda: mix_stage(config), layout.mix_model(config.run_root)),
                          (lambda: finetune(config, "btx"), layout.trained_model(config.run_root, "btx")),
                          (lambda: evaluate_run(config), layout.eval_results(config.run_root)),
                          (lambda: build_seed(imported), layout.seed_model(imported.run_root))):
        rival = WriterLease(store, stage_prefix(location), flow_run="rival").acquire()
        with pytest.raises(LeaseHeldError, match=f"{stage_prefix(location)} is being written by .*flow run rival"):
            run()
        assert not store.is_complete(location)
        rival.release()
        out = run()
        assert not out.skipped and out.manifest.lease_generation > rival.generation, location
        assert location in commits
    assert any("/checkpoints/step-" in c for c in commits)


def test_two_btx_processes_on_one_expert_one_trains_the_other_refuses(seeded, tmp_path):  # noqa: F811
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
    assert manifest.metrics["steps"] == 300 and manifest.lease_generation >= 1
    lease = LeaseRecord.parse((store / "ci" / "experts" / "math" / "_writer.json").read_bytes())
    assert lease.released and lease.pid == winner.pid  # released, its generation kept

