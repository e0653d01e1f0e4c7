"""The Branch and Train stages: build the seed, train one expert. Each is a recipe that only
wires library pieces: set up, (resume and) train, save to the store with a manifest.

Every stage is idempotent: an output whose manifest records the same config hash and the same
inputs (the seed's manifest, the content of the data) is returned without any work, so rerunning
a finished pipeline trains nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Callable

import fsspec

from btx_core import layout
from btx_core.arch import COMPANION_FILES
from btx_core.compute import flops_per_token
from btx_core.config import BTXConfig, TrainSettings, TransferSettings, stable_hash
from btx_core.data.cache import SPLIT_SALT, content_id, ensure_prepared, tokenizer_id
from btx_core.data.packing import TokenizedSplits, split_documents
from btx_core.data.sources import load_documents
from btx_core.errors import BTXError, CheckpointMismatchError, IncompleteOutputError
from btx_core.moe_routing import lm_loss_only
from btx_core.outputs import STAGE_FORMAT, StageOutput
from btx_core.seed import (create_tiny_llama, inspect_model_dir, load_causal_lm, load_tokenizer,
                           parameter_breakdown)
from btx_core.store import Manifest, Store, checkpoint_location
from btx_core.transfer import TransferPolicy
from btx_core.tokenizer import train_tokenizer
from btx_core.train import (Dist, Progress, evaluate_loss, init_distributed, main_rank_first,
                            pick_device, train)

log = logging.getLogger(__name__)
# What a seed directory contributes: weights, configs, and the tokenizer in any of its layouts.
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", *COMPANION_FILES)

ProgressCallback = Callable[[Progress], None]


class StoreCheckpoints:
    """A CheckpointSink over a store prefix; refuses checkpoints of a different config."""

    def __init__(self, store: Store, prefix: str, *, config_hash: str, inputs: dict[str, str],
                 keep: int, cache_dir: Path):
        self.store, self.prefix, self.keep, self.cache_dir = store, prefix, keep, cache_dir
        self.config_hash, self.inputs = config_hash, inputs

    def latest(self) -> tuple[int, Path] | None:
        found = self.store.latest_checkpoint(self.prefix)
        if found is None:
            return None
        step, location = found
        manifest = self.store.read_manifest(location)
        if manifest.config_hash != self.config_hash or manifest.inputs != self.inputs:
            raise CheckpointMismatchError(
                f"checkpoint {location} was made with a different config, seed or data. Delete "
                f"{self.prefix} to start this stage over, or restore the config it was made with")
        return step, self.store.fetch(location, self.cache_dir)

    def save(self, step: int, directory: Path) -> None:
        self.store.write_dir(directory, checkpoint_location(self.prefix, step), stage="checkpoint",
                             config_hash=self.config_hash, inputs=self.inputs, metrics={"step": step})
        self.store.prune_checkpoints(self.prefix, keep=self.keep)


@dataclass
class TrainingRun:
    """The shared recipe of every training stage: resume from the store, train, measure the
    held-out loss, save the model once (rank 0) with its manifest and metrics."""

    store: Store
    config: BTXConfig
    settings: TrainSettings
    ranks: Dist
    location: str
    checkpoints: str
    stage: str
    config_hash: str
    inputs: dict[str, str]

    def heldout_loss(self, model, data: TokenizedSplits) -> float:
        s = self.settings
        with lm_loss_only(model):  # an MoE's held-out loss leaves out its load-balancing term
            return evaluate_loss(model, data.heldout, batch_size=s.batch_size, max_blocks=s.eval_blocks,
                                 precision=s.precision)

    def train_and_save(self, model, tokenizer, data: TokenizedSplits, *, metrics: dict,
                       on_progress: ProgressCallback | None = None,
                       stop_after: int | None = None) -> StageOutput:
        sink = StoreCheckpoints(self.store, self.checkpoints, config_hash=self.config_hash,
                                inputs=self.inputs, keep=self.settings.keep_checkpoints,
                                cache_dir=cache_dir(self.config))
        result = train(model, data.train, self.settings, checkpoints=sink, on_progress=on_progress,
                       stop_after=stop_after)
        if result.steps < self.settings.total_steps(self.ranks.world_size):
            raise BTXError(f"{self.stage} stopped at step {result.steps} (stop_after); rerun to resume")
        fpt = flops_per_token(model.config.to_dict(), self.settings.seq_len)
        metrics = {"final_train_loss": result.final_loss, "heldout_loss": self.heldout_loss(model, data),
                   "steps": result.steps, "tokens": result.tokens, "resumed_from_step": result.resumed_from,
                   "flops_per_token": fpt, "train_flops": fpt * result.tokens,
                   "wall_s": result.wall_s, "tokens_per_s": result.tokens_per_s,
                   "train_losses": result.losses, **metrics}
        with main_rank_first(self.ranks):  # one writer; the other ranks then read its manifest
            if self.ranks.is_main:
                _save_model(self.store, model, tokenizer, self.location, stage=self.stage,
                            config_hash=self.config_hash, inputs=self.inputs, metrics=metrics)
        notes = [f"resumed from step {result.resumed_from}"] if result.resumed_from else []
        return StageOutput(self.location, self.store.read_manifest(self.location), skipped=False,
                           notes=notes)


def open_store(config: BTXConfig) -> Store:
    """The run's store; with the config's `store_transfer` if it sets one, else `Store.transfer`."""
    store = Store(config.store)
    if "store_transfer" in config.model_fields_set:
        store.transfer = transfer_policy(config.store_transfer)
    return store


def transfer_policy(t: TransferSettings) -> TransferPolicy:
    return TransferPolicy(files_at_once=t.files_at_once, connections=t.connections,
                          part_size=t.part_size_mib << 20, attempts=t.attempts,
                          first_wait_s=t.first_wait_s, max_wait_s=t.max_wait_s)


def cache_dir(config: BTXConfig) -> Path:
    return Path(os.path.expanduser(config.cache_dir))


# --- seed ----------------------------------------------------------------------------------------

def build_seed(config: BTXConfig, *, on_progress: ProgressCallback | None = None) -> StageOutput:
    """Create and pretrain the tiny demo seed, or import an existing model into the store."""
    store = open_store(config)
    location = layout.seed_model(config)
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
        local = _local_model_dir(source, cache_dir(config), Path(tmp))
        breakdown = inspect_model_dir(str(local), trust_remote_code=config.seed.trust_remote_code)
        load_tokenizer(str(local), trust_remote_code=config.seed.trust_remote_code)
        staged = Path(tmp) / "staged"
        _copy_model_files(local, staged)
        manifest = store.write_dir(staged, location, stage="seed", config_hash=config_hash,
                                   metrics={"parameters": breakdown.total, "ffn_share": breakdown.ffn_share},
                                   extra={"source": source})
    return StageOutput(location, manifest, skipped=False, notes=[f"seed: {breakdown.describe()}"])


def _pretrain_seed(config: BTXConfig, store: Store, location: str, config_hash: str,
                   on_progress: ProgressCallback | None) -> StageOutput:
    spec, settings = config.seed.create, config.seed.pretrain
    ranks = init_distributed(settings.device)
    with main_rank_first(ranks):
        tokenizer_manifest = _seed_tokenizer(config, store)
        prepared = ensure_prepared(
            config, store, config.seed.pretrain_data, tokenizer=tokenizer_id(tokenizer_manifest),
            tokenizer_dir=lambda: store.fetch(layout.seed_tokenizer(config), cache_dir(config)),
            seq_len=settings.seq_len, held_out_fraction=config.seed.held_out_fraction,
            cache_dir=cache_dir(config))
    inputs = {"tokenizer": content_id(tokenizer_manifest), "data": prepared.content_id}
    if (done := store.exists_with(location, config_hash, inputs)) is not None:
        return StageOutput(location, done, skipped=True)
    with main_rank_first(ranks):
        tokenizer_dir = store.fetch(layout.seed_tokenizer(config), cache_dir(config))
        data = prepared.load(store, cache_dir(config))
    tokenizer = load_tokenizer(str(tokenizer_dir))
    model = create_tiny_llama(spec, tokenizer, seed=settings.seed)
    breakdown = parameter_breakdown(model)
    log.info("seed: %s", breakdown.describe())
    run = TrainingRun(store, config, settings, ranks, location=location,
                      checkpoints=layout.seed_checkpoints(config), stage="seed",
                      config_hash=config_hash, inputs=inputs)
    out = run.train_and_save(model, tokenizer, data, on_progress=on_progress,
                             metrics={"parameters": breakdown.total, "ffn_share": breakdown.ffn_share})
    return replace(out, notes=[f"seed: {breakdown.describe()}", *out.notes])


def _seed_tokenizer(config: BTXConfig, store: Store) -> Manifest:
    """Train (once) the created seed's byte-level BPE tokenizer on the training split of its
    pretraining corpus (held-out text stays unseen by every part of the model)."""
    spec, source = config.seed.create, config.seed.pretrain_data
    location = layout.seed_tokenizer(config)
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
        return store.write_dir(Path(tmp), location, stage="tokenizer", config_hash=config_hash)


# --- experts -------------------------------------------------------------------------------------

def expert_config_hash(config: BTXConfig, domain: str) -> str:
    return stable_hash({"stage": "expert", "format": STAGE_FORMAT,
                        "domain": config.domain(domain).model_dump(mode="json"),
                        "training": config.expert_training.result_hash()})


def train_expert(config: BTXConfig, domain: str, *, seed_location: str | None = None,
                 on_progress: ProgressCallback | None = None,
                 stop_after: int | None = None) -> StageOutput:
    """Branch the seed and continue pretraining it on one domain; resumes from its checkpoints."""
    spec = config.domain(domain)
    settings = config.expert_training
    store = open_store(config)
    seed_location = seed_location or layout.seed_model(config)
    try:
        seed_manifest = store.read_manifest(seed_location)
    except IncompleteOutputError:
        raise BTXError(f"no complete seed at {seed_location}: run `btx seed CONFIG` first") from None
    ranks = init_distributed(settings.device)
    cache = cache_dir(config)
    with main_rank_first(ranks):  # rank 0 tokenizes and fetches; the others reuse its work
        prepared = ensure_prepared(config, store, spec.data, tokenizer=tokenizer_id(seed_manifest),
                                   tokenizer_dir=lambda: store.fetch(seed_location, cache),
                                   seq_len=settings.seq_len, held_out_fraction=spec.held_out_fraction,
                                   cache_dir=cache)
    location = layout.expert_model(config, domain)
    config_hash = expert_config_hash(config, domain)
    inputs = {"seed": seed_manifest.hash, "data": prepared.content_id}
    if (done := store.exists_with(location, config_hash, inputs)) is not None:
        return StageOutput(location, done, skipped=True)

    with main_rank_first(ranks):
        seed_dir = store.fetch(seed_location, cache)
        data = prepared.load(store, cache)
    model, tokenizer = load_causal_lm(str(seed_dir), trust_remote_code=config.seed.trust_remote_code)
    model.to(pick_device(settings.device, ranks, settings.precision))
    run = TrainingRun(store, config, settings, ranks, location=location,
                      checkpoints=layout.expert_checkpoints(config, domain), stage="expert",
                      config_hash=config_hash, inputs=inputs)
    # Measured before training (a resumed run loads its checkpoint inside train()).
    seed_heldout = run.heldout_loss(model, data)
    return run.train_and_save(model, tokenizer, data, on_progress=on_progress, stop_after=stop_after,
                              metrics={"seed_heldout_loss": seed_heldout, "domain": domain})


# --- shared pieces -------------------------------------------------------------------------------

def complete_input(store: Store, location: str, what: str, command: str) -> Manifest:
    """The manifest of a stage's input, or an error saying which command makes it."""
    try:
        return store.read_manifest(location)
    except IncompleteOutputError:
        raise BTXError(f"{what} is not complete at {location}: run `{command}` first") from None


