"""JAX binding: every symconv op as a JAX primitive, with forward and reverse mode derived.

    import jax, jax.numpy as jnp, symconv.jax as sj
    y = sj.conv(x, w, b, stride=2, padding=1)              # like lax.conv_general_dilated, NCHW
    y = sj.conv_transpose(x, w, stride=2)                   # like torch's conv_transpose{n}d
    y = sj.avg_pool(x, 3, stride=2, padding=1)
    shift = sj.op("Y[n, c, i] = sum(W[c, a] * X[n, c, 2*i + a], (a, 0, 2))",
                  {"X": (2, 3, 9), "W": (3, 3)})           # a user op, on JAX arrays
    loss = lambda w: jnp.sum(sj.conv(x, w, b, padding=1) ** 2)
    jax.jit(jax.grad(loss))(w); jax.jvp(loss, (w,), (dw,)); jax.hessian(loss)(w)

Every call binds one primitive, ``symconv_call``, whose parameters name the
compiled package (its handle: spec, cache and target as JSON), one of its
functions and, for a function whose output has the batch axis but no argument
does, the batch size.  Its rules come from the package's VJP table
(``symconv.autodiff``), nothing written by hand:

* **JVP**: the directional derivative along an argument's tangent is the VJP of
  that argument's VJP with respect to its cotangent (a derived function, linear
  in the tangent); so ``jax.jvp``, ``jax.linearize``, ``jax.jacfwd`` work.
* **Transpose**: a call linear in an argument transposes to that argument's VJP;
  reverse mode (``jax.grad``, ``jax.vjp``) is JAX's own linearize-and-transpose
  over these rules, so every order and every mix of modes works.
* **Batching** (``jax.vmap``): where only arguments with the run-time batch axis
  are mapped, one call with the mapped axis folded into the batch; else the call
  is mapped with ``lax.map``.

Calls reach the host through ``jax.pure_callback`` under ``jax.jit`` (the kernel
gets the arrays zero-copy; JAX copies the result into its buffer) and directly
outside it.  Derived packages (a gradient of a gradient) are built when a rule
first needs them, at trace time.  Semantics are ``torch.nn.functional``'s
(channels first, any rank); float32, or float64 with
``jax.config.update("jax_enable_x64", True)``.  Needs JAX (``pip install
symconv[jax]``); ``import symconv`` does not import it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from . import autodiff
from .binding import op_package, open_batch
from .graph.compiled import IndexOp, as_op
from .spec import channels_first_shape

__all__ = ["conv", "conv_transpose", "avg_pool", "op", "call", "SymOp"]

_DTYPES = ("float32", "float64")

call_p = Primitive("symconv_call")


def _function(handle: str, function: str):
    return autodiff.package(handle).kernel.functions[function]


def _run(arrays, handle: str, function: str, batch: int) -> np.ndarray:
    compiled = _function(handle, function)
    # zero-copy when JAX hands over C-contiguous arrays of the dtype (the usual case)
    return compiled(*(np.ascontiguousarray(a, compiled.dtype) for a in arrays), batch=batch)


def _impl(*args, handle: str, function: str, batch: int):
    return jnp.asarray(_run([np.asarray(a) for a in args], handle, function, batch))


def _abstract(*avals, handle: str, function: str, batch: int):
    compiled = _function(handle, function)
    return jax.core.ShapedArray(compiled.result_shape([a.shape for a in avals], batch),
                                compiled.dtype)


def _lowered(*args, handle: str, function: str, batch: int):
    aval = _abstract(*args, handle=handle, function=function,
                     batch=batch)
    return jax.pure_callback(lambda *arrays: _run(arrays, handle, function, batch),
                             jax.ShapeDtypeStruct(aval.shape, aval.dtype), *args)


def _bind(handle: str, function: str, args, batch: int):
    return call_p.bind(*args, handle=handle, function=function, batch=int(batch))


def _leading(shape) -> int:
    return shape[0] if len(shape) else 0


def _jvp(primals, tangents, *, handle: str, function: str, batch: int):
    """Each nonzero tangent adds one ``symconv_jvp`` term: linear in the tangent, it
    transposes to the function's own VJP (so reverse mode needs no other package)."""
    out = _bind(handle, function, primals, batch)
    names = _function(handle, function).args
    terms = [jvp_p.bind(*primals, tangent, handle=handle, function=function, arg=name,
                        batch=_leading(out.shape))
             for name, tangent in zip(names, tangents) if type(tangent) is not ad.Zero]
    if not terms:
        return out, jnp.zeros_like(out)
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return out, total


