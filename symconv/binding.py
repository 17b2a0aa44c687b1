"""What the framework bindings (``symconv.torch``, ``symconv.jax``, ``symconv.dask``) share:
the compiled package of an op for the shapes and arguments of a call.

Kernels are specialised to exact shapes but the batch size, which is left to
run time (one package serves every batch), so a binding asks for one per new
shape: the first request compiles it into the package cache (or finds it
there), later ones find the loaded kernel in the process's one kernel cache
(``symconv.compiler.KERNELS``).  SymPy and the C compiler are only touched on
a cache miss.  Gradients, of any order and in either mode, come from the
package's VJP table (``symconv.autodiff``).
"""

from __future__ import annotations

from .autodiff import Package, package_of
from .spec import SPECS, ConvSpec, spec_of


def open_batch(shape) -> tuple:
    """An input shape with its batch left to run time."""
    shape = tuple(shape)
    return (None, *shape[1:]) if shape else shape


def op_package(kind: str, cache_dir=None, target=None, **fields) -> Package:
    """The package of a spec of ``kind`` (``"conv"``, ``"conv_transpose"``, ``"avg_pool"``,
    ``"expr"``) with these fields."""
    return package_of(spec_of(SPECS[kind], **fields), cache_dir, target)


def conv_package(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, dtype="float32", padding_mode="zeros", cache_dir=None, target=None,
                 fixed_batch: bool = False) -> Package:
    """The package of a convolution, its batch left to run time unless ``fixed_batch``."""
    return op_package(ConvSpec.KIND, cache_dir, target,
                      input_shape=tuple(input_shape) if fixed_batch else open_batch(input_shape),
                      weight_shape=tuple(weight_shape), stride=stride, padding=padding,
                      dilation=dilation, groups=groups, bias=bias, dtype=dtype,
                      padding_mode=padding_mode)


def conv_kernel(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1, bias=True,
                dtype="float32", padding_mode="zeros", cache_dir=None, target=None,
                fixed_batch: bool = False):
    """The loaded ``symconv.Kernel`` of a convolution: compiled on first use into ``cache_dir``
    (default ``$SYMCONV_CACHE_DIR`` or ``~/.cache/symconv``), then kept in this process.
    Its batch size is left to run time unless ``fixed_batch``."""
    return conv_package(input_shape, weight_shape, stride, padding, dilation, groups, bias,
                        dtype, padding_mode, cache_dir, target, fixed_batch).kernel
