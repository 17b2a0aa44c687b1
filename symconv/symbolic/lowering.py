"""Lowering: a term's domain as a loop nest.

Every constraint becomes a bound of the innermost loop it involves (or a
guard on the free indices), every congruence a loop step with a residue.
The printers, the reference interpreter and the C emitter all read this one
loop nest, so what ``explain`` shows is what runs.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import sympy

from .affine import (ceil_div, integer_coefficients, integer_form, interval,
                     normalize_congruence, normalize_constraint, solve_congruence)
from .ir import Array, IndexSum, Term, index_range, rebased

# --- lowering: domain -> loop nest ---------------------------------------------------------------

@dataclass(frozen=True)
class Condition:
    """``expr >= 0`` (modulus 0) or ``expr ≡ 0 (mod modulus)``; expr has integer coefficients."""

    expr: sympy.Expr
    modulus: int = 0


@dataclass(frozen=True)
class Bound:
    """``ceil(num / den)`` as a lower bound, ``floor(num / den)`` as an upper bound."""

    num: sympy.Expr
    den: int


@dataclass(frozen=True)
class Loop:
    """One loop: index from max(lower) to min(upper) inclusive, on the lattice index ≡ residue
    (mod step); ``checks`` are tested in the body before any inner loop."""

    index: sympy.Idx
    lower: tuple[Bound, ...]
    upper: tuple[Bound, ...]
    step: int = 1
    residue: sympy.Expr = sympy.Integer(0)
    checks: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class Decision:
    """Where lowering put one constraint (``expr >= 0``) or congruence (``expr ≡ 0 mod
    modulus``) of a term: ``kind`` is one of DECISION_KINDS; ``index`` the loop it went
    to, with the ``bound`` it became or the ``step`` and ``residue`` it fixed."""

    kind: str
    condition: Condition
    index: sympy.Idx | None = None
    bound: Bound | None = None
    step: int = 1
    residue: sympy.Expr = sympy.Integer(0)


DECISION_KINDS = {
    "fixed": "an index with a single value is replaced by it",
    "lower bound": "a lower bound of the innermost loop the constraint involves",
    "upper bound": "an upper bound of the innermost loop the constraint involves",
    "guard": "on the free indices only: tested once per output element",
    "always": "true over the whole box of indices: dropped",
    "step": "the innermost loop it involves runs with a step from a residue",
    "check": "that loop has a step already: tested in its body",
    "split": "its gcd with the loop's coefficient leaves a congruence on outer indices",
}


@dataclass(frozen=True)
class LoopNest:
    """A lowered term: guards on the free indices, loops outermost first, then the body,
    whose reads of the ``zero_outside`` arrays give 0 outside their shape; ``decisions``
    say where each of the term's constraints and congruences went."""

    guards: tuple[Condition, ...]
    loops: tuple[Loop, ...]
    body: sympy.Expr
    zero_outside: tuple[str, ...] = ()
    decisions: tuple[Decision, ...] = field(default=(), compare=False)


def value_range(expr, box: Mapping[sympy.Expr, tuple[int, int]]) -> tuple[int, int]:
    """Range of an integer-valued affine expression (exact quotients allowed) over a box."""
    num, den = integer_form(expr)
    low, high = interval(num, box)
    return ceil_div(low, den), high // den


def nest_box(nest: LoopNest, free: Sequence[sympy.Idx]) -> dict[sympy.Expr, tuple[int, int]]:
    """Every index of a loop nest with its declared range: a box containing its domain."""
    return {v: index_range(v) for v in (*free, *(loop.index for loop in nest.loops))}




def lower(term: Term, free: Sequence[sympy.Idx]) -> LoopNest | None:
    """The loop nest of one term (None when its domain is provably empty); remembered,
    since scheduling, emitting and printing each lower the same terms."""
    return _lower(term, tuple(free))