def _transpose(cotangent, *args, handle: str, function: str, batch: int):
    """A call linear in some arguments: each one's cotangent is its VJP."""
    names = _function(handle, function).args
    known = {name: a for name, a in zip(names, args) if not ad.is_undefined_primal(a)}
    return [None if not ad.is_undefined_primal(arg) else
            _vjp_call(handle, function, name, known, cotangent, arg.aval)
            for name, arg in zip(names, args)]


def _vjp_call(handle: str, function: str, arg: str, known: dict, cotangent, aval):
    """``function``'s VJP with respect to ``arg`` (whose value is not needed: the function is
    linear in it) on the known arguments and ``cotangent``."""
    if type(cotangent) is ad.Zero:
        return ad.Zero(aval)
    rule = autodiff.vjp(autodiff.package(handle), function, arg)
    missing = [a for a in rule.sources if a is not None and a not in known]
    if missing:
        raise TypeError(f"symconv.jax: {function} is not linear in {arg} (its gradient reads "
                        f"{', '.join(missing)}); it cannot be transposed")
    return _bind(rule.package.handle, rule.function, rule.arrays(known, cotangent),
                 _leading(aval.shape))


def _batching(args, dims, *, handle: str, function: str, batch: int):
    compiled = _function(handle, function)
    mapped = {i for i, d in enumerate(dims) if d is not None}
    size = next(args[i].shape[dims[i]] for i in mapped)
    moved = [jnp.moveaxis(a, d, 0) if d is not None else a for a, d in zip(args, dims)]
    if compiled.maps_batch and mapped <= set(compiled.batched):
        folded = [a.reshape(-1, *a.shape[2:]) if i in mapped else a for i, a in enumerate(moved)]
        out = _bind(handle, function, folded, batch)
        return out.reshape(size, -1, *out.shape[1:]), 0

    def one(sliced):
        pieces = iter(sliced)
        return _bind(handle, function, [next(pieces) if i in mapped else a
                                        for i, a in enumerate(moved)], batch)
    return jax.lax.map(one, [moved[i] for i in sorted(mapped)]), 0


# --- the directional derivative of one argument, as a primitive of its own ----------------------
# jvp_p(*args, tangent) is function's derivative along ``tangent`` for argument ``arg``.  Run, it
# is the derived VJP of that argument's VJP (built on first use); transposed, it is the VJP.

jvp_p = Primitive("symconv_jvp")


def _realized(handle: str, function: str, arg: str) -> tuple[str, str, list[int]]:
    """The call that computes a ``symconv_jvp``: its handle, function, and for each of its
    arguments the position among ``(*function's arguments, tangent)`` it comes from."""
    rule = autodiff.jvp(autodiff.package(handle), function, arg)
    names = _function(handle, function).args
    return (rule.package.handle, rule.function,
            rule.arrays({name: i for i, name in enumerate(names)}, len(names)))


def _jvp_impl(*args, handle: str, function: str, arg: str, batch: int):
    target, name, positions = _realized(handle, function, arg)
    return _impl(*(args[p] for p in positions), handle=target, function=name, batch=batch)


def _jvp_abstract(*avals, handle: str, function: str, arg: str, batch: int):
    return _abstract(*avals[:-1], handle=handle, function=function, batch=batch)


def _jvp_lowered(*args, handle: str, function: str, arg: str, batch: int):
    target, name, positions = _realized(handle, function, arg)
    return _lowered(*(args[p] for p in positions), handle=target, function=name, batch=batch)


