"""What the framework bindings (``symconv.torch``, ``symconv.jax``, ``symconv.dask``) share:
the compiled kernel for a convolution's shapes and arguments.

Kernels are specialised to exact shapes, so a binding asks for one per new
shape: the first request compiles it into the package cache (or finds it
there), later ones find the loaded kernel in the process's one kernel cache
(``symconv.compiler.KERNELS``).  SymPy and the C compiler are only touched on
a cache miss.
"""

from __future__ import annotations

from typing import Any

from .spec import ConvSpec, spec_of


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def conv_fields(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1, bias=True,
                dtype="float32", padding_mode="zeros") -> dict[str, Any]:
    """ConvSpec fields; ``padding_mode`` is passed only when it is not the default."""
    fields = dict(input_shape=tuple(int(v) for v in input_shape),
                  weight_shape=tuple(int(v) for v in weight_shape), stride=_frozen(stride),
                  padding=_frozen(padding), dilation=_frozen(dilation), groups=groups, bias=bias,
                  dtype=dtype)
    if padding_mode != "zeros":
        fields["padding_mode"] = padding_mode
    return fields


def conv_kernel(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1, bias=True,
                dtype="float32", padding_mode="zeros", cache_dir=None, target=None):
    """The loaded ``symconv.Kernel`` of a convolution: compiled on first use into ``cache_dir``
    (default ``$SYMCONV_CACHE_DIR`` or ``~/.cache/symconv``), then kept in this process."""
    from .compiler import KERNELS
    spec = spec_of(ConvSpec, **conv_fields(input_shape, weight_shape, stride, padding, dilation,
                                           groups, bias, dtype, padding_mode))
    return KERNELS.get(spec, cache_dir, target)
