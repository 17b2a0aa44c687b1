"""JAX binding: symconv's compiled kernels as a ``jax.custom_vjp`` function.

    import jax, jax.numpy as jnp, symconv.jax as sj
    y = sj.conv(x, w, b, stride=2, padding=1)              # like lax.conv_general_dilated, NCHW
    loss = lambda w: jnp.sum(sj.conv(x, w, b, padding=1) ** 2)
    jax.jit(jax.grad(loss))(w)                              # under jit and grad
    jax.grad(lambda x: jnp.sum(jax.grad(loss_x)(x)))(x)     # second order too

Each call goes to the host through ``jax.pure_callback``: the kernel for the
traced shapes is compiled (or fetched from the kernel cache) when the
function is traced, and at run time the callback receives the arrays as
NumPy arrays, calls the C kernel on them without copying, and JAX copies the
result into its own buffer (one copy of the output per call; the XLA FFI
would avoid it).  The callback is pure, so ``jax.jit`` may cache, reorder or
drop calls like any other op.  The kernels take their batch size at run time,
so under ``jax.vmap`` over the input (or ``grad_output``) alone the forward and
``grad_input`` are one call on the vmapped axis folded into the batch; other
vmapped calls run once per vmapped element.

Differentiation is reverse mode (``jax.grad``, ``jax.vjp``): the backward
pass calls the kernels' ``grad_input``, ``grad_weight`` and ``grad_bias``,
which are custom-VJP functions themselves, so gradients of gradients work.
Forward mode (``jax.jvp``, ``jax.jacfwd``) is not available for a custom VJP.

Semantics are ``torch.nn.functional.conv{n}d``'s (channels first, any rank);
float32, or float64 with ``jax.config.update("jax_enable_x64", True)``.
Needs JAX (``pip install symconv[jax]``); ``import symconv`` does not import it.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .binding import conv_kernel

__all__ = ["conv", "ops"]

_DTYPES = ("float32", "float64")
_OPS: "weakref.WeakKeyDictionary[Any, Ops]" = weakref.WeakKeyDictionary()


def _callback(function: Callable, shape, dtype: np.dtype, *args, batched: tuple[int, ...] = ()):
    """``function(*args)`` on the host, as a pure op of known shape and dtype.

    ``batched``: the positions of the arguments that carry the kernel's run-time batch axis,
    when the result carries it too (a map over the batch).  Under ``jax.vmap`` such a call
    becomes one kernel call on the vmapped axis merged into the batch, where only those
    arguments are vmapped; any other vmapped call runs once per vmapped element."""
    ndims = [np.ndim(a) for a in args]

    def host(*arrays):
        # zero-copy when JAX hands over C-contiguous arrays of the dtype (the usual case)
        arrays = [np.ascontiguousarray(a, dtype) for a in arrays]
        extra = arrays[0].ndim - ndims[0]           # vmapped axes, in front of every array
        if extra == 0:
            return function(*arrays)
        lead = np.broadcast_shapes(*(a.shape[:extra] for a in arrays))
        mapped = [i for i, a in enumerate(arrays) if math.prod(a.shape[:extra]) > 1]
        flat = [np.broadcast_to(a, (*lead, *a.shape[extra:])).reshape(-1, *a.shape[extra:])
                for a in arrays]
        if batched and set(mapped) <= set(batched):   # one call, the vmapped axis in the batch
            merged = [np.ascontiguousarray(f.reshape(-1, *f.shape[2:])) if i in batched
                      else f[0] for i, f in enumerate(flat)]
            return function(*merged).reshape(*lead, *shape)
        results = [function(*(np.ascontiguousarray(f[v]) for f in flat))
                   for v in range(math.prod(lead))]
        return np.stack(results).reshape(*lead, *shape)
    return jax.pure_callback(host, jax.ShapeDtypeStruct(tuple(shape), dtype), *args,
                             vmap_method="expand_dims")


class Ops:
    """The custom-VJP functions of one compiled kernel.

    ``conv(x, w, b)`` / ``conv_nobias(x, w)`` are the forward op; ``grad_input(w, gy)``,
    ``grad_weight(x, gy)`` and ``grad_bias(gy)`` its gradients.  Each gradient is linear in
    each argument, and ``<u, GI(w, gy)> = <conv(u, w), gy>``, ``<v, GW(x, gy)> = <conv(x, v),
    gy>``: so their own VJPs are again these functions, and differentiation nests.
    """

    def __init__(self, kernel):
        record = kernel.record
        self.kernel = kernel
        self.dtype = np.dtype(record.dtype)
        self.shapes = dict(record.shapes)
        self.cotangent = record.cotangent
        self.has_bias = "bias" in kernel.inputs
        dtype, shapes = self.dtype, self.shapes

        def batch_of(shape, array):
            """An array shape with its open batch (None) taken from ``array``'s first axis."""
            return (array.shape[0], *shape[1:]) if shape[0] is None else shape

        out_shape, in_shape = shapes[record.output], shapes["input"]
        open_batch = out_shape[0] is None
        if self.has_bias:
            zeros = np.zeros(shapes["bias"], dtype)

            def forward_nobias(x, w):
                return kernel.forward(x, w, zeros)
        else:
            forward_nobias = kernel.forward

        @jax.custom_vjp
        def conv_nobias(x, w):
            return _callback(forward_nobias, batch_of(out_shape, x), dtype, x, w,
                             batched=(0,) if open_batch else ())

        def conv_nobias_fwd(x, w):
            return conv_nobias(x, w), (x, w)

        def conv_nobias_bwd(res, gy):
            x, w = res
            return grad_input(w, gy), grad_weight(x, gy)

        conv_nobias.defvjp(conv_nobias_fwd, conv_nobias_bwd)

        @jax.custom_vjp
        def conv(x, w, b):
            return _callback(kernel.forward, batch_of(out_shape, x), dtype, x, w, b,
                             batched=(0,) if open_batch else ())

        def conv_fwd(x, w, b):
            return conv(x, w, b), (x, w)

        def conv_bwd(res, gy):
            x, w = res
            return grad_input(w, gy), grad_weight(x, gy), grad_bias(gy)

        conv.defvjp(conv_fwd, conv_bwd)

        @jax.custom_vjp
        def grad_input(w, gy):
            return _callback(kernel.grad_input, batch_of(in_shape, gy), dtype, w, gy,
                             batched=(1,) if open_batch else ())

        def grad_input_fwd(w, gy):
            return grad_input(w, gy), (w, gy)

        def grad_input_bwd(res, u):
            w, gy = res
            return grad_weight(u, gy), conv_nobias(u, w)

        grad_input.defvjp(grad_input_fwd, grad_input_bwd)

        @jax.custom_vjp
        def grad_weight(x, gy):
            return _callback(kernel.grad_weight, shapes["weight"], dtype, x, gy)

        def grad_weight_fwd(x, gy):
            return grad_weight(x, gy), (x, gy)

        def grad_weight_bwd(res, v):
            x, gy = res
            return grad_input(v, gy), conv_nobias(x, v)

        grad_weight.defvjp(grad_weight_fwd, grad_weight_bwd)

        @jax.custom_vjp
        def grad_bias(gy):
            return _callback(kernel.grad_bias, shapes["bias"], dtype, gy)

        def grad_bias_fwd(gy):
            return grad_bias(gy), gy      # kept for its shape (the batch is the call's)

        def grad_bias_bwd(gy, t):
            spread = t.reshape(1, gy.shape[1], *(1,) * (gy.ndim - 2))
            return (jnp.broadcast_to(spread, gy.shape),)

        grad_bias.defvjp(grad_bias_fwd, grad_bias_bwd)

        self.conv, self.conv_nobias = conv, conv_nobias
        self.grad_input, self.grad_weight = grad_input, grad_weight
        self.grad_bias = grad_bias if self.has_bias else None


