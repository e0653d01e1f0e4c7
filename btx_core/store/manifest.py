"""The manifest of a stage output: every file with its size and sha256, the stage's config
hash, its inputs' manifest hashes, metrics. Written last; its presence means the output is done."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from btx_core.errors import IntegrityError

MANIFEST = "_manifest.json"


class FileEntry(BaseModel):
    """One stored file: its size in bytes and the hex sha256 of its content."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """What a stage output holds and how it was made; written last, so its presence means done."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    format_version: Literal[1] = 1
    stage: str
    created_at: str
    """ISO 8601, UTC."""
    config_hash: str
    inputs: dict[str, str] = {}
    """Input name -> that input's `Manifest.hash`, so a changed upstream invalidates this output."""
    files: dict[str, FileEntry]
    """Relative POSIX path -> entry; the manifest itself is not listed."""
    metrics: dict[str, Any] = {}
    """JSON data; NaN and inf are stored as null (JSON has neither)."""
    extra: dict[str, Any] = {}
    """Free JSON metadata for the stage's own use."""
    lease_generation: int | None = Field(default=None, ge=1)
    """The generation of the stage prefix's writer lease its writer held (store/lease.py); absent
    in outputs written without a lease, and in older btx's manifests."""

    @field_validator("files")
    @classmethod
    def _relative_paths(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        # fetch() writes these paths under a cache dir: "../x" or "/x" would escape it.
        for rel in files:
            if rel == MANIFEST or any(p in ("", ".", "..") for p in rel.split("/")):
                raise ValueError(f"file path {rel!r} must be relative, without '.', '..' or '//'")
        return files

    def _dumps(self, **layout: Any) -> bytes:
        # Without a lease generation the key is left out: a manifest of an older btx keeps its hash.
        unset = {"lease_generation"} if self.lease_generation is None else None
        return json.dumps(self.model_dump(mode="json", exclude=unset), sort_keys=True,
                          ensure_ascii=False, **layout).encode()

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON (sorted keys, no whitespace); inputs are recorded so."""
        return hashlib.sha256(self._dumps(separators=(",", ":"))).hexdigest()

    def to_json(self) -> bytes:
        """Indented for people reading the store; `hash` does not depend on the layout."""
        return self._dumps(indent=2) + b"\n"

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        """Parse and validate; raises `ValueError` (pydantic's ValidationError) when invalid."""
        return cls.model_validate_json(data)


def sha256_of(f) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(8 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def check_hash(location: str, rel: str, expected: str, actual: str) -> None:
    if actual != expected:
        raise IntegrityError(f"{location}/{rel} is corrupt: sha256 expected {expected}, actual "
                             f"{actual}; delete the output and rerun its stage (if it was being "
                             "rewritten meanwhile, just retry)")
