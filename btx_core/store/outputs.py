"""What every stage returns: where its output is and its manifest. A light module, so that
commands which only move tensors need not import the training stack."""

from __future__ import annotations

from dataclasses import dataclass, field

from btx_core.store.manifest import Manifest

STAGE_FORMAT = 1  # bump when a stage's output changes for the same config


@dataclass(frozen=True)
class StageOutput:
    location: str
    manifest: Manifest
    skipped: bool
    """True when the output already existed for the same config and inputs (no work was done)."""
    notes: list[str] = field(default_factory=list)
    """Human-readable facts worth printing (parameter share, resume point)."""

    @property
    def metrics(self) -> dict:
        return self.manifest.metrics