@functools.lru_cache(maxsize=4096)
def _lower(term: Term, free: tuple[sympy.Idx, ...]) -> LoopNest | None:
    """The work of lower.

    Single-valued indices are substituted; each congruence fixes a step and
    residue for the innermost loop it involves (splitting off a gcd condition
    on the outer indices when needed); each constraint becomes a bound of the
    innermost loop it involves, or a guard when it involves free indices only.
    Bounds and guards that hold over the whole index box are dropped.
    """
    fixed = {v: v.lower for v in term.indices if v.lower == v.upper}
    decisions = [Decision("fixed", Condition(v - value), v) for v, value in fixed.items()]
    variables = [v for v in term.indices if v not in fixed]
    # xreplace, not subs: the same simultaneous replacement of index symbols, without
    # subs' algebraic matching (which took most of a compile's lowering time)
    body = term.body.xreplace(fixed) if fixed else term.body
    depth = {v: d for d, v in enumerate(variables)}
    box = {v: index_range(v) for v in (*free, *variables)}

    constraints = [sympy.sympify(e).xreplace(fixed) for e in term.constraints]
    stated = len(constraints)          # the term's own; then each loop's range
    for v in variables:
        lo, hi = index_range(v)
        constraints += [v - lo, hi - v]

    guards: list[Condition] = []
    checks: dict[sympy.Expr, list[Condition]] = {v: [] for v in variables}
    steps: dict[sympy.Expr, tuple[int, sympy.Expr]] = {}
    pending = [normalize_congruence(sympy.sympify(e).xreplace(fixed), m)
               for e, m in term.congruences]
    while pending:
        expr, modulus = pending.pop(0)
        if modulus == 1:
            continue
        coefficients, constant = integer_coefficients(expr)
        inner = [v for v in coefficients if v in depth]
        if not coefficients:
            if constant % modulus:
                return None
            continue
        condition = Condition(expr, modulus)
        if not inner:
            guards.append(condition)
            decisions.append(Decision("guard", condition))
            continue
        u = max(inner, key=depth.__getitem__)
        c = coefficients[u] % modulus
        rest = expr - coefficients[u] * u
        g, reduced, factor = solve_congruence(c, modulus)
        if g > 1:
            pending.append(normalize_congruence(rest, g))
            decisions.append(Decision("split", condition, u, step=g))
        if reduced == 1:
            continue
        residue = sympy.expand(factor * rest / g)
        if u in steps:
            checks[u].append(condition)
            decisions.append(Decision("check", condition, u))
        else:
            steps[u] = (reduced, residue)
            decisions.append(Decision("step", condition, u, step=reduced, residue=residue))

    lower_bounds: dict[sympy.Expr, list[Bound]] = {v: [] for v in variables}
    upper_bounds: dict[sympy.Expr, list[Bound]] = {v: [] for v in variables}
    for number, expr in enumerate(constraints):
        expr = normalize_constraint(expr)
        coefficients, constant = integer_coefficients(expr)
        inner = [v for v in coefficients if v in depth]
        decide = decisions.append if number < stated else (lambda decision: None)
        if not inner:
            low, high = interval(expr, box)
            if high < 0:
                return None
            if low < 0:
                guards.append(Condition(expr))
            decide(Decision("guard" if low < 0 else "always", Condition(expr)))
            continue
        u = max(inner, key=depth.__getitem__)
        a = coefficients[u]
        rest = expr - a * u
        if a > 0:
            bound = Bound(sympy.expand(-rest), a)
            lower_bounds[u].append(bound)
        else:
            bound = Bound(sympy.expand(rest), -a)
            upper_bounds[u].append(bound)
        decide(Decision("lower bound" if a > 0 else "upper bound", Condition(expr), u, bound))

    loops = []
    for v in variables:
        lows = _prune(lower_bounds[v], box, is_lower=True)
        highs = _prune(upper_bounds[v], box, is_lower=False)
        if lows[0].num.is_Integer and highs[0].num.is_Integer and \
                ceil_div(int(lows[0].num), lows[0].den) > int(highs[0].num) // highs[0].den:
            return None
        step, residue = steps.get(v, (1, sympy.Integer(0)))
        loops.append(Loop(v, lows, highs, step, residue, tuple(checks[v])))
    return LoopNest(tuple(dict.fromkeys(guards)), tuple(loops), body, term.zero_outside,
                    tuple(decisions))


def _prune(bounds: list[Bound], box, is_lower: bool) -> tuple[Bound, ...]:
    """Merge constant bounds into one and drop bounds implied by it over the whole box."""
    constants = [b for b in bounds if b.num.is_Integer]
    values = [ceil_div(int(b.num), b.den) if is_lower else int(b.num) // b.den for b in constants]
    tightest = max(values) if is_lower else min(values)
    kept = [Bound(sympy.Integer(tightest), 1)]
    for b in bounds:
        if b.num.is_Integer:
            continue
        low, high = interval(b.num, box)
        implied = (ceil_div(high, b.den) <= tightest) if is_lower else (low // b.den >= tightest)
        if not implied and b not in kept:
            kept.append(b)
    return tuple(kept)


def loop_nests(fn: IndexSum) -> list[LoopNest]:
    """The lowered terms of a sum, empty ones dropped."""
    nests = (lower(term, fn.indices) for term in fn.terms)
    return [nest for nest in nests if nest is not None]


def canonical_text(function) -> tuple[str, tuple[int, ...]]:
    """An ``ir.SumFunction`` as its lowered loop nests (what its C is generated from) with its
    arrays named by position, and the order of its arguments those positions follow: the
    order giving the least text.  Two functions with the same text compute the same thing
    from arguments passed in their orders, whatever the arrays are called and however their
    domains were first written."""
    nests = loop_nests(function.sum)

    def text(order) -> str:
        names = {function.args[k].name: f"a{i}" for i, k in enumerate(order)}
        names[function.sum.output.name] = "out"
        arrays = {a.name: Array(names[a.name], a.shape)
                  for a in (*function.args, function.sum.output)}
        lowered = [(tuple((c.expr, c.modulus) for c in nest.guards),
                    tuple((loop.index, tuple((b.num, b.den) for b in loop.lower),
                           tuple((b.num, b.den) for b in loop.upper), loop.step, loop.residue,
                           tuple((c.expr, c.modulus) for c in loop.checks))
                          for loop in nest.loops),
                    rebased(nest.body, arrays),
                    tuple(sorted(names[a] for a in nest.zero_outside)))
                   for nest in nests]
        batch = function.batch and (function.batch.extent, function.batch.index,
                                    tuple(sorted(names[a] for a in function.batch.arrays
                                                 if a in names)))
        shapes = [function.args[k].shape for k in order]
        return sympy.srepr((function.sum.output.shape, function.sum.indices, lowered)) + \
            repr((shapes, batch))
    return min((text(order), order)
               for order in itertools.permutations(range(len(function.args))))
