"""What becomes of every config field of a dense seed when its experts are mixed into an MoE.

Each field of each dense config class (`LlamaConfig().to_dict()` etc.) has one rule:
- `Carry`: the MoE config takes the value (under the same name, or the names listed);
- `Drop`: the MoE config leaves it out, for the reason given (it does not change the forward pass);
- `Only`: the MoE class can hold one value only; a seed with another is refused, naming the field;
- `Special`: a handler translates it (RoPE parameters, Qwen3's per-layer attention kinds).
tests/unit/test_config_fields.py checks that the table covers every field of every dense config class of
the installed transformers, so a field a future version adds fails a test instead of vanishing.

The seed's config is read with `AutoConfig` (transformers-4 `rope_theta`/`rope_scaling`/`torch_dtype`
are normalised there) and the MoE's is built with the target's config class and written with its
`save_pretrained`: a raw dict would keep the old keys, and the MoE class would fall back to its own
defaults (Mixtral's rope_theta 1e6 instead of, say, 100000: logits off by ~10).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from btx_core.model.families import DenseFamily

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Carry:
    """The MoE takes the seed's value over."""
    to: tuple[str, ...] = ()
    """The MoE config's names for it; empty: the same name."""


@dataclass(frozen=True)
class Drop:
    """Left out of the MoE's config, for the reason given."""
    why: str


@dataclass(frozen=True)
class Only:
    """The MoE can only represent this value: a seed with another one is refused."""
    value: Any
    why: str


@dataclass(frozen=True)
class Special:
    """Carried by a handler of its own (e.g. the RoPE parameters)."""
    handler: str
    why: str


# Fields every PreTrainedConfig has.
COMMON: dict[str, object] = {
    "_name_or_path": Drop("where the config was read from; the model card records the lineage"),
    "architectures": Drop("replaced by the MoE class"),
    "model_type": Drop("replaced by the MoE's"),
    "transformers_version": Drop("written by save_pretrained"),
    "dtype": Drop("the MoE's dtype is that of the weights mix writes (the experts' unless asked)"),
    "chunk_size_feed_forward": Drop("read only by some encoders' feed-forward chunking, not these decoders"),
    "id2label": Drop("sequence-classification heads only"),
    "label2id": Drop("sequence-classification heads only"),
    "problem_type": Drop("sequence-classification heads only"),
    "output_attentions": Drop("what a forward returns, not what it computes"),
    "output_hidden_states": Drop("what a forward returns, not what it computes"),
    "return_dict": Drop("what a forward returns, not what it computes"),
    "is_encoder_decoder": Only(False, "btx mixes decoder-only models"),
    "use_cache": Carry(),
    "bos_token_id": Carry(), "eos_token_id": Carry(), "pad_token_id": Carry(),
    "tie_word_embeddings": Carry(),
    "initializer_range": Carry(),  # also the scale of the new routers' normal init
    "vocab_size": Carry(), "hidden_size": Carry(), "num_hidden_layers": Carry(),
    "num_attention_heads": Carry(), "num_key_value_heads": Carry(), "hidden_act": Carry(),
    "max_position_embeddings": Carry(), "rms_norm_eps": Carry(), "attention_dropout": Carry(),
    "rope_parameters": Special("rope", "RoPE theta and scaling, of a type the family's MoE was tested with"),
}
# Qwen-MoE experts are `moe_intermediate_size` wide; `intermediate_size` sizes its (unused) dense MLPs.
_QWEN_FFN = Carry(("intermediate_size", "moe_intermediate_size"))

FIELDS: dict[str, dict[str, object]] = {
    "llama": {**COMMON, "intermediate_size": Carry(), "head_dim": Carry(),
              "attention_bias": Only(False, "Mixtral's attention projections have no biases"),
              "mlp_bias": Only(False, "Mixtral's experts have no biases"),
              "pretraining_tp": Drop("transformers 5's Llama does not read it (how the model was pretrained)")},
    "mistral": {**COMMON, "intermediate_size": Carry(), "head_dim": Carry(), "sliding_window": Carry()},
    # Qwen2-MoE takes the per-layer attention kinds as given (the layer_types carried decide; its
    # own max_window_layers rule differs from Qwen2's, so layer_types must travel explicitly).
    "qwen2": {**COMMON, "intermediate_size": _QWEN_FFN, "use_sliding_window": Carry(),
              "sliding_window": Carry(), "max_window_layers": Carry(), "layer_types": Carry()},
    "qwen3": {**COMMON, "intermediate_size": _QWEN_FFN, "head_dim": Carry(), "attention_bias": Carry(),
              "layer_types": Special("one_window", "Qwen3-MoE gives every layer the same attention window"),
              "use_sliding_window": Drop("decided from layer_types (handler one_window)"),
              "sliding_window": Drop("decided from layer_types (handler one_window)"),
              "max_window_layers": Drop("only derives layer_types, which decides")},
    "olmo2": {**COMMON, "intermediate_size": Carry(), "attention_bias": Carry()},
}