def _jvp_jvp(primals, tangents, *, handle: str, function: str, arg: str, batch: int):
    target, name, positions = _realized(handle, function, arg)
    return _jvp([primals[p] for p in positions], [tangents[p] for p in positions],
                handle=target, function=name, batch=batch)


def _jvp_transpose(cotangent, *args, handle: str, function: str, arg: str, batch: int):
    *primals, tangent = args
    if any(ad.is_undefined_primal(a) for a in primals):
        raise TypeError(f"symconv.jax: the derivative of {function} along {arg} is linear in "
                        f"the tangent only")
    known = dict(zip(_function(handle, function).args, primals))
    return [None] * len(primals) + [_vjp_call(handle, function, arg, known, cotangent,
                                              tangent.aval)]


def _jvp_batching(args, dims, *, handle: str, function: str, arg: str, batch: int):
    target, name, positions = _realized(handle, function, arg)
    return _batching([args[p] for p in positions], [dims[p] for p in positions],
                     handle=target, function=name, batch=batch)


def _register(primitive: Primitive, impl, abstract, lowered, jvp, transpose, batch) -> None:
    """A primitive's rules: run eagerly, shape, lower under jit, differentiate, vmap."""
    primitive.def_impl(impl)
    primitive.def_abstract_eval(abstract)
    mlir.register_lowering(primitive, mlir.lower_fun(lowered, multiple_results=False))
    ad.primitive_jvps[primitive] = jvp
    ad.primitive_transposes[primitive] = transpose
    batching.primitive_batchers[primitive] = batch


_register(call_p, _impl, _abstract, _lowered, _jvp, _transpose, _batching)
_register(jvp_p, _jvp_impl, _jvp_abstract, _jvp_lowered, _jvp_jvp, _jvp_transpose,
          _jvp_batching)


def call(package: "autodiff.Package", function: str, *arrays, batch: int = 0):
    """``function`` of a compiled package (``symconv.autodiff.Package``) on JAX arrays, as the
    primitive: differentiable in both modes, to any order.  ``batch`` sizes an output batch
    axis that no argument has."""
    return _bind(package.handle, function, [jnp.asarray(a) for a in arrays], batch)


# --- convolution, transposed convolution, pooling ---------------------------------------------

def _dtype(named: dict[str, Any]) -> str:
    """The one dtype of a call's arrays (None for an absent bias), as its name."""
    names = {}
    for name, value in named.items():
        if value is None:
            continue
        dtype = np.dtype(getattr(value, "dtype", None) or np.asarray(value).dtype)
        if dtype.name not in _DTYPES:
            raise TypeError(f"symconv.jax: {name} has dtype {dtype}; symconv's kernels take "
                            f"float32 or float64 (float64 needs jax_enable_x64)")
        names[name] = dtype.name
    if len(set(names.values())) > 1:
        listed = ", ".join(f"{name} {dtype}" for name, dtype in names.items())
        raise TypeError(f"symconv.jax: the arrays have different dtypes ({listed}); use one")
    return next(iter(names.values()))


def _forward(kind: str, arrays: list, cache_dir, target, input_shape=None, **fields):
    """The op's forward on ``arrays``; its spec's ``input_shape`` is the first array's shape
    (with the batch open) unless given."""
    arrays = [jnp.asarray(a) for a in arrays if a is not None]
    package = op_package(kind, cache_dir, target,
                         input_shape=open_batch(input_shape or arrays[0].shape), **fields)
    return _bind(package.handle, "forward", arrays, _leading(arrays[0].shape))


