"""Generate a family of dense Llama "experts" branched from one random seed, for the MiX benchmarks.

    python bench/make_family.py {small,large} [--experts 4] [--out bench/.cache/families]

Each expert is the seed plus a little Gaussian noise (2% of each tensor's std; norms get 1 +/- 0.02),
so experts differ in every tensor the way trained branches do, while sharing the seed's shapes.
Written in bf16 by transformers' `save_pretrained` (inputs sharded at 1 GB, as Hub checkpoints
are), with a byte-level BPE tokenizer trained on Python's stdlib (mergekit loads a tokenizer even
when it does not route by prompts). A family is generated once and cached: `family.json`, written
last, marks it complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from btx_core.model.tokenizer import train_tokenizer

CACHE = Path(__file__).resolve().parent / ".cache" / "families"
VOCAB = 32000

# Two shapes: SmolLM-like (tied embeddings) and TinyLlama-like (untied, 16 layers instead of 22).
FAMILIES = {
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                  num_key_value_heads=4, tie_word_embeddings=True),
    "large": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=4, tie_word_embeddings=False),
}


def family_config(name: str) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, rope_theta=10000.0,
                       bos_token_id=0, eos_token_id=0, pad_token_id=1, **FAMILIES[name])


def stdlib_docs(limit_bytes: int = 8_000_000) -> list[str]:
    """Non-test stdlib sources: text that every machine has, enough for a 32k BPE."""
    root = Path(json.__file__).resolve().parent.parent
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        text = path.read_text(errors="replace")
        docs.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return docs


def make_family(name: str, experts: int = 4, out: Path = CACHE, seed: int = 0) -> Path:
    """Generate (or find cached) family `name`; returns its directory with expert0..expert{N-1}."""
    family_dir = out / name
    marker = family_dir / "family.json"
    if marker.exists() and json.loads(marker.read_text()).get("experts") == experts:
        return family_dir
    if family_dir.exists():
        shutil.rmtree(family_dir)  # an interrupted generation: start over
    family_dir.mkdir(parents=True)
    start = time.perf_counter()

    tokenizer = train_tokenizer(stdlib_docs(), VOCAB, family_dir / "tokenizer")
    config = family_config(name)
    config.vocab_size = len(tokenizer)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    seed_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    n_ffn = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    gen = torch.Generator().manual_seed(seed + 1)
    for e in range(experts):
        with torch.no_grad():
            for key, param in model.state_dict().items():
                base = seed_state[key].float()
                scale = base.std().item() if base.numel() > 1 and base.std().item() > 0 else 1.0
                noise = torch.randn(base.shape, generator=gen) * (0.02 * scale)
                param.copy_((base + noise).to(param.dtype))
        expert_dir = family_dir / f"expert{e}"
        model.save_pretrained(expert_dir, max_shard_size="1GB")
        tokenizer.save_pretrained(expert_dir)
        print(f"  {name}: wrote {expert_dir.name}", file=sys.stderr)

    info = {
        "family": name, "experts": experts, "params_per_expert": n_params, "ffn_params_per_expert": n_ffn,
        "dtype": "bfloat16", "config": {k: v for k, v in FAMILIES[name].items()} | {"vocab_size": config.vocab_size},
        "bytes_per_expert": sum(f.stat().st_size for f in (family_dir / "expert0").glob("*.safetensors")),
        "generation_s": round(time.perf_counter() - start, 1),
    }
    marker.write_text(json.dumps(info, indent=1))
    return family_dir


def describe(family_dir: Path) -> str:
    info = json.loads((family_dir / "family.json").read_text())
    c = info["config"]
    return (f"{info['experts']} x {info['params_per_expert'] / 1e6:,.0f}M-parameter Llama experts "
            f"(hidden {c['hidden_size']}, FFN {c['intermediate_size']}, {c['num_hidden_layers']} layers, "
            f"{c['num_attention_heads']}/{c['num_key_value_heads']} heads, vocab {c['vocab_size']}, "
            f"{'tied' if c['tie_word_embeddings'] else 'untied'} embeddings; FFN "
            f"{info['ffn_params_per_expert'] / info['params_per_expert']:.0%} of parameters), bf16, "
            f"{info['bytes_per_expert'] / 1e9:.2f} GB each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--out", type=Path, default=CACHE)
    args = parser.parse_args()
    family_dir = make_family(args.family, args.experts, args.out)
    print(f"{family_dir}: {describe(family_dir)}")


if __name__ == "__main__":
    main()
