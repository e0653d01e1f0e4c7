"""Dense models (a seed, an expert): load one of a supported family, or create a tiny Llama for demos and tests.

Loading goes through transformers' Auto classes for local directories and Hub ids alike (the
code path tests exercise on local directories is the one real users take with Hub ids); store
URIs are fetched to a verified local copy first. The architecture is checked from config.json
before any weights are read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from btx_core.errors import BTXError, UnsupportedArchitectureError
from btx_core.model.config_fields import translate
from btx_core.model.families import MOE_TARGETS, DenseFamily, dense_family, unsupported_message

log = logging.getLogger(__name__)

def check_architecture(config, where: str) -> DenseFamily:
    """The model's family; refuses other families and any config field its MoE cannot carry
    (model/config_fields.py), so an unmixable seed is refused when imported, not at mix time."""
    family = dense_family(getattr(config, "model_type", None))
    if family is None:
        raise UnsupportedArchitectureError(unsupported_message(getattr(config, "model_type", None), where))
    _, problems = translate(config.to_dict(), family, where)
    if problems:
        raise UnsupportedArchitectureError("; ".join(problems))
    return family


def load_causal_lm(model_dir: str, *, trust_remote_code: bool = False,
                   dtype: torch.dtype = torch.float32, allow_moe: bool = False):
    """(model, tokenizer) from a local directory or Hub id, refusing unsupported families.

    Weights load in `dtype` (fp32 by default: the optimizer's master copy); the directory's own
    dtype is kept in `model.config.dtype` so a trained model is saved the way it came.
    """
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise BTXError(f"cannot read a model config from {model_dir!r}: {exc}. Point `seed.model` "
                       "at a Hugging Face model directory or Hub id") from exc
    if not (allow_moe and getattr(config, "model_type", None) in MOE_TARGETS):
        check_architecture(config, repr(model_dir))
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    saved_dtype = getattr(config, "dtype", None)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    model.config.dtype = saved_dtype or dtype
    return model, tokenizer


def load_tokenizer(model_dir: str, *, trust_remote_code: bool = False):
    """The model's own tokenizer; it must be a fast one (data packing relies on tokenizers)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise BTXError(f"cannot load a tokenizer from {model_dir!r} ({exc.__class__.__name__}): "
                       "save the tokenizer with the model (`tokenizer.save_pretrained(dir)`)") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise BTXError(f"the tokenizer in {model_dir!r} is not a fast tokenizer: save one with "
                       "tokenizer.json (AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
    return tokenizer


def create_tiny_llama(tokenizer, seed: int, *, hidden_size: int, intermediate_size: int, num_layers: int,
                      num_heads: int, num_kv_heads: int, tie_embeddings: bool, max_position_embeddings: int,
                      rope_theta: float) -> LlamaForCausalLM:
    """A freshly initialised Llama of the given shape (the config's `seed.create`, as
    `TinyModelSpec.llama_shape()` gives it), seeded for reproducibility."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def inspect_model_dir(model_dir: str, *, trust_remote_code: bool = False) -> "ParameterBreakdown":
    """Check a model directory's family and count its parameters without reading weights."""
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    check_architecture(config, repr(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return parameter_breakdown(model)


@dataclass(frozen=True)
class ParameterBreakdown:
    """A model's unique parameters, and how many of them sit in FFNs (what BTX keeps per expert)."""

    total: int
    ffn: int

    @property
    def ffn_share(self) -> float:
        return self.ffn / self.total

    @property
    def metrics(self) -> dict[str, float]:
        return {"parameters": self.total, "ffn_share": self.ffn_share}

    def describe(self) -> str:
        return (f"{self.total / 1e6:.2f}M parameters, {self.ffn_share:.0%} in FFNs "
                "(BTX keeps FFNs per expert and averages the rest)")


def parameter_breakdown(model: torch.nn.Module) -> ParameterBreakdown:
    """Unique parameters (tied embeddings counted once) and the share in FFNs."""
    family = check_architecture(model.config, type(model).__name__)
    layers = model.config.num_hidden_layers
    seen: set[int] = set()
    total = ffn = 0
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if family.is_ffn(name, layers):
            ffn += param.numel()
    return ParameterBreakdown(total=total, ffn=ffn)
