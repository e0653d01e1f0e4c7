"""The Branch and Train stages against a real S3 server (moto on 127.0.0.1): a branch that is
interrupted resumes from its newest checkpoint in the bucket, and reruns are skipped."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from btx_core.config.load import parse_config
from btx_core.errors import BTXError
from btx_core.stages.common import open_store
from btx_core.stages.expert import train_expert
from btx_core.stages.seed import build_seed
from btx_core.store import layout

ROOT = Path(__file__).parents[2]


def ci_config(store: str, cache: Path, **expert):
    raw = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    raw.update(store=store, cache_dir=str(cache))
    raw["expert_training"].update(expert)
    return parse_config(raw)


def test_expert_on_s3_resumes_after_an_interruption_and_skips_when_done(s3_root, tmp_path):
    config = ci_config(s3_root, tmp_path / "cache", steps=12, checkpoint_every=4, keep_checkpoints=2)
    with pytest.raises(BTXError, match="btx seed"):
        train_expert(config, "math")                       # no seed yet: a clear error, no work

    seed = build_seed(config)
    assert not seed.skipped and seed.location.startswith("s3://")
    assert seed.metrics["ffn_share"] > 0.5 and seed.metrics["heldout_loss"] > 0
    assert build_seed(config).skipped

    with pytest.raises(BTXError, match="rerun to resume"):
        train_expert(config, "math", stop_after=6)         # an interrupted branch
    store = open_store(config)
    assert [s for s, _ in store.list_checkpoints(layout.expert_checkpoints(config.run_root, "math"))] == [4]
    assert not store.is_complete(layout.expert_model(config.run_root, "math"))

    progress = []
    out = train_expert(config, "math", on_progress=progress.append)
    assert progress[0].resumed_from == 4 and out.metrics["resumed_from_step"] == 4
    assert out.metrics["steps"] == 12 and out.manifest.inputs["seed"] == seed.manifest.hash
    assert set(out.manifest.inputs) == {"seed", "data"}
    assert out.metrics["heldout_loss"] < out.metrics["seed_heldout_loss"]
    assert [s for s, _ in store.list_checkpoints(layout.expert_checkpoints(config.run_root, "math"))] == [8, 12]
    store.verify(out.location)
    assert train_expert(config, "math").skipped

    # The same branch trained without interruption ends with the same weights.
    fresh = ci_config(s3_root + "-fresh", tmp_path / "cache2", steps=12, checkpoint_every=4)
    fresh_store = open_store(fresh)
    local_seed = shutil.copytree(store.fetch(seed.location, tmp_path / "seedcopy"), tmp_path / "seed",
                                 ignore=shutil.ignore_patterns("_manifest.json"))
    fresh_store.write_dir(local_seed, layout.seed_model(fresh.run_root), stage="seed",
                          config_hash=seed.manifest.config_hash)
    straight = train_expert(fresh, "math")
    a = load_file(store.fetch(out.location, tmp_path / "a") / "model.safetensors")
    b = load_file(fresh_store.fetch(straight.location, tmp_path / "b") / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_keep_checkpoints_0_keeps_the_newest_while_training_and_none_once_the_expert_is_saved(s3_root, tmp_path):
    config = ci_config(s3_root, tmp_path / "cache", steps=12, checkpoint_every=4, keep_checkpoints=0)
    build_seed(config)
    store, prefix = open_store(config), layout.expert_checkpoints(config.run_root, "code")
    with pytest.raises(BTXError, match="rerun to resume"):
        train_expert(config, "code", stop_after=9)
    assert [s for s, _ in store.list_checkpoints(prefix)] == [8]  # what a resume needs, nothing more
    out = train_expert(config, "code")
    assert out.metrics["resumed_from_step"] == 8 and store.is_complete(out.location)
    assert store.list_checkpoints(prefix) == [] and not store.fs.find(store._path(prefix))  # no file left


def test_changed_training_config_refuses_stale_checkpoints(s3_root, tmp_path):
    config = ci_config(s3_root, tmp_path / "cache", steps=8, checkpoint_every=4)
    build_seed(config)
    with pytest.raises(BTXError):
        train_expert(config, "code", stop_after=5)
    changed = ci_config(s3_root, tmp_path / "cache", steps=8, checkpoint_every=4, lr=0.5)
    with pytest.raises(BTXError, match="different config"):
        train_expert(changed, "code")


def test_seed_from_a_plain_hf_directory_in_s3(s3_root, tmp_path):
    import fsspec
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from btx_core.data.builtin.corpora import builtin_documents
    from btx_core.model.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(builtin_documents("general", max_bytes=200_000), 400, tmp_path / "tok")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    fs, root = fsspec.core.url_to_fs(s3_root)
    fs.put(str(tmp_path / "hf") + "/", f"{root}/models/pico/", recursive=True)

    config = parse_config({"run_name": "s3seed", "store": s3_root + "/store", "cache_dir": str(tmp_path / "c"),
                           "seed": {"model": s3_root + "/models/pico"},
                           "domains": [{"name": "math", "data": {"builtin": "math", "max_bytes": 50_000}}],
                           "expert_training": {"steps": 2, "seq_len": 16, "batch_size": 2, "warmup_steps": 1}})
    seed = build_seed(config)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(seed.manifest.files)
    assert seed.metrics["parameters"] > 0


def test_changed_data_is_a_new_input_and_unchanged_data_is_not(tmp_path):
    """An expert records the content of the blocks it trained on: touching its files changes
    nothing, editing them retrains."""
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": f"Document {i}: " + "the quick brown fox jumps. " * 20}) for i in range(60)]
    corpus.write_text("\n".join(lines))
    raw = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    raw.update(store=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"))
    raw["domains"] = [{"name": "fox", "data": {"path": str(corpus)}}]
    raw["expert_training"].update(steps=4, checkpoint_every=2)
    config = parse_config(raw)
    build_seed(config)
    first = train_expert(config, "fox").manifest
    os.utime(corpus, (time.time() + 100, time.time() + 100))             # touched, same content
    assert train_expert(config, "fox").skipped
    corpus.write_text("\n".join(lines + [json.dumps({"text": "A new document. " * 40})]))
    edited = train_expert(config, "fox")             # the finished run's checkpoints: leftovers, retrained
    assert not edited.skipped and edited.manifest.inputs != first.inputs
    assert edited.metrics["resumed_from_step"] == 0

