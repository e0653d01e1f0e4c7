"""The integration tests of tests/unit/test_train.py, which holds their helpers and fixtures."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.unit.test_train import SETTINGS, _torchrun, one_process, seeded_store  # noqa: F401 - fixtures


def test_ddp_on_gloo_with_two_processes_matches_one_process_and_resumes(tmp_path, one_process):
    one = one_process
    two = _torchrun(tmp_path, "two", 2)
    assert len(one["losses"]) == len(two["losses"]) == SETTINGS.steps
    # Same global batch, same data order, same initial weights (DDP broadcasts rank 0's): the
    # curves agree up to float reduction order.
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4, atol=1e-5)

    ckpt = tmp_path / "ckpt"
    _torchrun(tmp_path, "killed", 2, ckpt=str(ckpt), stop_after=5)
    resumed = _torchrun(tmp_path, "resumed", 2, ckpt=str(ckpt))
    assert resumed["resumed_from"] == 3
    np.testing.assert_allclose(resumed["losses"], two["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(list(resumed["weights"].values()), list(two["weights"].values()), rtol=1e-5)


@pytest.mark.slow
def test_fsdp_on_gloo_matches_one_process_resumes_and_moves_between_process_counts(tmp_path, one_process):
    """FSDP2 (sharded weights, gradients and AdamW state) on 2 gloo processes: the loss curve of
    one process within float tolerance; a killed run resumes from its full-state checkpoint; with
    `nproc_per_node` the global batch does not depend on the process count, so the same
    checkpoint also resumes on one process."""
    one = one_process
    fsdp = _torchrun(tmp_path, "fsdp", 2, mode="fsdp")
    assert len(fsdp["losses"]) == SETTINGS.steps
    np.testing.assert_allclose(fsdp["losses"], one["losses"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(list(fsdp["weights"].values()), list(one["weights"].values()),
                               rtol=1e-3, atol=1e-4)

    ckpt = tmp_path / "ckpt"
    _torchrun(tmp_path, "killed", 2, ckpt=str(ckpt), stop_after=5, mode="fsdp")
    assert sorted(p.name for p in ckpt.iterdir()) == ["3"]
    assert {p.name for p in (ckpt / "3").iterdir()} == {
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}
    shutil.copytree(ckpt, tmp_path / "ckpt-alone")
    resumed = _torchrun(tmp_path, "resumed", 2, ckpt=str(ckpt), mode="fsdp")
    assert resumed["resumed_from"] == 3
    np.testing.assert_allclose(resumed["losses"], fsdp["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(list(resumed["weights"].values()), list(fsdp["weights"].values()), rtol=1e-5)

    # The FSDP checkpoint is a plain full one: DDP, and a single process, resume from it alike.
    alone = _torchrun(tmp_path, "alone", 1, ckpt=str(tmp_path / "ckpt-alone"), mode="ddp")
    assert alone["resumed_from"] == 3
    np.testing.assert_allclose(alone["losses"], fsdp["losses"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_branch_relaunches_itself_under_torchrun_with_the_one_process_curve(seeded_store):
    pytest.importorskip("prefect")
    from btx_core.errors import BTXError
    from btx_core.stages.branch import processes_for, train_expert_torchrun
    from btx_core.stages.expert import train_expert

    one = train_expert(seeded_store("store-one"), "math")
    config = seeded_store("store-two", nproc_per_node=2)
    assert processes_for(config.expert_training) == 2
    assert processes_for(config.expert_training.model_copy(update={"nproc_per_node": "auto", "device": "cpu"})) == 1
    reports = []
    two = train_expert_torchrun(config, "math", 2, on_progress=reports.append, poll_s=0.2)
    assert not two.skipped and two.location.endswith("/ci/experts/math/model")
    # The same global batch on 2 gloo processes (2 sequences each) as on one (4): the same curve.
    np.testing.assert_allclose(two.metrics["train_losses"], one.metrics["train_losses"], rtol=1e-4, atol=1e-5)
    assert two.manifest.config_hash == one.manifest.config_hash  # nproc_per_node is not hashed
    assert [r.step for r in reports] == [2, 4, 6, 8] and reports[-1].total_steps == 8
    again = train_expert_torchrun(config, "math", 2, poll_s=0.2)
    assert again.skipped and again.manifest.hash == two.manifest.hash

    # A failing branch: torchrun's status and the end of the CLI's message are the task's error.
    unseeded = config.model_copy(update={"store": str(Path(config.store).parent / "store-empty")})
    with pytest.raises(BTXError, match=r"(?s)exited with status 1.*no complete seed.*btx seed CONFIG"):
        train_expert_torchrun(unseeded, "math", 2, poll_s=0.2)

