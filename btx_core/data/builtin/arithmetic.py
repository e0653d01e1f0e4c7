"""Arithmetic families: column addition and subtraction (carries and borrows shown), long
multiplication and division, order of operations, fractions, percentages, GCD/LCM, powers.

Each family is a function `rng -> Problem`; every step is an equation a reader can check.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction

from btx_core.data.builtin.mathtext import Problem, fmt, fmt_decimal

# ---------------------------------------------------------------------------------------------
# Column arithmetic: the carries and borrows are the point, so every column is a step.

PLACES = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands"]


def addition(rng: random.Random) -> Problem:
    a, b = rng.randrange(100, 100_000), rng.randrange(100, 100_000)
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        new_carry = total // 10
        tail = f", write {total % 10}" + (f", carry {new_carry}" if new_carry else "")
        steps.append(f"{PLACES[i].capitalize()}: {terms} = {total}{tail}.")
        carry = new_carry
    if carry:
        steps.append(f"Bring down the final carry {carry}.")
    steps.append(f"So {a} + {b} = {a + b}.")
    return Problem("addition", f"Compute {a} + {b}.", steps, str(a + b), {"a": a, "b": b})


def subtraction(rng: random.Random) -> Problem:
    a, b = sorted((rng.randrange(100, 100_000), rng.randrange(100, 100_000)), reverse=True)
    da, db = str(a)[::-1], str(b)[::-1]
    steps, borrow = [], 0
    for i in range(len(da)):
        x, y = int(da[i]), int(db[i]) if i < len(db) else 0
        lent = f" - {borrow}" if borrow else ""
        if x - borrow - y < 0:
            value = 10 + x - borrow - y
            steps.append(f"{PLACES[i].capitalize()}: {x}{lent} is less than {y}, so borrow 1: "
                         f"10 + {x}{lent} - {y} = {value}.")
            borrow = 1
        else:
            value = x - borrow - y
            steps.append(f"{PLACES[i].capitalize()}: {x}{lent} - {y} = {value}.")
            borrow = 0
    steps.append(f"So {a} - {b} = {a - b}.")
    return Problem("subtraction", f"Compute {a} - {b}.", steps, str(a - b), {"a": a, "b": b})


def multiplication(rng: random.Random) -> Problem:
    a, b = rng.randrange(12, 1000), rng.randrange(12, 100)
    steps, partials = [], []
    for i, digit in enumerate(str(b)[::-1]):
        if digit == "0":
            continue
        part = int(digit) * 10**i
        partials.append(a * part)
        steps.append(f"{a} × {part} = {a * part}")
    if len(partials) > 1:
        steps.append("Add the partial products: " + " + ".join(map(str, partials)) + f" = {a * b}")
    return Problem("multiplication", f"Compute {a} × {b}.", steps, str(a * b), {"a": a, "b": b})


def division(rng: random.Random) -> Problem:
    divisor = rng.randrange(3, 40)
    n = rng.randrange(divisor * 10, 100_000)
    steps, rem, quotient = [], 0, ""
    for digit in str(n):
        current = rem * 10 + int(digit)
        q = current // divisor
        if quotient or q:
            steps.append(f"Bring down {digit}: {current} ÷ {divisor} gives {q}; "
                         f"{divisor} × {q} = {divisor * q}, and {current} - {divisor * q} = "
                         f"{current - divisor * q}.")
            quotient += str(q)
        rem = current - divisor * q
    q_total, r_total = divmod(n, divisor)
    steps.append(f"Check: {divisor} × {q_total} + {r_total} = {n}.")
    answer = f"{q_total} remainder {r_total}" if r_total else str(q_total)
    return Problem("division", f"Divide {n} by {divisor}.", steps, answer, {"n": n, "d": divisor})


# ---------------------------------------------------------------------------------------------
# Order of operations: a random expression tree, reduced one operation at a time.

PRECEDENCE = {"+": 1, "-": 1, "×": 2, "÷": 2, "^": 3}


@dataclass
class Node:
    op: str | None = None  # None for a number
    value: int = 0
    left: Node | None = None
    right: Node | None = None


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "×":
        return a * b
    if op == "÷":
        return a // b  # exact: the generator makes the dividend a multiple
    return a**b


def _tree(rng: random.Random, depth: int) -> Node:
    if depth == 0 or rng.random() < 0.25:
        return Node(value=rng.randrange(1, 13))
    op = rng.choice(["+", "-", "×", "÷", "^"] if depth == 1 else ["+", "-", "×", "÷"])
    if op == "^":  # small powers of a number keep the values readable
        return Node("^", left=Node(value=rng.randrange(2, 6)), right=Node(value=rng.randrange(2, 4)))
    right = _tree(rng, depth - 1)
    if op == "÷":  # exact division: the dividend is a multiple of the divisor's value
        divisor = _value(right)
        if divisor == 0 or divisor > 20:
            return Node("+", left=Node(value=rng.randrange(1, 13)), right=right)
        return Node("÷", left=Node(value=divisor * rng.randrange(1, 10)), right=right)
    return Node(op, left=_tree(rng, depth - 1), right=right)


def _value(node: Node) -> int:
    if node.op is None:
        return node.value
    return _apply(node.op, _value(node.left), _value(node.right))


def _render(node: Node) -> str:
    if node.op is None:
        return str(node.value)
    left, right = _render(node.left), _render(node.right)
    # Parentheses exactly where the tree departs from the usual precedence and left-to-right order.
    if node.left.op and PRECEDENCE[node.left.op] < PRECEDENCE[node.op]:
        left = f"({left})"
    if node.right.op and PRECEDENCE[node.right.op] <= PRECEDENCE[node.op]:
        right = f"({right})"
    return f"{left}^{right}" if node.op == "^" else f"{left} {node.op} {right}"


def _next_reduction(node: Node) -> Node:
    """The operation a person does next: innermost parentheses, then ^, then × ÷, then + -,
    leftmost first."""
    candidates: list[tuple[int, int, int, Node]] = []

    def walk(n: Node, parens: int) -> None:
        if n.op is None:
            return
        for child in (n.left, n.right):
            if child.op is not None:
                bracketed = (PRECEDENCE[child.op] < PRECEDENCE[n.op] if child is n.left
                             else PRECEDENCE[child.op] <= PRECEDENCE[n.op])
                walk(child, parens + bracketed)
        if n.left.op is None and n.right.op is None:
            candidates.append((-parens, -PRECEDENCE[n.op], len(candidates), n))

    walk(node, 0)
    return min(candidates, key=lambda c: c[:3])[3]


def order_of_operations(rng: random.Random) -> Problem:
    while True:
        tree = _tree(rng, rng.choice([2, 3]))
        if tree.op is None or not _all_small(tree):
            continue
        break
    question = _render(tree)
    steps = []
    while tree.op is not None:
        node = _next_reduction(tree)
        a, b, op = node.left.value, node.right.value, node.op
        result = _apply(op, a, b)
        shown = f"{a}^{b}" if op == "^" else f"{a} {op} {b}"
        node.op, node.value, node.left, node.right = None, result, None, None
        steps.append(f"{shown} = {result}, giving {_render(tree)}" if tree.op else f"{shown} = {result}")
    return Problem("order_of_operations", f"Evaluate {question}.", steps, str(tree.value),
                   {"expression": question})


def _all_small(node: Node) -> bool:
    """Every intermediate value non-negative and under 10,000 (negatives need more notation)."""
    if node.op is None:
        return True
    value = _value(node)
    return 0 <= value < 10_000 and _all_small(node.left) and _all_small(node.right)


# ---------------------------------------------------------------------------------------------
# Fractions and percentages.


def _random_fraction(rng: random.Random) -> Fraction:
    den = rng.randrange(2, 13)
    return Fraction(rng.randrange(1, 3 * den), den)


def fractions(rng: random.Random) -> Problem:
    a, b = _random_fraction(rng), _random_fraction(rng)
    op = rng.choice("+-×÷")
    steps = []
    if op in "+-":
        common = math.lcm(a.denominator, b.denominator)
        na, nb = a.numerator * (common // a.denominator), b.numerator * (common // b.denominator)
        raw_num = na + nb if op == "+" else na - nb
        steps.append(f"The least common denominator of {a.denominator} and {b.denominator} is {common}.")
        steps.append(f"Rewrite: {fmt(a)} = {na}/{common} and {fmt(b)} = {nb}/{common}.")
        steps.append(f"{'Add' if op == '+' else 'Subtract'} the numerators: "
                     f"{na} {op} {nb} = {raw_num}, so the result is {raw_num}/{common}.")
        raw = (raw_num, common)
    elif op == "×":
        raw = (a.numerator * b.numerator, a.denominator * b.denominator)
        steps.append(f"Multiply numerators and denominators: {a.numerator} × {b.numerator} = {raw[0]} "
                     f"and {a.denominator} × {b.denominator} = {raw[1]}, giving {raw[0]}/{raw[1]}.")
    else:
        steps.append(f"Dividing by {fmt(b)} is multiplying by its reciprocal {b.denominator}/{b.numerator}.")
        raw = (a.numerator * b.denominator, a.denominator * b.numerator)
        steps.append(f"Multiply: {a.numerator} × {b.denominator} = {raw[0]} and "
                     f"{a.denominator} × {b.numerator} = {raw[1]}, giving {raw[0]}/{raw[1]}.")
    result = Fraction(*raw)
    divisor = math.gcd(*raw)
    if divisor > 1 and raw[0] != 0:
        steps.append(f"Simplify: divide the numerator and denominator by their GCD {divisor}: "
                     f"{raw[0]}/{raw[1]} = {fmt(result)}.")
    # "7/4 ÷ 3/2" would read as ((7/4) ÷ 3) / 2 by the precedence rules: bracket the fractions.
    shown = [fmt(v) if op in "+-" or v.denominator == 1 else f"({fmt(v)})" for v in (a, b)]
    return Problem("fractions", f"Compute {shown[0]} {op} {shown[1]}.", steps, fmt(result),
                   {"a": str(a), "b": str(b), "op": op})


def percentages(rng: random.Random) -> Problem:
    kind = rng.randrange(3)
    if kind == 0:
        pct = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 45, 60, 75, 80, 125])
        base = rng.randrange(4, 200) * 4  # a multiple of 4 keeps every answer a short decimal
        value = Fraction(pct * base, 100)
        steps = [f"{pct}% means {pct}/100.", f"{pct}/100 × {base} = {pct * base}/100 = {fmt_decimal(value)}."]
        return Problem("percentages", f"What is {pct}% of {base}?", steps, fmt_decimal(value),
                       {"kind": "of", "pct": pct, "base": base})
    if kind == 1:
        whole = rng.choice([20, 25, 40, 50, 80, 200, 250, 400, 500])
        part = rng.randrange(1, whole + 1)
        pct = Fraction(part * 100, whole)
        steps = [f"Divide the part by the whole: {part}/{whole}.",
                 f"Multiply by 100: {part} × 100 / {whole} = {fmt_decimal(pct)}."]
        return Problem("percentages", f"{part} is what percent of {whole}?", steps,
                       f"{fmt_decimal(pct)}%", {"kind": "what_percent", "part": part, "whole": whole})
    price, pct = rng.randrange(10, 500), rng.choice([5, 10, 15, 20, 25, 30, 40, 50])
    up = rng.random() < 0.5
    change = Fraction(price * pct, 100)
    new = price + change if up else price - change
    word = "increases" if up else "decreases"
    steps = [f"The change is {pct}% of ${price}: {pct}/100 × {price} = ${fmt_decimal(change)}.",
             f"The new price is ${price} {'+' if up else '-'} ${fmt_decimal(change)} = ${fmt_decimal(new)}."]
    return Problem("percentages", f"A price of ${price} {word} by {pct}%. What is the new price?",
                   steps, f"${fmt_decimal(new)}", {"kind": "change", "price": price, "pct": pct, "up": up})


# ---------------------------------------------------------------------------------------------
# Number theory and powers.


def gcd_lcm(rng: random.Random) -> Problem:
    g = rng.randrange(2, 30)
    a, b = g * rng.randrange(2, 40), g * rng.randrange(2, 40)
    if a < b:
        a, b = b, a
    steps, x, y = ["Use the Euclidean algorithm."], a, b
    while y:
        q, r = divmod(x, y)
        steps.append(f"{q} × {y} + {r} = {x}")
        x, y = y, r
    gcd = x
    lcm = a * b // gcd
    steps.append(f"The last non-zero remainder is the GCD: {gcd}.")
    steps.append(f"LCM = {a} × {b} ÷ {gcd} = {lcm}.")
    return Problem("gcd_lcm", f"Find the GCD and LCM of {a} and {b}.", steps,
                   f"GCD = {gcd}, LCM = {lcm}", {"a": a, "b": b})


def powers(rng: random.Random) -> Problem:
    kind = rng.randrange(5)
    if kind == 0:  # repeated multiplication, values kept under ten million
        base = rng.randrange(2, 31)
        n = rng.randrange(2, min(8, int(math.log(10**7, base))) + 1)
        steps, value = [], base
        for _ in range(n - 1):
            steps.append(f"{value} × {base} = {value * base}")
            value *= base
        return Problem("powers", f"Compute {base}^{n}.", steps, str(value), {"expression": f"{base}^{n}"})
    base = rng.randrange(2, 10)
    m, n = rng.randrange(1, 6), rng.randrange(1, 5)
    if kind == 1:
        m, n = min(m, 4), min(n, 3)
        expr, exp = f"{base}^{m} × {base}^{n}", m + n
        rule = f"Same base, so add the exponents: {m} + {n} = {exp}."
    elif kind == 2:
        m += n
        expr, exp = f"{base}^{m} ÷ {base}^{n}", m - n
        rule = f"Same base, so subtract the exponents: {m} - {n} = {exp}."
    elif kind == 3:
        base, m, n = rng.randrange(2, 6), rng.randrange(2, 4), rng.randrange(2, 4)
        expr, exp = f"({base}^{m})^{n}", m * n
        rule = f"A power of a power multiplies the exponents: {m} × {n} = {exp}."
    else:
        n = rng.randrange(1, 5)
        expr = f"{base}^-{n}"
        steps = [f"A negative exponent means the reciprocal: {expr} = 1/{base}^{n}.",
                 f"{base}^{n} = {base**n}, so {expr} = 1/{base**n}."]
        return Problem("powers", f"Compute {expr}.", steps, f"1/{base**n}", {"expression": expr})
    steps = [rule, f"{expr} = {base}^{exp} = {base**exp}"]
    return Problem("powers", f"Compute {expr}.", steps, str(base**exp), {"expression": expr})
