"""Model families btx can branch, declared as data.

Each entry names a dense family's FFN projections (the tensors that become experts when
mixing) by template; everything else in a layer, plus embeddings, final norm and lm_head, is
shared and averaged. Adding a family (Qwen2, Qwen3) is a table entry plus tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DenseFamily:
    model_type: str
    """`config.json`'s model_type."""
    architecture: str
    """The transformers class a checkpoint of this family is loaded as."""
    ffn_templates: tuple[str, ...]
    """Per-layer FFN weights, `{layer}` standing for the layer index: the future experts."""

    def is_ffn(self, name: str, num_layers: int) -> bool:
        return any(name == t.format(layer=i) for t in self.ffn_templates for i in range(num_layers))


_LLAMA_FFN = tuple(f"model.layers.{{layer}}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))

DENSE_FAMILIES: dict[str, DenseFamily] = {
    "llama": DenseFamily("llama", "LlamaForCausalLM", _LLAMA_FFN),
    "mistral": DenseFamily("mistral", "MistralForCausalLM", _LLAMA_FFN),
}


def dense_family(model_type: str | None) -> DenseFamily | None:
    return DENSE_FAMILIES.get(model_type or "")


def unsupported_message(model_type: str | None, where: str) -> str:
    known = ", ".join(sorted(DENSE_FAMILIES))
    return (f"{where} is a {model_type or 'unknown'!r} model; btx branches dense decoder-only "
            f"models of the families: {known}. Convert the model or pick a supported seed")


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
