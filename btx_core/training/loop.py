"""One training loop for every stage: seed pretraining, expert training and MoE finetuning.

Plain PyTorch around a transformers causal LM: AdamW, warm-up then cosine decay to a fraction of
the peak (transformers' scheduler), bf16 autocast over fp32 weights, gradient accumulation, and,
when launched by `torchrun`, DDP or FSDP (`training/distributed.py`). Resumability is the design constraint:
the data order is a pure function of (seed, step), so a checkpoint only needs the step to put the
data back where it was, and restoring weights, optimizer, scheduler and RNG makes a resumed run
end with the same weights as an uninterrupted one. Checkpoints hold the full (unsharded) state
whatever the wrapping, written by rank 0.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from btx_core.config.schema import TrainSettings
from btx_core.data.shards import Blocks
from btx_core.errors import BTXError, CheckpointMismatchError, DataError
from btx_core.training.distributed import (
    Dist,
    full_optimizer_state,
    full_weights,
    gradient_sync,
    init_distributed,
    main_rank_first,
    optimizer_loader,
    pick_device,
    resolve_precision,
    shard,
    wrap_ddp,
)
from btx_core.training.optimizer import adamw
from btx_core.training.read_ahead import ReadAhead
from btx_core.training.state import (
    TrainState,
    load_model_weights,
    load_training_state,
    read_train_state,
    save_checkpoint,
)
from btx_core.training.stop import TrainingStopped, stop_on_sigterm, stop_requested

log = logging.getLogger(__name__)
FINAL_LOSS_WINDOW = 10  # steps averaged for the reported final training loss
# A launcher (btx_core/stages/branch.py) that runs training in processes of its own names a file here;
# rank 0 appends every progress report to it as a JSON line.
PROGRESS_FILE_ENV = "BTX_PROGRESS_FILE"


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives every `log_every` steps."""

    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_s: float
    eta_s: float
    resumed_from: int


@dataclass(frozen=True)
class TrainResult:
    steps: int
    tokens: int
    final_loss: float
    losses: list[float]
    resumed_from: int
    wall_s: float
    tokens_per_s: float
    final_extra_loss: float | None = None
    """The objective's term, averaged like `final_loss` over the steps this process trained."""
    precision: str = "fp32"
    """The precision trained in (`auto` resolved for the device)."""


