"""Worked arithmetic and algebra problems: the built-in `math` corpus.

The paper's math expert trains on worked solutions (arXiv 2403.07816, section 4.1); offline we
generate them. Every document is a problem, "Solution:", the steps, and "Answer: ...". Answers
are exact (integers and `Fraction`s, never floats), and the tests recompute every one of them.

The stream is a pure function of the seed: one `random.Random(seed)` drives everything and the
families take turns, so `math_documents(k, s)` is a prefix of `math_documents(n, s)` for k < n
and a byte cap keeps the families balanced.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from itertools import islice

from btx_core.data.builtin.algebra import linear_equation, linear_system, quadratic, word_problem
from btx_core.data.builtin.arithmetic import (
    addition,
    division,
    fractions,
    gcd_lcm,
    multiplication,
    order_of_operations,
    percentages,
    powers,
    subtraction,
)
from btx_core.data.builtin.mathtext import Problem

__all__ = ["FAMILIES", "MATHGEN_VERSION", "Problem", "iter_math_documents", "iter_problems",
           "math_documents", "math_problems"]

# Bump when the generated text changes, so cached tokenized data is rebuilt.
MATHGEN_VERSION = 1

FAMILIES: dict[str, Callable[[random.Random], Problem]] = {
    f.__name__: f for f in (addition, subtraction, multiplication, division, order_of_operations,
                            fractions, percentages, linear_equation, linear_system, quadratic,
                            gcd_lcm, powers, word_problem)
}


def iter_problems(seed: int, families: list[str] | None = None) -> Iterator[Problem]:
    """An endless, seed-determined stream of problems; the families take turns."""
    names = list(families or FAMILIES)
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown math problem families {unknown}; known: {sorted(FAMILIES)}")
    rng = random.Random(seed)
    i = 0
    while True:
        yield FAMILIES[names[i % len(names)]](rng)
        i += 1


def math_problems(n: int, seed: int, families: list[str] | None = None) -> list[Problem]:
    return list(islice(iter_problems(seed, families), n))


def iter_math_documents(seed: int) -> Iterator[str]:
    return (p.document() for p in iter_problems(seed))


def math_documents(n: int, seed: int) -> list[str]:
    """`n` worked problems as documents, the same for the same seed."""
    return list(islice(iter_math_documents(seed), n))
