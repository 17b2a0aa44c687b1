"""What the framework bindings (``symconv.torch``, ``symconv.jax``, ``symconv.dask``) share:
the compiled kernel for a convolution's shapes and arguments.

Kernels are specialised to exact shapes but the batch size, which is left to
run time (one package serves every batch), so a binding asks for one per new
shape: the first request compiles it into the package cache (or finds it
there), later ones find the loaded kernel in the process's one kernel cache
(``symconv.compiler.KERNELS``).  SymPy and the C compiler are only touched on
a cache miss.
"""

from __future__ import annotations

from .spec import ConvSpec, spec_of


def conv_kernel(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1, bias=True,
                dtype="float32", padding_mode="zeros", cache_dir=None, target=None,
                fixed_batch: bool = False):
    """The loaded ``symconv.Kernel`` of a convolution: compiled on first use into ``cache_dir``
    (default ``$SYMCONV_CACHE_DIR`` or ``~/.cache/symconv``), then kept in this process.
    Its batch size is left to run time unless ``fixed_batch``."""
    from .compiler import KERNELS
    input_shape = tuple(input_shape)
    if not fixed_batch and input_shape:
        input_shape = (None, *input_shape[1:])
    spec = spec_of(ConvSpec, input_shape=input_shape, weight_shape=tuple(weight_shape),
                   stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                   dtype=dtype, padding_mode=padding_mode)
    return KERNELS.get(spec, cache_dir, target)
