"""What the framework bindings (``symconv.torch``, ``symconv.jax``, ``symconv.dask``) share:
the compiled kernel for a convolution's shapes and arguments.

Kernels are specialised to exact shapes, so a binding asks for one per new
shape: the first request compiles it into the package cache (or finds it
there), later ones find the loaded kernel in the process's one kernel cache
(``symconv.compiler.KERNELS``).  SymPy and the C compiler are only touched on
a cache miss.
"""

from __future__ import annotations

from .spec import ConvSpec, spec_of


def conv_kernel(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1, bias=True,
                dtype="float32", padding_mode="zeros", cache_dir=None, target=None):
    """The loaded ``symconv.Kernel`` of a convolution: compiled on first use into ``cache_dir``
    (default ``$SYMCONV_CACHE_DIR`` or ``~/.cache/symconv``), then kept in this process."""
    from .compiler import KERNELS
    spec = spec_of(ConvSpec, input_shape=tuple(input_shape), weight_shape=tuple(weight_shape),
                   stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                   dtype=dtype, padding_mode=padding_mode)
    return KERNELS.get(spec, cache_dir, target)
