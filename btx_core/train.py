"""One training loop for every stage: seed pretraining, expert training (and, later, MoE finetuning).

Plain PyTorch around a transformers causal LM: AdamW, warm-up then cosine decay to a fraction of
the peak (transformers' scheduler), bf16 autocast over fp32 weights, gradient accumulation, and
DDP when launched by `torchrun`. Resumability is the design constraint: the data order is a pure
function of (seed, step), so a checkpoint only needs the step to put the data back where it was,
and restoring weights, optimizer, scheduler and RNG makes a resumed run end with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from btx_core.config import TrainSettings
from btx_core.errors import BTXError, CheckpointMismatchError, DataError
from btx_core.train_state import TrainState, load_checkpoint, read_train_state, save_checkpoint

log = logging.getLogger(__name__)
BARRIER_TIMEOUT = timedelta(hours=2)
FINAL_LOSS_WINDOW = 10  # steps averaged for the reported final training loss


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


class CheckpointSink(Protocol):
    """Where a run's checkpoints live (a store prefix, in practice)."""

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint as (step, local directory), or None."""

    def save(self, step: int, directory: Path) -> None:
        """Persist a checkpoint directory written by `save_checkpoint`."""


# --- distributed -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); otherwise one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local_rank)  # before NCCL starts, or every rank uses GPU 0
        # The other ranks wait in a barrier while rank 0 uploads a checkpoint: give big models time.
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


@contextlib.contextmanager
def main_rank_first(ranks: Dist):
    """Rank 0 runs the block first (e.g. tokenizes into the shared cache); the others then run it."""
    if ranks.world_size > 1 and not ranks.is_main:
        dist.barrier()
    yield
    if ranks.world_size > 1 and ranks.is_main:
        dist.barrier()


def pick_device(setting: str, ranks: Dist, precision: str = "fp32") -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise BTXError("device: cuda was asked for but no CUDA device is visible; "
                               "use `device: auto` or `cpu`")
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise BTXError(f"{torch.cuda.get_device_name()} has no bf16 support: use "
                               "`precision: fp32` (pre-Ampere GPUs such as V100 and T4)")
        return torch.device("cuda", ranks.local_rank)
    return torch.device("cpu")


# --- data order --------------------------------------------------------------------------------

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
        order = np.random.default_rng([settings.seed, int(epoch)]).permutation(n_blocks)
        out[epochs == epoch] = order[offsets[epochs == epoch]]
    return out


# --- the loop ----------------------------------------------------------------------------------

def train(model: torch.nn.Module, blocks: np.ndarray, settings: TrainSettings, *,
          checkpoints: CheckpointSink | None = None,
          on_progress: Callable[[Progress], None] | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Train `model` in place on packed token blocks [n, seq_len]; resume from `checkpoints`.

    `stop_after` ends the run early after that many steps (as a kill would), for tests.
    """
    if blocks.ndim != 2 or blocks.shape[1] != settings.seq_len:
        raise ValueError(f"blocks have shape {blocks.shape}, expected [n, {settings.seq_len}]: "
                         "pack the data with the stage's seq_len")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    ranks = init_distributed(settings.device)
    device = pick_device(settings.device, ranks, settings.precision)
    model.to(device).train()
    if settings.gradient_checkpointing:
        # Non-reentrant checkpointing is the variant that works under DDP.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    total_steps = settings.total_steps(ranks.world_size)
    optimizer = _optimizer(model, settings, fused=device.type == "cuda")
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=min(settings.warmup_steps, total_steps),
        num_training_steps=total_steps, min_lr_rate=settings.min_lr_ratio)
    state = TrainState(step=0, sequences_seen=0, tokens_seen=0, world_size=ranks.world_size, losses=[])
    with main_rank_first(ranks):  # rank 0 fetches into the shared cache; the others reuse it
        latest = checkpoints.latest() if checkpoints else None
    if latest is not None:
        state = _resume(latest, model, optimizer, scheduler, ranks)
    resumed_from = state.step
    wrapped = _wrap_ddp(model, device, ranks)
    autocast = _autocast(settings.precision, device)
    data = torch.from_numpy(np.ascontiguousarray(blocks))  # int32 in memory; int64 per micro-batch
    tokens_per_step = settings.tokens_per_step * ranks.world_size

    started = window_start = time.perf_counter()
    window_steps = 0
    last_stop = total_steps if stop_after is None else min(total_steps, resumed_from + stop_after)
    while state.step < last_stop:
        loss = _step(wrapped, data, state.step, settings, ranks, device, autocast, optimizer)
        scheduler.step()
        state.step += 1
        state.sequences_seen += settings.batch_size * settings.grad_accum * ranks.world_size
        state.tokens_seen += tokens_per_step
        state.losses.append(loss)
        window_steps += 1
        if on_progress and ranks.is_main and (state.step % settings.log_every == 0 or state.step == total_steps):
            now = time.perf_counter()
            rate = window_steps * tokens_per_step / max(now - window_start, 1e-9)
            on_progress(Progress(step=state.step, total_steps=total_steps, loss=loss,
                                 lr=scheduler.get_last_lr()[0], tokens_per_s=rate,
                                 eta_s=(total_steps - state.step) * tokens_per_step / rate,
                                 resumed_from=resumed_from))
            window_start, window_steps = now, 0
        if checkpoints and (state.step % settings.checkpoint_every == 0 or state.step == total_steps):
            _save(checkpoints, state, model, optimizer, scheduler, ranks)

    wall = time.perf_counter() - started
    trained_tokens = (state.step - resumed_from) * tokens_per_step
    recent = state.losses[-FINAL_LOSS_WINDOW:]
    return TrainResult(steps=state.step, tokens=state.tokens_seen,
                       final_loss=sum(recent) / len(recent) if recent else math.nan,
                       losses=list(state.losses), resumed_from=resumed_from, wall_s=wall,
                       tokens_per_s=trained_tokens / wall if wall > 0 else 0.0)


