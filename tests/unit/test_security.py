"""Security: nothing btx loads can run code. No pickle on any load path (checked in the source,
and by loading every artefact a pipeline writes with safetensors and JSON alone), and
`trust_remote_code` off unless the config turns it on."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCANNED = ("btx_core", "flows", "bench", "tests")
SKIPPED_DIRS = {"__pycache__", ".cache", "node_modules"}  # and every .venv*: other people's code


# --- (a) the source --------------------------------------------------------------------------------

def _python_files():
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).parts
            if not any(p in SKIPPED_DIRS or p.startswith(".venv") for p in parts):
                yield path


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _true(call: ast.Call, keyword: str) -> bool:
    return any(k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


PICKLE_LOADERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads",
                  "dill.load", "dill.loads", "joblib.load", "pd.read_pickle", "pandas.read_pickle",
                  "torch.serialization.load"}


def unsafe_loads(source: str) -> list[tuple[int, str]]:
    """(line, what) of every load that can run code: pickle and friends, `torch.load` without
    `weights_only=True`, `np.load(allow_pickle=True)`, a `trust_remote_code=True` literal."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "cPickle", "dill"):
            found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names
                      if a.name in ("load", "loads", "Unpickler")]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in PICKLE_LOADERS:
            found.append((node.lineno, f"{name}(...)"))
        elif name.endswith("torch.load") and not _true(node, "weights_only"):
            found.append((node.lineno, "torch.load(...) without weights_only=True"))
        elif name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy") and _true(node, "allow_pickle"):
            found.append((node.lineno, f"{name}(..., allow_pickle=True)"))
        if _true(node, "trust_remote_code"):
            found.append((node.lineno, f"{name or 'a call'}(..., trust_remote_code=True)"))
    return found


def test_no_source_file_loads_pickle_or_trusts_remote_code():
    files = list(_python_files())
    assert len(files) > 40 and any(f.parent.name == "btx_core" for f in files)
    offences = [f"{path.relative_to(ROOT)}:{line}: {what}"
                for path in files for line, what in unsafe_loads(path.read_text())]
    assert not offences, "code that can run what it loads:\n" + "\n".join(offences)


@pytest.mark.parametrize("line, expected", [
    ("import pickle\npickle.load(open('x', 'rb'))", "pickle.load(...)"),
    ("import pickle as p\nfrom pickle import loads", "from pickle import loads"),
    ("import torch\ntorch.load('x.pt')", "torch.load(...) without weights_only=True"),
    ("import torch\ntorch.load('x.pt', weights_only=False)", "torch.load(...) without weights_only=True"),
    ("import numpy as np\nnp.load('x.npy', allow_pickle=True)", "np.load(..., allow_pickle=True)"),
    ("AutoModel.from_pretrained('x', trust_remote_code=True)",
     "AutoModel.from_pretrained(..., trust_remote_code=True)"),
])
def test_the_source_check_catches_each_unsafe_load(line, expected):
    assert [what for _, what in unsafe_loads(line)] == [expected]


def test_the_source_check_allows_the_safe_forms():
    safe = ("import torch, numpy as np\ntorch.load('x', weights_only=True)\n"
            "np.load('x.npy', allow_pickle=False)\nnp.load('x.npy')\n"
            "AutoConfig.from_pretrained('x', trust_remote_code=config.seed.trust_remote_code)\n"
            "# pickle.load(f) in a comment\ns = 'torch.load(x)'\n")
    assert unsafe_loads(safe) == []


# --- (b) every artefact of a pipeline run ------------------------------------------------------------

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}
TEXT_SUFFIXES = {".md", ".txt", ".csv", ".jinja", ".model"}  # .model: a sentencepiece protobuf, as bytes


