"""Training on several processes: joining torchrun's process group, the device of each rank,
DDP's gradient sync, and FSDP2's sharded copy with the full (unsharded) state that checkpoints hold."""

from __future__ import annotations

import atexit
import contextlib
import copy
import logging
import os
import platform
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from btx_core.errors import BTXError

log = logging.getLogger(__name__)

BARRIER_TIMEOUT = timedelta(hours=2)


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
        atexit.register(_leave_process_group)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def _leave_process_group() -> None:
    """Destroy the process group at exit, before the interpreter tears down, as PyTorch asks:
    left to the teardown, gloo's threads can abort a rank that has finished its work
    ("terminate called without an active exception", seen once in tests/{unit,integration}/test_data_shards.py)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_rank_first(ranks: Dist):
    """Rank 0 runs the block first (e.g. tokenizes into the shared cache); the others then run it."""
    if ranks.world_size > 1 and not ranks.is_main:
        dist.barrier()
    yield
    if ranks.world_size > 1 and ranks.is_main:
        dist.barrier()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively (else autocast to bf16 is emulated, and slow)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if platform.machine().lower() in ("aarch64", "arm64"):
        with contextlib.suppress(OSError):
            return " bf16" in Path("/proc/cpuinfo").read_text()
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


_warned_emulated = False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> `bf16` where `device` computes it natively, else `fp32`; an explicit `bf16`
    stays (with one warning per process where it is emulated)."""
    global _warned_emulated
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device) and not _warned_emulated:
        _warned_emulated = True
        log.warning("precision: bf16 on a CPU without native bf16 (no AMX or AVX512-BF16): torch "
                    "emulates it, several times slower than fp32. Use `precision: auto` or `fp32`.")
    return precision


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


@contextlib.contextmanager
def gradient_sync(model, sync: bool):
    if sync or not (hasattr(model, "no_sync") or hasattr(model, "set_requires_gradient_sync")):
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def wrap_ddp(model: torch.nn.Module, device: torch.device, ranks: Dist):
    if ranks.world_size == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


# --- FSDP: a sharded copy for training; full state for checkpoints ----------------------------------

def shard(model: torch.nn.Module, device: torch.device, ranks: Dist) -> torch.nn.Module:
    """A copy of `model` sharded over the ranks with FSDP2 (one unit per decoder layer, then the
    rest); `model` itself moves to the CPU. Rank 0's weights win, as under DDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to("cpu")  # the device never holds two whole copies
    sharded = copy.deepcopy(model).to(device)
    with torch.no_grad():
        for tensor in [*sharded.parameters(), *sharded.buffers()]:
            dist.broadcast(tensor, src=0)
    mesh = init_device_mesh(device.type, (ranks.world_size,))
    units = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(sharded.modules())[1:]:
        if type(module).__name__ in units:
            fully_shard(module, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    return sharded


def full_weights(sharded: torch.nn.Module, *, everywhere: bool) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU: gathered one tensor at a time (every rank takes part),
    kept on rank 0 only unless `everywhere`."""
    from torch.distributed.tensor import DTensor

    keep = everywhere or dist.get_rank() == 0
    out = {}
    for name, tensor in sharded.state_dict().items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if keep:
            out[name] = full.detach().cpu()
    return out


def parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order a plain optimizer numbers its parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(sharded: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The whole optimizer state on rank 0, keyed by index like a plain optimizer's (None elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(sharded, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    index = {name: i for i, name in enumerate(parameter_names(sharded, optimizer))}
    return {"state": {index[name]: value for name, value in full["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in full["param_groups"]]}


def optimizer_loader(runner: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool):
    """How a checkpoint's (index-keyed, full) optimizer state goes into this run's optimizer."""
    if not fsdp:
        return optimizer.load_state_dict

    def load(state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = parameter_names(runner, optimizer)
        by_name = {"state": {names[i]: value for i, value in state["state"].items()},
                   "param_groups": [dict(g, params=[names[i] for i in g["params"]])
                                    for g in state["param_groups"]]}
        set_optimizer_state_dict(runner, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    return load