def _step(model, data: torch.Tensor, step: int, settings: TrainSettings, ranks: Dist,
          device: torch.device, autocast, optimizer) -> float:
    """One optimizer step over `grad_accum` micro-batches; returns the mean loss over all ranks."""
    total = torch.zeros((), device=device)
    for micro in range(settings.grad_accum):
        ids = data[batch_indices(len(data), step, micro, settings, ranks)].to(device, non_blocking=True).long()
        # DDP all-reduces gradients on every backward; only the last micro-batch needs it.
        sync = micro == settings.grad_accum - 1 or not hasattr(model, "no_sync")
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
            loss = model(input_ids=ids, labels=ids).loss / settings.grad_accum
        loss.backward()
        total += loss.detach()
    if settings.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ranks.world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return float(total)


def _optimizer(model: torch.nn.Module, settings: TrainSettings, fused: bool) -> torch.optim.AdamW:
    # No weight decay on norms and biases (1-d tensors), as in Llama's and GPT's recipes.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": settings.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps,
                             fused=fused or None)


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _wrap_ddp(model: torch.nn.Module, device: torch.device, ranks: Dist):
    if ranks.world_size == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _resume(latest: tuple[int, Path], model, optimizer, scheduler, ranks: Dist) -> TrainState:
    step, directory = latest
    saved = read_train_state(directory)
    if saved.world_size != ranks.world_size:
        raise CheckpointMismatchError(f"checkpoint at step {step} was trained with {saved.world_size} "
                           f"process(es), this run has {ranks.world_size}: resume with the same "
                           "number of processes (the data order depends on it)")
    state = load_checkpoint(directory, model, optimizer, scheduler)
    log.info("resuming from step %d (%s)", state.step, directory)
    return state


def _save(checkpoints: CheckpointSink, state: TrainState, model, optimizer, scheduler, ranks: Dist):
    if ranks.is_main:
        with tempfile.TemporaryDirectory(prefix="btx-ckpt-") as tmp:
            save_checkpoint(Path(tmp), model, optimizer, scheduler, state)
            checkpoints.save(state.step, Path(tmp))
    if ranks.world_size > 1:
        dist.barrier()


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, blocks: np.ndarray, *, batch_size: int, max_blocks: int,
                  precision: str = "fp32", device: torch.device | None = None) -> float:
    """Mean next-token loss (nats per token) over the first `max_blocks` held-out blocks."""
    if len(blocks) == 0:
        raise DataError("no held-out blocks to evaluate: add data or raise held_out_fraction")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    data = torch.from_numpy(np.ascontiguousarray(blocks[:max_blocks]))
    total, count = 0.0, 0
    with _autocast(precision, device):
        for start in range(0, len(data), batch_size):
            ids = data[start:start + batch_size].to(device).long()
            # .loss is a mean over the batch's predicted tokens; weigh batches by their size.
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(model(input_ids=ids, labels=ids).loss) * n
            count += n
    model.train(was_training)
    return total / count
