"""Training checkpoints in the store: how they are named, found in a listing, and which ones to prune.

A checkpoint is an output at `<prefix>/step-NNNNNNNN`; `Store.list_checkpoints`,
`latest_checkpoint` and `prune_checkpoints` list the prefix and decide with these functions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePosixPath

_STEP_RE = re.compile(r"step-(\d{8,})")  # 8 digits sort as text too; wider still parses


def checkpoint_location(prefix: str, step: int) -> str:
    """`prefix/step-00000100`: the location of training checkpoint `step` under `prefix`."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"{prefix.rstrip('/')}/step-{step:08d}"


def steps_in(paths: Iterable[str]) -> list[tuple[int, str]]:
    """(step, path) of the `step-NNNNNNNN` entries of a listing (trailing '/' dropped)."""
    matches = [(_STEP_RE.fullmatch(PurePosixPath(p).name), p.rstrip("/")) for p in paths]
    return [(int(m.group(1)), p) for m, p in matches if m]


def to_prune(children: Iterable[tuple[int, str, bool]], keep: int) -> list[str]:
    """Of (step, location, complete) children, oldest first, the locations to delete: all but
    the newest `keep` complete ones. Incomplete ones older than the newest complete one are
    debris of killed writes and go too; newer incomplete ones may be a write in progress.
    `keep` >= 0 (`Store.prune_checkpoints` checks it before listing anything)."""
    children = list(children)
    complete = [loc for _, loc, ok in children if ok]
    newest = max((s for s, _, ok in children if ok), default=-1)  # none complete: prune none
    kept = set(complete[-keep:]) if keep else set()
    return [loc for s, loc, ok in children if (ok and loc not in kept) or (not ok and s < newest)]
