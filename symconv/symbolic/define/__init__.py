"""Forward definitions: every spec kind as an index sum, one builder per kind.

``definition(spec)`` is the entry point: convolutions, transposed
convolutions and pooling (``conv``), user text (``expression``) and derived
gradients as ops of their own (``gradient``) each return an
:class:`OpDefinition`.
"""

from __future__ import annotations

from dataclasses import replace

from ...spec import BATCH, AvgPoolSpec, ConvSpec, ConvTransposeSpec, ExprSpec, GradientSpec
from .conv import avg_pool, conv, conv_transpose
from .expression import expression
from .gradient import gradient
from ..batch import DEFINED_EXTENT
from .op import OpDefinition, check_addressable, open_batch

BUILDERS = {ConvSpec: conv, AvgPoolSpec: avg_pool, ConvTransposeSpec: conv_transpose,
            ExprSpec: expression}


def definition(spec) -> OpDefinition:
    """The forward definition of any spec symconv compiles (IRError where an array is too
    large to index, see check_addressable)."""
    op = _definition(spec)
    check_addressable(op)
    return op


def _definition(spec) -> OpDefinition:
    if isinstance(spec, GradientSpec):
        return gradient(spec, definition(spec.parent))
    builder = BUILDERS.get(type(spec))
    if builder is None:
        kinds = ", ".join(t.__name__ for t in (*BUILDERS, GradientSpec))
        raise TypeError(f"cannot define {type(spec).__name__}; expected one of {kinds}")
    if not spec.batch_open:
        return builder(spec)
    if isinstance(spec, ExprSpec):      # it opens its own named extent (expression.py)
        return builder(spec)
    op = builder(spec.with_batch(DEFINED_EXTENT))    # peeled to the item op: the batch is an
    op = open_batch(op, ("input", "output"), BATCH)    # outer loop at run time
    details = {**op.details, "spec": spec.to_dict()}
    if "flops" in details:
        details["flops"] = spec.flops                  # per item
    return replace(op, key=spec.key, description=spec.describe(), details=details)


__all__ = ["BUILDERS", "OpDefinition", "definition"]
