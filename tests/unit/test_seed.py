"""Seeds users bring: Llama/Mistral directories (GQA, tied embeddings, bf16) are imported and
branched; other architectures, pickle-only weights and missing tokenizers are refused early."""

from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from btx_core.config.load import environment_problems, parse_config
from btx_core.config.schema import TinyModelSpec
from btx_core.data.builtin.corpora import builtin_documents
from btx_core.errors import BTXError, UnsupportedArchitectureError
from btx_core.model.dense import create_tiny_llama, load_causal_lm, parameter_breakdown
from btx_core.model.tokenizer import train_tokenizer
from btx_core.stages.seed import build_seed


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    docs = builtin_documents("general", max_bytes=300_000)
    return train_tokenizer(docs, 400, tmp_path_factory.mktemp("tok"))


def save_seed(directory: Path, model, tokenizer) -> str:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def pico(kind: str, tokenizer, tie=True):
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                  max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=32, **common))
    return LlamaForCausalLM(LlamaConfig(**common))


def config_for(tmp_path, seed_dir: str):
    return parse_config({
        "run_name": "import", "store": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache"),
        "seed": {"model": seed_dir},
        "domains": [{"name": "math", "data": {"builtin": "math", "max_bytes": 150_000}}],
        "expert_training": {"steps": 6, "lr": 1e-3, "warmup_steps": 2, "seq_len": 32, "batch_size": 4,
                            "precision": "bf16", "checkpoint_every": 3, "eval_blocks": 8},
    }, base_dir=tmp_path)


def test_unsupported_architecture_is_refused_before_any_work(tmp_path, tokenizer):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    seed_dir = save_seed(tmp_path / "gpt2", gpt2, tokenizer)
    problems = environment_problems({"seed": {"model": seed_dir}}, tmp_path)
    assert len(problems) == 1 and problems[0].startswith("seed.model:")
    assert "'gpt2' model" in problems[0] and "llama, mistral" in problems[0]
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        load_causal_lm(seed_dir)
    assert not (tmp_path / "store").exists()


def test_pickle_only_weights_are_refused(tmp_path, tokenizer):
    seed_dir = Path(save_seed(tmp_path / "seed", pico("llama", tokenizer), tokenizer))
    (seed_dir / "model.safetensors").rename(seed_dir / "pytorch_model.bin")
    with pytest.raises(BTXError, match="no .safetensors weights"):
        build_seed(config_for(tmp_path, str(seed_dir)))
    assert not (tmp_path / "store" / "import" / "seed" / "model" / "_manifest.json").exists()


def test_seed_without_tokenizer_is_refused_with_the_fix(tmp_path, tokenizer):
    seed_dir = tmp_path / "seed"
    pico("llama", tokenizer).save_pretrained(seed_dir)
    with pytest.raises(BTXError, match="tokenizer.save_pretrained"):
        build_seed(config_for(tmp_path, str(seed_dir)))
    assert not (tmp_path / "store" / "import" / "seed" / "model" / "_manifest.json").exists()


def test_demo_shape_keeps_most_parameters_in_ffns(tokenizer):
    class FakeTokenizer:
        bos_token_id = eos_token_id = 0
        pad_token_id = 1

        def __len__(self):
            return 4096

    breakdown = parameter_breakdown(create_tiny_llama(FakeTokenizer(), seed=0, **TinyModelSpec().llama_shape()))
    assert breakdown.ffn_share >= 0.55
    assert breakdown.ffn == 6 * 3 * 256 * 1024


def test_hub_id_while_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = config_for(tmp_path, "someone/some-model")
    with pytest.raises(BTXError, match="cannot download 'someone/some-model'.*HF_HUB_OFFLINE"):
        build_seed(config)
    assert not (tmp_path / "store" / "import" / "seed" / "model").exists()