def _save_model(store: Store, model, tokenizer, location: str, *, stage: str, config_hash: str,
                inputs: dict[str, str], metrics: dict) -> Manifest:
    """Save in the model's own dtype, HF layout, safetensors; then commit to the store."""
    dtype = getattr(model.config, "dtype", None)
    with tempfile.TemporaryDirectory(prefix=f"btx-{stage}-") as tmp:
        model.to("cpu")
        if dtype is not None and dtype != next(model.parameters()).dtype:
            model.to(dtype)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        return store.write_dir(Path(tmp), location, stage=stage, config_hash=config_hash,
                               inputs=inputs, metrics=metrics)


def _local_model_dir(source: str, cache: Path, scratch: Path) -> Path:
    """A local directory holding the model: itself, a verified copy from the store, or a Hub snapshot."""
    if "://" in source and not source.startswith("file://"):
        store = Store(source.rsplit("/", 1)[0])
        if store.is_complete(source):  # a btx output: verified against its manifest
            return store.fetch(source, cache)
        return _download_model_files(source, scratch / "download")
    path = Path(source.removeprefix("file://")).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # a Hub id: real users only, never offline tests

    try:
        # The user's HF cache: a model downloaded once (by btx or anything else) is reused.
        return Path(snapshot_download(source, allow_patterns=list(MODEL_FILES)))
    except Exception as exc:  # offline, unknown repo, gated model: all end here
        raise BTXError(f"cannot download {source!r} from the Hugging Face Hub ({type(exc).__name__}): "
                       "check the id and network access (HF_HUB_OFFLINE must be unset; gated models "
                       "need HF_TOKEN), or point `seed.model` at a local directory") from exc


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
