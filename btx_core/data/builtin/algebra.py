"""Algebra families (linear equations, 2x2 systems, quadratics by factoring) and word problems
with units. The solution is chosen first and the problem built around it, so answers are exact
and the printed coefficients stay integers. Each rearrangement is a step, as in a textbook.
"""

from __future__ import annotations

import random
from fractions import Fraction

from btx_core.data.builtin.mathtext import Problem, fmt, fmt_decimal, linear, paren


def linear_equation(rng: random.Random) -> Problem:
    # a x + b = c x + d with a != c; the solution is an integer most of the time.
    while True:
        a, c = rng.randrange(-9, 10), rng.randrange(-9, 10)
        if a != c and a != 0:
            break
    x = Fraction(rng.randrange(-12, 13), rng.choice([1, 1, 1, 2, 3]))
    b = rng.randrange(-20, 21)
    d_frac = (a - c) * x + b
    if d_frac.denominator != 1:  # keep the printed equation integral
        x = Fraction(round(x))
        d_frac = (a - c) * x + b
    d = int(d_frac)
    question = f"Solve for x: {linear((a, 'x'), (b, ''))} = {linear((c, 'x'), (d, ''))}."
    steps = []
    if c:
        steps.append(f"{'Subtract' if c > 0 else 'Add'} {linear((abs(c), 'x'))} "
                     f"{'from' if c > 0 else 'to'} both sides: {linear((a - c, 'x'), (b, ''))} = {d}.")
    if b:
        steps.append(f"{'Subtract' if b > 0 else 'Add'} {abs(b)} {'from' if b > 0 else 'to'} both sides: "
                     f"{linear((a - c, 'x'))} = {d - b}.")
    if a - c != 1:
        steps.append(f"Divide both sides by {a - c}: x = {fmt(Fraction(d - b, a - c))}.")
    steps.append(f"Check: {linear((a, 'x'), (b, ''))} with x = {fmt(x)} gives {fmt(a * x + b)}, "
                 f"and {linear((c, 'x'), (d, ''))} gives {fmt(c * x + d)}.")
    return Problem("linear_equation", question, steps, f"x = {fmt(x)}",
                   {"a": a, "b": b, "c": c, "d": d})


def linear_system(rng: random.Random) -> Problem:
    while True:
        a1, b1, a2, b2 = (rng.randrange(-6, 7) for _ in range(4))
        if a1 and a2 and b1 and b2 and a1 * b2 - a2 * b1:
            break
    x, y = rng.randrange(-9, 10), rng.randrange(-9, 10)
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    eq1, eq2 = f"{linear((a1, 'x'), (b1, 'y'))} = {c1}", f"{linear((a2, 'x'), (b2, 'y'))} = {c2}"
    # Eliminate y: multiply (1) by b2 and (2) by b1, then subtract.
    steps = [f"Label the equations (1) {eq1} and (2) {eq2}.",
             f"Multiply (1) by {b2}: {linear((a1 * b2, 'x'), (b1 * b2, 'y'))} = {c1 * b2}.",
             f"Multiply (2) by {b1}: {linear((a2 * b1, 'x'), (b1 * b2, 'y'))} = {c2 * b1}.",
             f"Subtract to eliminate y: {linear((a1 * b2 - a2 * b1, 'x'))} = {c1 * b2 - c2 * b1}.",
             f"So x = {c1 * b2 - c2 * b1} ÷ {paren(a1 * b2 - a2 * b1)} = {x}."]
    rest = c1 - a1 * x
    steps.append(f"Substitute into (1): {linear((b1, 'y'))} = {c1} - ({a1 * x}) = {rest}, "
                 f"so y = {rest} ÷ {paren(b1)} = {y}.")
    steps.append(f"Check (2): {a2} × ({x}) + {b2} × ({y}) = {c2}.")
    return Problem("linear_system", f"Solve the system: {eq1} and {eq2}.", steps, f"x = {x}, y = {y}",
                   {"eq1": (a1, b1, c1), "eq2": (a2, b2, c2)})


def quadratic(rng: random.Random) -> Problem:
    r1, r2 = sorted((rng.randrange(-15, 16), rng.randrange(-15, 16)))
    k = rng.choice([1, 1, 1, 2, 3, 4, 5])
    b, c = -(r1 + r2), r1 * r2  # x^2 + bx + c = (x - r1)(x - r2)
    poly = linear((k, "x^2"), (k * b, "x"), (k * c, ""))
    steps = []
    if k != 1:
        steps.append(f"Divide both sides by {k}: {linear((1, 'x^2'), (b, 'x'), (c, ''))} = 0.")
    steps.append(f"Find two numbers whose product is {c} and whose sum is {b}: {-r1} and {-r2}.")
    factor = lambda r: f"(x {'-' if r >= 0 else '+'} {abs(r)})" if r else "x"  # noqa: E731
    steps.append(f"Factor: {'x^2' if r1 == r2 == 0 else factor(r1) + factor(r2)} = 0.")
    if r1 == r2:
        steps.append(f"Both factors are the same, so there is one repeated root: x = {r1}.")
        answer = f"x = {r1}"
    else:
        steps.append(f"Set each factor to zero: x = {r1} or x = {r2}.")
        answer = f"x = {r1} or x = {r2}"
    return Problem("quadratic", f"Solve {poly} = 0 by factoring.", steps, answer,
                   {"coefficients": (k, k * b, k * c)})


# ---------------------------------------------------------------------------------------------
# Word problems: a formula, its units, one multiplication.


def word_problem(rng: random.Random) -> Problem:
    kind = rng.randrange(4)
    if kind == 0:
        speed, halves = rng.randrange(30, 130), rng.randrange(1, 13)
        hours = Fraction(halves, 2)
        dist = speed * hours
        q = f"A train travels at {speed} km/h for {fmt_decimal(hours)} hours. How far does it travel?"
        steps = ["Distance = speed × time.",
                 f"{speed} km/h × {fmt_decimal(hours)} h = {fmt_decimal(dist)} km."]
        return Problem("word_problem", q, steps, f"{fmt_decimal(dist)} km",
                       {"kind": "distance", "speed": speed, "hours": str(hours)})
    if kind == 1:
        km = Fraction(rng.randrange(1, 500), 10)
        q = f"Convert {fmt_decimal(km)} km to meters."
        steps = ["1 km = 1000 m.", f"{fmt_decimal(km)} × 1000 = {fmt_decimal(km * 1000)}."]
        return Problem("word_problem", q, steps, f"{fmt_decimal(km * 1000)} m",
                       {"kind": "km_to_m", "km": str(km)})
    if kind == 2:
        count, cents = rng.randrange(2, 25), rng.randrange(25, 2000)
        price = Fraction(cents, 100)
        total = count * price
        item = rng.choice(["notebooks", "apples", "tickets", "pens", "mugs", "books"])
        q = f"One of the {item} costs ${fmt_decimal(price)}. How much do {count} {item} cost?"
        steps = ["Total cost = number of items × price per item.",
                 f"{count} × ${fmt_decimal(price)} = ${fmt_decimal(total)}."]
        return Problem("word_problem", q, steps, f"${fmt_decimal(total)}",
                       {"kind": "cost", "count": count, "price": str(price)})
    length, width = rng.randrange(2, 60), rng.randrange(2, 60)
    q = f"A rectangular room is {length} m long and {width} m wide. What is its area?"
    steps = ["Area of a rectangle = length × width.", f"{length} m × {width} m = {length * width} m^2."]
    return Problem("word_problem", q, steps, f"{length * width} m^2",
                   {"kind": "area", "length": length, "width": width})
