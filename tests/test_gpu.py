"""CUDA checks: bf16 expert training and exact resume on a GPU. Skipped without one."""

import numpy as np
import pytest
import torch

from btx_core.config import TrainSettings
from btx_core.train import train
from tests.test_train import DirSink, blocks, pico_llama

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_training_on_cuda_resumes_exactly(tmp_path):
    settings = TrainSettings(steps=8, lr=3e-3, warmup_steps=2, seq_len=16, batch_size=4, precision="bf16",
                             device="cuda", checkpoint_every=3, seed=1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    straight = pico_llama()
    full = train(straight, blocks(), settings)
    assert next(straight.parameters()).is_cuda and np.isfinite(full.losses).all()
    sink = DirSink(tmp_path)
    train(pico_llama(), blocks(), settings, checkpoints=sink, stop_after=4)
    resumed = train(pico_llama(seed=5), blocks(), settings, checkpoints=sink)
    assert resumed.resumed_from == 3
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-3)