# --- special fields ------------------------------------------------------------------------------

def _rope(value, dense: Mapping, family: DenseFamily, out: dict) -> str | None:
    if not isinstance(value, Mapping) or "rope_type" not in value:
        return (f"config rope_parameters={value!r} is not one RoPE for all layers; "
                f"{family.moe.architecture} takes a single rope_parameters")
    if value["rope_type"] not in family.rope_types:
        return (f"config rope_parameters.rope_type is {value['rope_type']!r}; btx carries only "
                f"{', '.join(family.rope_types)} into {family.moe.architecture}. Use a seed with one of those")
    out["rope_parameters"] = {k: v for k, v in value.items() if k != "type"}  # "type": the legacy key
    return None


def _one_window(value, dense: Mapping, family: DenseFamily, out: dict) -> str | None:
    kinds = set(value or ["full_attention"])
    if kinds == {"full_attention"}:
        out.update(use_sliding_window=False, sliding_window=None)
    elif kinds == {"sliding_attention"}:
        out.update(use_sliding_window=True, sliding_window=dense.get("sliding_window"))
    else:
        return (f"config layer_types mixes {', '.join(sorted(kinds))}; {family.moe.architecture} gives every "
                "layer the same attention window, so this seed cannot be mixed exactly")
    return None


HANDLERS = {"rope": _rope, "one_window": _one_window}


# --- translation ---------------------------------------------------------------------------------

def translate(dense: Mapping, family: DenseFamily, where: str) -> tuple[dict, list[str]]:
    """(the MoE config's keys taken from the dense config `dense` (a normalised to_dict()),
    every problem that refuses the seed)."""
    table = FIELDS[family.model_type]
    out, problems = {}, []
    for key, value in dense.items():
        rule = table.get(key)
        if isinstance(rule, Carry):
            out.update(dict.fromkeys(rule.to or (key,), value))
        elif isinstance(rule, Only):
            if value != rule.value:
                problems.append(f"{where}: config {key}={value!r}, but {family.moe.architecture} needs "
                                f"{rule.value!r} ({rule.why}); btx cannot mix this seed exactly")
        elif isinstance(rule, Special):
            if (problem := HANDLERS[rule.handler](value, dense, family, out)) is not None:
                problems.append(f"{where}: {problem}")
        elif rule is None:
            log.warning("%s: config field %s=%r is unknown to btx's %s table; left out of the MoE config",
                        where, key, value, family.model_type)
    return out, problems


def build_moe_config(carried: Mapping, family: DenseFamily, *, num_experts: int, top_k: int,
                     aux_loss_coef: float, dtype, expert_names: list[str]):
    """The MoE's config, through its transformers config class. `output_router_logits` is off in
    what is saved (finetuning turns it on for its run); the aux coefficient is transformers' stock
    one, alpha x layers (btx finetunes with the paper's own per-layer loss by default:
    btx_core/moe/routing.py)."""
    import transformers

    target = family.moe
    cls = getattr(transformers, target.config_class)
    config = cls(**carried, **target.fixed_config, **{target.experts_key: num_experts},
                 num_experts_per_tok=top_k, output_router_logits=False, router_aux_loss_coef=aux_loss_coef,
                 btx_expert_names=list(expert_names))
    config.architectures = [target.architecture]
    config.dtype = dtype
    return config


def decoder_classes(family: DenseFamily):
    """(decoder layer class, rotary embedding class) of the family's MoE, for the routing probe."""
    module = importlib.import_module(family.moe.modeling)
    return getattr(module, family.moe.decoder_layer), getattr(module, family.moe.rotary)
