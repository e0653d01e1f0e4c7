"""What every stage shares: its store and cache, the writer lease of the prefix it writes,
checkpoints in the store, and the recipe of a training stage (resume, train, measure the
held-out loss, save with a manifest).

Every stage is idempotent: an output whose manifest records the same config hash and the same
inputs (the seed's manifest, the content of the data) is returned without any work, so rerunning
a finished pipeline trains nothing. A stage that has work to do holds the writer lease of its
prefix while it does it (`stage_lease`, `unless_done`), and commits every output under it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Callable

from btx_core.config.schema import BTXConfig, TrainSettings
from btx_core.data.prepare import TokenizedSplits
from btx_core.errors import BTXError, CheckpointMismatchError, IncompleteOutputError
from btx_core.model.card import read_front_matter, write_finetune_card
from btx_core.moe.routing import lm_loss_only
from btx_core.store.core import Manifest, Store, checkpoint_location
from btx_core.store.lease import WriterLease
from btx_core.store.outputs import StageOutput
from btx_core.training.compute import flops_per_token, trained_fraction
from btx_core.training.distributed import Dist, main_rank_first
from btx_core.training.loop import Objective, Progress, evaluate_loss, train

log = logging.getLogger(__name__)
ProgressCallback = Callable[[Progress], None]


class StoreCheckpoints:
    """A CheckpointSink over a store prefix; refuses checkpoints of a different config, except
    those of a run that finished (its output `finished` was made from them): after a config
    change they are leftovers, deleted when this run starts over."""

    def __init__(self, store: Store, prefix: str, *, config_hash: str, inputs: dict[str, str],
                 keep: int, cache_dir: Path, finished: str | None = None):
        self.store, self.prefix, self.keep, self.cache_dir = store, prefix, keep, cache_dir
        self.config_hash, self.inputs, self.finished = config_hash, inputs, finished
        self.lease: WriterLease | None = None
        """The stage prefix's writer lease, checked before every checkpoint write."""

    def latest(self) -> tuple[int, Path] | None:
        found = self.store.latest_checkpoint(self.prefix)
        if found is None:
            return None
        step, location = found
        manifest = self.store.read_manifest(location)
        if manifest.config_hash != self.config_hash or manifest.inputs != self.inputs:
            if self.finished and self.store.exists_with(self.finished, manifest.config_hash, manifest.inputs):
                log.warning("%s: the checkpoints of the finished %s were made with another config or "
                            "inputs; deleting them and starting over (the finished output stays until "
                            "this run replaces it)", self.prefix, self.finished)
                for _, old in self.store.list_checkpoints(self.prefix):
                    self.store.delete(old)
                return None
            raise CheckpointMismatchError(
                f"checkpoint {location} was made with a different config, seed or data. Delete "
                f"{self.prefix} to start this stage over, or restore the config it was made with")
        return step, self.store.fetch(location, self.cache_dir)

    def save(self, step: int, directory: Path) -> None:
        if self.lease is not None:
            self.lease.check()
        self.store.write_dir(directory, checkpoint_location(self.prefix, step), stage="checkpoint",
                             config_hash=self.config_hash, inputs=self.inputs, metrics={"step": step},
                             fence=self.lease)
        self.store.prune_checkpoints(self.prefix, keep=max(1, self.keep))  # 0: the newest until the output


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
    card_source: tuple[str, Path] | None = None
    """(the source model's location, its local directory): the saved model gets a model card."""
    card_facts: dict | None = None
    """What else the card says (`write_finetune_card`'s lineage, recipe, lr, sections)."""

    def heldout_loss(self, model, data: TokenizedSplits) -> float:
        s = self.settings
        with lm_loss_only(model):  # an MoE's held-out loss leaves out its load-balancing term
            return evaluate_loss(model, data.heldout, batch_size=s.batch_size, max_blocks=s.eval_blocks,
                                 precision=s.precision)

    def train_and_save(self, model, tokenizer, data: TokenizedSplits, *, metrics: dict,
                       on_progress: ProgressCallback | None = None,
                       stop_after: int | None = None, objective: Objective | None = None) -> StageOutput:
        sink = StoreCheckpoints(self.store, self.checkpoints, config_hash=self.config_hash,
                                inputs=self.inputs, keep=self.settings.keep_checkpoints,
                                cache_dir=cache_dir(self.config), finished=self.location)

        def make(lease: WriterLease | None) -> StageOutput:
            sink.lease = lease
            return self._train_and_save(model, tokenizer, data, sink, metrics=metrics,
                                        on_progress=on_progress, stop_after=stop_after, objective=objective)

        # One writer per stage prefix (rank 0 writes; the other ranks follow it).
        return unless_done(self.store, self.config, self.location, self.config_hash, self.inputs, make,
                           main=self.ranks.is_main)

    def _train_and_save(self, model, tokenizer, data: TokenizedSplits, sink: StoreCheckpoints, *,
                        metrics: dict, on_progress: ProgressCallback | None,
                        stop_after: int | None, objective: Objective | None = None) -> StageOutput:
        result = train(model, data.train, self.settings, checkpoints=sink, on_progress=on_progress,
                       stop_after=stop_after, objective=objective)
        if result.steps < self.settings.total_steps(self.ranks.world_size):
            raise BTXError(f"{self.stage} stopped at step {result.steps} (stop_after); rerun to resume")
        fpt = flops_per_token(model.config.to_dict(), self.settings.seq_len, trained_fraction(model))
        metrics = {"final_train_loss": result.final_loss, "heldout_loss": self.heldout_loss(model, data),
                   "steps": result.steps, "tokens": result.tokens, "resumed_from_step": result.resumed_from,
                   "flops_per_token": fpt, "train_flops": fpt * result.tokens,
                   "wall_s": result.wall_s, "devices": self.ranks.world_size, "tokens_per_s": result.tokens_per_s,
                   "precision": result.precision,
                   "train_losses": result.losses, **metrics}
        if result.final_extra_loss is not None:  # MoE finetuning: the paper's load-balancing loss
            metrics["final_load_balancing_loss"] = result.final_extra_loss
        with main_rank_first(self.ranks):  # one writer; the other ranks then read its manifest
            if self.ranks.is_main:
                if sink.lease is not None:
                    sink.lease.check()
                save_model(self.store, model, tokenizer, self.location, stage=self.stage,
                           config_hash=self.config_hash, inputs=self.inputs, metrics=metrics,
                           card_source=self.card_source, card_facts=self.card_facts, fence=sink.lease)
                if self.settings.keep_checkpoints == 0:  # the output is saved: no run resumes from them
                    self.store.prune_checkpoints(self.checkpoints, keep=0)
        notes = [f"resumed from step {result.resumed_from}"] if result.resumed_from else []
        return StageOutput(self.location, self.store.read_manifest(self.location), skipped=False,
                           notes=notes)


