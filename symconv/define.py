"""Forward definitions: a ConvSpec (or any op) as an index sum.

This is the only module that knows convolution words.  A convolution is
written exactly as its definition reads::

    output[n, o, i] = bias[o] + Σ_c Σ_k weight[o, c, k] · input[n, c, s·i + d·k - p]

with the input marked zero outside its shape: that is the padding.  Groups are an explicit axis: the arrays
are viewed as ``input[n, g, c, ...]``, ``weight[g, o, c, ...]``,
``output[n, g, o, ...]``: the same memory in C order, and every index stays
affine, so the derivation needs no special case for grouped or depthwise
convolution.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Mapping

import sympy

from .derive import vjp
from .ir import (Array, IndexSum, IRError, Term, accesses, index, index_range, integer_form,
                 linear_parts, value_range)
from .spec import AvgPoolSpec, ConvSpec, ConvTransposeSpec, ExprSpec, GradientSpec


@dataclass(frozen=True)
class OpDefinition:
    """A differentiable op: its forward sum and how callers see its arrays.

    ``inputs`` are in call order with their IR shapes; ``shapes`` gives the
    shape callers pass for every array (inputs, output and gradients), which
    may be a different view of the same memory (``numel`` always matches).
    """

    kind: str
    forward: IndexSum
    inputs: tuple[Array, ...]
    differentiable: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]
    dtype: str
    key: str
    description: str
    details: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arrays = {a.name: a for a in (*self.inputs, self.forward.output)}
        for name, array in arrays.items():
            if math.prod(self.shapes[name]) != math.prod(array.shape):
                raise ValueError(f"{self.kind}: public shape {self.shapes[name]} of {name} does "
                                 f"not match its IR shape {array.shape}")


def _windows(out_spatial, kernel, stride, dilation, padding):
    """Output indices i, window indices k, and the input positions s·i + d·k - lo they read;
    with padding, some positions fall outside the input, which reads as zero there."""
    i = [index(f"i{t}", size) for t, size in enumerate(out_spatial)]
    k = [index(f"k{t}", size) for t, size in enumerate(kernel)]
    positions = [s * it + d * kt - lo
                 for it, kt, s, d, (lo, _) in zip(i, k, stride, dilation, padding)]
    padded = ("input",) if any(lo or hi for lo, hi in padding) else ()
    return i, k, positions, padded


def _op(spec, forward: IndexSum, inputs, shapes, **details) -> OpDefinition:
    """A spec's op: every input differentiable, the spec kept for the manifest."""
    inputs = tuple(inputs)
    return OpDefinition(kind=spec.KIND, forward=forward, inputs=inputs,
                        differentiable=tuple(a.name for a in inputs), shapes=shapes,
                        dtype=spec.dtype, key=spec.key, description=spec.describe(),
                        details={"spec": spec.to_dict(), **details})


def _padding_regions(positions, i, k, spatial, spec):
    """(input positions, constraints) per term.  Zero padding is one term that reads zeros
    outside the input.  The other modes split each dim's position p into the regions
    p < 0, 0 <= p < W and p >= W, where the read position is an affine map of p: reflect
    -p and 2(W-1) - p, replicate 0 and W - 1, circular p + W and p - W.  Regions no output
    reaches are dropped."""
    mode = spec.padding_mode
    if mode == "zeros":
        return [(tuple(positions), ())]
    box = {v: index_range(v) for v in (*i, *k)}
    per_dim = []
    for p, size in zip(positions, spatial):
        low, high = value_range(p, box)
        left = {"reflect": -p, "replicate": sympy.Integer(0), "circular": p + size}[mode]
        right = {"reflect": 2 * (size - 1) - p, "replicate": sympy.Integer(size - 1),
                 "circular": p - size}[mode]
        options = [(p, (p, size - 1 - p))]
        if low < 0:
            options.append((left, (-1 - p,)))
        if high > size - 1:
            options.append((right, (p - size,)))
        per_dim.append(options)
    regions = []
    for combination in itertools.product(*per_dim):
        mapped = tuple(m for m, _ in combination)
        constraints = tuple(c for _, cs in combination for c in cs)
        regions.append((mapped, constraints))
    return regions


