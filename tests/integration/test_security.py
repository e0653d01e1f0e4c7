"""The integration tests of tests/unit/test_security.py, which holds their helpers and fixtures."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_mix_stage import trained  # noqa: F401  (a store with a seed and 3 experts)
from tests.unit.test_security import load_safely


def test_every_stored_artefact_loads_with_safetensors_and_json_only(trained):
    """Seed (tokenizer, model, checkpoints), experts (models, checkpoints), tokenized data, the
    MiX and the upcycled MoE: every file the pipeline put in the store."""
    from btx_core.stages.mix import mix_stage

    work, config = trained
    mix_stage(config)
    mix_stage(config, upcycle=True)
    store = Path(config.store)
    files = sorted(p for p in store.rglob("*") if p.is_file())
    kinds = {}
    for path in files:
        kinds.setdefault(load_safely(path), []).append(path)
    names = {p.name for p in files}
    assert {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
            "_manifest.json", "tokenizer.json", "config.json"} <= names
    assert any("/checkpoints/step-" in str(p) for p in files) and any("/mix/" in str(p) for p in files)
    assert any("/_data/" in str(p) for p in files) and any("/upcycle/" in str(p) for p in files)
    assert set(kinds) <= {"safetensors", "json", "npy", "raw tokens", "text", "png", "empty"} and len(kinds["safetensors"]) >= 10

