"""Run-time extents: a batch axis whose size is known only when the op is called.

The batch of a convolution buys nothing from specialisation: its index is
only passed through.  Every array either has it as its first axis or lacks it,
and wherever it is read it is read as the same bare index ``n``: the output
is a map over the batch (``out[n, ...]`` reads only item ``n``) or a sum over
it (``grad_weight = Σ_n ...``).  Such an op is the same computation for every
item, so symconv compiles the *item* sum — the arrays without their batch axis
— with every other extent exact, and a loop over the run-time batch around it
(see codegen.emit).  Gradients keep the structure: the gradient for an array
with the batch axis is a map over it, the gradient for one without is a sum
over it, so derivation works on the item sum unchanged.

:func:`peel` checks that an index really is only passed through (an index
with a run-time extent anywhere else, say in a delta with a non-unit
coefficient, is refused with an IRError naming it) and returns the item sum.
"""

from __future__ import annotations

import sympy

from ..errors import IRError
from .affine import linear_parts
from .ir import Array, IndexSum, Term, accesses

# The extent a batch-open op is defined with before it is peeled: any will do, as long as the
# bounds of its index are told apart from constants (so not 1, where n <= 0 reads as n = 0).
DEFINED_EXTENT = 5


def leading_index(access: sympy.Indexed, where: str, extent: str) -> sympy.Symbol:
    position = access.indices[0]
    if not isinstance(position, sympy.Idx):
        raise IRError(f"{where}: {access} indexes the run-time extent {extent} of "
                      f"{access.base.label} with {position}; an extent known only at run time "
                      f"must be read as a bare index")
    return position


def misused(index, extent: str, where: str) -> IRError:
    return IRError(f"{where}: the index {index} runs over the run-time extent {extent} and is "
                   f"used elsewhere than as the first index of an array that has it; an extent "
                   f"known only at run time must be passed through")


def check_reads(body: sympy.Expr, arrays, extent: str, where: str) -> None:
    """Every read of an array in ``arrays`` starts with a bare index, used nowhere else in
    the reads of ``body`` (the rest of a term is checked by :func:`peel`)."""
    reads = accesses(body)
    leading = {leading_index(a, where, extent) for a in reads if str(a.base.label) in arrays}
    for access in reads:
        rest = access.indices[1:] if str(access.base.label) in arrays else access.indices
        for index in leading:
            if any(sympy.sympify(p).has(index) for p in rest):
                raise misused(index, extent, where)


def _item_read(access: sympy.Indexed) -> sympy.Indexed:
    shape = tuple(int(s) for s in access.base.shape)
    return Array(str(access.base.label), shape[1:])[access.indices[1:]]


def _range_bound(expr, index) -> bool:
    """True for ``index >= 0`` and ``DEFINED_EXTENT - 1 - index >= 0`` (times a positive
    number): the index's own range, which every item satisfies."""
    coefficients, constant = linear_parts(expr)
    if set(coefficients) != {index}:
        return False
    a = coefficients[index]
    return (a > 0 and constant == 0) or (a < 0 and constant == -a * (DEFINED_EXTENT - 1))


def peel(fn: IndexSum, arrays, extent: str) -> tuple[IndexSum, str]:
    """The item sum of ``fn`` — every array in ``arrays`` without its first axis (defined
    with DEFINED_EXTENT), the index over that axis gone — and that index's name.  Refuses
    with an IRError naming the index where it is not only passed through."""
    arrays = frozenset(arrays)
    output = fn.output.name
    maps = output in arrays
    for array in (*fn.inputs, fn.output):
        if array.name in arrays and (len(array.shape) < 2 or array.shape[0] != DEFINED_EXTENT):
            raise IRError(f"{output}: the array {array.name} has only its run-time extent "
                          f"{extent}; give it at least one more axis")
    free = fn.indices[0] if maps else None
    names, terms = set(), []
    for number, term in enumerate(fn.terms):
        where = f"{output}, term {number} ({term.body})"
        batched = [a for a in accesses(term.body) if str(a.base.label) in arrays]
        if not batched:
            if not maps:
                raise IRError(f"{where}: a sum over the run-time extent {extent} needs every "
                              f"term to read an array that has it")
            used = {*term.body.free_symbols, *(s for e in (*term.constraints,
                    *(e for e, _ in term.congruences)) for s in sympy.sympify(e).free_symbols)}
            if free in used:
                raise misused(free, extent, where)
            terms.append(term)
            continue
        leading = {leading_index(a, where, extent) for a in batched}
        if len(leading) > 1:
            raise IRError(f"{where}: the run-time extent {extent} is run over by "
                          f"{', '.join(sorted(map(str, leading)))}; it must be one index, "
                          f"passed through")
        (index,) = leading
        if maps and index != free:
            raise IRError(f"{where}: the index {index} runs over the run-time extent {extent} "
                          f"but is not the output's {free}; it must be passed through")
        if not maps and index not in term.indices:
            raise IRError(f"{where}: the index {index} runs over the run-time extent {extent} "
                          f"but is neither summed nor the output's first index")
        body = term.body.replace(lambda e: isinstance(e, sympy.Indexed)
                                 and str(e.base.label) in arrays, _item_read)
        constraints = tuple(c for c in term.constraints if not _range_bound(c, index))
        rest = [*constraints, *(e for e, _ in term.congruences), body]
        if any(index in sympy.sympify(e).free_symbols for e in rest):
            raise IRError(f"{where}: the index {index} runs over the run-time extent {extent} "
                          f"and is used elsewhere than as the first index of an array that "
                          f"has it; an extent known only at run time must be passed through")
        names.add(str(index.label))
        terms.append(Term(tuple(i for i in term.indices if i != index), body, constraints,
                          term.congruences, term.zero_outside))
    if maps:
        names.add(str(free.label))
    item_output = Array(output, fn.output.shape[1:]) if maps else fn.output
    indices = fn.indices[1:] if maps else fn.indices
    return IndexSum(item_output, indices, tuple(terms)), min(names)
