"""The index-sum IR.

An :class:`IndexSum` defines one output array element by element::

    out[free] = term_1 + term_2 + ...

Each :class:`Term` sums a SymPy body over its own summation indices (SymPy
``Idx`` objects with constant ranges), restricted to a domain:

* ``constraints``: affine expressions that must be ``>= 0`` (the bounds a
  derivation leaves);
* ``congruences``: pairs ``(e, m)`` meaning ``e ≡ 0 (mod m)`` (the stride
  conditions a derivation produces);
* ``zero_outside``: arrays that read as 0 outside their shape (zero padding):
  such a read still takes part in the sum, as a zero, exactly like a padded
  array in the textbook definition (so ``inf * 0`` gives ``nan`` there).

Array accesses in the body are SymPy ``Indexed`` objects whose indices are
affine in the index variables, with rational coefficients allowed where the
congruences make the value an integer (``(j + 1 - k)/2``).

:func:`lower` turns a term's domain into a loop nest: every constraint
becomes a bound of the innermost loop it involves (or a guard on the free
indices), every congruence a loop step with a residue.  The printers, the
reference interpreter :func:`evaluate` and the C emitter all read that one
loop nest, so what ``explain`` shows is what runs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import reduce
from typing import Mapping, Sequence

import numpy as np
import sympy
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

from .spec import IRError  # noqa: F401  (re-exported: the IR's errors)


# --- arrays and indices --------------------------------------------------------------------------

@dataclass(frozen=True)
class Array:
    """A named dense array with a constant shape (C order)."""

    name: str
    shape: tuple[int, ...]

    @property
    def base(self) -> sympy.IndexedBase:
        return sympy.IndexedBase(self.name, shape=self.shape)

    def __getitem__(self, indices) -> sympy.Indexed:
        return self.base[indices]


def index(name: str, extent: int) -> sympy.Idx:
    """An index variable ranging over ``0 .. extent - 1``."""
    return sympy.Idx(name, (0, extent - 1))


def index_range(idx: sympy.Idx) -> tuple[int, int]:
    """The constant inclusive range of an index."""
    return int(idx.lower), int(idx.upper)


def accesses(expr: sympy.Expr) -> list[sympy.Indexed]:
    """The distinct array accesses in an expression, in a deterministic order."""
    return sorted(expr.atoms(sympy.Indexed), key=sympy.default_sort_key)


def array_of(access: sympy.Indexed) -> Array:
    base = access.base
    return Array(str(base.label), tuple(int(s) for s in base.shape))


# --- affine expressions --------------------------------------------------------------------------

def linear_parts(expr) -> tuple[dict[sympy.Expr, sympy.Rational], sympy.Rational]:
    """Split an affine expression into {index: coefficient} and a constant.

    Raises IRError when the expression is not affine with rational coefficients.
    """
    expr = sympy.expand(sympy.sympify(expr))
    coefficients: dict[sympy.Expr, sympy.Rational] = {}
    constant = sympy.Integer(0)
    for factor, coefficient in expr.as_coefficients_dict().items():
        if not coefficient.is_Rational:
            raise IRError(f"index expression {expr} has a non-rational coefficient {coefficient}")
        if factor == 1:
            constant += coefficient
        elif isinstance(factor, (sympy.Idx, sympy.Symbol)):
            coefficients[factor] = coefficients.get(factor, 0) + coefficient
        else:
            raise IRError(f"index expression {expr} is not affine: term {factor}")
    return {k: v for k, v in coefficients.items() if v != 0}, constant


def integer_form(expr) -> tuple[sympy.Expr, int]:
    """``(numerator, denominator)``: numerator has integer coefficients, expr = num / den."""
    coefficients, constant = linear_parts(expr)
    den = reduce(math.lcm, (int(c.q) for c in (*coefficients.values(), constant)), 1)
    return sympy.expand(expr * den), den


def _integer_coefficients(expr) -> tuple[dict, int]:
    coefficients, constant = linear_parts(expr)
    if constant.q != 1 or any(c.q != 1 for c in coefficients.values()):
        raise IRError(f"expected integer coefficients in {expr}")
    return {k: int(v) for k, v in coefficients.items()}, int(constant)


def normalize_constraint(expr) -> sympy.Expr:
    """The tightest integer form of ``expr >= 0``: integer, coprime coefficients."""
    num, _ = integer_form(expr)
    coefficients, constant = _integer_coefficients(num)
    g = reduce(math.gcd, coefficients.values(), 0)
    if g > 1:
        return sum((c // g) * v for v, c in coefficients.items()) + constant // g
    return num


def normalize_congruence(expr, modulus: int) -> tuple[sympy.Expr, int]:
    """The simplest integer form of ``expr ≡ 0 (mod modulus)``; modulus 1 means always true."""
    num, den = integer_form(expr)
    modulus *= den
    coefficients, constant = _integer_coefficients(num)
    coefficients = {v: c % modulus for v, c in coefficients.items() if c % modulus}
    constant %= modulus
    g = reduce(math.gcd, coefficients.values(), math.gcd(constant, modulus))
    modulus //= g
    expr = sum((c // g) * v for v, c in coefficients.items()) + constant // g
    return sympy.sympify(expr), modulus


# --- the IR itself -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    """``Σ_{indices} body`` over the domain given by constraints and congruences."""

    indices: tuple[sympy.Idx, ...]
    body: sympy.Expr
    constraints: tuple[sympy.Expr, ...] = ()
    congruences: tuple[tuple[sympy.Expr, int], ...] = ()
    zero_outside: tuple[str, ...] = ()


@dataclass(frozen=True)
class IndexSum:
    """``output[indices] = Σ terms``; every output element is written exactly once."""

    output: Array
    indices: tuple[sympy.Idx, ...]
    terms: tuple[Term, ...]

    def __post_init__(self) -> None:
        check_index_sum(self)

    @property
    def inputs(self) -> list[Array]:
        """The arrays the terms read, sorted by name."""
        found = {array_of(a) for term in self.terms for a in accesses(term.body)}
        return sorted(found, key=lambda a: a.name)

    def __str__(self) -> str:
        return to_text(self)


def check_index_sum(fn: IndexSum) -> None:
    """Reject malformed sums with an error that names the bad part."""
    if len(fn.indices) != len(fn.output.shape):
        raise IRError(f"{fn.output.name}: {len(fn.indices)} free indices for a "
                      f"{len(fn.output.shape)}-d output")
    for idx, extent in zip(fn.indices, fn.output.shape):
        if index_range(idx) != (0, extent - 1):
            raise IRError(f"{fn.output.name}: free index {idx} ranges over {index_range(idx)}, "
                          f"expected (0, {extent - 1}) to cover the output")
    if len(set(fn.indices)) != len(fn.indices):
        raise IRError(f"{fn.output.name}: repeated free index in {fn.indices}")
    for number, term in enumerate(fn.terms):
        where = f"{fn.output.name}, term {number} ({term.body})"
        bound = set(fn.indices) | set(term.indices)
        if set(term.indices) & set(fn.indices):
            raise IRError(f"{where}: a summation index is also a free index")
        labels = {a.base.label for a in accesses(term.body)}
        unbound = {s for s in term.body.free_symbols
                   if isinstance(s, (sympy.Idx, sympy.Symbol)) and s not in labels} - bound
        if unbound:
            raise IRError(f"{where}: unbound index {', '.join(sorted(map(str, unbound)))}")
        for access in accesses(term.body):
            array = array_of(access)
            if len(access.indices) != len(array.shape):
                raise IRError(f"{where}: {access} has {len(access.indices)} indices for a "
                              f"{len(array.shape)}-d array")
            for position in access.indices:
                try:
                    linear_parts(position)
                except IRError as error:
                    raise IRError(f"{where}: in {access}: {error}") from None
        read = {str(a.base.label) for a in accesses(term.body)}
        if not set(term.zero_outside) <= read:
            raise IRError(f"{where}: zero_outside names {sorted(set(term.zero_outside) - read)} "
                          f"which the term does not read")
        for expr in (*term.constraints, *(e for e, _ in term.congruences)):
            if not sympy.sympify(expr).free_symbols <= bound:
                raise IRError(f"{where}: condition {expr} uses an unbound index")
            linear_parts(expr)


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
class LoopNest:
    """A lowered term: guards on the free indices, loops outermost first, then the body,
    whose reads of the ``zero_outside`` arrays give 0 outside their shape."""

    guards: tuple[Condition, ...]
    loops: tuple[Loop, ...]
    body: sympy.Expr
    zero_outside: tuple[str, ...] = ()


def value_range(expr, box: Mapping[sympy.Expr, tuple[int, int]]) -> tuple[int, int]:
    """Range of an integer-valued affine expression (exact quotients allowed) over a box."""
    num, den = integer_form(expr)
    low, high = _interval(num, box)
    return _ceil_div(low, den), high // den


def nest_box(nest: LoopNest, free: Sequence[sympy.Idx]) -> dict[sympy.Expr, tuple[int, int]]:
    """Every index of a loop nest with its declared range: a box containing its domain."""
    return {v: index_range(v) for v in (*free, *(loop.index for loop in nest.loops))}


def _interval(expr, box: Mapping[sympy.Expr, tuple[int, int]]) -> tuple[int, int]:
    """Range of an integer affine expression over a box of index ranges."""
    coefficients, constant = _integer_coefficients(expr)
    low = high = constant
    for var, c in coefficients.items():
        lo, hi = box[var]
        low += min(c * lo, c * hi)
        high += max(c * lo, c * hi)
    return low, high


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def lower(term: Term, free: Sequence[sympy.Idx]) -> LoopNest | None:
    """The loop nest of one term (None when its domain is provably empty).

    Single-valued indices are substituted; each congruence fixes a step and
    residue for the innermost loop it involves (splitting off a gcd condition
    on the outer indices when needed); each constraint becomes a bound of the
    innermost loop it involves, or a guard when it involves free indices only.
    Bounds and guards that hold over the whole index box are dropped.
    """
    fixed = {v: v.lower for v in term.indices if v.lower == v.upper}
    variables = [v for v in term.indices if v not in fixed]
    body = term.body.subs(fixed, simultaneous=True) if fixed else term.body
    depth = {v: d for d, v in enumerate(variables)}
    box = {v: index_range(v) for v in (*free, *variables)}

    constraints = [sympy.sympify(e).subs(fixed) for e in term.constraints]
    for v in variables:
        lo, hi = index_range(v)
        constraints += [v - lo, hi - v]

    guards: list[Condition] = []
    checks: dict[sympy.Expr, list[Condition]] = {v: [] for v in variables}
    steps: dict[sympy.Expr, tuple[int, sympy.Expr]] = {}
    pending = [normalize_congruence(sympy.sympify(e).subs(fixed), m) for e, m in term.congruences]
    while pending:
        expr, modulus = pending.pop(0)
        if modulus == 1:
            continue
        coefficients, constant = _integer_coefficients(expr)
        inner = [v for v in coefficients if v in depth]
        if not coefficients:
            if constant % modulus:
                return None
            continue
        if not inner:
            guards.append(Condition(expr, modulus))
            continue
        u = max(inner, key=depth.__getitem__)
        c = coefficients[u] % modulus
        rest = expr - coefficients[u] * u
        g = math.gcd(c, modulus)
        if g > 1:
            pending.append(normalize_congruence(rest, g))
        reduced = modulus // g
        if reduced == 1:
            continue
        residue = sympy.expand(-pow(c // g, -1, reduced) * rest / g)
        if u in steps:
            checks[u].append(Condition(expr, modulus))
        else:
            steps[u] = (reduced, residue)

    lower_bounds: dict[sympy.Expr, list[Bound]] = {v: [] for v in variables}
    upper_bounds: dict[sympy.Expr, list[Bound]] = {v: [] for v in variables}
    for expr in constraints:
        expr = normalize_constraint(expr)
        coefficients, constant = _integer_coefficients(expr)
        inner = [v for v in coefficients if v in depth]
        if not inner:
            low, high = _interval(expr, box)
            if high < 0:
                return None
            if low < 0:
                guards.append(Condition(expr))
            continue
        u = max(inner, key=depth.__getitem__)
        a = coefficients[u]
        rest = expr - a * u
        if a > 0:
            lower_bounds[u].append(Bound(sympy.expand(-rest), a))
        else:
            upper_bounds[u].append(Bound(sympy.expand(rest), -a))

    loops = []
    for v in variables:
        lows = _prune(lower_bounds[v], box, is_lower=True)
        highs = _prune(upper_bounds[v], box, is_lower=False)
        if lows[0].num.is_Integer and highs[0].num.is_Integer and \
                _ceil_div(int(lows[0].num), lows[0].den) > int(highs[0].num) // highs[0].den:
            return None
        step, residue = steps.get(v, (1, sympy.Integer(0)))
        loops.append(Loop(v, lows, highs, step, residue, tuple(checks[v])))
    return LoopNest(tuple(dict.fromkeys(guards)), tuple(loops), body, term.zero_outside)


def _prune(bounds: list[Bound], box, is_lower: bool) -> tuple[Bound, ...]:
    """Merge constant bounds into one and drop bounds implied by it over the whole box."""
    constants = [b for b in bounds if b.num.is_Integer]
    values = [_ceil_div(int(b.num), b.den) if is_lower else int(b.num) // b.den for b in constants]
    tightest = max(values) if is_lower else min(values)
    kept = [Bound(sympy.Integer(tightest), 1)]
    for b in bounds:
        if b.num.is_Integer:
            continue
        low, high = _interval(b.num, box)
        implied = (_ceil_div(high, b.den) <= tightest) if is_lower else (low // b.den >= tightest)
        if not implied and b not in kept:
            kept.append(b)
    return tuple(kept)


def loop_nests(fn: IndexSum) -> list[LoopNest]:
    """The lowered terms of a sum, empty ones dropped."""
    nests = (lower(term, fn.indices) for term in fn.terms)
    return [nest for nest in nests if nest is not None]


# --- the reference interpreter -------------------------------------------------------------------

class _AffineEval:
    """Exact integer evaluation of an affine expression (its division must be exact)."""

    def __init__(self, expr):
        num, self.den = integer_form(expr)
        coefficients, self.constant = _integer_coefficients(num)
        self.terms = tuple(coefficients.items())
        self.text = str(expr)

    def __call__(self, env) -> int:
        value = self.constant + sum(c * env[v] for v, c in self.terms)
        if value % self.den:
            raise IRError(f"index expression {self.text} is not an integer at {env}")
        return value // self.den


class _Test:
    """A compiled Condition."""

    def __init__(self, condition: Condition):
        self.value, self.modulus = _AffineEval(condition.expr), condition.modulus

    def __call__(self, env) -> bool:
        value = self.value(env)
        return value >= 0 if self.modulus == 0 else value % self.modulus == 0


class _CompiledLoop:
    def __init__(self, loop: Loop):
        self.index, self.step = loop.index, loop.step
        self.lower = [(_AffineEval(b.num), b.den) for b in loop.lower]
        self.upper = [(_AffineEval(b.num), b.den) for b in loop.upper]
        self.residue = _AffineEval(loop.residue)
        self.checks = [_Test(c) for c in loop.checks]

    def values(self, env) -> range:
        low = max(_ceil_div(num(env), den) for num, den in self.lower)
        high = min(num(env) // den for num, den in self.upper)
        if self.step > 1:
            low += (self.residue(env) - low) % self.step
        return range(low, high + 1, self.step)


_DELTA = {"KroneckerDelta": lambda a, b: 1.0 if a == b else 0.0}


class _CompiledNest:
    """A loop nest ready to run: the body as a Python function of (array values..., indices...)."""

    def __init__(self, nest: LoopNest):
        placeholders = {a: sympy.Dummy(f"a{i}") for i, a in enumerate(accesses(nest.body))}
        self.indices = sorted((s for s in nest.body.free_symbols if isinstance(s, sympy.Idx)),
                              key=sympy.default_sort_key)
        names = {i: sympy.Dummy(str(i.label)) for i in self.indices}
        self.body = sympy.lambdify([*placeholders.values(), *names.values()],
                                   nest.body.xreplace({**placeholders, **names}), [_DELTA, "math"])
        self.reads = [(str(a.base.label), tuple(_AffineEval(e) for e in a.indices),
                       tuple(int(n) for n in a.base.shape),
                       str(a.base.label) in nest.zero_outside) for a in placeholders]
        self.guards = [_Test(g) for g in nest.guards]
        self.loops = [_CompiledLoop(loop) for loop in nest.loops]

    def run(self, env, arrays) -> float:
        if not all(guard(env) for guard in self.guards):
            return 0.0
        total = 0.0
        for point in self._points(0, dict(env)):
            values = []
            for name, positions, shape, zero_outside in self.reads:
                at = tuple(p(point) for p in positions)
                if all(0 <= i < n for i, n in zip(at, shape)):
                    values.append(float(arrays[name][at]))
                elif zero_outside:
                    values.append(0.0)
                else:
                    raise IRError(f"access {name}{list(at)} is out of bounds for shape {shape}")
            total += self.body(*values, *(point[i] for i in self.indices))
        return total

    def _points(self, depth: int, env):
        if depth == len(self.loops):
            yield env
            return
        loop = self.loops[depth]
        for value in loop.values(env):
            env[loop.index] = value
            if all(check(env) for check in loop.checks):
                yield from self._points(depth + 1, env)
        env.pop(loop.index, None)


def evaluate(fn: IndexSum, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Evaluate an index sum in float64 by walking its loop nests (slow; for small tests).

    ``arrays`` maps each input name to an array of the IR shape.  Every access
    is checked to lie inside its array, so a wrong derivation shows up as an
    error, not as a silently wrong number.
    """
    return evaluate_nests(loop_nests(fn), fn.indices, arrays)


