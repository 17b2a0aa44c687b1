"""Reverse-mode derivation of index sums: the VJP as another index sum.

For ``y[F] = Σ_R body`` and a cotangent ``gy``, the gradient with respect to
an array ``x`` read in the body is, by the chain rule,

    grad_x[J] = Σ_F Σ_R gy[F] · ∂body/∂x[e(F, R)] · Π_t δ(J_t, e_t(F, R))

(one such *scatter* term per occurrence of ``x`` in the body).  Each
Kronecker delta is an affine equation ``J_t = e_t(F, R)`` in the summation
indices.  :func:`vjp` eliminates them exactly over the integers:

* a summation index with coefficient ±1 is substituted away;
* a common factor ``g`` of the coefficients becomes the congruence
  ``J-part ≡ 0 (mod g)``;
* otherwise an index ``u`` with coefficient ``a`` is solved as an exact
  quotient, ``u = (rest)/a``, under the congruence ``rest ≡ 0 (mod |a|)``;
* the ranges of eliminated indices become constraints on the ones left.

The result is an ordinary :class:`~symconv.ir.IndexSum` in *gather* form:
one output element at a time, no scatter, no delta left; lowering turns its
constraints into loop bounds and its congruences into loop steps.  Because
the result is again an index sum it can be differentiated again.  Nothing
here knows about convolution.

Every decision is kept as a :class:`Step` holding the term after it, so the
derivation can be narrated (``symconv explain --steps``) and each
intermediate form checked to be the same gradient.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import reduce

import sympy

from ..errors import IRError
from .affine import linear_parts, normalize_congruence, normalize_constraint, substitute
from .ir import Array, IndexSum, Term, accesses, index_range


@dataclass(frozen=True)
class Step:
    """One step from a scatter term to its gather form, and the term after it.

    ``kind`` is one of STEP_KINDS; ``delta`` is the Kronecker delta the step works on (its two
    sides), ``index`` the summation index it eliminates and ``value`` what replaces it,
    ``congruence`` an ``(expr, modulus)`` it adds (``expr ≡ 0``), ``added`` the constraints
    ``expr >= 0`` it adds.  ``term`` (after the step) sums the same values as the scatter
    term it started from: the deltas not yet eliminated (``deltas``) are still in it."""

    kind: str
    indices: tuple[sympy.Idx, ...]      # the term after the step, in parts
    body: sympy.Expr
    deltas: tuple[tuple[sympy.Expr, sympy.Expr], ...]
    constraints: tuple[sympy.Expr, ...]
    congruences: tuple[tuple[sympy.Expr, int], ...]
    zero_outside: tuple[str, ...]
    delta: tuple[sympy.Expr, sympy.Expr] | None = None
    index: sympy.Idx | None = None
    value: sympy.Expr | None = None
    congruence: tuple[sympy.Expr, int] | None = None
    added: tuple[sympy.Expr, ...] = ()
    read: sympy.Indexed | None = None     # the chain rule's step: the read differentiated

    @property
    def term(self) -> Term:
        return Term(self.indices, self.body * _deltas(self.deltas), self.constraints,
                    self.congruences, self.zero_outside)

    def renamed(self, mapping) -> "Step":
        """The same step with indices renamed by ``mapping`` (index -> index)."""
        def named(expr):
            return None if expr is None else sympy.sympify(expr).xreplace(mapping)

        def pair(p):
            return None if p is None else (named(p[0]), named(p[1]))
        return Step(self.kind, tuple(mapping.get(i, i) for i in self.indices),
                    named(self.body), tuple(pair(d) for d in self.deltas),
                    tuple(named(c) for c in self.constraints),
                    tuple((named(e), m) for e, m in self.congruences), self.zero_outside,
                    pair(self.delta), named(self.index), named(self.value),
                    None if self.congruence is None else (named(self.congruence[0]),
                                                          self.congruence[1]),
                    tuple(named(c) for c in self.added), named(self.read))


STEP_KINDS = {
    "chain rule": "the cotangent times the body's partial derivative, with one Kronecker "
                  "delta per axis of the array: the scatter term",
    "substitute": "a summation index with coefficient ±1 in the delta is substituted",
    "common factor": "the delta's summation indices share a factor g: the rest must be a "
                     "multiple of g (a congruence)",
    "quotient": "no unit coefficient: the index is the exact quotient, under the "
                "congruence that makes it an integer",
    "equality": "no summation index left in the delta: an equation between free indices",
    "always": "the delta holds for every term",
    "never": "the delta never holds: the term is zero",
    "simplify": "constraints in normal form, those true everywhere dropped",
}


@dataclass(frozen=True)
class Derivation:
    """One VJP with its intermediate forms kept for inspection."""

    wrt: Array
    scatter: IndexSum   # the chain rule's result, Kronecker deltas still in the body
    gather: IndexSum    # the deltas eliminated: the form that is compiled
    records: tuple[tuple[Step, ...], ...] = ()   # per scatter term, provisional names
    names: tuple[str, ...] = ()                 # the gradient's index names

    @functools.cached_property
    def steps(self) -> tuple[tuple[Step, ...], ...]:
        """Per scatter term, its steps with the final names: free indices as the gradient's,
        a summation index whose name a free index takes primed while it lasts (as in the
        scatter form).  Renamed on first use: recording costs the derivation nothing."""
        final = dict(zip(_provisional(self.wrt), self.scatter.indices))
        shown = []
        for record in self.records:
            mapping = _term_names(record[0].term, final, list(self.names), prime=True)
            shown.append(tuple(step.renamed(mapping) for step in record))
        return tuple(shown)


def partial(body: sympy.Expr, access: sympy.Indexed) -> sympy.Expr:
    """∂body/∂access, treating each array element as a real scalar variable.  Steps (sign,
    Heaviside, floor, ceiling) have derivative zero almost everywhere, as in PyTorch."""
    scalars = {a: sympy.Dummy(f"a{n}", real=True) for n, a in enumerate(accesses(body))}
    derivative = sympy.diff(body.xreplace(scalars), scalars[access])
    derivative = derivative.replace(lambda e: isinstance(e, sympy.DiracDelta) or (
        isinstance(e, sympy.Derivative) and isinstance(e.expr, (sympy.floor, sympy.ceiling))),
        lambda e: sympy.Integer(0))
    derivative = derivative.replace(lambda e: isinstance(e, sympy.Subs), lambda e: e.doit())
    if derivative.has(sympy.Derivative, sympy.Subs):
        raise IRError(f"cannot differentiate {body} with respect to {access}")
    return derivative.xreplace({s: a for a, s in scalars.items()})


def vjp(fn: IndexSum, wrt: Array, cotangent: Array | None = None,
        name: str | None = None) -> Derivation:
    """The gradient of ``Σ cotangent · fn`` with respect to the array ``wrt``."""
    cotangent = cotangent or Array(f"grad_{fn.output.name}", fn.output.shape)
    if cotangent.shape != fn.output.shape:
        raise IRError(f"cotangent {cotangent.name}{cotangent.shape} does not match "
                      f"{fn.output.name}{fn.output.shape}")
    result = Array(name or f"grad_{wrt.name}", wrt.shape)
    occurrences = [[a for a in accesses(term.body) if str(a.base.label) == wrt.name]
                   for term in fn.terms]
    free = _provisional(wrt)

    scatter_terms, gather_terms, steps = [], [], []
    for term, found in zip(fn.terms, occurrences):
        unknowns = (*fn.indices, *term.indices)
        for access in found:
            factor = cotangent[fn.indices] * partial(term.body, access)
            if factor == 0:
                continue
            deltas = tuple(zip(free, access.indices))
            # The read being differentiated is exact after elimination (its index equals an
            # element's); every other read of a zero-padded array, wrt's included, stays padded.
            others = {str(a.base.label) for a in accesses(factor) if a != access}
            padded = tuple(n for n in term.zero_outside if n != wrt.name or n in others)
            scatter_terms.append(Term(unknowns, factor * _deltas(deltas), term.constraints,
                                      term.congruences, padded))
            record = [Step("chain rule", unknowns, factor, deltas, tuple(term.constraints),
                           tuple(term.congruences), padded, read=access)]
            solved = eliminate(unknowns, [j - e for j, e in deltas], factor, term.constraints,
                               term.congruences, deltas=deltas, zero_outside=padded,
                               record=record)
            steps.append(tuple(record))
            if solved is not None:
                gather_terms.append(solved)

    first = next((a for found in occurrences for a in found), None)
    names = _free_names(first, wrt)
    scatter = _renamed(IndexSum(result, free, tuple(scatter_terms)), names, prime=True)
    gather = _renamed(IndexSum(result, free, tuple(gather_terms)), names, prime=False)
    return Derivation(wrt, scatter, gather, tuple(steps), tuple(names))


def _provisional(wrt: Array) -> tuple[sympy.Idx, ...]:
    """The gradient's free indices under names that cannot clash with the sum's own;
    renamed at the end."""
    return tuple(sympy.Idx(f"_J{t}_", (0, n - 1)) for t, n in enumerate(wrt.shape))


def _deltas(pairs) -> sympy.Expr:
    """Π δ(j, e) over ``pairs``, kept unevaluated (1 when there are none)."""
    return sympy.Mul(*(sympy.KroneckerDelta(j, e, evaluate=False) for j, e in pairs),
                     evaluate=False)


def eliminate(unknowns, equations, body, constraints=(), congruences=(), *, deltas=None,
              zero_outside=(), record: list | None = None) -> Term | None:
    """Solve ``equations`` (each an affine expression = 0) for summation indices.

    Returns the gather-form term over the indices left, or None when the
    equations have no integer solution at all.  With ``record``, appends a
    :class:`Step` per decision; ``deltas`` are the equations as the delta pairs
    ``(j, e)`` the steps show (``j - e`` = the equation).
    """
    remaining = list(unknowns)
    constraints = [sympy.sympify(c) for c in constraints]
    congruences = [(sympy.sympify(e), m) for e, m in congruences]
    pending = [sympy.expand(e) for e in equations]
    shown = list(deltas) if deltas is not None else [(e, sympy.Integer(0)) for e in pending]

    def note(kind: str, delta, kept: bool = False, **fields) -> None:
        """Record a step; ``kept``: its delta is not eliminated yet (still in the term)."""
        if record is not None:
            left = (delta, *shown) if kept else tuple(shown)
            record.append(Step(kind, tuple(remaining), body, left, tuple(constraints),
                               tuple(congruences), tuple(zero_outside), delta, **fields))

    while pending:
        equation, delta = pending.pop(0), shown.pop(0)
        coefficients, _ = linear_parts(equation)
        scale = reduce(math.lcm, (int(c.q) for c in coefficients.values()), 1)
        scale = math.lcm(scale, int(linear_parts(equation)[1].q))
        equation = sympy.expand(equation * scale)
        coefficients, _ = linear_parts(equation)
        involved = {u: int(coefficients[u]) for u in remaining if u in coefficients}
        rest = sympy.expand(equation - sum(a * u for u, a in involved.items()))
        if not involved:
            if rest.is_Number:
                if rest != 0:
                    note("never", delta)
                    return None
                note("always", delta)
                continue
            constraints += [rest, -rest]        # an equality between free indices
            note("equality", delta, added=(rest, -rest))
            continue
        g = reduce(math.gcd, involved.values())
        if g > 1:
            congruences.append((rest, g))
            note("common factor", delta, kept=True, congruence=(rest, g))
            involved = {u: a // g for u, a in involved.items()}
            rest = rest / g
        u = _pick(involved, remaining)
        a = involved[u]
        others = rest + sum(c * v for v, c in involved.items() if v != u)
        if abs(a) != 1:
            congruences.append((others, abs(a)))
        value = sympy.expand(-others / a)
        lo, hi = index_range(u)
        added = (value - lo, hi - value)
        constraints += added
        remaining.remove(u)
        replace = {u: value}
        body, constraints, congruences = substitute(replace, body, constraints, congruences)
        pending = [sympy.expand(e.xreplace(replace)) for e in pending]
        shown = [(j, sympy.expand(e.xreplace(replace))) for j, e in shown]
        note("substitute" if abs(a) == 1 else "quotient", delta, index=u, value=value,
             congruence=(others, abs(a)) if abs(a) != 1 else None, added=added)
    constraints, congruences = _simplified(constraints, congruences)
    note("simplify", None)
    return Term(tuple(remaining), body, constraints, congruences, tuple(zero_outside))


def _pick(involved: dict, order: list):
    """The index to eliminate: a unit coefficient if any (exact substitution), then the
    largest range (so the loops left run over the small extents), then the innermost."""
    def preference(u):
        lo, hi = index_range(u)
        return (abs(involved[u]) == 1, hi - lo, order.index(u))
    return max(involved, key=preference)


def _simplified(constraints, congruences):
    """Normalised, de-duplicated constraints and congruences; trivially true ones dropped."""
    kept_constraints = []
    for c in constraints:
        c = normalize_constraint(c)
        if c.is_Number and c >= 0:
            continue
        if c not in kept_constraints:
            kept_constraints.append(c)
    kept_congruences = []
    for e, m in congruences:
        e, m = normalize_congruence(e, m)
        if m != 1 and (e, m) not in kept_congruences:
            kept_congruences.append((e, m))
    return tuple(kept_constraints), tuple(kept_congruences)


def _free_names(access, wrt: Array) -> list[str]:
    """Names for the gradient's indices: the forward's own name where the access uses a bare
    index there, ``j0, j1, ...`` elsewhere."""
    names, counter = [], 0
    for t in range(len(wrt.shape)):
        position = access.indices[t] if access is not None else None
        if isinstance(position, sympy.Idx) and str(position.label) not in names:
            names.append(str(position.label))
            continue
        while f"j{counter}" in names:
            counter += 1
        names.append(f"j{counter}")
        counter += 1
    return names


def _term_names(term: Term, mapping: dict, names: list[str], prime: bool) -> dict:
    """``mapping`` (free indices) extended to the term's summation indices whose name a
    free index takes: primed for display, or a numeric suffix for C."""
    taken = set(names)
    local = dict(mapping)
    for idx in term.indices:
        base = new = str(idx.label)
        suffix = 0
        while new in taken:
            suffix += 1
            new = base + "'" * suffix if prime else f"{base}_{suffix}"
        taken.add(new)
        if new != base:
            local[idx] = sympy.Idx(new, (idx.lower, idx.upper))
    return local


def _renamed(fn: IndexSum, names: list[str], prime: bool) -> IndexSum:
    """Give the provisional free indices their final names; summation indices whose name is
    taken get a prime (for display) or a numeric suffix (for C)."""
    mapping = {j: sympy.Idx(name, (j.lower, j.upper)) for j, name in zip(fn.indices, names)}
    terms = []
    for term in fn.terms:
        local = _term_names(term, mapping, names, prime)
        renamed = term.substituted(local)
        terms.append(Term(tuple(local.get(i, i) for i in term.indices), renamed.body,
                          renamed.constraints, renamed.congruences, term.zero_outside))
    return IndexSum(fn.output, tuple(mapping[j] for j in fn.indices), tuple(terms))
