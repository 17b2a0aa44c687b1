"""Convolutions and pooling as index sums: the only module that knows convolution words.

A convolution is written exactly as its definition reads::

    output[n, o, i] = bias[o] + Σ_c Σ_k weight[o, c, k] · input[n, c, s·i + d·k - p]

with the input marked zero outside its shape: that is the padding.  Under
``layout="channels_last"`` the same sum reads ``input[n, i, c]`` and writes
``output[n, i, o]``: only the order of the axes changes.  Groups
are an explicit axis: the arrays are viewed as ``input[n, g, c, ...]``,
``weight[g, o, c, ...]``, ``output[n, g, o, ...]``: the same memory in C
order, and every index stays affine, so the derivation needs no special case
for grouped or depthwise convolution.  A transposed convolution is the input
gradient of its adjoint convolution, derived.
"""

from __future__ import annotations

import itertools
import math

import sympy

from ...spec import AvgPoolSpec, ConvSpec, ConvTransposeSpec
from ..derive import vjp
from ..ir import Array, IndexSum, Term, index, index_range, rebased
from ..lowering import value_range
from .op import OpDefinition, spec_op

# A convolution's arguments in torch's order; a bias-free one takes None for the bias.
CONV_ARGUMENTS = ("input", "weight", "bias")


def _windows(out_spatial, kernel, stride, dilation, padding):
    """Output indices i, window indices k, and the input positions s·i + d·k - lo they read;
    with padding, some positions fall outside the input, which reads as zero there."""
    i = [index(f"i{t}", size) for t, size in enumerate(out_spatial)]
    k = [index(f"k{t}", size) for t, size in enumerate(kernel)]
    positions = [s * it + d * kt - lo
                 for it, kt, s, d, (lo, _) in zip(i, k, stride, dilation, padding)]
    padded = ("input",) if any(lo or hi for lo, hi in padding) else ()
    return i, k, positions, padded


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

    last = spec.layout == "channels_last"

    def channels_at(batch, channels, places):
        """An array's axes (or indices) in its layout: channels after the batch, or last."""
        return (batch, *places, *channels) if last else (batch, *channels, *places)

    x = Array("input", channels_at(n_batch, (*group_axis, c_group), spatial))
    w = Array("weight", (*group_axis, c_out // groups, c_group, *kernel))
    y = Array("output", channels_at(n_batch, (*group_axis, c_out // groups),
                                    spec.output_shape[2:]))

    if spec.padding_mode != "zeros":
        padded = ()          # every read is mapped inside the input
    terms = [Term((c, *k), w[(*g, o, c, *k)] * x[channels_at(n, (*g, c), mapped)], region,
                  zero_outside=padded)
             for mapped, region in _padding_regions(positions, i, k, spatial, spec)]
    inputs = [x, w]
    shapes = {name: spec.array_shape(name) for name in ("input", "weight", "output")}
    if spec.bias:
        b = Array("bias", (*group_axis, c_out // groups))
        terms.insert(0, Term((), b[(*g, o)]))
        inputs.append(b)
        shapes["bias"] = spec.bias_shape

    forward = IndexSum(y, channels_at(n, (*g, o), i), tuple(terms))
    return spec_op(spec, forward, inputs, shapes, CONV_ARGUMENTS, flops=spec.flops)


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
    return spec_op(spec, forward, (x,), {"input": spec.input_shape, "output": spec.output_shape})


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
    terms = [Term(t.indices, rebased(t.body, {"grad_output": x}), t.constraints, t.congruences,
                  t.zero_outside) for t in gradient.terms]
    inputs = [x, w]
    shapes = {"input": spec.input_shape, "weight": spec.weight_shape, "output": spec.output_shape}
    if spec.bias:
        channels = gradient.indices[1:3] if grouped else gradient.indices[1:2]
        b = Array("bias", tuple(index_range(c)[1] + 1 for c in channels))
        terms.insert(0, Term((), b[tuple(channels)]))
        inputs.append(b)
        shapes["bias"] = spec.bias_shape
    return spec_op(spec, IndexSum(y, gradient.indices, tuple(terms)), inputs, shapes,
                   CONV_ARGUMENTS, flops=spec.flops)
