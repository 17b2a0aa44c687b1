"""The integer toolkit of the IR: affine index expressions and exact integer arithmetic.

Everything the derivation, lowering and scheduling do over the integers is
here once: splitting an affine expression into coefficients, its integer
form, normal forms of ``e >= 0`` and ``e ≡ 0 (mod m)``, the range of an
expression over a box, ceiling division, solving ``a·u + r ≡ 0 (mod m)``,
substitution into a term's parts and C-order strides.
"""

from __future__ import annotations

import math
import functools
from functools import reduce
from typing import Mapping, Sequence

import sympy

from ..errors import IRError

# --- affine expressions ---------------------------------------------------------------------------------

def linear_parts(expr) -> tuple[dict[sympy.Expr, sympy.Rational], sympy.Rational]:
    """Split an affine expression into {index: coefficient} and a constant.

    Raises IRError when the expression is not affine with rational coefficients.
    """
    coefficients, constant = _linear_parts(expr)
    return dict(coefficients), constant


@functools.lru_cache(maxsize=1 << 16)
def _linear_parts(expr) -> tuple[dict[sympy.Expr, sympy.Rational], sympy.Rational]:
    """linear_parts, remembered: the passes ask for the same few thousand expressions'
    parts hundreds of thousands of times per package (the caller gets a copy of the dict)."""
    expr = sympy.sympify(expr)
    terms = _plain_terms(expr)
    if terms is None:
        expr = sympy.expand(expr)
        terms = expr.as_coefficients_dict().items()
    coefficients: dict[sympy.Expr, sympy.Rational] = {}
    constant = sympy.Integer(0)
    for factor, coefficient in terms:
        if not coefficient.is_Rational:
            raise IRError(f"index expression {expr} has a non-rational coefficient {coefficient}")
        if factor == 1:
            constant += coefficient
        elif isinstance(factor, (sympy.Idx, sympy.Symbol)):
            coefficients[factor] = coefficients.get(factor, 0) + coefficient
        else:
            raise IRError(f"index expression {expr} is not affine: term {factor}")
    return {k: v for k, v in coefficients.items() if v != 0}, constant


def _plain_terms(expr) -> list[tuple[sympy.Expr, sympy.Expr]] | None:
    """``(factor, coefficient)`` of each term of a sum already in expanded form (numbers,
    indices, number·index), read off directly; None for any other form, which
    sympy.expand first brings to it (expand took most of the time of code generation)."""
    terms = []
    for term in expr.args if expr.is_Add else (expr,):
        if term.is_Number:
            terms.append((sympy.S.One, term))
        elif isinstance(term, (sympy.Idx, sympy.Symbol)):
            terms.append((term, sympy.S.One))
        elif (term.is_Mul and len(term.args) == 2 and term.args[0].is_Number
              and isinstance(term.args[1], (sympy.Idx, sympy.Symbol))):
            terms.append((term.args[1], term.args[0]))
        else:
            return None
    return terms


@functools.lru_cache(maxsize=1 << 16)
def integer_form(expr) -> tuple[sympy.Expr, int]:
    """``(numerator, denominator)``: numerator has integer coefficients, expr = num / den."""
    coefficients, constant = linear_parts(expr)
    den = reduce(math.lcm, (int(c.q) for c in (*coefficients.values(), constant)), 1)
    expr = sympy.sympify(expr)
    if den == 1 and _plain_terms(expr) is not None:
        return expr, 1
    return sympy.expand(expr * den), den


def integer_coefficients(expr) -> tuple[dict, int]:
    coefficients, constant = linear_parts(expr)
    if constant.q != 1 or any(c.q != 1 for c in coefficients.values()):
        raise IRError(f"expected integer coefficients in {expr}")
    return {k: int(v) for k, v in coefficients.items()}, int(constant)


@functools.lru_cache(maxsize=1 << 16)
def normalize_constraint(expr) -> sympy.Expr:
    """The tightest integer form of ``expr >= 0``: integer, coprime coefficients."""
    num, _ = integer_form(expr)
    coefficients, constant = integer_coefficients(num)
    g = reduce(math.gcd, coefficients.values(), 0)
    if g > 1:
        return sum((c // g) * v for v, c in coefficients.items()) + constant // g
    return num


def normalize_congruence(expr, modulus: int) -> tuple[sympy.Expr, int]:
    """The simplest integer form of ``expr ≡ 0 (mod modulus)``; modulus 1 means always true."""
    num, den = integer_form(expr)
    modulus *= den
    coefficients, constant = integer_coefficients(num)
    coefficients = {v: c % modulus for v, c in coefficients.items() if c % modulus}
    constant %= modulus
    g = reduce(math.gcd, coefficients.values(), math.gcd(constant, modulus))
    modulus //= g
    expr = sum((c // g) * v for v, c in coefficients.items()) + constant // g
    return sympy.sympify(expr), modulus

def interval(expr, box: Mapping[sympy.Expr, tuple[int, int]]) -> tuple[int, int]:
    """Range of an integer affine expression over a box of index ranges."""
    coefficients, constant = integer_coefficients(expr)
    low = high = constant
    for var, c in coefficients.items():
        lo, hi = box[var]
        low += min(c * lo, c * hi)
        high += max(c * lo, c * hi)
    return low, high


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers, ``b > 0``."""
    return -(-a // b)


def solve_congruence(a: int, modulus: int) -> tuple[int, int, int]:
    """How ``a·u + r ≡ 0 (mod modulus)`` is solved for ``u``: ``(g, step, factor)`` with
    ``g = gcd(a, modulus)``.  A solution exists iff ``r ≡ 0 (mod g)``; then
    ``u ≡ factor·(r/g) (mod step)``, ``step = modulus/g``, ``factor = -(a/g)⁻¹ mod step``."""
    g = math.gcd(a, modulus)
    step = modulus // g
    return g, step, -pow(a // g, -1, step)


def substitute(mapping: Mapping, body: sympy.Expr, constraints: Sequence = (),
               congruences: Sequence = ()) -> tuple[sympy.Expr, list, list]:
    """``mapping`` applied to a term's parts: the body, and the constraints and congruences
    (expanded, so their coefficients stay readable by :func:`linear_parts`)."""
    if not mapping:
        return body, list(constraints), list(congruences)
    return (body.xreplace(mapping),
            [sympy.expand(sympy.sympify(c).xreplace(mapping)) for c in constraints],
            [(sympy.expand(sympy.sympify(e).xreplace(mapping)), m) for e, m in congruences])


def c_order_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Element strides of a C-order (row-major) array of ``shape``."""
    return tuple(math.prod(shape[t + 1:]) for t in range(len(shape)))