def evaluate_nests(nests: Sequence[LoopNest], indices: Sequence[sympy.Idx],
                   arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The sum of loop nests at every point of the box of ``indices`` (ranges from 0)."""
    out = np.zeros([index_range(i)[1] + 1 for i in indices])
    compiled = [_CompiledNest(nest) for nest in nests]
    for point in itertools.product(*(range(n) for n in out.shape)):
        env = dict(zip(indices, point))
        out[point] = sum(nest.run(env, arrays) for nest in compiled)
    return out


# --- printing ------------------------------------------------------------------------------------

class _TextPrinter(StrPrinter):
    """Indices by name, quotients of indices as (num)/den, deltas as δ."""

    printmethod = "_symconv_text"  # not Indexed._sympystr: the methods below decide

    def _print_Idx(self, expr):
        return str(expr.label)

    def _print_Indexed(self, expr):
        return f"{expr.base.label}[{', '.join(self._index(i) for i in expr.indices)}]"

    def _print_KroneckerDelta(self, expr):
        return f"δ({self._print(expr.args[0])}, {self._print(expr.args[1])})"

    def _index(self, position):
        num, den = integer_form(position)
        return self._print(num) if den == 1 else f"({self._print(num)})/{den}"


class _LatexPrinter(LatexPrinter):
    def _print_Idx(self, expr):
        return self._print(expr.label)

    def _print_Indexed(self, expr):
        name = str(expr.base.label).replace("_", r"\_")
        return rf"\mathrm{{{name}}}_{{{', '.join(self._index(i) for i in expr.indices)}}}"

    def _index(self, position):
        num, den = integer_form(position)
        return self._print(num) if den == 1 else rf"\frac{{{self._print(num)}}}{{{den}}}"


def _text(expr) -> str:
    return _TextPrinter().doprint(expr)


def _latex(expr) -> str:
    return _LatexPrinter().doprint(expr)


def _bound_text(bound: Bound, is_lower: bool, latex: bool) -> str:
    show = _latex if latex else _text
    if bound.den == 1:
        return show(bound.num)
    if latex:
        fence = (r"\left\lceil", r"\right\rceil") if is_lower else (r"\left\lfloor", r"\right\rfloor")
        return rf"{fence[0]}\frac{{{show(bound.num)}}}{{{bound.den}}}{fence[1]}"
    fence = ("⌈", "⌉") if is_lower else ("⌊", "⌋")
    return f"{fence[0]}({show(bound.num)})/{bound.den}{fence[1]}"


def _bounds_text(bounds: Sequence[Bound], is_lower: bool, latex: bool) -> str:
    parts = [_bound_text(b, is_lower, latex) for b in bounds]
    if len(parts) == 1:
        return parts[0]
    name = ("max" if is_lower else "min")
    if latex:
        return rf"\{name}\left({', '.join(parts)}\right)"
    return f"{name}({', '.join(parts)})"


def _condition_text(condition: Condition, latex: bool) -> str:
    show = _latex if latex else _text
    if condition.modulus == 0:
        return f"{show(condition.expr)} \\geq 0" if latex else f"{show(condition.expr)} >= 0"
    if latex:
        return rf"{show(condition.expr)} \equiv 0 \pmod{{{condition.modulus}}}"
    return f"{show(condition.expr)} ≡ 0 (mod {condition.modulus})"


def nest_text(nest: LoopNest, latex: bool = False) -> str:
    """One lowered term as a nested sum with its bounds and conditions."""
    show = _latex if latex else _text
    sums, notes = [], []
    for loop in nest.loops:
        low = _bounds_text(loop.lower, True, latex)
        high = _bounds_text(loop.upper, False, latex)
        var = show(loop.index)
        if latex:
            sums.append(rf"\sum_{{{var}={low}}}^{{{high}}}")
        else:
            sums.append(f"Σ_{{{var}={low}..{high}}}")
        if loop.step > 1:
            notes.append(_condition_text(Condition(loop.index - loop.residue, loop.step), latex))
        notes += [_condition_text(c, latex) for c in loop.checks]
    notes = [_condition_text(g, latex) for g in nest.guards] + notes
    for name in nest.zero_outside:
        notes.append(rf"\mathrm{{{name}}} = 0 \text{{ outside its shape}}".replace("_", r"\_")
                     if latex else f"{name} = 0 outside its shape")
    body = show(nest.body)
    if latex:
        text = " ".join(sums + [body])
        separator = r",\ "
        return text + (rf" \quad [{separator.join(notes)}]" if notes else "")
    text = " ".join(sums + [body])
    return text + (f"   where {', '.join(notes)}" if notes else "")


def to_text(fn: IndexSum, latex: bool = False) -> str:
    """The sum in gather form: each term with loop bounds, steps and conditions."""
    show = _latex if latex else _text
    lhs = show(fn.output[fn.indices])
    terms = [nest_text(nest, latex) for nest in loop_nests(fn)]
    if latex:
        return f"{lhs} = " + (" + ".join(terms) if terms else "0")
    if not terms:
        return f"{lhs} = 0"
    if len(terms) == 1 and len(terms[0]) < 100:
        return f"{lhs} = {terms[0]}"
    return f"{lhs} =\n    " + "\n  + ".join(terms)


def to_latex(fn: IndexSum) -> str:
    return to_text(fn, latex=True)
