"""What the framework bindings (``symconv.torch``, ``symconv.jax``, ``symconv.dask``) share:
the compiled kernel for a convolution's shapes and arguments, memoised per process.

Kernels are specialised to exact shapes, so a binding asks for one per new
shape: the first request compiles it into the kernel cache (or finds it
there), later ones return the loaded kernel without building or hashing a
spec.  SymPy and the C compiler are only touched on a cache miss.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from .spec import ConvSpec

_KERNELS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def conv_fields(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1, bias=True,
                dtype="float32", padding_mode="zeros") -> dict[str, Any]:
    """ConvSpec fields; ``padding_mode`` is passed only when it is not the default."""
    fields = dict(input_shape=tuple(int(v) for v in input_shape),
                  weight_shape=tuple(int(v) for v in weight_shape), stride=_freeze(stride),
                  padding=_freeze(padding), dilation=_freeze(dilation), groups=groups, bias=bias,
                  dtype=dtype)
    if padding_mode != "zeros":
        fields["padding_mode"] = padding_mode
    return fields


def conv_spec(*args, **kwargs) -> ConvSpec:
    """The validated ConvSpec of :func:`conv_fields`' arguments."""
    return ConvSpec(**conv_fields(*args, **kwargs))


def conv_kernel(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1, bias=True,
                dtype="float32", padding_mode="zeros", cache_dir=None, target=None):
    """The loaded ``symconv.Kernel`` of a convolution: compiled on first use into ``cache_dir``
    (default ``$SYMCONV_CACHE_DIR`` or ``~/.cache/symconv``), then memoised in this process."""
    fields = conv_fields(input_shape, weight_shape, stride, padding, dilation, groups, bias, dtype,
                         padding_mode)
    cache = os.fspath(cache_dir) if cache_dir is not None else os.environ.get("SYMCONV_CACHE_DIR")
    key = (tuple(sorted(fields.items())), cache, target)
    kernel = _KERNELS.get(key)
    if kernel is None:
        from .compiler import compile_conv  # SymPy loads only if a build is needed
        with _LOCK:
            kernel = _KERNELS.get(key)
            if kernel is None:
                kernel = compile_conv(ConvSpec(**fields), cache_dir=cache_dir, target=target)
                _KERNELS[key] = kernel
    return kernel


def spec_kernel(spec: ConvSpec, cache_dir=None, target=None):
    """:func:`conv_kernel` for a ConvSpec."""
    data = spec.to_dict()
    return conv_kernel(data["input_shape"], data["weight_shape"], data["stride"],
                       data["padding"], data["dilation"], data["groups"], data["bias"],
                       data["dtype"], data.get("padding_mode", "zeros"), cache_dir, target)