def stage_prefix(location: str) -> str:
    """The prefix a stage writes under (its output, and a training stage's checkpoints): the
    parent of its output location (`<run>/experts/<domain>` for `<run>/experts/<domain>/model`)."""
    return location.rstrip("/").rsplit("/", 1)[0]


@contextlib.contextmanager
def stage_lease(store: Store, config: BTXConfig, location: str, *,
                main: bool = True) -> Iterator[WriterLease | None]:
    """Hold the writer lease of `location`'s stage prefix while the block writes there (pass it
    as `fence=` to every `write_dir`); LeaseHeldError if another live writer holds it. Ranks
    other than the main one write nothing and take none (None)."""
    if not main:
        yield None
        return
    policy = config.store_lease
    with WriterLease(store, stage_prefix(location), ttl_s=policy.ttl_s, renew_s=policy.renew_s,
                     conditional_writes=policy.conditional_writes == "required") as lease:
        yield lease


def unless_done(store: Store, config: BTXConfig, location: str, config_hash: str, inputs: dict[str, str],
                make: Callable[[WriterLease | None], StageOutput], *, main: bool = True) -> StageOutput:
    """The output at `location` if it was made from this config and these inputs; else
    `make(lease)` under the stage's writer lease, asked again once the lease is held (the
    writer before may have just finished it)."""
    if (done := store.exists_with(location, config_hash, inputs)) is not None:
        return StageOutput(location, done, skipped=True)
    with stage_lease(store, config, location, main=main) as lease:
        if (done := store.exists_with(location, config_hash, inputs)) is not None:
            return StageOutput(location, done, skipped=True)
        return make(lease)


def commit_under_lease(store: Store, config: BTXConfig, local_dir: Path, location: str, *, config_hash: str,
                       inputs: dict[str, str] | None = None, **manifest) -> StageOutput:
    """`store.write_dir` of an output built and checked before any lease was taken (so bad input
    writes nothing to the store), under the stage's writer lease, unless another writer
    committed it meanwhile. `manifest`: write_dir's other fields (stage, metrics, extra)."""
    return unless_done(store, config, location, config_hash, inputs or {}, lambda lease: StageOutput(
        location, store.write_dir(local_dir, location, config_hash=config_hash, inputs=inputs, fence=lease,
                                  **manifest), skipped=False))


def open_store(config: BTXConfig) -> Store:
    """The run's store; with the config's `store_transfer` if it sets one, else `Store.transfer`."""
    return Store(config.store, transfer=config.store_transfer if "store_transfer" in config.model_fields_set
                 else None)


def cache_dir(config: BTXConfig) -> Path:
    """`cache_dir`, else `BTX_CACHE_DIR`, else ~/.cache/btx, resolved where the stage runs (a
    config travels from the control pod to the expert pods as a parameter)."""
    return Path(os.path.expanduser(config.cache_dir or os.environ.get("BTX_CACHE_DIR") or "~/.cache/btx"))


def complete_input(store: Store, location: str, what: str, command: str) -> Manifest:
    """The manifest of a stage's input, or an error saying which command makes it."""
    try:
        return store.read_manifest(location)
    except IncompleteOutputError:
        raise BTXError(f"{what} is not complete at {location}: run `{command}` first") from None


def save_model(store: Store, model, tokenizer, location: str, *, stage: str, config_hash: str,
               inputs: dict[str, str], metrics: dict, card_source: tuple[str, Path] | None = None,
               card_facts: dict | None = None, fence: WriterLease | None = None) -> Manifest:
    """Save in the model's own dtype, HF layout, safetensors (config, generation config, tokenizer,
    and with `card_source` a model card); then commit to the store. An MoE is saved with
    `output_router_logits` off: training turns it on for its run, inference has no use for it."""
    dtype = getattr(model.config, "dtype", None)
    router_logits = getattr(model.config, "output_router_logits", None)
    with tempfile.TemporaryDirectory(prefix=f"btx-{stage}-") as tmp:
        model.to("cpu")
        if dtype is not None and dtype != next(model.parameters()).dtype:
            model.to(dtype)
        if router_logits is not None:
            model.config.output_router_logits = False
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if router_logits is not None:
                model.config.output_router_logits = router_logits
        tokenizer.save_pretrained(tmp)
        if card_source is not None:
            source, source_dir = card_source
            write_finetune_card(Path(tmp), config=model.config.to_dict(), source=source,
                                source_card=read_front_matter(source_dir), stage=stage, metrics=metrics,
                                **(card_facts or {}))
        return store.write_dir(Path(tmp), location, stage=stage, config_hash=config_hash,
                               inputs=inputs, metrics=metrics, fence=fence)
