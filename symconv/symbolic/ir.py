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

The rest of the symbolic stage builds on these records: ``affine`` (the
integer toolkit), ``lowering`` (a term's domain as a loop nest), ``printing``
and ``interpreter`` (both read the loop nest), ``derive`` (gradients) and
``define`` (forward sums from specs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

from ..errors import IRError
from .affine import linear_parts, substitute

# --- arrays and indices --------------------------------------------------------------------------

@dataclass(frozen=True)
class Array:
    """A named dense array with a constant shape (C order)."""

    name: str
    shape: tuple[int, ...]

    @property
    def base(self) -> sympy.IndexedBase:
        return sympy.IndexedBase(self.name, shape=self.shape, real=True)   # data are real

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
    return list(_accesses(expr))


@functools.lru_cache(maxsize=1 << 12)
def _accesses(expr: sympy.Expr) -> tuple[sympy.Indexed, ...]:
    """accesses, remembered: the passes ask again for the same few bodies' reads, and
    SymPy's sort key is slow."""
    return tuple(sorted(expr.atoms(sympy.Indexed), key=sympy.default_sort_key))


def rebased(expr, arrays: dict[str, Array]):
    """``expr`` with the reads of the named arrays reading the given arrays instead."""
    return expr.replace(
        lambda e: isinstance(e, sympy.Indexed) and str(e.base.label) in arrays,
        lambda e: arrays[str(e.base.label)][e.indices])


def array_of(access: sympy.Indexed) -> Array:
    base = access.base
    return Array(str(base.label), tuple(int(s) for s in base.shape))


# --- what a body may compute ----------------------------------------------------------------------

# The functions a body may apply: each prints in C and has a derivative made of them (a step's
# derivative is zero almost everywhere; at a tie Heaviside is 1/2, so Max/Min split the gradient).
BODY_FUNCTIONS = (
    sympy.exp, sympy.log, sympy.sin, sympy.cos, sympy.tan, sympy.asin, sympy.acos, sympy.atan,
    sympy.atan2, sympy.sinh, sympy.cosh, sympy.tanh, sympy.asinh, sympy.acosh, sympy.atanh,
    sympy.erf, sympy.erfc, sympy.Abs, sympy.sign, sympy.Heaviside, sympy.Min, sympy.Max,
    sympy.floor, sympy.ceiling,
)
_BODY_NODES = (sympy.Add, sympy.Mul, sympy.Pow, sympy.Symbol, *BODY_FUNCTIONS)


def check_body(body: sympy.Expr, where: str) -> None:
    """Refuse anything in a body that symconv cannot differentiate and print in C: other
    functions (gamma, Mod, re, a name SymPy does not know...), comparisons, complex or
    infinite numbers.  Array reads are values; their indices are checked elsewhere."""
    def visit(node) -> None:
        if isinstance(node, sympy.Indexed):
            return
        if isinstance(node, sympy.Atom) and node.is_number:
            if not node.is_finite or not node.is_real:
                raise IRError(f"{where}: the number {node} is not a finite real")
            return
        if not isinstance(node, _BODY_NODES):
            what = type(node).__name__ if isinstance(node, sympy.Function) else str(node)
            names = ", ".join(f.__name__ for f in BODY_FUNCTIONS)
            raise IRError(f"{where}: {what} is not supported in a body (supported: +, -, *, /, "
                          f"** and {names})")
        for arg in node.args:
            visit(arg)

    visit(sympy.sympify(body))


# --- the IR itself -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    """``Σ_{indices} body`` over the domain given by constraints and congruences."""

    indices: tuple[sympy.Idx, ...]
    body: sympy.Expr
    constraints: tuple[sympy.Expr, ...] = ()
    congruences: tuple[tuple[sympy.Expr, int], ...] = ()
    zero_outside: tuple[str, ...] = ()

    def substituted(self, mapping) -> "Term":
        """The same term with ``mapping`` applied to its body and domain (indices unchanged)."""
        body, constraints, congruences = substitute(mapping, self.body, self.constraints,
                                                    self.congruences)
        return Term(self.indices, body, tuple(constraints), tuple(congruences),
                    self.zero_outside)


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
        _check_term(fn, number, term)


def _check_term(fn: IndexSum, number: int, term: Term) -> None:
    """check_index_sum for one term (its text printed only into an error: printing every
    term's body took a tenth of a package's code generation)."""
    def where() -> str:
        return f"{fn.output.name}, term {number} ({term.body})"

    bound = set(fn.indices) | set(term.indices)
    if set(term.indices) & set(fn.indices):
        raise IRError(f"{where()}: a summation index is also a free index")
    reads = accesses(term.body)
    labels = {a.base.label for a in reads}
    unbound = {s for s in term.body.free_symbols
               if isinstance(s, (sympy.Idx, sympy.Symbol)) and s not in labels} - bound
    if unbound:
        raise IRError(f"{where()}: unbound index {', '.join(sorted(map(str, unbound)))}")
    for access in reads:
        array = array_of(access)
        if len(access.indices) != len(array.shape):
            raise IRError(f"{where()}: {access} has {len(access.indices)} indices for a "
                          f"{len(array.shape)}-d array")
        for position in access.indices:
            try:
                linear_parts(position)
            except IRError as error:
                raise IRError(f"{where()}: in {access}: {error}") from None
    read = {str(label) for label in labels}
    if not set(term.zero_outside) <= read:
        raise IRError(f"{where()}: zero_outside names {sorted(set(term.zero_outside) - read)} "
                      f"which the term does not read")
    for expr in (*term.constraints, *(e for e, _ in term.congruences)):
        if not sympy.sympify(expr).free_symbols <= bound:
            raise IRError(f"{where()}: condition {expr} uses an unbound index")
        linear_parts(expr)


@dataclass(frozen=True)
class Batch:
    """A leading axis of run-time extent ``extent`` (shown as that name), run over by the
    index shown as ``index``, that the arrays named in ``arrays`` have and the others lack."""

    extent: str
    index: str
    arrays: frozenset[str]

    def maps(self, output: str) -> bool:
        """True when a sum writing ``output`` is a map over the batch, False for a sum over it."""
        return output in self.arrays

    def with_arrays(self, arrays) -> "Batch":
        return Batch(self.extent, self.index, frozenset(arrays))


@dataclass(frozen=True)
class SumFunction:
    """A function a package exports: its name, the index sum it computes and the arrays it
    takes, in call order (the forward sum, or a gradient's gather form).  With ``batch``,
    the sum is one item's and the function maps or sums it over a run-time batch."""

    name: str
    sum: IndexSum
    args: tuple[Array, ...]
    batch: Batch | None = None     # a run-time batch axis around the item sum
