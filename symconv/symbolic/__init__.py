"""The symbolic stage: index sums, their gradients and their loop nests (SymPy).

Read in this order: ``ir`` (the records), ``affine`` (integer toolkit),
``lowering``, ``printing``, ``interpreter``, ``derive`` (the VJP), ``define``
(forward sums of every spec kind).
"""