def ops(kernel) -> Ops:
    """The custom-VJP functions of a loaded kernel (made once per kernel)."""
    found = _OPS.get(kernel)
    if found is None:
        found = _OPS[kernel] = Ops(kernel)
    return found


def _dtype_name(name: str, value: Any) -> str:
    dtype = np.dtype(getattr(value, "dtype", None) or np.asarray(value).dtype)
    if dtype.name not in _DTYPES:
        raise TypeError(f"symconv.jax: {name} has dtype {dtype}; symconv's kernels take float32 "
                        f"or float64 (float64 needs jax_enable_x64)")
    return dtype.name


def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1, *,
         padding_mode: str = "zeros", cache_dir=None, target=None):
    """N-D convolution like ``torch.nn.functional.conv{n}d`` (channels first, cross-correlation)
    on compiled symconv kernels, differentiable with ``jax.grad`` and usable under ``jax.jit``.

    ``x`` is (N, C_in, *spatial), ``weight`` (C_out, C_in // groups, *kernel), ``bias``
    (C_out,) or None; any number of spatial dims; ``stride``, ``padding`` and ``dilation``
    take every form ``symconv.ConvSpec`` accepts.  The kernel for the shapes is compiled
    when the function is traced.
    """
    x, weight = jnp.asarray(x), jnp.asarray(weight)
    dtype = _dtype_name("input", x)
    if _dtype_name("weight", weight) != dtype or (
            bias is not None and _dtype_name("bias", bias) != dtype):
        raise TypeError("symconv.jax: input, weight and bias must have one dtype")
    if x.ndim != weight.ndim:
        raise ValueError(f"symconv.jax.conv: input of shape {x.shape} and weight of shape "
                         f"{weight.shape} must have the same number of dims")
    kernel = conv_kernel(x.shape, weight.shape, stride, padding, dilation, groups,
                         bias is not None, dtype, padding_mode, cache_dir, target)
    functions = ops(kernel)
    if bias is None:
        return functions.conv_nobias(x, weight)
    return functions.conv(x, weight, jnp.asarray(bias))
