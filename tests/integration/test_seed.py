"""The integration tests of tests/unit/test_seed.py, which holds their helpers and fixtures."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from btx_core.stages.expert import train_expert
from btx_core.stages.seed import build_seed
from tests.unit.test_seed import config_for, pico, save_seed, tokenizer  # noqa: F401 - fixtures


@pytest.mark.parametrize("kind,tie", [("mistral", False), ("llama", True)])
def test_imported_bf16_seed_is_branched_and_saved_the_way_it_came(tmp_path, tokenizer, kind, tie):
    model = pico(kind, tokenizer, tie=tie).to(torch.bfloat16)
    seed_dir = save_seed(tmp_path / "seed", model, tokenizer)
    config = config_for(tmp_path, seed_dir)
    seed = build_seed(config)
    assert not seed.skipped and seed.manifest.extra["source"] == seed_dir
    assert build_seed(config).skipped
    expert = train_expert(config, "math")
    out = Path(expert.location)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == kind and saved["num_key_value_heads"] == 2
    assert saved.get("sliding_window") == (32 if kind == "mistral" else None)
    weights = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert ("lm_head.weight" in weights) == (not tie)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == type(model).__name__
    assert expert.metrics["heldout_loss"] < expert.metrics["seed_heldout_loss"]

