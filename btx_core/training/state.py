"""Resumable training state, saved without pickle.

A checkpoint directory holds the model weights (`model.safetensors`) apart from the training
state: optimizer moments in `optimizer.safetensors`, and everything else (step, data position,
scheduler, optimizer hyper-parameters, Python/NumPy RNG) in `state.json`, the torch RNG states
in `rng.safetensors`. Restoring all of it makes a resumed run bit-identical to an
uninterrupted one on CPU.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from btx_core.errors import CheckpointMismatchError

FORMAT_VERSION = 1
MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE = (
    "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


@dataclass
class TrainState:
    """Counters that say where a run is; the rest of a checkpoint is tensors."""

    step: int
    """Optimizer steps done."""
    sequences_seen: int
    """Training sequences consumed, over all processes: the data position."""
    tokens_seen: int
    """Training tokens consumed, over all processes."""
    world_size: int
    """Processes the run was trained with (data order depends on it through the global batch)."""
    losses: list[float]
    """Training loss of every step so far (for loss curves)."""


def save_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, state: TrainState, *, optimizer_state: dict | None = None) -> None:
    """Write a checkpoint of a plain (unsharded) model. `optimizer_state` replaces
    `optimizer.state_dict()` when the optimizer runs on sharded parameters (FSDP): the full
    state, keyed by parameter index as a plain optimizer numbers its parameters."""
    directory.mkdir(parents=True, exist_ok=True)
    # save_model drops the duplicate names of tied weights that save_file refuses.
    save_model(model, str(directory / MODEL_FILE))
    tensors, optimizer_meta = _split_optimizer_state(optimizer_state or optimizer.state_dict())
    save_file(tensors, str(directory / OPTIMIZER_FILE))
    save_file(_torch_rng_state(), str(directory / RNG_FILE))
    meta = {
        "format_version": FORMAT_VERSION,
        "train_state": asdict(state),
        "optimizer": optimizer_meta,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "python_rng": _jsonable(random.getstate()),
        "numpy_rng": _jsonable(np.random.get_state()),
    }
    (directory / STATE_FILE).write_text(json.dumps(meta))


def load_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler) -> TrainState:
    load_model_weights(directory, model)
    return load_training_state(directory, scheduler, optimizer.load_state_dict)


def load_model_weights(directory: Path, model: torch.nn.Module) -> None:
    """The checkpoint's weights into a plain (unsharded) model."""
    _meta(directory)
    missing, unexpected = load_model(model, str(directory / MODEL_FILE), strict=False)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"checkpoint {directory} does not fit the model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): delete the stage's checkpoints to start it over")


def load_training_state(directory: Path, scheduler, load_optimizer: Callable[[dict], Any]) -> TrainState:
    """Optimizer (through `load_optimizer`, given the index-keyed state dict), scheduler and RNG
    of a checkpoint; returns its counters."""
    meta = _meta(directory)
    tensors = load_file(str(directory / OPTIMIZER_FILE))
    load_optimizer(_join_optimizer_state(tensors, meta["optimizer"]))
    scheduler_state = dict(meta["scheduler"], lr_lambdas=[None] * len(meta["scheduler"]["base_lrs"]))
    scheduler.load_state_dict(scheduler_state)
    _set_torch_rng_state(load_file(str(directory / RNG_FILE)))
    random.setstate(_python_rng(meta["python_rng"]))
    np.random.set_state(_numpy_rng(meta["numpy_rng"]))
    return TrainState(**meta["train_state"])


def read_train_state(directory: Path) -> TrainState:
    """The counters of a checkpoint, without loading tensors."""
    return TrainState(**json.loads((directory / STATE_FILE).read_text())["train_state"])


def _meta(directory: Path) -> dict:
    meta = json.loads((directory / STATE_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{directory} has training-state format {meta.get('format_version')}, "
                                      f"this btx reads {FORMAT_VERSION}: resume with the btx that wrote it")
    return meta


# --- optimizer: tensors to safetensors, the rest to JSON ----------------------------------------

def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# --- random number generators ------------------------------------------------------------------

def _torch_rng_state() -> dict[str, torch.Tensor]:
    # Only this process's own GPU: touching every visible device would create a CUDA context
    # (and take memory) on each of them from every rank.
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_torch_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _python_rng(value: list) -> tuple:
    version, internal, gauss = value
    return version, tuple(internal), gauss


def _numpy_rng(value: list) -> tuple:
    name, keys, pos, has_gauss, cached = value
    return name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached
