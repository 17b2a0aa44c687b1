"""User-defined ops: an index sum written as text, parsed into the IR."""

from __future__ import annotations

import re

import sympy

from ...errors import IRError
from ...spec import ExprSpec
from ..affine import integer_form, linear_parts
from ..ir import (Array, IndexSum, Term, accesses, check_body, index, index_range,
                  rebased)
from ..lowering import value_range
from ..batch import DEFINED_EXTENT, check_reads
from .op import OpDefinition, open_batch, spec_op


_LHS = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*\[([^\]]*)\]\s*$")


# A name not followed by "(" is an array (followed by "[") or an index.  Each is read through a
# placeholder bound to its own symbol, so any name works: a Python keyword (for, lambda), a name
# SymPy would read as a constant (I, E, S, N, O, Q, pi) or one of its functions (gamma, beta).
_NAME = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)\b(?!\s*\()")


def _sum(body, *limits):
    return sympy.Sum(body, *limits)


def _parse(spec: ExprSpec):
    """(output name, free index names, RHS as a SymPy expression with IndexedBase reads)."""
    left, right = spec.expression.split("=", 1)
    match = _LHS.match(left)
    if not match:
        raise IRError(f"expression: the left side must read Out[i, j, ...], got {left.strip()!r}")
    names = [n.strip() for n in match.group(2).split(",")] if match.group(2).strip() else []
    if not names or not all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", n) for n in names):
        raise IRError(f"expression: the output's indices must be plain names, got "
                      f"{match.group(2)!r}")
    if len(set(names)) != len(names):
        raise IRError(f"expression: repeated output index in {names}")
    unknown = sorted(set(re.findall(r"([A-Za-z][A-Za-z0-9_]*)\s*\[", right)) -
                     {name for name, _ in spec.shapes})
    if unknown:
        raise IRError(f"expression: no shape given for {', '.join(unknown)}")
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations
    arrays = {name for name, _ in spec.shapes}
    placeholders: dict[str, str] = {}

    def placeholder(match) -> str:
        return placeholders.setdefault(match.group(1), f"_n{len(placeholders)}")

    text = _NAME.sub(placeholder, right)
    local = {hidden: sympy.IndexedBase(name, real=True) if name in arrays else
             sympy.Symbol(name) for name, hidden in placeholders.items()}
    local.update(sum=_sum, Sum=_sum)
    try:
        rhs = parse_expr(text, local_dict=local, transformations=standard_transformations)
    except Exception as error:  # SymPy raises many kinds for text it cannot read
        raise IRError(f"expression: cannot read {right.strip()!r}: {error}") from None
    return match.group(1), names, sympy.sympify(rhs)


def _fresh(base: str, taken: set[str]) -> str:
    """``base``, or ``base_2``, ``base_3``... : the first name not taken, now taken."""
    name, count = base, 1
    while name in taken:
        count += 1
        name = f"{base}_{count}"
    taken.add(name)
    return name


def _sums(expr, taken: set[str]) -> list[tuple[tuple, sympy.Expr]]:
    """The expression as a list of (limits, body): sums of products of reads.  Products and
    integer powers of sums become one sum over fresh copies of their indices (named apart
    from every name in ``taken``)."""
    if isinstance(expr, sympy.Add):
        return [term for arg in expr.args for term in _sums(arg, taken)]
    if isinstance(expr, sympy.Sum):
        return [(tuple(tuple(limit) for limit in expr.limits) + limits, body)
                for limits, body in _sums(expr.function, taken)]
    if isinstance(expr, sympy.Pow) and expr.has(sympy.Sum):
        if not (expr.exp.is_Integer and int(expr.exp) > 0):
            raise IRError(f"expression: {expr} is not an index sum (only whole positive powers "
                          f"of a sum expand into one)")
        return _sums(sympy.Mul(*[expr.base] * int(expr.exp), evaluate=False), taken)
    if isinstance(expr, sympy.Mul) and expr.has(sympy.Sum):
        combined = [((), sympy.Integer(1))]
        for factor in expr.args:
            product = []
            for limits, body in combined:
                used = {str(limit[0]) for limit in limits}
                for more, extra in _sums(factor, taken):
                    renames = {}
                    for limit in more:
                        name = str(limit[0])
                        if name in used:
                            name = _fresh(name, taken)
                            renames[limit[0]] = sympy.Symbol(name)
                        used.add(name)
                    more = tuple((limit[0].xreplace(renames), *limit[1:]) for limit in more)
                    product.append((limits + more, body * extra.xreplace(renames)))
            combined = product
        return combined
    if expr.has(sympy.Sum):
        raise IRError(f"expression: {expr} applies a function to a sum, which is not an index "
                      f"sum; write the function inside the sum or as a separate op")
    return [((), expr)]


def _floors_to_indices(body, indices: dict, constraints: list, box: dict, taken: set[str]):
    """Each floor(e/m) inside an index becomes a summation index q with m·q <= e <= m·q + m - 1
    (one value of q per point): the sum stays affine, so it derives like any other."""
    floors = sorted({f for a in accesses(body) for p in a.indices for f in
                     sympy.sympify(p).atoms(sympy.floor)}, key=sympy.default_sort_key)
    for number, floor in enumerate(floors):
        num, den = integer_form(floor.args[0])
        low, high = value_range(num, box)
        q = sympy.Idx(_fresh(f"q{number}", taken), (low // den, high // den))
        indices[str(q.label)] = q
        box[q] = index_range(q)
        constraints += [num - den * q, den * q + den - 1 - num]
        body = body.xreplace({floor: q})
    return body


def expression(spec: ExprSpec) -> OpDefinition:
    """A user-defined op from its text (see ExprSpec).  A run-time extent (a name in place of
    the first size) is defined with DEFINED_EXTENT, then peeled off (symbolic.batch)."""
    out_name, free_names, rhs = _parse(spec)
    extent = spec.run_time_extent
    shapes = {name: tuple(DEFINED_EXTENT if isinstance(n, str) else n for n in shape)
              for name, shape in spec.shapes}
    inputs = [Array(name, shapes[name]) for name, _ in spec.shapes if name != out_name]
    read = {str(a.label) for a in rhs.atoms(sympy.IndexedBase)} - {out_name}
    unused = [a.name for a in inputs if a.name not in read]
    if unused:
        raise IRError(f"expression: {', '.join(unused)} given a shape but never read")
    unknown = sorted(read - {a.name for a in inputs})
    if unknown:
        raise IRError(f"expression: no shape given for {', '.join(unknown)}")
    taken = {str(s) for s in rhs.atoms(sympy.Symbol)} | set(free_names)
    terms_text = _sums(rebased(rhs, {a.name: a for a in inputs}), taken)
    if extent is not None:     # a sum may run up to the run-time extent: (b, 0, n - 1)
        limits_at = {sympy.Symbol(extent): DEFINED_EXTENT}
        terms_text = [(tuple((limit[0], *(sympy.sympify(v).xreplace(limits_at)
                                          for v in limit[1:])) for limit in limits), body)
                      for limits, body in terms_text]
    out_shape = tuple(shapes[out_name]) if out_name in shapes else \
        _infer_output(out_name, free_names, terms_text, shapes)
    if len(out_shape) != len(free_names):
        raise IRError(f"expression: {out_name} has {len(free_names)} indices but shape "
                      f"{out_shape}")
    free = {name: index(name, n) for name, n in zip(free_names, out_shape)}
    batched = {name for name, shape in spec.shapes if isinstance(shape[0], str)}
    terms = []
    for number, (limits, body) in enumerate(terms_text):
        indices = dict(free)
        summed = []
        for limit in limits:
            if len(limit) != 3 or not all(sympy.sympify(v).is_Integer for v in limit[1:]):
                raise IRError(f"expression: sum limits must be (index, first, last) with integer "
                              f"bounds, got {limit}")
            name = str(limit[0])
            if name in free:
                raise IRError(f"expression: {name} is both an output index and summed")
            idx = sympy.Idx(name, (int(limit[1]), int(limit[2])))
            indices[name] = idx
            summed.append(idx)
        check_body(body, f"expression, term {number} ({body})")
        symbols = {s: indices[str(s)] for s in body.free_symbols
                   if isinstance(s, sympy.Symbol) and str(s) in indices}
        body = body.xreplace(symbols)
        labels = {a.base.label for a in accesses(body)}
        unbound = sorted(str(s) for s in body.free_symbols
                         if isinstance(s, sympy.Symbol) and s not in labels)
        if unbound:
            raise IRError(f"expression, term {number} ({body}): unbound index "
                          f"{', '.join(unbound)}")
        if extent is not None:
            check_reads(body, batched, extent, f"expression, term {number} ({body})")
        box = {i: index_range(i) for i in indices.values()}
        constraints: list = []
        before = set(indices)
        body = _floors_to_indices(body, indices, constraints, box, taken)
        summed += [indices[n] for n in indices if n not in before]
        _check_reads(number, body, box, spec.zero_outside)
        padded = tuple(sorted({str(a.base.label) for a in accesses(body)} &
                              set(spec.zero_outside)))
        terms.append(Term(tuple(summed), body, tuple(constraints), (), padded))
    forward = IndexSum(Array(out_name, out_shape), tuple(free.values()), tuple(terms))
    op = spec_op(spec, forward, inputs, {**{a.name: a.shape for a in inputs}, out_name: out_shape})
    if extent is None:
        return op
    if out_name not in shapes and any(str(a.base.label) in batched and
                                      str(a.indices[0]) == free_names[0]
                                      for t in terms for a in accesses(t.body)):
        batched.add(out_name)      # its first index runs over the run-time extent
    return open_batch(op, batched, extent)


def _infer_output(out_name, free_names, terms, shapes) -> tuple[int, ...]:
    """The largest range of each output index that keeps every read inside its array, where
    the index appears alone beside summation indices of known range."""
    highs = {}
    for limits, body in terms:
        ranges = {str(limit[0]): (int(limit[1]), int(limit[2])) for limit in limits}
        for access in body.atoms(sympy.Indexed):
            extents = shapes[str(access.base.label)]
            for position, extent in zip(access.indices, extents):
                try:
                    coefficients, constant = linear_parts(position)
                except IRError:
                    continue
                mine = [s for s in coefficients if str(s) in free_names]
                if len(mine) != 1 or coefficients[mine[0]] <= 0 or not all(
                        str(s) in ranges for s in coefficients if s is not mine[0]):
                    continue
                f, a = mine[0], coefficients[mine[0]]
                rest = constant + sum(c * (ranges[str(s)][1] if c > 0 else ranges[str(s)][0])
                                      for s, c in coefficients.items() if s is not f)
                bound = int(sympy.floor((extent - 1 - rest) / a))
                highs[str(f)] = min(highs.get(str(f), bound), bound)
    missing = [n for n in free_names if n not in highs]
    if missing:
        raise IRError(f"expression: cannot infer the range of {', '.join(missing)} from the "
                      f"reads; give {out_name}'s shape in shapes")
    shape = tuple(highs[n] + 1 for n in free_names)
    if any(n < 1 for n in shape):
        raise IRError(f"expression: the reads leave {out_name} empty (shape {shape})")
    return shape


def _check_reads(number: int, body, box, zero_outside) -> None:
    """Every read of an array that is not zero-padded stays inside it over the term's box."""
    for access in accesses(body):
        name = str(access.base.label)
        if name in zero_outside:
            continue
        for dim, (position, extent) in enumerate(zip(access.indices, access.base.shape)):
            low, high = value_range(position, box)
            if low < 0 or high > int(extent) - 1:
                raise IRError(f"expression, term {number} ({body}): {name} index {dim} "
                              f"({position}) reaches {low}..{high}, outside 0..{int(extent) - 1};"
                              f" list {name} in zero_outside to read zeros there")
