"""The symbolic stage: index sums, their gradients and their loop nests (SymPy).

Read in this order: ``ir`` (the records), ``affine`` (integer toolkit),
``lowering``, ``printing``, ``interpreter``, ``derive`` (the VJP), ``define``
(forward sums of every spec kind).
"""


def clear_caches() -> None:
    """Forget what the integer passes remember (affine forms, a body's reads, lowered terms):
    it saves work within one compile; kept across compiles it would only hold memory."""
    from . import affine, ir, lowering
    for cached in (affine._linear_parts, affine.integer_form, affine.normalize_constraint,
                   ir._accesses, lowering._lower):
        cached.cache_clear()