class Objective(Protocol):
    """What a stage adds to the model's own loss: MoE finetuning's load-balancing loss and router
    temperature schedule (`btx_core/moe/routing.py`, `RouterObjective`). A pure function of the
    step, so a resumed run trains exactly as an uninterrupted one."""

    def at_step(self, step: int, total_steps: int) -> None:
        """Called before each optimizer step."""

    def extra_loss(self, outputs, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """A term added to `outputs.loss` for the backward pass (None: nothing)."""

    def held_parameters(self, step: int, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Parameters of `model` that keep their value at this step (MoE finetuning's router warm-up)."""

    def learning_rates(self, model: torch.nn.Module) -> dict[int, float]:
        """id(parameter) -> peak learning rate, for parameters of `model` that do not train at the
        run's own (MoE finetuning's router learning rate); the schedule scales each alike."""


class CheckpointSink(Protocol):
    """Where a run's checkpoints live (a store prefix, in practice)."""

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint as (step, local directory), or None."""

    def save(self, step: int, directory: Path) -> None:
        """Persist a checkpoint directory written by `save_checkpoint`."""


# --- data order --------------------------------------------------------------------------------

def per_process(settings: TrainSettings, ranks: Dist) -> TrainSettings:
    """This process's settings: with `nproc_per_node` other than 1, `batch_size` is the global
    micro-batch and each process takes an equal share (the global batch, and so the data order,
    is then the same for any number of processes)."""
    if not settings.splits_batch or ranks.world_size == 1:
        return settings
    if settings.batch_size % ranks.world_size:
        raise BTXError(f"batch_size ({settings.batch_size}) must be divisible by the {ranks.world_size} "
                       "processes this run has: change batch_size or nproc_per_node")
    return settings.model_copy(update={"batch_size": settings.batch_size // ranks.world_size})


def batch_indices(n_blocks: int, step: int, micro: int, settings: TrainSettings, ranks: Dist) -> np.ndarray:
    """Block indices of one micro-batch of one process: a pure function of (seed, step).

    The stream of blocks is a new permutation every epoch; each optimizer step takes the next
    `batch_size * grad_accum * world_size` blocks, and each process its slice of every micro-batch,
    so N processes with batch B see the same global batch as one process with batch N*B.
    """
    global_micro = settings.batch_size * ranks.world_size
    start = (step * settings.grad_accum + micro) * global_micro + ranks.rank * settings.batch_size
    positions = np.arange(start, start + settings.batch_size)
    epochs, offsets = np.divmod(positions, n_blocks)
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        out[epochs == epoch] = epoch_order(settings.seed, int(epoch), n_blocks)[offsets[epochs == epoch]]
    return out


@functools.lru_cache(maxsize=8)  # per trainer in this process: the epoch in progress and the next
def epoch_order(seed: int, epoch: int, n_blocks: int) -> np.ndarray:
    """The blocks of one epoch in training order. Made once per epoch, not per micro-batch: a
    permutation of n blocks costs O(n), milliseconds per step once a corpus has millions of
    blocks (BENCHMARKS.md, "Training from lazy shards"). Stored in the smallest integer type
    that holds n (4 bytes a block below 2^31) and read-only, since callers share it."""
    order = np.random.default_rng([seed, epoch]).permutation(n_blocks)
    order = order.astype(np.min_scalar_type(max(n_blocks - 1, 0)))
    order.flags.writeable = False
    return order


# --- the loop ----------------------------------------------------------------------------------

def train(model: torch.nn.Module, blocks: Blocks, settings: TrainSettings, *,
          checkpoints: CheckpointSink | None = None,
          on_progress: Callable[[Progress], None] | None = None,
          stop_after: int | None = None, objective: Objective | None = None) -> TrainResult:
    """Train `model` in place on packed token blocks [n, seq_len]; resume from `checkpoints`.

    `blocks` is an array in memory or a lazy one (token shards, a mixture of them): each step
    reads only its micro-batches' rows, `blocks[indices]`, so memory does not grow with the
    corpus and each process reads only its own slice.

    `stop_after` ends the run early after that many steps (as a kill would), for tests. Under
    FSDP the training runs on a sharded copy; `model` gets its final weights at the end.
    SIGTERM (in the main thread) or `stop.request_stop` writes a checkpoint at the next step
    boundary and raises `TrainingStopped` (btx_core/training/stop.py). `objective` adds a term
    to the model's loss (the loss reported is their sum).
    """
    if len(blocks.shape) != 2 or blocks.shape[1] != settings.seq_len:
        raise ValueError(f"blocks have shape {blocks.shape}, expected [n, {settings.seq_len}]: "
                         "pack the data with the stage's seq_len")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    ranks = init_distributed(settings.device)
    device = pick_device(settings.device, ranks, settings.precision)
    total_steps = settings.total_steps(ranks.world_size)
    settings = per_process(settings, ranks)  # from here on, batch_size is this process's share
    fsdp = settings.distributed == "fsdp" and ranks.world_size > 1
    # FSDP trains a sharded copy (below); `model` stays whole, on the CPU, to write checkpoints from.
    model.to("cpu" if fsdp else device).train()
    if settings.gradient_checkpointing:
        # Non-reentrant checkpointing is the variant that works under DDP and FSDP.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with main_rank_first(ranks):  # rank 0 fetches into the shared cache; the others reuse it
        latest = checkpoints.latest() if checkpoints else None
    if latest is not None:
        _check_resumable(latest, settings, ranks)
        load_model_weights(latest[1], model)
    runner = shard(model, device, ranks) if fsdp else model
    optimizer = adamw(runner, settings, fused=device.type == "cuda" and not fsdp,
                      learning_rates=objective.learning_rates(runner) if objective is not None else None)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=min(settings.warmup_steps, total_steps),
        num_training_steps=total_steps, min_lr_rate=settings.min_lr_ratio)
    state = TrainState(step=0, sequences_seen=0, tokens_seen=0, world_size=ranks.world_size, losses=[])
    if latest is not None:
        state = load_training_state(latest[1], scheduler, optimizer_loader(runner, optimizer, fsdp))
        state.world_size = ranks.world_size
        log.info("resuming from step %d (%s)", state.step, latest[1])
    resumed_from = state.step
    wrapped = runner if fsdp else wrap_ddp(model, device, ranks)
    autocast = _autocast(settings.precision, device)
    tokens_per_step = settings.tokens_per_step * ranks.world_size
    report = _with_progress_file(on_progress) if ranks.is_main else None

    started = window_start = time.perf_counter()
    window_steps, extra_losses = 0, []
    last_stop = total_steps if stop_after is None else min(total_steps, resumed_from + stop_after)
    order = functools.partial(batch_indices, len(blocks), settings=settings, ranks=ranks)
    with stop_on_sigterm(), ReadAhead(blocks, order, settings.grad_accum, last_stop) as reader:
        while state.step < last_stop:
            if objective is not None:
                objective.at_step(state.step, total_steps)
            held = objective.held_parameters(state.step, runner) if objective is not None else []
            loss, extra = _step(wrapped, reader, state.step, settings, ranks, device, autocast, optimizer,
                                objective, held)
            if extra is not None:
                extra_losses.append(extra)
            scheduler.step()
            state.step += 1
            state.sequences_seen += settings.batch_size * settings.grad_accum * ranks.world_size
            state.tokens_seen += tokens_per_step
            state.losses.append(loss)
            window_steps += 1
            if report and (state.step % settings.log_every == 0 or state.step == total_steps):
                now = time.perf_counter()
                rate = window_steps * tokens_per_step / max(now - window_start, 1e-9)
                report(Progress(step=state.step, total_steps=total_steps, loss=loss,
                                lr=scheduler.get_last_lr()[0], tokens_per_s=rate,
                                eta_s=(total_steps - state.step) * tokens_per_step / rate,
                                resumed_from=resumed_from))
                window_start, window_steps = now, 0
            if checkpoints and (state.step % settings.checkpoint_every == 0 or state.step == total_steps):
                _save(checkpoints, state, model, runner if fsdp else None, optimizer, scheduler, ranks)

            if state.step < last_stop and _stopping(ranks, device):
                saved = checkpoints is not None and (state.step % settings.checkpoint_every == 0
                                                     or state.step == total_steps)
                if checkpoints and not saved and state.step > resumed_from:
                    _save(checkpoints, state, model, runner if fsdp else None, optimizer, scheduler, ranks)
                why = stop_requested() or "another rank was asked to stop"
                where = f"a checkpoint at step {state.step}" if checkpoints else "no checkpoint sink"
                log.warning("training stopped at step %d (%s); %s", state.step, why, where)
                raise TrainingStopped(f"training stopped at step {state.step}/{total_steps} ({why}); "
                                      f"{where}: a rerun resumes from it")
    if fsdp:  # the trained weights back into the caller's (plain) model, on every rank
        model.load_state_dict(full_weights(runner, everywhere=True))
        model.to(device)
        del runner, optimizer
    wall = time.perf_counter() - started
    trained_tokens = (state.step - resumed_from) * tokens_per_step
    recent, recent_extra = state.losses[-FINAL_LOSS_WINDOW:], extra_losses[-FINAL_LOSS_WINDOW:]
    return TrainResult(steps=state.step, tokens=state.tokens_seen,
                       final_loss=sum(recent) / len(recent) if recent else math.nan,
                       losses=list(state.losses), resumed_from=resumed_from, wall_s=wall,
                       tokens_per_s=trained_tokens / wall if wall > 0 else 0.0,
                       final_extra_loss=sum(recent_extra) / len(recent_extra) if recent_extra else None,
                       precision=resolve_precision(settings.precision, device))


def _stopping(ranks: Dist, device: torch.device) -> bool:
    """Whether to stop now; all ranks agree (one stops, all stop: the checkpoint is collective)."""
    stop = stop_requested() is not None
    if ranks.world_size > 1:
        flag = torch.tensor([1.0 if stop else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
    return stop


def _step(model, reader: ReadAhead, step: int, settings: TrainSettings, ranks: Dist,
          device: torch.device, autocast, optimizer, objective: Objective | None = None, held=()
          ) -> tuple[float, float | None]:
    """One optimizer step over `grad_accum` micro-batches; returns the mean loss over all ranks
    and, with an objective, the mean of its term (part of the loss)."""
    total = torch.zeros((), device=device)
    extra_total = None
    for micro in range(settings.grad_accum):
        rows = reader.rows(step, micro)
        ids = torch.from_numpy(rows).to(device, non_blocking=True).long()
        # DDP and FSDP reduce gradients on every backward; only the last micro-batch needs it.
        sync = micro == settings.grad_accum - 1
        with gradient_sync(model, sync), autocast:
            outputs = model(input_ids=ids, labels=ids)
            loss = outputs.loss
            # Packed blocks have no padding, hence no attention mask.
            extra = objective.extra_loss(outputs) if objective is not None else None
            if extra is not None:
                loss = loss + extra.to(loss.device)
                extra_total = (0.0 if extra_total is None else extra_total) + extra.detach() / settings.grad_accum
            loss = loss / settings.grad_accum
        loss.backward()
        total += loss.detach()
    for param in held:  # AdamW skips a parameter without a gradient: no update, no weight decay
        param.grad = None
    if settings.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ranks.world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
        if extra_total is not None:
            dist.all_reduce(extra_total, op=dist.ReduceOp.AVG)
    return float(total), None if extra_total is None else float(extra_total)


def _autocast(precision: str, device: torch.device):
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- checkpoints ---------------------------------------------------------------------------------

def _check_resumable(latest: tuple[int, Path], settings: TrainSettings, ranks: Dist) -> None:
    step, directory = latest
    saved = read_train_state(directory)
    if saved.world_size == ranks.world_size:
        return
    # A split batch makes the global batch, and so the data order, independent of the number of
    # processes: a branch retried on a node with other GPUs resumes where it was.
    global_batch = settings.batch_size * settings.grad_accum * ranks.world_size
    if settings.splits_batch and saved.sequences_seen == saved.step * global_batch:
        return
    raise CheckpointMismatchError(f"checkpoint at step {step} was trained with {saved.world_size} "
                                  f"process(es), this run has {ranks.world_size}: resume with the same "
                                  "number of processes (the data order depends on it), or set "
                                  "nproc_per_node so that batch_size is the global batch")


def _save(checkpoints: CheckpointSink, state: TrainState, model, sharded, optimizer, scheduler, ranks: Dist):
    """Rank 0 writes the full state; under FSDP every rank first helps gather it into `model`."""
    optimizer_state = None
    if sharded is not None:
        weights = full_weights(sharded, everywhere=False)
        optimizer_state = full_optimizer_state(sharded, optimizer)
        if ranks.is_main:
            model.load_state_dict(weights)
    if ranks.is_main:
        with tempfile.TemporaryDirectory(prefix="btx-ckpt-") as tmp:
            save_checkpoint(Path(tmp), model, optimizer, scheduler, state, optimizer_state=optimizer_state)
            checkpoints.save(state.step, Path(tmp))
    if ranks.world_size > 1:
        dist.barrier()


def _with_progress_file(on_progress: Callable[[Progress], None] | None):
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path:
        return on_progress

    def report(p: Progress) -> None:
        if on_progress:
            on_progress(p)
        with open(path, "a") as f:
            f.write(json.dumps(asdict(p)) + "\n")

    return report


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, blocks: Blocks, *, batch_size: int, max_blocks: int,
                  precision: str = "fp32", device: torch.device | None = None) -> float:
    """Mean next-token loss (nats per token) over the first `max_blocks` held-out blocks."""
    if len(blocks) == 0:
        raise DataError("no held-out blocks to evaluate: add data or raise held_out_fraction")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with _autocast(precision, device):
        for start in range(0, min(len(blocks), max_blocks), batch_size):
            ids = torch.from_numpy(np.asarray(blocks[start:min(start + batch_size, max_blocks)])).to(device).long()
            # .loss is a mean over the batch's predicted tokens; weigh batches by their size.
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(model(input_ids=ids, labels=ids).loss) * n
            count += n
    model.train(was_training)
    return total / count
