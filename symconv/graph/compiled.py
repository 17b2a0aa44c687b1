"""Graph ops run by compiled kernels: convolution, transposed convolution, average pooling
and user-defined index sums.

Each call of a compiled function is one graph node.  Its backward rule calls
the derived gradient functions the same way, so it is recorded under
``create_graph``; the gradient of a gradient function is the gradient of its
own op (a ``GradientSpec``), compiled when first needed: derivatives of any
order, all derived.  Kernels are specialised to exact shapes but the batch
size, which is left to run time: the first call with new shapes compiles them
(``symconv.compiler``, imported on first use so
``import symconv`` stays free of SymPy) into the kernel cache, and later calls
find them in the process's one kernel cache.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np

from .. import autodiff
from ..autodiff import Package, package_of
from ..binding import open_batch
from ..spec import (AvgPoolSpec, ConvSpec, ConvTransposeSpec, ExprSpec, channels_first_shape,
                    spec_of)
from .engine import Tensor, as_tensor, record


def kernel_of(spec) -> Any:
    """The loaded kernel of any spec, from the process's one kernel cache."""
    from ..compiler import KERNELS  # here, not at import: SymPy loads only if a build is needed
    return KERNELS.get(spec)


def _float_dtype(op: str, *tensors: Tensor) -> np.dtype:
    dtype = np.result_type(*(t.dtype for t in tensors))
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"{op}: compiled kernels take float32 or float64 arrays, got "
                        f"{', '.join(str(t.dtype) for t in tensors)}")
    return dtype


class _Buffers:
    """Kernel outputs kept from one step to the next.  An array nothing else references any
    more is written again instead of a fresh one: the first write to newly mapped pages
    costs about ten times a write to reused memory."""

    def __init__(self, per_shape: int = 4):
        self.per_shape = per_shape
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def get(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        with self._lock:
            pool = self._free.setdefault((shape, np.dtype(dtype).str), [])
            for array in pool:
                if sys.getrefcount(array) == 3:  # the pool, this loop and the call: no one else
                    return array
            array = np.empty(shape, dtype)
            if len(pool) < self.per_shape:
                pool.append(array)
            return array


_buffers = _Buffers()


def call(label: str, package: Package, function: str, operands: dict[str, Tensor],
         dtype: np.dtype, batch: int | None = None) -> Tensor:
    """Function ``function`` of a compiled package on the named operands, as a graph node
    (``batch``: the size of an output batch axis no operand has).  Its rule calls the
    functions the package's VJP table names (see symconv.autodiff)."""
    compiled = package.kernel.functions[function]
    names = compiled.args
    inputs = tuple(operands[name] for name in names)
    arrays = [np.ascontiguousarray(t.data, dtype) for t in inputs]
    out = _buffers.get(compiled.output_shape(*arrays, batch=batch), dtype)
    data = compiled(*arrays, out=out)

    def backward(g, out):
        values = dict(zip(names, inputs))
        wanted = autodiff.differentiable(package, function)
        grads = []
        for name, tensor in zip(names, inputs):
            if tensor.requires_grad and name in wanted:
                rule = autodiff.vjp(package, function, name)
                given = dict(zip(rule.params, rule.arrays(values, g)))
                grads.append(call(f"grad_{name}", rule.package, rule.function, given, dtype,
                                  tensor.shape[0] if tensor.ndim else None))
            else:
                grads.append(None)
        return tuple(grads)
    return record(label, data, inputs, backward)


def _forward(label: str, spec: Any, inputs: tuple[Tensor, ...], dtype: np.dtype) -> Tensor:
    package = package_of(spec)
    return call(label, package, "forward", dict(zip(package.kernel.inputs, inputs)), dtype)


def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1,
         padding_mode: str = "zeros", layout: str = "channels_first") -> Tensor:
    """N-D convolution (cross-correlation) like ``torch.nn.functional.conv{n}d``.

    ``x`` is (N, C_in, *spatial), ``weight`` (C_out, C_in // groups, *kernel),
    ``bias`` (C_out,) or None; any number of spatial dims.  ``stride``,
    ``padding``, ``dilation`` and ``padding_mode`` take every form ``ConvSpec``
    accepts; with ``layout="channels_last"`` ``x`` and the output are (N, *spatial, C).
    The compiled kernel is chosen by shapes and arguments and built once.
    """
    x, weight = as_tensor(x), as_tensor(weight)
    inputs = (x, weight) if bias is None else (x, weight, as_tensor(bias))
    dtype = _float_dtype("conv", *inputs)
    if x.ndim != weight.ndim:
        raise ValueError(f"conv: input of shape {x.shape} and weight of shape {weight.shape} "
                         f"must have the same number of dims")
    shape = channels_first_shape(x.shape) if layout == "channels_last" else x.shape
    spec = spec_of(ConvSpec, input_shape=open_batch(shape), weight_shape=weight.shape,
                   stride=stride, padding=padding, dilation=dilation, groups=groups,
                   bias=bias is not None, dtype=dtype.name, padding_mode=padding_mode,
                   layout=layout)
    return _forward("conv", spec, inputs, dtype)


def conv_transpose(x, weight, bias=None, stride=1, padding=0, output_padding=0, dilation=1,
                   groups: int = 1) -> Tensor:
    """N-D transposed convolution like ``torch.nn.functional.conv_transpose{n}d``: ``weight``
    is (C_in, C_out // groups, *kernel); derived as a convolution's input gradient."""
    x, weight = as_tensor(x), as_tensor(weight)
    inputs = (x, weight) if bias is None else (x, weight, as_tensor(bias))
    dtype = _float_dtype("conv_transpose", *inputs)
    spec = spec_of(ConvTransposeSpec, input_shape=open_batch(x.shape), weight_shape=weight.shape,
                   stride=stride, padding=padding, output_padding=output_padding,
                   dilation=dilation, groups=groups, bias=bias is not None, dtype=dtype.name)
    return _forward("conv_transpose", spec, inputs, dtype)


