"""What every definition returns: an op's forward sum and how callers see its arrays."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping

from ...errors import IRError
from ..batch import peel
from ..ir import Array, Batch, IndexSum


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
    batch: Batch | None = None

    def __post_init__(self) -> None:
        arrays = {a.name: a for a in (*self.inputs, self.forward.output)}
        for name, array in arrays.items():
            shape = self.shapes[name]
            if self.batch is not None and name in self.batch.arrays:
                shape = shape[1:]
            if math.prod(shape) != math.prod(array.shape):
                raise ValueError(f"{self.kind}: public shape {self.shapes[name]} of {name} does "
                                 f"not match its IR shape {array.shape}")


ADDRESSABLE_BYTES = 2 ** 63    # the kernels' offsets are int64: an array past this wraps


def check_addressable(op: OpDefinition) -> None:
    """Refuse an op with an array (one item's, over a run-time batch) of 2**63 bytes or
    more: no machine holds it, and the C's int64 offsets into it would wrap."""
    itemsize = 4 if op.dtype == "float32" else 8
    for array in (*op.inputs, op.forward.output):
        size = math.prod(array.shape) * itemsize
        if size >= ADDRESSABLE_BYTES:
            raise IRError(f"{op.kind}: {array.name} of shape {op.shapes[array.name]} would "
                          f"take {size:.3g} bytes{' per item' if op.batch else ''}; the "
                          f"kernels index arrays of under 2**63 bytes")


def spec_op(spec, forward: IndexSum, inputs, shapes, arguments=(), batch: Batch | None = None,
            **details) -> OpDefinition:
    """A spec's op: every input differentiable, the spec kept for the manifest."""
    inputs = tuple(inputs)
    return OpDefinition(kind=spec.KIND, forward=forward, inputs=inputs,
                        differentiable=tuple(a.name for a in inputs), shapes=shapes,
                        dtype=spec.dtype, key=spec.key, description=spec.describe(),
                        details={"spec": spec.to_dict(), **details},
                        arguments=tuple(arguments) or tuple(a.name for a in inputs), batch=batch)


def open_batch(op: OpDefinition, arrays, extent: str) -> OpDefinition:
    """An op defined for batch 1 (``arrays`` have that batch as their first axis) as the
    item op of a batch known only at run time: see symbolic.batch."""
    forward, name = peel(op.forward, arrays, extent)
    items = {a.name: a for a in (*forward.inputs, forward.output)}
    inputs = tuple(items.get(a.name, a) if a.name in arrays else a for a in op.inputs)
    shapes = {name_: (None, *shape[1:]) if name_ in arrays else shape
              for name_, shape in op.shapes.items()}
    return replace(op, forward=forward, inputs=inputs, shapes=shapes,
                   batch=Batch(extent, name, frozenset(arrays)))
