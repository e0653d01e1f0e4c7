"""CUDA checks: bf16 expert training and resume on a GPU. Skipped without one (`make test-gpu`)."""

import numpy as np
import pytest
import torch

from btx_core.config.schema import TrainSettings
from btx_core.training.loop import train
from tests.unit.test_train import DirSink, blocks, pico_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def test_bf16_training_on_cuda_resumes_to_the_same_weights(tmp_path, deterministic):
    settings = TrainSettings(steps=8, lr=3e-3, warmup_steps=2, seq_len=16, batch_size=4, precision="bf16",
                             device="cuda", checkpoint_every=3, seed=1)
    straight = pico_llama()
    full = train(straight, blocks(), settings)
    assert next(straight.parameters()).is_cuda and np.isfinite(full.losses).all()
    assert full.losses[-1] < full.losses[0]
    sink = DirSink(tmp_path)
    train(pico_llama(), blocks(), settings, checkpoints=sink, stop_after=4)
    resumed_model = pico_llama(seed=5)
    resumed = train(resumed_model, blocks(), settings, checkpoints=sink)
    assert resumed.resumed_from == 3
    np.testing.assert_allclose(resumed.losses[3:], full.losses[3:], rtol=1e-3)
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)