def avg_pool(x, kernel_size, stride=None, padding=0) -> Tensor:
    """N-D average pooling over (N, C, *spatial), zero padding counted in the window like
    PyTorch's ``count_include_pad=True``; compiled from its index sum like ``conv``."""
    x = as_tensor(x)
    dtype = _float_dtype("avg_pool", x)
    spec = spec_of(AvgPoolSpec, input_shape=open_batch(x.shape), kernel_size=kernel_size,
                   stride=stride, padding=padding, dtype=dtype.name)
    return _forward("avg_pool", spec, (x,), dtype)


class IndexOp:
    """A user-defined op: an index sum compiled with its derived gradients.

    Call it on NumPy arrays for the output array, or on Tensors for a graph op whose
    gradients (of any order) are the derived ones.  Made without a dtype, it runs in the
    dtype of the arrays it is called with (float32 or float64, promoted like NumPy), one
    kernel per dtype; made with one, it refuses arrays of another.  ``formulas`` shows the
    forward sum and every gradient sum.
    """

    def __init__(self, spec: Any, fixed_dtype: bool = True):
        self.spec = spec
        self.fixed_dtype = fixed_dtype

    @property
    def kernel(self) -> Any:
        return kernel_of(self.spec)

    @property
    def formulas(self) -> dict[str, str]:
        return self.kernel.formulas

    def __repr__(self) -> str:
        return f"<symconv op {self.spec.describe()}>"

    @property
    def names(self) -> tuple[str, ...]:
        """The arrays it is called with, in order."""
        return tuple(a for a, _ in self.spec.shapes if a != self.spec.output_name)

    def packages(self, cache_dir=None, target=None) -> dict[str, Package]:
        """Its package in each dtype it runs in: its own, or float32 and float64."""
        dtypes = (self.spec.dtype,) if self.fixed_dtype else ("float32", "float64")
        return {dtype: package_of(self.spec_in(dtype), cache_dir, target) for dtype in dtypes}

    def spec_in(self, dtype) -> Any:
        """This op's spec in ``dtype`` (float32 or float64): its own, or its twin."""
        dtype = np.dtype(dtype)
        if dtype.name == self.spec.dtype:
            return self.spec
        return spec_of(ExprSpec, expression=self.spec.expression, shapes=self.spec.shapes,
                       dtype=dtype.name, zero_outside=self.spec.zero_outside)

    def _spec_for(self, inputs) -> Any:
        """The spec to run ``inputs`` with: this op's, or its twin in their dtype."""
        dtypes = [np.asarray(t.data if isinstance(t, Tensor) else t).dtype for t in inputs]
        if self.fixed_dtype:
            for name, dtype in zip(self.names, dtypes):
                if dtype != np.dtype(self.spec.dtype):
                    raise TypeError(f"op {self.spec.output_name}: {name} has dtype {dtype}, but "
                                    f"the op was made with dtype={self.spec.dtype!r}; pass "
                                    f"{self.spec.dtype} arrays, or make the op without a dtype "
                                    f"to follow its arrays")
            return self.spec
        dtype = np.result_type(*dtypes) if dtypes else np.dtype(self.spec.dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"op {self.spec.output_name}: compiled kernels take float32 or "
                            f"float64 arrays, got {', '.join(map(str, dtypes))}")
        return self.spec_in(dtype)

    def __call__(self, *inputs):
        spec = self._spec_for(inputs)
        dtype = np.dtype(spec.dtype)
        if any(isinstance(t, Tensor) for t in inputs):
            tensors = tuple(as_tensor(t) for t in inputs)
            return _forward(spec.output_name, spec, tensors, dtype)
        return kernel_of(spec).forward(*(np.ascontiguousarray(a, dtype) for a in inputs))


def op(expression: str, shapes, dtype: str | None = None, zero_outside=()) -> IndexOp:
    """A user-defined op from an index sum, e.g.
    ``op("Y[n, c, i] = sum(W[c, a] * X[n, c, 2*i + a], (a, 0, 2))", {"X": (2, 3, 9),
    "W": (3, 3)})``; see ``symconv.ExprSpec`` for the notation.  Inputs are called in the
    order of ``shapes``.  A SymPy ``Eq(Y[...], Sum(...))`` is accepted as well.  Without
    ``dtype`` the op runs in the dtype of the arrays it is called with (``kernel`` and
    ``formulas`` then show the float32 one)."""
    if not isinstance(expression, str):
        import sympy
        if not isinstance(expression, sympy.Eq):
            raise TypeError(f"op: expected a string or sympy.Eq, got "
                            f"{type(expression).__name__}")
        expression = f"{sympy.sstr(expression.lhs)} = {sympy.sstr(expression.rhs)}"
    spec = ExprSpec(expression, shapes, dtype=dtype or "float32", zero_outside=zero_outside)
    return IndexOp(spec, fixed_dtype=dtype is not None)


def as_op(expression, shapes=None, dtype: str | None = None, zero_outside=(),
          caller: str = "op") -> IndexOp:
    """``expression`` when it is an op already, else ``op(expression, shapes, ...)``: what the
    framework bindings' ``op`` takes."""
    if isinstance(expression, IndexOp):
        return expression
    if shapes is None:
        raise TypeError(f"{caller}: give the op's shapes, or pass a symconv.op(...)")
    return op(expression, shapes, dtype, zero_outside)