def conv(spec: ConvSpec) -> OpDefinition:
    """The forward convolution of a spec as an index sum."""
    n_batch, c_in, *spatial = spec.input_shape
    c_out, c_group, *kernel = spec.weight_shape
    groups = spec.groups
    grouped = groups > 1

    n = index("n", n_batch)
    g = (index("g", groups),) if grouped else ()
    o = index("o", c_out // groups)
    c = index("c", c_group)
    i, k, positions, padded = _windows(spec.output_shape[2:], kernel, spec.stride,
                                       spec.dilation, spec.padding)
    group_axis = (groups,) if grouped else ()

    x = Array("input", (n_batch, *group_axis, c_group, *spatial))
    w = Array("weight", (*group_axis, c_out // groups, c_group, *kernel))
    y = Array("output", (n_batch, *group_axis, c_out // groups, *spec.output_shape[2:]))

    if spec.padding_mode != "zeros":
        padded = ()          # every read is mapped inside the input
    terms = [Term((c, *k), w[(*g, o, c, *k)] * x[(n, *g, c, *mapped)], region,
                  zero_outside=padded)
             for mapped, region in _padding_regions(positions, i, k, spatial, spec)]
    inputs = [x, w]
    shapes = {"input": spec.input_shape, "weight": spec.weight_shape, "output": spec.output_shape}
    if spec.bias:
        b = Array("bias", (*group_axis, c_out // groups))
        terms.insert(0, Term((), b[(*g, o)]))
        inputs.append(b)
        shapes["bias"] = spec.bias_shape

    forward = IndexSum(y, (n, *g, o, *i), tuple(terms))
    return _op(spec, forward, inputs, shapes, flops=spec.flops)


def avg_pool(spec: AvgPoolSpec) -> OpDefinition:
    """output[n, c, i] = Σ_k input[n, c, s·i + k - lo] / |window|, zero outside the input."""
    n_batch, channels, *spatial = spec.input_shape
    n, c = index("n", n_batch), index("c", channels)
    i, k, positions, padded = _windows(spec.output_shape[2:], spec.kernel_size, spec.stride,
                                       (1,) * spec.rank, spec.padding)
    x = Array("input", spec.input_shape)
    y = Array("output", spec.output_shape)
    body = x[(n, c, *positions)] * sympy.Rational(1, math.prod(spec.kernel_size))
    forward = IndexSum(y, (n, c, *i), (Term(tuple(k), body, zero_outside=padded),))
    return _op(spec, forward, (x,), {"input": spec.input_shape, "output": spec.output_shape})


def conv_transpose(spec: ConvTransposeSpec) -> OpDefinition:
    """A transposed convolution is the input gradient of its adjoint convolution, so its
    forward sum is that gradient, derived (scatter solved into gather form), with the
    cotangent read as the input; plus the bias."""
    adjoint = conv(spec.adjoint)
    gradient = vjp(adjoint.forward, adjoint.inputs[0]).gather
    grouped = spec.groups > 1
    x = Array("input", (spec.input_shape[0], *((spec.groups,) if grouped else ()),
                        spec.input_shape[1] // spec.groups, *spec.input_shape[2:]))
    w = adjoint.inputs[1]
    y = Array("output", gradient.output.shape)
    terms = [Term(t.indices, _rebased(t.body, {"grad_output": x}), t.constraints, t.congruences,
                  t.zero_outside) for t in gradient.terms]
    inputs = [x, w]
    shapes = {"input": spec.input_shape, "weight": spec.weight_shape, "output": spec.output_shape}
    if spec.bias:
        channels = gradient.indices[1:3] if grouped else gradient.indices[1:2]
        b = Array("bias", tuple(index_range(c)[1] + 1 for c in channels))
        terms.insert(0, Term((), b[tuple(channels)]))
        inputs.append(b)
        shapes["bias"] = spec.bias_shape
    return _op(spec, IndexSum(y, gradient.indices, tuple(terms)), inputs, shapes,
               flops=spec.flops)


def _rebased(expr, arrays: dict[str, Array]):
    """``expr`` with the reads of the named arrays reading the given arrays instead."""
    return expr.replace(
        lambda e: isinstance(e, sympy.Indexed) and str(e.base.label) in arrays,
        lambda e: arrays[str(e.base.label)][e.indices])


def gradient(spec: GradientSpec) -> OpDefinition:
    """One derived gradient of another op, as an op: its inputs are what the gradient reads
    (the parent's inputs and its cotangent), and its own gradients are derived again."""
    parent = definition(spec.parent)
    wrt = spec.function[len("grad_"):]
    array = next((a for a in parent.inputs if a.name == wrt), None)
    if array is None or wrt not in parent.differentiable:
        names = ", ".join(f"grad_{name}" for name in parent.differentiable)
        raise IRError(f"{spec.parent.describe()} has no gradient {spec.function} "
                      f"(it has {names})")
    output = parent.forward.output
    cotangent = Array(f"grad_{output.name}", output.shape)
    fn = vjp(parent.forward, array, cotangent).gather
    read = {a.name for a in fn.inputs}
    inputs = tuple(a for a in (*parent.inputs, cotangent) if a.name in read)
    shapes = {**parent.shapes, cotangent.name: parent.shapes[output.name],
              fn.output.name: parent.shapes[wrt]}
    return _op(spec, fn, inputs,
               {a: shapes[a] for a in (*(i.name for i in inputs), fn.output.name)})


def definition(spec) -> OpDefinition:
    """The forward definition of any spec symconv compiles."""
    builders = {ConvSpec: conv, AvgPoolSpec: avg_pool, ConvTransposeSpec: conv_transpose,
                ExprSpec: expression, GradientSpec: gradient}
    if type(spec) not in builders:
        raise TypeError(f"cannot define {type(spec).__name__}; expected one of "
                        f"{', '.join(t.__name__ for t in builders)}")
    return builders[type(spec)](spec)


# --- user-defined ops: an index sum written as text ----------------------------------------------

_LHS = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*\[([^\]]*)\]\s*$")


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
    local = {name: sympy.IndexedBase(name) for name, _ in spec.shapes}
    local.update(sum=_sum, Sum=_sum)
    try:
        rhs = parse_expr(right, local_dict=local, transformations=standard_transformations)
    except Exception as error:  # SymPy raises many kinds for text it cannot read
        raise IRError(f"expression: cannot read {right.strip()!r}: {error}") from None
    return match.group(1), names, sympy.sympify(rhs)


def _sums(expr) -> list[tuple[tuple, sympy.Expr]]:
    """The expression as a list of (limits, body): sums of products of reads.  Products and
    integer powers of sums become one sum over fresh copies of their indices."""
    if isinstance(expr, sympy.Add):
        return [term for arg in expr.args for term in _sums(arg)]
    if isinstance(expr, sympy.Sum):
        return [(tuple(tuple(limit) for limit in expr.limits) + limits, body)
                for limits, body in _sums(expr.function)]
    if isinstance(expr, sympy.Pow) and expr.has(sympy.Sum):
        if not (expr.exp.is_Integer and int(expr.exp) > 0):
            raise IRError(f"expression: {expr} is not an index sum (only whole positive powers "
                          f"of a sum expand into one)")
        return _sums(sympy.Mul(*[expr.base] * int(expr.exp), evaluate=False))
    if isinstance(expr, sympy.Mul) and expr.has(sympy.Sum):
        combined = [((), sympy.Integer(1))]
        for factor in expr.args:
            product = []
            for limits, body in combined:
                used = {str(limit[0]) for limit in limits}
                for more, extra in _sums(factor):
                    renames = {}
                    for limit in more:
                        name = str(limit[0])
                        fresh, count = name, 1
                        while fresh in used:
                            count += 1
                            fresh = f"{name}_{count}"
                        used.add(fresh)
                        if fresh != name:
                            renames[limit[0]] = sympy.Symbol(fresh)
                    more = tuple((limit[0].xreplace(renames), *limit[1:]) for limit in more)
                    product.append((limits + more, body * extra.xreplace(renames)))
            combined = product
        return combined
    if expr.has(sympy.Sum):
        raise IRError(f"expression: {expr} applies a function to a sum, which is not an index "
                      f"sum; write the function inside the sum or as a separate op")
    return [((), expr)]


def _floors_to_indices(body, indices: dict, constraints: list, box: dict):
    """Each floor(e/m) inside an index becomes a summation index q with m·q <= e <= m·q + m - 1
    (one value of q per point): the sum stays affine, so it derives like any other."""
    floors = sorted({f for a in accesses(body) for p in a.indices for f in
                     sympy.sympify(p).atoms(sympy.floor)}, key=sympy.default_sort_key)
    for number, floor in enumerate(floors):
        num, den = integer_form(floor.args[0])
        low, high = value_range(num, box)
        q = sympy.Idx(f"q{number}", (low // den, high // den))
        indices[str(q.label)] = q
        box[q] = index_range(q)
        constraints += [num - den * q, den * q + den - 1 - num]
        body = body.xreplace({floor: q})
    return body


def expression(spec: ExprSpec) -> OpDefinition:
    """A user-defined op from its text (see ExprSpec)."""
    out_name, free_names, rhs = _parse(spec)
    shapes = dict(spec.shapes)
    inputs = [Array(name, shape) for name, shape in spec.shapes if name != out_name]
    read = {str(a.label) for a in rhs.atoms(sympy.IndexedBase)} - {out_name}
    unused = [a.name for a in inputs if a.name not in read]
    if unused:
        raise IRError(f"expression: {', '.join(unused)} given a shape but never read")
    unknown = sorted(read - {a.name for a in inputs})
    if unknown:
        raise IRError(f"expression: no shape given for {', '.join(unknown)}")
    terms_text = _sums(_rebased(rhs, {a.name: a for a in inputs}))
    out_shape = tuple(shapes[out_name]) if out_name in shapes else \
        _infer_output(out_name, free_names, terms_text, shapes)
    if len(out_shape) != len(free_names):
        raise IRError(f"expression: {out_name} has {len(free_names)} indices but shape "
                      f"{out_shape}")
    free = {name: index(name, n) for name, n in zip(free_names, out_shape)}
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
        symbols = {s: indices[str(s)] for s in body.free_symbols
                   if isinstance(s, sympy.Symbol) and str(s) in indices}
        body = body.xreplace(symbols)
        labels = {a.base.label for a in accesses(body)}
        unbound = sorted(str(s) for s in body.free_symbols
                         if isinstance(s, sympy.Symbol) and s not in labels)
        if unbound:
            raise IRError(f"expression, term {number} ({body}): unbound index "
                          f"{', '.join(unbound)}")
        box = {i: index_range(i) for i in indices.values()}
        constraints: list = []
        before = set(indices)
        body = _floors_to_indices(body, indices, constraints, box)
        summed += [indices[n] for n in indices if n not in before]
        _check_reads(number, body, box, spec.zero_outside)
        padded = tuple(sorted({str(a.base.label) for a in accesses(body)} &
                              set(spec.zero_outside)))
        terms.append(Term(tuple(summed), body, tuple(constraints), (), padded))
    forward = IndexSum(Array(out_name, out_shape), tuple(free.values()), tuple(terms))
    return _op(spec, forward, inputs, {**{a.name: a.shape for a in inputs}, out_name: out_shape})


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
