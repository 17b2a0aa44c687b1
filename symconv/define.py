"""Forward definitions: a ConvSpec (or any op) as an index sum.

This is the only module that knows convolution words.  A convolution is
written exactly as its definition reads::

    output[n, o, i] = bias[o] + Σ_c Σ_k weight[o, c, k] · input[n, c, s·i + d·k - p]

with the padding expressed as a guard ``0 <= s·i + d·k - p <= W - 1`` (the
input is zero outside its range).  Groups are an explicit axis: the arrays
are viewed as ``input[n, g, c, ...]``, ``weight[g, o, c, ...]``,
``output[n, g, o, ...]``: the same memory in C order, and every index stays
affine, so the derivation needs no special case for grouped or depthwise
convolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from .ir import Array, IndexSum, Term, index
from .spec import ConvSpec


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


def conv(spec: ConvSpec) -> OpDefinition:
    """The forward convolution of a spec as an index sum."""
    n_batch, c_in, *spatial = spec.input_shape
    c_out, c_group, *kernel = spec.weight_shape
    out_spatial = spec.output_shape[2:]
    groups = spec.groups
    grouped = groups > 1

    n = index("n", n_batch)
    g = (index("g", groups),) if grouped else ()
    o = index("o", c_out // groups)
    c = index("c", c_group)
    i = [index(f"i{t}", size) for t, size in enumerate(out_spatial)]
    k = [index(f"k{t}", size) for t, size in enumerate(kernel)]
    group_axis = (groups,) if grouped else ()

    x = Array("input", (n_batch, *group_axis, c_group, *spatial))
    w = Array("weight", (*group_axis, c_out // groups, c_group, *kernel))
    y = Array("output", (n_batch, *group_axis, c_out // groups, *out_spatial))

    positions = [s * it + d * kt - lo
                 for it, kt, s, d, (lo, _) in zip(i, k, spec.stride, spec.dilation, spec.padding)]
    body = w[(*g, o, c, *k)] * x[(n, *g, c, *positions)]
    inside_input = [bound for position, size in zip(positions, spatial)
                    for bound in (position, size - 1 - position)]
    terms = [Term((c, *k), body, tuple(inside_input))]
    inputs = [x, w]
    shapes = {"input": spec.input_shape, "weight": spec.weight_shape, "output": spec.output_shape}
    if spec.bias:
        b = Array("bias", (*group_axis, c_out // groups))
        terms.insert(0, Term((), b[(*g, o)]))
        inputs.append(b)
        shapes["bias"] = spec.bias_shape

    forward = IndexSum(y, (n, *g, o, *i), tuple(terms))
    return OpDefinition(
        kind="conv",
        forward=forward,
        inputs=tuple(inputs),
        differentiable=tuple(a.name for a in inputs),
        shapes=shapes,
        dtype=spec.dtype,
        key=spec.key,
        description=spec.describe(),
        details={"spec": spec.to_dict(), "flops": spec.flops},
    )
