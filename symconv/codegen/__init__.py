"""The code-generation stage: how a sum runs (``schedule``) and its C (``c`` scalar code,
``isa`` vector instruction sets, ``channels`` the implicit-GEMM plan, ``vector`` the
other lane plans, ``emit`` whole translation units)."""

from .c import PRELUDE, CSource, c_affine
from .emit import emit, emit_function

__all__ = ["PRELUDE", "CSource", "c_affine", "emit", "emit_function"]
