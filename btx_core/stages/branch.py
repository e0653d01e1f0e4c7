"""An expert branch on several processes of one node: `btx train-expert` relaunched under
`torchrun --nproc-per-node N` (DDP or FSDP, per `expert_training.distributed`) and followed: rank
0's progress reports come back through a file, and a failure surfaces with torchrun's exit status,
the CLI's error and the tail of its output. What `flows/expert.py` runs when
`expert_training.nproc_per_node` gives a branch more than one process (`auto`: one per CUDA device
its pool's job gives it)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from btx_core.config.schema import BTXConfig, TrainSettings
from btx_core.errors import BTXError, ConfigError, IncompleteOutputError
from btx_core.store import layout
from btx_core.store.outputs import StageOutput
from btx_core.training.loop import PROGRESS_FILE_ENV, Progress

log = logging.getLogger(__name__)
OUTPUT_TAIL_LINES = 30
ProgressCallback = Callable[[Progress], None]


class BranchProcessesFailed(BTXError):
    """The branch's torchrun ended with a non-zero status."""


def processes_for(settings: TrainSettings) -> int:
    """Processes a branch trains on: `nproc_per_node`, where `auto` is one per visible CUDA
    device (what the pool's job gives it: `gpu_count` on Kubernetes), at least one."""
    if settings.nproc_per_node != "auto":
        return settings.nproc_per_node
    if settings.device == "cpu":
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def torchrun_command(nproc: int, config_file: Path, domain: str) -> list[str]:
    """`torchrun` (this interpreter's) on one node, rendezvous on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "btx_core.cli", "train-expert", str(config_file), "--domain", domain]


def train_expert_torchrun(config: BTXConfig, domain: str, nproc: int, *,
                          on_progress: ProgressCallback | None = None, poll_s: float = 1.0) -> StageOutput:
    """Train one expert on `nproc` processes of this node (torchrun), from the config's seed;
    resumes and skips like `btx train-expert`, whose command it runs."""
    from btx_core.stages.common import open_store

    store, location = open_store(config), layout.expert_model(config.run_root, domain)
    before = _manifest_hash(store, location)
    with tempfile.TemporaryDirectory(prefix=f"btx-expert-{domain}-") as tmp:
        config_file, reports, output = Path(tmp, "config.yaml"), Path(tmp, "progress.jsonl"), Path(tmp, "output.log")
        config_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        reports.touch()
        env = dict(os.environ, **{PROGRESS_FILE_ENV: str(reports)})
        command = torchrun_command(nproc, config_file, domain)
        log.info("expert[%s]: %s", domain, " ".join(command))
        with open(output, "wb") as sink:  # a file, not a pipe: a chatty child never blocks on it
            proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True,  # its own group: stopped as one
                                    preexec_fn=_sigterm_when_parent_dies)
        try:
            _follow(proc, reports, on_progress, poll_s)
        except BaseException:  # a failing callback (the fault hook), a cancelled task run
            _stop(proc)
            raise
        text = output.read_text(errors="replace")
    tail = _tail(text)
    if proc.returncode != 0:
        # What the CLI said (each rank says it), then torchrun's own account of the failure.
        said = "\n".join(dict.fromkeys(m.group(0) for m in re.finditer(r"(?m)^error: .*(\n  .*)*", text)))
        message = (f"expert[{domain}]: torchrun with {nproc} processes exited with status "
                   f"{proc.returncode}: {said or 'no error message'}\nthe end of its output:\n{tail}")
        # The CLI says "invalid config" for problems no retry can fix: keep them out of retries.
        if "error: invalid config" in said:
            raise ConfigError([message])
        raise BranchProcessesFailed(message)
    manifest = store.read_manifest(location)
    log.info("expert[%s]: torchrun with %d processes done\n%s", domain, nproc, tail)
    return StageOutput(location, manifest, skipped=manifest.hash == before,
                       notes=[f"trained on {nproc} processes ({config.expert_training.distributed})"])


def train_expert_branch(config: BTXConfig, domain: str, *, seed_location: str,
                        on_progress: ProgressCallback | None = None) -> StageOutput:
    """One expert branch on this node: in this process, or under torchrun when
    `expert_training.nproc_per_node` gives it several processes."""
    nproc = processes_for(config.expert_training)
    if nproc == 1:
        from btx_core.stages.expert import train_expert

        return train_expert(config, domain, seed_location=seed_location, on_progress=on_progress)
    if seed_location != layout.seed_model(config.run_root):
        raise BTXError(f"expert[{domain}]: a branch under torchrun branches from the run's own seed "
                       f"({layout.seed_model(config.run_root)}), not {seed_location}: set nproc_per_node: 1")
    return train_expert_torchrun(config, domain, nproc, on_progress=on_progress)


def _manifest_hash(store, location: str) -> str | None:
    try:
        return store.read_manifest(location).hash
    except IncompleteOutputError:
        return None


def _follow(proc: subprocess.Popen, reports: Path, on_progress: ProgressCallback | None, poll_s: float) -> None:
    """Wait for `proc`, passing each progress report rank 0 appends to `reports` to `on_progress`."""
    pending = ""
    with open(reports) as f:
        while True:
            finished = proc.poll() is not None
            pending += f.read()
            *lines, pending = pending.split("\n")  # a line being written stays pending
            for line in lines:
                if line.strip() and on_progress is not None:
                    on_progress(Progress(**json.loads(line)))
            if finished:
                return
            time.sleep(poll_s)


def _sigterm_when_parent_dies() -> None:
    """In the torchrun child before exec: SIGTERM when the thread that started it ends (it waits
    on torchrun until torchrun ends, so: when this process dies, even by SIGKILL); torchrun then
    stops its ranks, which checkpoint and exit (and follow torchrun if it is killed outright)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the branch's process group (torchrun passes it to its workers), then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(text: str) -> str:
    """The last lines of a process's output; progress bars' carriage-return redraws count once."""
    lines = [re.split(r"\r", line)[-1].rstrip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    return "\n".join(lines[-OUTPUT_TAIL_LINES:])[-6000:]
