"""Model families btx can branch and mix, declared as data.

Each dense family names its FFN projections (the tensors that become experts when mixing) and
its shared tensors (attention, norms, embeddings, lm_head: averaged) by template, and the MoE
architecture it mixes into with that architecture's router and expert tensor names. Adding a
family (Qwen2 -> Qwen2-MoE, Qwen3 -> Qwen3-MoE) is a table entry plus tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class MoETarget:
    """The MoE model a dense family mixes into, in the on-disk layout of transformers'
    `save_pretrained` (what every consumer of such checkpoints reads)."""

    model_type: str
    architecture: str
    router: str
    """Per-layer router weight [num_experts, hidden]; `{layer}` is the layer index."""
    experts: Mapping[str, str]
    """FFN role (gate_proj, up_proj, down_proj) -> expert tensor; `{layer}`, `{expert}`."""

    block: str = "model.layers.{layer}.mlp"
    """The loaded model's MoE block module (its `.gate` is the router module)."""
    expert_params: tuple[str, ...] = ()
    """The loaded model's expert FFN parameters, relative to `block` (what finetuning can freeze)."""

    def expert_name(self, role: str, layer: int, expert: int) -> str:
        return self.experts[role].format(layer=layer, expert=expert)


@dataclass(frozen=True)
class DenseFamily:
    model_type: str
    """`config.json`'s model_type."""
    architecture: str
    """The transformers class a checkpoint of this family is loaded as."""
    ffn: Mapping[str, str]
    """FFN role -> per-layer weight, `{layer}` standing for the layer index: the future experts."""
    shared_layer: tuple[str, ...]
    """The other per-layer tensors: averaged when mixing, same name in the MoE."""
    shared_global: tuple[str, ...]
    """Tensors outside the layers (lm_head is absent when tied to the embeddings)."""
    moe: MoETarget
    carried_config: tuple[str, ...]
    """config.json keys the MoE takes over unchanged; all experts must agree on them."""
    required_config: Mapping[str, Any]
    """config.json values the MoE architecture needs (e.g. no attention bias in Mixtral)."""
    embedding: str = "model.embed_tokens.weight"
    layer_prefix: str = "model.layers.{layer}."
    """What every tensor of one decoder layer starts with."""

    @property
    def ffn_templates(self) -> tuple[str, ...]:
        return tuple(self.ffn.values())

    def is_ffn(self, name: str, num_layers: int) -> bool:
        return any(name == t.format(layer=i) for t in self.ffn_templates for i in range(num_layers))

    def ffn_name(self, role: str, layer: int) -> str:
        return self.ffn[role].format(layer=layer)

    def shared_names(self, num_layers: int, tied: bool) -> list[str]:
        """Every non-FFN tensor a checkpoint of this family holds, in model order."""
        return [self.embedding, *self.layer_shared(range(num_layers)), *self.final_shared(tied)]

    def layer_shared(self, layers) -> list[str]:
        return [t.format(layer=i) for i in layers for t in self.shared_layer]

    def final_shared(self, tied: bool) -> list[str]:
        """The shared tensors after the last layer (final norm, an untied lm_head)."""
        return [n for n in self.shared_global if n != self.embedding and not (tied and n == "lm_head.weight")]


_LLAMA_FFN = {p: f"model.layers.{{layer}}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
_LLAMA_SHARED = tuple(f"model.layers.{{layer}}.{t}.weight" for t in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "input_layernorm", "post_attention_layernorm"))
_LLAMA_GLOBAL = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_MOE = "model.layers.{layer}.block_sparse_moe"
# Mixtral's w1/w3/w2 are Llama's gate/up/down projections (transformers' conversion mapping).
MIXTRAL = MoETarget("mixtral", "MixtralForCausalLM", router=f"{_MOE}.gate.weight", experts={
    "gate_proj": f"{_MOE}.experts.{{expert}}.w1.weight",
    "up_proj": f"{_MOE}.experts.{{expert}}.w3.weight",
    "down_proj": f"{_MOE}.experts.{{expert}}.w2.weight"},
    # In memory, transformers 5 fuses each layer's experts: gate_up_proj [E, 2F, H], down_proj [E, H, F].
    block="model.layers.{layer}.mlp", expert_params=("experts.gate_up_proj", "experts.down_proj"))
_LLAMA_CARRIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                  "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
                  "sliding_window", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id")

DENSE_FAMILIES: dict[str, DenseFamily] = {
    "llama": DenseFamily("llama", "LlamaForCausalLM", _LLAMA_FFN, _LLAMA_SHARED, _LLAMA_GLOBAL,
                         MIXTRAL, _LLAMA_CARRIED, {"attention_bias": False, "mlp_bias": False}),
    "mistral": DenseFamily("mistral", "MistralForCausalLM", _LLAMA_FFN, _LLAMA_SHARED, _LLAMA_GLOBAL,
                           MIXTRAL, _LLAMA_CARRIED, {}),
}
MOE_TARGETS: dict[str, MoETarget] = {MIXTRAL.model_type: MIXTRAL}


def dense_family(model_type: str | None) -> DenseFamily | None:
    return DENSE_FAMILIES.get(model_type or "")


def unsupported_message(model_type: str | None, where: str) -> str:
    known = ", ".join(sorted(DENSE_FAMILIES))
    return (f"{where} is a {model_type or 'unknown'!r} model; btx branches dense decoder-only "
            f"models of the families: {known}. Convert the model or pick a supported seed")


# A model directory's tokenizer, in any of its layouts (its identity for prepared data).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
# What travels with the weights when a model is copied or rewritten.
COMPANION_FILES = (*TOKENIZER_FILES, "chat_template.jinja", "generation_config.json")


# Checked before any heavy import, so `btx validate` stays fast.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def seed_architecture_problem(ref: str) -> str | None:
    """A cheap pre-flight check of a local seed directory; None when fine or not checkable here."""
    if "://" in ref and not ref.startswith("file://"):
        return None  # a store URI: checked when fetched
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.exists():
        if HUB_ID.match(ref):
            return None  # a Hub id: checked when loaded
        return f"{ref!r} is neither an existing directory nor a Hub id (owner/name): fix the path"
    config_file = path / "config.json"
    if not config_file.is_file():
        return f"{ref!r} has no config.json: point it at a Hugging Face model directory"
    model_type = json.loads(config_file.read_text()).get("model_type")
    if dense_family(model_type) is None:
        return unsupported_message(model_type, repr(ref))
    return None
