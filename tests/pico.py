"""Pico dense models of every family btx mixes, saved as transformers 5 writes them or with the
config.json a transformers-4 checkpoint on the Hub has (written here by hand), plus a tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 101
HIDDEN, HEADS, KV_HEADS = 32, 4, 2
# max_position_embeddings below the test length: dynamic NTK and longrope switch regimes inside it.
MAX_POS = 128
ROPE = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 64},  # + factors per head_dim
}
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"head_dim": 8}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 48}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, {}),
}


def dense(family: str, *, tie: bool = False, rope: str = "default", theta: float = 50_000.0, layers: int = 2,
          seed: int = 0, **overrides):
    """A randomly initialised pico model (fp32, eval mode); norms and biases made non-trivial so that
    averaging or dropping them would show."""
    config_class, model_class, extra = FAMILIES[family]
    rope_parameters = {**ROPE[rope], "rope_theta": theta}
    if rope == "longrope":  # one factor per rotary frequency: head_dim / 2
        half = overrides.get("head_dim", extra.get("head_dim", HIDDEN // HEADS)) // 2
        rope_parameters.update(short_factor=[1.0 + i / 8 for i in range(half)],
                               long_factor=[2.0 + i / 4 for i in range(half)])
    config = config_class(**{**dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS,
        tie_word_embeddings=tie, rope_parameters=rope_parameters, bos_token_id=0, eos_token_id=1, pad_token_id=2),
        **extra, **overrides})
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def write_tokenizer(path: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer over `vocab` tokens: what a model directory ships, in milliseconds."""
    words = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w0", eos_token="w1", pad_token="w2",
                            unk_token="w3").save_pretrained(path)


def save(model, path: Path, *, fmt: str = "t5", tokenizer: bool = True) -> Path:
    """`model` saved by transformers 5, then with fmt="t4" its config.json rewritten as transformers 4
    wrote it: top-level rope_theta and rope_scaling, torch_dtype, no rope_parameters, no layer_types."""
    model.save_pretrained(path)
    if tokenizer:
        write_tokenizer(path, model.config.vocab_size)
    if fmt == "t4":
        to_t4(path)
    return path


def to_t4(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    # transformers 4 wrote rope_scaling with "type" (older) or "rope_type" (llama3 and later)
    config["rope_scaling"] = None if kind == "default" else {("rope_type" if kind == "llama3" else "type"): kind, **rope}
    config["torch_dtype"] = config.pop("dtype", "float32")
    config.pop("layer_types", None)
    config["transformers_version"] = "4.46.3"
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return config


def branch(model, path: Path, seed: int, scale: float = 0.02, **save_kw) -> Path:
    """A copy of `model` with every weight nudged: an 'expert' of the same seed."""
    torch.manual_seed(seed)
    with torch.no_grad():
        copy = type(model)(model.config).to(next(model.parameters()).dtype)
        copy.load_state_dict(model.state_dict())
        for p in copy.parameters():
            p.add_(torch.randn_like(p) * scale)
    return save(copy.eval(), path, **save_kw)
