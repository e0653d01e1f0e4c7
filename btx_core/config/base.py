"""The base of every config model: unknown keys refused, frozen, and its cross-field check run.

A model names its check (btx_core/config/checks.py) in `cross_check`. The checks are written over
plain mappings, so `cross_field_problems` also runs them on raw data whose other fields failed
validation (load.py): every problem is reported at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    cross_check: ClassVar[Callable[[Mapping], list[str]] | None] = None
    """The model's cross-field check: its data (defaults filled in) -> problems; None: none."""

    @model_validator(mode="after")
    def _cross_field(self):
        problems = cross_field_problems(type(self), self.model_dump())
        if problems:
            raise ValueError("; ".join(problems))
        return self


def cross_field_problems(model: type[BaseModel], data: Mapping) -> list[str]:
    """The cross-field problems of one model's data; defaults fill what `data` leaves out."""
    check = getattr(model, "cross_check", None)
    if check is None:
        return []
    defaults = {name: f.get_default(call_default_factory=True)
                for name, f in model.model_fields.items() if not f.is_required()}
    try:
        return check({**defaults, **data})
    except (TypeError, ValueError, KeyError, ZeroDivisionError):
        return []  # wrongly typed fields: already reported by the field checks
