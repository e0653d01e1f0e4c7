"""Problems as text: the `Problem` record and how numbers and linear expressions are written.

Numbers are exact (`int`, `Fraction`) all the way to the page, so an answer is never a rounded
float; tests recompute every answer from the question.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction


@dataclass(frozen=True)
class Problem:
    """One worked problem. `data` holds the numbers in machine-readable form (for checking)."""

    family: str
    question: str
    steps: list[str]
    answer: str
    data: dict = field(default_factory=dict)

    def document(self) -> str:
        return "\n".join(["Problem: " + self.question, "Solution:", *self.steps,
                          "Answer: " + self.answer])


def fmt(value: Fraction | int) -> str:
    """An exact number as people write it: 7, -3/4."""
    value = Fraction(value)
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def fmt_decimal(value: Fraction | int) -> str:
    """A number with a finite decimal expansion, written exactly (12.5, 0.75, 40)."""
    value = Fraction(value)
    sign, value = ("-" if value < 0 else ""), abs(value)
    whole, rest = divmod(value, 1)
    digits = ""
    while rest:
        rest *= 10
        digit, rest = divmod(rest, 1)
        digits += str(digit)
        if len(digits) > 12:
            raise ValueError(f"{value} has no short decimal expansion")
    return f"{sign}{whole}" + (f".{digits}" if digits else "")


def _signed_term(coef: int, var: str, first: bool) -> str:
    """One term of a linear expression: '3x', '- x', '+ 5' (first terms carry their sign)."""
    if coef == 0:
        return ""
    size = abs(coef)
    body = (var if size == 1 else f"{size}{var}") if var else str(size)
    if first:
        return body if coef > 0 else f"-{body}"
    return f"+ {body}" if coef > 0 else f"- {body}"


def linear(*terms: tuple[int, str]) -> str:
    """Render a sum of (coefficient, variable) terms, skipping zeros: '2x - 3y + 4'."""
    parts = []
    for coef, var in terms:
        part = _signed_term(coef, var, first=not parts)
        if part:
            parts.append(part)
    return " ".join(parts) if parts else "0"


def paren(n: int) -> str:
    """A negative number in parentheses, so '÷ (-3)' never reads as a subtraction."""
    return f"({n})" if n < 0 else str(n)
