"""What every definition returns: an op's forward sum and how callers see its arrays."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import sympy

from ..ir import Array, IndexSum


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
    arguments: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        arrays = {a.name: a for a in (*self.inputs, self.forward.output)}
        for name, array in arrays.items():
            if math.prod(self.shapes[name]) != math.prod(array.shape):
                raise ValueError(f"{self.kind}: public shape {self.shapes[name]} of {name} does "
                                 f"not match its IR shape {array.shape}")


def spec_op(spec, forward: IndexSum, inputs, shapes, arguments=(), **details) -> OpDefinition:
    """A spec's op: every input differentiable, the spec kept for the manifest."""
    inputs = tuple(inputs)
    return OpDefinition(kind=spec.KIND, forward=forward, inputs=inputs,
                        differentiable=tuple(a.name for a in inputs), shapes=shapes,
                        dtype=spec.dtype, key=spec.key, description=spec.describe(),
                        details={"spec": spec.to_dict(), **details},
                        arguments=tuple(arguments) or tuple(a.name for a in inputs))


def rebased(expr, arrays: dict[str, Array]):
    """``expr`` with the reads of the named arrays reading the given arrays instead."""
    return expr.replace(
        lambda e: isinstance(e, sympy.Indexed) and str(e.base.label) in arrays,
        lambda e: arrays[str(e.base.label)][e.indices])