def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1, *,
         padding_mode: str = "zeros", layout: str = "channels_first", cache_dir=None,
         target=None):
    """N-D convolution like ``torch.nn.functional.conv{n}d`` (channels first, cross-correlation)
    on compiled symconv kernels, under ``jax.jit``, ``grad``, ``jvp`` and ``vmap``.

    ``x`` is (N, C_in, *spatial), ``weight`` (C_out, C_in // groups, *kernel), ``bias``
    (C_out,) or None; any number of spatial dims; ``stride``, ``padding``, ``dilation`` and
    ``padding_mode`` take every form ``symconv.ConvSpec`` accepts.  With
    ``layout="channels_last"`` ``x`` is (N, *spatial, C_in) and so is the output (JAX's
    NHWC).  The kernel for the shapes is compiled when the function is traced.
    """
    dtype = _dtype({"input": x, "weight": weight, "bias": bias})
    if np.ndim(x) != np.ndim(weight):
        raise ValueError(f"symconv.jax.conv: input of shape {np.shape(x)} and weight of shape "
                         f"{np.shape(weight)} must have the same number of dims")
    shape = np.shape(x)
    return _forward("conv", [x, weight, bias], cache_dir, target,
                    input_shape=channels_first_shape(shape) if layout == "channels_last"
                    else shape,
                    weight_shape=tuple(np.shape(weight)), stride=stride, padding=padding,
                    dilation=dilation, groups=groups, bias=bias is not None, dtype=dtype,
                    padding_mode=padding_mode, layout=layout)


def conv_transpose(x, weight, bias=None, stride=1, padding=0, output_padding=0,
                   groups: int = 1, dilation=1, *, cache_dir=None, target=None):
    """N-D transposed convolution like ``torch.nn.functional.conv_transpose{n}d`` (same
    argument order): ``weight`` is (C_in, C_out // groups, *kernel)."""
    dtype = _dtype({"input": x, "weight": weight, "bias": bias})
    return _forward("conv_transpose", [x, weight, bias], cache_dir, target,
                    weight_shape=tuple(np.shape(weight)), stride=stride, padding=padding,
                    output_padding=output_padding, dilation=dilation, groups=groups,
                    bias=bias is not None, dtype=dtype)


def avg_pool(x, kernel_size, stride=None, padding=0, *, cache_dir=None, target=None):
    """N-D average pooling like ``torch.nn.functional.avg_pool{n}d`` with
    ``count_include_pad=True``."""
    return _forward("avg_pool", [x], cache_dir, target, kernel_size=kernel_size, stride=stride,
                    padding=padding, dtype=_dtype({"input": x}))


# --- user ops -----------------------------------------------------------------------------------

class SymOp:
    """A user op from ``symconv.op`` (an index sum) on JAX arrays, in the order of its
    ``shapes``; made without a dtype it follows its arrays (float32 or float64)."""

    def __init__(self, index: IndexOp, *, cache_dir=None, target=None):
        if not isinstance(index, IndexOp):
            raise TypeError(f"SymOp takes a symconv.op(...), got {type(index).__name__}")
        self.index = index
        self.names = index.names
        self._packages = index.packages(cache_dir, target)

    def __call__(self, *arrays):
        if len(arrays) != len(self.names):
            raise TypeError(f"op {self.index.spec.output_name} takes {len(self.names)} arrays "
                            f"({', '.join(self.names)}), got {len(arrays)}")
        dtype = _dtype(dict(zip(self.names, arrays)))
        if dtype not in self._packages:
            raise TypeError(f"op {self.index.spec.output_name} was made with dtype="
                            f"{self.index.spec.dtype!r}; pass {self.index.spec.dtype} arrays, "
                            f"or make the op without a dtype to follow its arrays")
        return call(self._packages[dtype], "forward", *arrays)

    def __repr__(self) -> str:
        return f"<symconv.jax op {self.index.spec.describe()}>"


def op(expression, shapes=None, dtype: str | None = None, zero_outside=(), **kwargs) -> SymOp:
    """A user op on JAX arrays: ``op(text, shapes, ...)`` takes ``symconv.op``'s arguments, or
    ``op(symconv.op(...))`` an op already made; ``cache_dir`` and ``target`` go to
    :class:`SymOp`."""
    return SymOp(as_op(expression, shapes, dtype, zero_outside, "symconv.jax.op"), **kwargs)