def load_safely(path: Path) -> str:
    """Load one stored file with safetensors, json or numpy (no pickle); return how. Raises on a
    file type that would need pickle, or on one no safe loader is known for."""
    suffix = path.suffix
    if suffix in PICKLE_SUFFIXES:
        raise AssertionError(f"{path}: a {suffix} file would be loaded with pickle")
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        return "safetensors"
    if suffix == ".json":
        json.loads(path.read_text())
        if path.name == "tokenizer.json":
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(path))
        return "json"
    if suffix == ".jsonl":
        for line in path.read_text().splitlines():
            if line.strip():
                json.loads(line)
        return "json"
    if suffix == ".npy":
        import numpy as np

        np.load(path, allow_pickle=False)
        return "npy"
    if suffix == ".tokens":  # a token shard: raw integers of the dtype its index.json names
        import numpy as np

        index = json.loads((path.parent / "index.json").read_text())
        tokens = np.fromfile(path, dtype=np.dtype(index["dtype"]))
        assert tokens.size * tokens.itemsize == path.stat().st_size, path
        return "raw tokens"
    if suffix == ".crc32":  # a token shard's per-block CRC-32s: raw little-endian uint32, one a block
        import numpy as np

        index = json.loads((path.parent / "index.json").read_text())
        shard = path.with_suffix("")
        checks = np.fromfile(path, dtype="<u4")
        assert checks.size * 4 == path.stat().st_size, path
        assert checks.size * index["seq_len"] * np.dtype(index["dtype"]).itemsize == shard.stat().st_size, path
        return "raw tokens"
    if suffix == ".lock":  # a local store's writer-lease lock (flock's target): no content to load
        assert path.stat().st_size == 0, path
        return "empty"
    if suffix in TEXT_SUFFIXES:
        path.read_bytes()
        return "text"
    if suffix == ".png":
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        return "png"
    raise AssertionError(f"{path}: no safe loader is known for {suffix or 'files without a suffix'}; "
                         "store it as safetensors or JSON, or add a safe loader here")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "optimizer.pt", "state.pkl", "model.pth"])
def test_a_pickle_artefact_fails_the_check(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(AssertionError, match="pickle"):
        load_safely(tmp_path / name)


# --- (c) trust_remote_code stays off -------------------------------------------------------------------

@pytest.fixture
def recorded(monkeypatch):
    """Every transformers Auto-class load, with the trust_remote_code it was given."""
    import transformers

    calls: list[tuple[str, object]] = []

    def spy(cls, method):
        original = getattr(cls, method).__func__

        def wrapper(klass, *args, **kwargs):
            calls.append((f"{cls.__name__}.{method}", kwargs.get("trust_remote_code")))
            return original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, method, classmethod(wrapper))

    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        spy(cls, "from_pretrained")
    spy(transformers.AutoModelForCausalLM, "from_config")
    return calls


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory) -> Path:
    """A pico Llama with a fast tokenizer, as a user's seed directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from btx_core.model.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("seed")
    tokenizer = train_tokenizer(["the seed model reads text\n" * 30, "1 + 1 = 2\n" * 30], 300, path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(path)
    return path


def test_model_loads_do_not_trust_remote_code_by_default(recorded, seed_dir):
    from btx_core.model.dense import inspect_model_dir, load_causal_lm, load_tokenizer

    load_causal_lm(str(seed_dir))
    inspect_model_dir(str(seed_dir))
    load_tokenizer(str(seed_dir))
    assert {name for name, _ in recorded} == {"AutoConfig.from_pretrained", "AutoTokenizer.from_pretrained",
                                              "AutoModelForCausalLM.from_pretrained",
                                              "AutoModelForCausalLM.from_config"}
    assert all(trust is False for _, trust in recorded), recorded


@pytest.mark.parametrize("turned_on", [False, True], ids=["default", "config-turns-it-on"])
def test_the_seed_stage_trusts_remote_code_only_when_the_config_says_so(recorded, seed_dir, tmp_path, turned_on):
    import yaml

    from btx_core.config.load import parse_config
    from btx_core.stages.seed import build_seed

    raw = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    raw.update(store=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"),
               seed={"model": str(seed_dir), **({"trust_remote_code": True} if turned_on else {})})
    config = parse_config(raw)
    assert config.seed.trust_remote_code is turned_on
    build_seed(config)
    assert recorded and all(trust is turned_on for _, trust in recorded), recorded

