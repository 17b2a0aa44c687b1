"""A derived gradient as an op of its own, so that it can be differentiated again."""

from __future__ import annotations

import itertools

from ...errors import IRError
from ...spec import GradientSpec
from ..derive import vjp
from ..ir import Array, IndexSum
from .op import OpDefinition, spec_op


def gradient(spec: GradientSpec, parent: OpDefinition) -> OpDefinition:
    """One derived gradient of another op, as an op: its inputs are what the gradient reads
    (the parent's inputs and its cotangent), and its own gradients are derived again.
    ``parent`` is the definition of ``spec.parent``."""
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
    name = output_name(fn.output.name, [a.name for a in inputs])
    batched = gradient_batched(parent) if parent.batch else frozenset()
    if name != fn.output.name:
        batched |= {name} if fn.output.name in batched else set()
        fn = IndexSum(Array(name, fn.output.shape), fn.indices, fn.terms)
    shapes = {**parent.shapes, cotangent.name: parent.shapes[output.name],
              fn.output.name: parent.shapes[wrt]}
    batch = parent.batch and parent.batch.with_arrays(batched)
    return spec_op(spec, fn, inputs,
                   {a: shapes[a] for a in (*(i.name for i in inputs), fn.output.name)},
                   batch=batch)


def output_name(base: str, inputs) -> str:
    """``base``, else ``base_2``, ``base_3``...: the first name that, with the names of the
    op's own gradients (``grad_<input>``) and cotangent (``grad_<name>``), meets no other
    array of the op (a gradient of a gradient of a gradient would otherwise reuse one)."""
    taken = set(inputs) | {f"grad_{i}" for i in inputs}
    for n in itertools.count(1):
        name = base if n == 1 else f"{base}_{n}"
        if name not in taken and f"grad_{name}" not in taken:
            return name


def gradient_batched(op: OpDefinition) -> frozenset[str]:
    """The arrays of an op and of its gradients that have the op's run-time batch axis: its
    own, the output's cotangent when the output has it, the gradient of each that has it."""
    arrays = op.batch.arrays
    output = op.forward.output.name
    cotangent = {f"grad_{output}"} if output in arrays else set()
    return frozenset(arrays | cotangent | {f"grad_{name}" for name in arrays})
