"""Model families btx can branch and mix, declared as data.

Each dense family names its FFN projections (the tensors that become experts when mixing) and
its shared tensors (attention, norms, embeddings, lm_head: averaged) by template, and the MoE
architecture it mixes into: that architecture's config class, router and expert tensor names
(on disk, as `save_pretrained` writes them), and the settings that make its MoE layer compute
exactly softmax-top-k-renormalised experts, like Mixtral. What happens to each config field of a
dense family (carried, dropped, or refused) is declared in `btx_core/model/config_fields.py`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# What a tensor of a dense checkpoint is, for the merge-cost report and `branch.train`.
TENSOR_KINDS = ("embeddings", "attention", "norms", "ffn")


@dataclass(frozen=True)
class MoETarget:
    """The MoE model a dense family mixes into."""

    model_type: str
    architecture: str
    config_class: str
    """transformers' config class, built and saved through `save_pretrained`."""
    modeling: str
    """transformers module holding `decoder_layer` and `rotary` (the routing probe runs them)."""
    decoder_layer: str
    rotary: str
    router: str
    """On-disk per-layer router weight [num_experts, hidden]; `{layer}` is the layer index."""
    experts: Mapping[str, str]
    """FFN role (gate_proj, up_proj, down_proj) -> on-disk expert tensor; `{layer}`, `{expert}`."""
    experts_key: str
    """The config.json key holding the number of experts."""
    fixed_config: Mapping[str, Any] = field(default_factory=dict)
    """Target settings that make the MoE block a plain renormalised top-k mixture of the experts."""
    fixed_layer: Mapping[str, tuple] = field(default_factory=dict)
    """Per-layer tensors the target needs but btx does not use, written as zeros (relative to the
    layer; shapes use "hidden"): Qwen2-MoE's shared expert, made empty so it adds exactly 0."""
    block: str = "model.layers.{layer}.mlp"
    """The loaded model's MoE block module (its `.gate` is the router module)."""
    expert_params: tuple[str, ...] = ("experts.gate_up_proj", "experts.down_proj")
    """The loaded model's expert FFN parameters, relative to `block` (what finetuning can freeze).
    In memory transformers 5 fuses each layer's experts: gate_up_proj [E, 2F, H], down_proj [E, H, F]."""

    def expert_name(self, role: str, layer: int, expert: int) -> str:
        return self.experts[role].format(layer=layer, expert=expert)

    def fixed_layer_tensors(self, layer: int, hidden: int) -> dict[str, tuple[int, ...]]:
        prefix = f"model.layers.{layer}."
        return {prefix + name: tuple(hidden if d == "hidden" else d for d in shape)
                for name, shape in self.fixed_layer.items()}


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
    rope_types: tuple[str, ...] = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
    """RoPE types whose MoE was shown equal to the dense model (tests/unit/test_families.py)."""
    norm_layer: tuple[str, ...] = ()
    """The per-layer norm weights among `shared_layer` (q/k norms included): what
    `branch.train: ffn_and_norms` still trains, and the `norms` kind of the merge-cost report."""
    bias_layer: tuple[str, ...] = ()
    """Attention biases, present when `bias_flag` is set in the config (always when it is None)."""
    bias_flag: str | None = None
    embedding: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    layer_prefix: str = "model.layers.{layer}."
    """What every tensor of one decoder layer starts with."""

    @property
    def ffn_templates(self) -> tuple[str, ...]:
        return tuple(self.ffn.values())

    def is_ffn(self, name: str, num_layers: int) -> bool:
        return any(name == t.format(layer=i) for t in self.ffn_templates for i in range(num_layers))

    def ffn_name(self, role: str, layer: int) -> str:
        return self.ffn[role].format(layer=layer)

    def layer_templates(self, config: Mapping) -> tuple[str, ...]:
        biased = self.bias_layer and (self.bias_flag is None or config.get(self.bias_flag))
        return self.shared_layer + (self.bias_layer if biased else ())

    def shared_names(self, num_layers: int, tied: bool, config: Mapping) -> list[str]:
        """Every non-FFN tensor a checkpoint of this family holds, in model order."""
        return [self.embedding, *self.layer_shared(range(num_layers), config), *self.final_shared(tied)]

    def layer_shared(self, layers, config: Mapping) -> list[str]:
        return [t.format(layer=i) for i in layers for t in self.layer_templates(config)]

    def final_shared(self, tied: bool) -> list[str]:
        """The shared tensors after the last layer (final norm, an untied lm_head)."""
        return [n for n in self.shared_global if n != self.embedding and not (tied and n == "lm_head.weight")]

    def tensor_kinds(self, num_layers: int, tied: bool, config: Mapping) -> dict[str, str]:
        """Every tensor of a checkpoint of this family -> its kind (one of TENSOR_KINDS): what the
        merge-cost report groups by and what `branch.train` freezes."""
        norms = {t.format(layer=i) for t in self.norm_layer for i in range(num_layers)} | {self.final_norm}
        kinds = {n: "norms" if n in norms else "attention" for n in self.layer_shared(range(num_layers), config)}
        kinds |= {n: "norms" if n in norms else "embeddings" for n in self.final_shared(tied)}
        kinds[self.embedding] = "embeddings"
        return kinds | {self.ffn_name(role, i): "ffn" for role in self.ffn for i in range(num_layers)}


