"""The fault hook of the tests: an expert branch that fails once, on purpose, right after its
first checkpoint, so that a test can watch its retry resume from that checkpoint.

`BTX_FAULT_AFTER_CHECKPOINT=<marker file>` arms it. While the marker does not exist, the first
expert branch whose training reports progress past its first checkpoint creates the marker and
fails with `InjectedFault`; a retry (or a retried parent run) finds the marker and trains on,
resuming from the checkpoint. The training loop reports progress before it saves the checkpoint
of the same step, so the first report past `checkpoint_every` comes after that checkpoint is in
the store.

Production code knows nothing of it: the hook wraps the two trainers of btx_core.stages.branch
(`train_expert_branch`, `train_expert_torchrun`), so that the progress callback a flow's task
hands them fails once. Where it is installed:
- in the test's own process, `armed(marker)`, for a `with` block;
- in the processes a test starts (a worker and its flow runs, the pipeline's branch processes,
  the `prefect` CLI), `process_env(marker)`: the variable, and a PYTHONPATH on which Python finds
  startup/sitecustomize.py, which patches btx_core.stages.branch when the process imports it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from btx_core.errors import BTXError

FAULT_ENV = "BTX_FAULT_AFTER_CHECKPOINT"
REPO = Path(__file__).resolve().parents[2]
STARTUP = Path(__file__).resolve().parent / "startup"
BRANCH = "btx_core.stages.branch"
TRAINERS = ("train_expert_branch", "train_expert_torchrun")


class InjectedFault(BTXError):
    """The failure BTX_FAULT_AFTER_CHECKPOINT asked for."""


def fail_once(callback, checkpoint_every: int, domain: str):
    """`callback`, failing once after the first checkpoint while the hook is armed."""
    path = os.environ.get(FAULT_ENV)
    if not path or os.path.exists(path) or getattr(callback, "fails_once", False):
        return callback

    def armed(p) -> None:
        if callback is not None:
            callback(p)
        if p.step > checkpoint_every:
            try:  # O_EXCL: of branches running at once, exactly one fails
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, f"expert[{domain}] failed on purpose at step {p.step}\n".encode())
            os.close(fd)
            raise InjectedFault(f"expert[{domain}]: injected fault at step {p.step} ({FAULT_ENV}={path})")

    armed.fails_once = True  # train_expert_branch hands it on to train_expert_torchrun: arm once
    return armed


def _failing_once(trainer):
    @functools.wraps(trainer)
    def train(config, domain, *args, on_progress=None, **kwargs):
        on_progress = fail_once(on_progress, config.expert_training.checkpoint_every, domain)
        return trainer(config, domain, *args, on_progress=on_progress, **kwargs)

    return train


def patch(module) -> dict:
    """Wrap the trainers of btx_core.stages.branch (`module`); returns the originals."""
    originals = {name: getattr(module, name) for name in TRAINERS}
    for name, trainer in originals.items():
        setattr(module, name, _failing_once(trainer))
    return originals


def process_env(marker: Path) -> dict[str, str]:
    """Environment variables that arm the hook in a process started with them (and in the
    processes it starts): add them to its environment."""
    paths = [str(STARTUP), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {FAULT_ENV: str(marker), "PYTHONPATH": os.pathsep.join(paths)}


@contextlib.contextmanager
def armed(marker: Path) -> Iterator[None]:
    """Arm the hook in this process and in every process it starts, for the block. (A module
    that bound `train_expert_torchrun` before the block, as flows/expert.py does, keeps the
    unwrapped one: in this process, only branches that call the trainers through the module
    fail, as the pipeline's expert task does.)"""
    import btx_core.stages.branch as branch

    saved = {name: os.environ.get(name) for name in (FAULT_ENV, "PYTHONPATH")}
    os.environ.update(process_env(marker))
    originals = patch(branch)
    try:
        yield
    finally:
        for name, trainer in originals.items():
            setattr(branch, name, trainer)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def patch_on_import() -> None:
    """Patch btx_core.stages.branch once this process imports it (now, if it has), so that a
    process that never trains (a worker) does not import torch for it."""
    if BRANCH in sys.modules:
        patch(sys.modules[BRANCH])
    else:
        sys.meta_path.insert(0, _PatchOnImport())


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Lets the other finders find btx_core.stages.branch, and patches it once it has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != BRANCH:
            return None
        sys.meta_path.remove(self)  # once per process
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenPatch(spec.loader)
        return spec


class _ThenPatch(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # get_source, get_filename, ...: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        patch(module)