def _layer(*names: str, suffix: str = "weight") -> tuple[str, ...]:
    return tuple(f"model.layers.{{layer}}.{n}.{suffix}" for n in names)


_FFN = {p: f"model.layers.{{layer}}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_PRE_NORM = ("input_layernorm", "post_attention_layernorm")
_QK_NORM = ("self_attn.q_norm", "self_attn.k_norm")
_GLOBAL = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
# Every target but Mixtral keeps Llama's projection names per expert on disk (conversion_mapping:
# qwen2_moe, and qwen3_moe / flex_olmo which reuse its pattern).
_QWEN_EXPERTS = {p: f"model.layers.{{layer}}.mlp.experts.{{expert}}.{p}.weight" for p in _FFN}
_QWEN_ROUTER = "model.layers.{layer}.mlp.gate.weight"
# Without renormalisation the top-k weights of N identical experts would sum to < 1.
_RENORMALISED = {"norm_topk_prob": True}
# Every layer an MoE layer, none a dense MLP: BTX replaces every FFN.
_ALL_SPARSE = {"decoder_sparse_step": 1, "mlp_only_layers": []}
_MOE = "model.layers.{layer}.block_sparse_moe"

# Mixtral's w1/w3/w2 are Llama's gate/up/down projections (transformers' conversion mapping);
# its router always renormalises the top-k probabilities.
MIXTRAL = MoETarget(
    "mixtral", "MixtralForCausalLM", "MixtralConfig", "transformers.models.mixtral.modeling_mixtral",
    "MixtralDecoderLayer", "MixtralRotaryEmbedding", router=f"{_MOE}.gate.weight", experts={
        "gate_proj": f"{_MOE}.experts.{{expert}}.w1.weight",
        "up_proj": f"{_MOE}.experts.{{expert}}.w3.weight",
        "down_proj": f"{_MOE}.experts.{{expert}}.w2.weight"},
    experts_key="num_local_experts")
# Qwen2-MoE adds sigmoid(gate) x shared_expert(x) to every MoE layer; a shared expert of width 0
# outputs exactly 0 (vLLM builds none at width 0), so the block is the routed experts alone.
QWEN2_MOE = MoETarget(
    "qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", "transformers.models.qwen2_moe.modeling_qwen2_moe",
    "Qwen2MoeDecoderLayer", "Qwen2MoeRotaryEmbedding", router=_QWEN_ROUTER, experts=_QWEN_EXPERTS,
    experts_key="num_experts",
    fixed_config={**_RENORMALISED, **_ALL_SPARSE, "shared_expert_intermediate_size": 0, "qkv_bias": True},
    fixed_layer={"mlp.shared_expert.gate_proj.weight": (0, "hidden"),
                 "mlp.shared_expert.up_proj.weight": (0, "hidden"),
                 "mlp.shared_expert.down_proj.weight": ("hidden", 0),
                 "mlp.shared_expert_gate.weight": (1, "hidden")})
QWEN3_MOE = MoETarget(
    "qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", "transformers.models.qwen3_moe.modeling_qwen3_moe",
    "Qwen3MoeDecoderLayer", "Qwen3MoeRotaryEmbedding", router=_QWEN_ROUTER, experts=_QWEN_EXPERTS,
    experts_key="num_local_experts", fixed_config={**_RENORMALISED, **_ALL_SPARSE})
# FlexOlmo is OLMo-2 with MoE blocks: the same post-norms and q/k norms over the whole projection
# (OLMoE normalises before attention and the MLP instead, so it cannot hold an OLMo-2 layer).
FLEX_OLMO = MoETarget(
    "flex_olmo", "FlexOlmoForCausalLM", "FlexOlmoConfig", "transformers.models.flex_olmo.modeling_flex_olmo",
    "FlexOlmoDecoderLayer", "FlexOlmoRotaryEmbedding", router=_QWEN_ROUTER, experts=_QWEN_EXPERTS,
    experts_key="num_experts", fixed_config=_RENORMALISED)

_LLAMA_SHARED = _layer(*_ATTENTION, *_PRE_NORM)
_OLMO2_NORMS = (*_QK_NORM, "post_attention_layernorm", "post_feedforward_layernorm")
DENSE_FAMILIES: dict[str, DenseFamily] = {
    "llama": DenseFamily("llama", "LlamaForCausalLM", _FFN, _LLAMA_SHARED, _GLOBAL, MIXTRAL,
                         norm_layer=_layer(*_PRE_NORM)),
    "mistral": DenseFamily("mistral", "MistralForCausalLM", _FFN, _LLAMA_SHARED, _GLOBAL, MIXTRAL,
                           norm_layer=_layer(*_PRE_NORM)),
    "qwen2": DenseFamily("qwen2", "Qwen2ForCausalLM", _FFN, _LLAMA_SHARED, _GLOBAL, QWEN2_MOE,
                         norm_layer=_layer(*_PRE_NORM), bias_layer=_layer(*_ATTENTION[:3], suffix="bias")),
    "qwen3": DenseFamily("qwen3", "Qwen3ForCausalLM", _FFN, _layer(*_ATTENTION, *_QK_NORM, *_PRE_NORM),
                         _GLOBAL, QWEN3_MOE, norm_layer=_layer(*_QK_NORM, *_PRE_NORM),
                         bias_layer=_layer(*_ATTENTION, suffix="bias"), bias_flag="attention_bias"),
    "olmo2": DenseFamily("olmo2", "Olmo2ForCausalLM", _FFN, _layer(*_ATTENTION, *_OLMO2_NORMS),
                         _GLOBAL, FLEX_OLMO, norm_layer=_layer(*_OLMO2_NORMS),
                         bias_layer=_layer(*_ATTENTION, suffix="bias"), bias_flag="attention_bias"),
}
MOE_TARGETS: dict[str, MoETarget] = {t.model_type: t for t in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, FLEX_OLMO)}


def dense_family(model_type: str | None) -> DenseFamily | None:
    return DENSE_FAMILIES.get(model_type or "")


def tensor_kinds(config: Mapping) -> dict[str, str]:
    """Every tensor of a dense checkpoint with this config.json (as a mapping) -> its kind."""
    family = DENSE_FAMILIES[config["model_type"]]
    return family.tensor_kinds(config["num_hidden_layers"], bool(config.get("tie_word_embeddings")), config)


def num_experts(config: Mapping) -> int | None:
    """The number of experts of an MoE config.json (None for a dense model)."""
    target = MOE_TARGETS.get(config.get("model_type") or "")
    return config.get(target.experts_key) if target else None


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


def quantized_problem(path: Path, config: Mapping | None, where: str) -> str | None:
    """A GGUF file or a quantised checkpoint: btx averages and trains full-precision weights."""
    ggufs = sorted(p.name for p in path.glob("*.gguf")) if path.is_dir() else []
    if ggufs or path.suffix == ".gguf":
        return (f"{where} holds a GGUF file ({(ggufs or [path.name])[0]}); btx needs safetensors weights. "
                "Dequantise it first: AutoModelForCausalLM.from_pretrained(dir, gguf_file=NAME)"
                ".save_pretrained(OUT), tokenizer included, and point at OUT")
    method = (config or {}).get("quantization_config")
    if method:
        kind = method.get("quant_method", "unknown") if isinstance(method, Mapping) else method
        return (f"{where} is a quantised checkpoint (quantization_config: {kind}); btx averages and "
                "trains full-precision weights. Use the unquantised (bf16/fp32) model")
    return None


def rope_problem(raw: Mapping, family: DenseFamily, where: str) -> str | None:
    """The RoPE type of a raw config.json in either format (transformers 4: rope_scaling.type or
    .rope_type; 5: rope_parameters.rope_type), when the family's MoE cannot carry it."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else None
    if kind is None or kind in family.rope_types:
        return None
    return (f"{where}: config RoPE type {kind!r} (rope_parameters / rope_scaling); btx carries only "
            f"{', '.join(family.rope_types)} into {family.moe.architecture}. Use a seed with one of those")


def seed_architecture_problem(ref: str) -> str | None:
    """A cheap pre-flight check of a local seed directory (no transformers import, so `btx validate`
    stays fast); None when fine or not checkable here. Every other config field is checked when
    the seed is imported (model/dense.py, through model/config_fields.py)."""
    if "://" in ref and not ref.startswith("file://"):
        return None  # a store URI: checked when fetched
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.exists():
        if HUB_ID.match(ref):
            return None  # a Hub id: checked when loaded
        return f"{ref!r} is neither an existing directory nor a Hub id (owner/name): fix the path"
    config_file = path / "config.json"
    if not config_file.is_file():
        return quantized_problem(path, None, repr(ref)) or \
            f"{ref!r} has no config.json: point it at a Hugging Face model directory"
    config = json.loads(config_file.read_text())
    if (problem := quantized_problem(path, config, repr(ref))) is not None:
        return problem
    if dense_family(config.get("model_type")) is None:
        return unsupported_message(config.get("model_type"), repr(ref))
    return rope_problem(config, dense_family(config["model_type"]), repr(ref))
