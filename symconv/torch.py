"""PyTorch binding: every symconv op as a ``torch.library`` custom op, differentiated by the
derived gradients.

    import torch, symconv, symconv.torch as st
    layer = st.SymConv(3, 8, 3, stride=2, padding=1, rank=4)   # any rank, 4-D included
    y = layer(torch.randn(2, 3, 9, 8, 7, 6))                    # (2, 8, 5, 4, 4, 3)
    y = st.conv(x, w, b, stride=2, padding=1)                   # functional, like F.conv{n}d
    y = st.conv_transpose(x, w, stride=2)                       # like F.conv_transpose{n}d
    y = st.avg_pool(x, 3, stride=2, padding=1)                  # like F.avg_pool{n}d
    shift = st.op("Y[n, c, i] = sum(W[c, a] * X[n, c, 2*i + a], (a, 0, 2))",
                  {"X": (2, 3, 9), "W": (3, 3)})               # a user op, on tensors
    model.conv1 = st.SymConv.from_torch(model.conv1)            # replace a torch.nn.ConvNd

A call is one function of a compiled package, named by ``handle`` (the
package's spec, cache and target, as JSON) and ``function``.  While
``torch.compile`` or ``torch.export`` traces, it is the custom op
``torch.ops.symconv.call(handle, function, tensors, batch)``, whose fake
implementation gives the output's shape from the package's manifest: no graph
break, and an exported program runs wherever symconv can find or build the
package.  On real tensors it is a classic ``autograd.Function`` (a fraction of
the custom op's dispatch time), under ``torch.func``'s transforms a new-style
one (which they can run).  All three differentiate with the package's VJP table
(``symconv.autodiff``): a gradient is another call, so every order, in reverse
and forward mode, is derived; none is written by hand here.

What is and is not accepted:

* **Device**: CPU only.  A CUDA (or other) tensor raises ``ValueError``.
* **Layout**: strided dense tensors.  ``conv`` takes an input in ``channels_last``
  memory (``channels_last``, ``channels_last_3d``, or any rank's channels
  innermost) as it is, through a kernel compiled for that layout, and returns
  its output in the same memory format.  Any other non-contiguous tensor (a
  transpose, a slice, a channels_last weight) is **copied** to a contiguous
  one before the call (one ``.contiguous()``); ``allow_copy=False`` raises
  ``ValueError`` instead.  The incoming gradient is made contiguous the same way.
* **Dtype**: float32 or float64, the same for every tensor; others raise
  ``TypeError``.
* **Shapes**: kernels are specialised to every extent but the batch, so under
  ``torch.compile`` use the default (automatic) dynamic shapes or mark only the
  batch dynamic; ``dynamic=True`` makes every extent symbolic and is refused.

Semantics are PyTorch's.  This module needs PyTorch (``pip install symconv[torch]``);
``import symconv`` does not import it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from . import autodiff
from .binding import conv_kernel as kernel_for
from .binding import op_package, open_batch
from .graph.compiled import IndexOp, as_op

__all__ = ["conv", "conv_transpose", "avg_pool", "op", "call", "SymConv", "SymOp", "kernel_for"]

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as a C-contiguous NumPy array, without a copy where possible
    (the public functions checked device, layout and dtype; the kernel checks the rest)."""
    tensor = tensor.detach()
    return (tensor if tensor.is_contiguous() else tensor.contiguous()).numpy()


def _check(tensor: Any, name: str, allow_copy: bool = True) -> None:
    """A clear error for a tensor symconv's kernels cannot take."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"symconv.torch: {name} must be a torch.Tensor, got "
                        f"{type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"symconv.torch: {name} is on device {tensor.device}; symconv's kernels "
                         f"run on the CPU: move it with .cpu()")
    if tensor.layout != torch.strided:
        raise ValueError(f"symconv.torch: {name} has layout {tensor.layout}; pass a dense "
                         f"(strided) tensor, e.g. .to_dense()")
    if tensor.dtype not in _DTYPES:
        raise TypeError(f"symconv.torch: {name} has dtype {tensor.dtype}; symconv's kernels take "
                        f"torch.float32 or torch.float64")
    if not allow_copy and not tensor.is_contiguous():
        raise ValueError(f"symconv.torch: {name} is not contiguous (strides "
                         f"{tensor.stride()}); pass .contiguous() or allow_copy=True")


def _checked(named: dict[str, Any], allow_copy: bool) -> str:
    """Check the tensors of a call (None for an absent bias); their one dtype's name."""
    given = {name: t for name, t in named.items() if t is not None}
    for name, tensor in given.items():
        _check(tensor, name, allow_copy)
    dtypes = {t.dtype for t in given.values()}
    if len(dtypes) > 1:
        listed = ", ".join(f"{name} {t.dtype}" for name, t in given.items())
        raise TypeError(f"symconv.torch: the tensors have different dtypes ({listed}); use one")
    return _DTYPES[next(iter(given.values())).dtype]


# --- one call of a compiled function, two ways to make it --------------------------------------

def _function(handle: str, function: str):
    return autodiff.package(handle).kernel.functions[function]


def _run(handle: str, function: str, args, batch: int) -> torch.Tensor:
    """``function`` of the package ``handle`` names, on ``args`` (in the function's order);
    ``batch`` sizes an output batch axis that no argument has (else it is ignored)."""
    compiled = _function(handle, function)
    arrays = [_array(tensor) for tensor in args]
    out = torch.empty(compiled.output_shape(*arrays, batch=batch), dtype=args[0].dtype)
    compiled(*arrays, out=out.numpy(), batch=batch)
    return out


def _gradients(handle: str, function: str, args, grad, needed, apply) -> list:
    """The gradient of each argument ``needed`` asks for (None for the others): the call the
    package's VJP table names, made with ``apply``."""
    package = autodiff.package(handle)
    names = package.kernel.functions[function].args
    values = dict(zip(names, args))
    differentiable = autodiff.differentiable(package, function)
    grads = []
    for name, wanted in zip(names, needed):
        if wanted and name in differentiable:
            rule = autodiff.vjp(package, function, name)
            batch = values[name].shape[0] if values[name].dim() else 0
            grads.append(apply(rule.package.handle, rule.function, rule.arrays(values, grad),
                               batch))
        else:
            grads.append(None)
    return grads


def _tangent(handle: str, function: str, args, tangents, batch: int, apply):
    """The output's tangent (forward mode): for each argument with a tangent, the call the
    package's VJP table gives for its directional derivative (the VJP of its VJP)."""
    package = autodiff.package(handle)
    values = dict(zip(package.kernel.functions[function].args, args))
    total = None
    for name, tangent in zip(values, tangents):
        if tangent is None:
            continue
        rule = autodiff.jvp(package, function, name)
        term = apply(rule.package.handle, rule.function, rule.arrays(values, tangent), batch)
        total = term if total is None else total + term
    return total


def _vmapped(batch_size: int, dims, handle: str, function: str, args, batch: int, apply):
    """Under ``torch.vmap``: one call with the mapped axis folded into the kernel's run-time
    batch where only batched arguments are mapped, else one call per mapped element."""
    compiled = _function(handle, function)
    moved = [t if d is None else t.movedim(d, 0) for t, d in zip(args, dims)]
    mapped = {i for i, d in enumerate(dims) if d is not None}
    if compiled.maps_batch and mapped <= set(compiled.batched):
        folded = [t.reshape(-1, *t.shape[2:]) if i in mapped else t for i, t in enumerate(moved)]
        out = apply(handle, function, folded, batch)
        return out.reshape(batch_size, -1, *out.shape[1:]), 0
    results = [apply(handle, function, [t[v] if i in mapped else t for i, t in enumerate(moved)],
                     batch) for v in range(batch_size)]
    return torch.stack(results), 0


# The custom op: what torch.compile and torch.export see (a fake implementation gives shapes).

@torch.library.custom_op("symconv::call", mutates_args=())
def _call(handle: str, function: str, args: list[torch.Tensor], batch: int) -> torch.Tensor:
    """One call of a compiled function, as a custom op (see :func:`_run`)."""
    return _run(handle, function, args, batch)


@_call.register_fake
def _call_fake(handle: str, function: str, args: list[torch.Tensor], batch: int):
    compiled = _function(handle, function)
    return args[0].new_empty(compiled.result_shape([tuple(t.shape) for t in args], batch))


def _setup_context(ctx, inputs, output) -> None:
    ctx.handle, ctx.function, args, _ = inputs
    ctx.save_for_backward(*args)


def _backward(ctx, grad: torch.Tensor):
    return None, None, _gradients(ctx.handle, ctx.function, ctx.saved_tensors, grad,
                                  ctx.needs_input_grad[2], _custom), None


def _custom(handle: str, function: str, args, batch: int) -> torch.Tensor:
    return _call(handle, function, list(args), batch)


_call.register_autograd(_backward, setup_context=_setup_context)


@torch.library.register_vmap("symconv::call")
def _call_vmap(info, in_dims, handle: str, function: str, args: list[torch.Tensor], batch: int):
    return _vmapped(info.batch_size, in_dims[2], handle, function, args, batch, _custom)


class _Eager(torch.autograd.Function):
    """The same call on real tensors outside torch.func's transforms: a classic
    autograd.Function dispatches in a fraction of a custom op's time (8 µs against 50)."""

    @staticmethod
    def forward(ctx, handle, function, batch, *args):
        ctx.handle, ctx.function = handle, function
        ctx.save_for_backward(*args)
        ctx.save_for_forward(*args)
        out = _run(handle, function, args, batch)
        ctx.batch = out.shape[0] if out.dim() else 0
        return out

    @staticmethod
    def backward(ctx, grad):
        return (None, None, None, *_gradients(ctx.handle, ctx.function, ctx.saved_tensors, grad,
                                              ctx.needs_input_grad[3:], _eager))

    @staticmethod
    def jvp(ctx, *tangents):
        return _tangent(ctx.handle, ctx.function, ctx.saved_tensors, tangents[3:], ctx.batch,
                        _eager)


def _eager(handle: str, function: str, args, batch: int) -> torch.Tensor:
    return _Eager.apply(handle, function, batch, *args)


class _Transformable(torch.autograd.Function):
    """The call under torch.func's transforms (grad, jvp, jacrev, jacfwd, hessian, vmap): a
    new-style autograd.Function, which they run, where the custom op's autograd is not
    (pytorch/pytorch#170834)."""

    @staticmethod
    def forward(handle, function, batch, *args):
        return _run(handle, function, args, batch)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.handle, ctx.function = inputs[:2]
        ctx.save_for_backward(*inputs[3:])
        ctx.save_for_forward(*inputs[3:])
        ctx.batch = output.shape[0] if output.dim() else 0

    @staticmethod
    def backward(ctx, grad):
        return (None, None, None, *_gradients(ctx.handle, ctx.function, ctx.saved_tensors, grad,
                                              ctx.needs_input_grad[3:], _apply))

    @staticmethod
    def jvp(ctx, *tangents):
        return _tangent(ctx.handle, ctx.function, ctx.saved_tensors, tangents[3:], ctx.batch,
                        _apply)

    @staticmethod
    def vmap(info, in_dims, handle, function, batch, *args):
        return _vmapped(info.batch_size, in_dims[3:], handle, function, args, batch, _apply)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _apply(handle: str, function: str, args, batch: int) -> torch.Tensor:
    """One call: the custom op while torch.compile or torch.export traces (their tensors are
    fake), an autograd.Function otherwise (one torch.func's transforms can run, under them)."""
    if torch.compiler.is_compiling() or any(type(t) not in _PLAIN for t in args):
        return _call(handle, function, list(args), batch)
    if torch._C._are_functorch_transforms_active():
        return _Transformable.apply(handle, function, batch, *args)
    return _eager(handle, function, args, batch)


def call(package: "autodiff.Package", function: str, *tensors: torch.Tensor) -> torch.Tensor:
    """``function`` of a compiled package (``symconv.autodiff.Package``) on tensors:
    differentiable to any order through the package's VJP table."""
    return _apply(package.handle, function, tensors, _batch(tensors))


def _batch(tensors) -> int:
    """The leading extent of the first tensor (what an output batch axis no input has would
    take; ignored by every function that has an input with the batch axis)."""
    first = tensors[0] if tensors else None
    return first.shape[0] if first is not None and first.dim() else 0


@torch.compiler.assume_constant_result
def _handle(kind: str, cache_dir, target, fields: tuple) -> str:
    """The package handle of a spec; a constant to ``torch.compile`` (it reads only shapes
    and arguments, never data)."""
    try:
        return _remembered_handle(kind, cache_dir, target, fields)
    except TypeError:           # an unhashable argument (a list): no memo
        return op_package(kind, cache_dir, target, **dict(fields)).handle


@functools.lru_cache(maxsize=1024)
def _remembered_handle(kind: str, cache_dir, target, fields: tuple) -> str:
    return op_package(kind, cache_dir, target, **dict(fields)).handle


def _where(cache_dir) -> str | None:
    return None if cache_dir is None else str(cache_dir)


# --- convolution, transposed convolution, pooling ---------------------------------------------

def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
         padding=0, dilation=1, groups: int = 1, *, padding_mode: str = "zeros",
         cache_dir=None, target=None, allow_copy: bool = True) -> torch.Tensor:
    """N-D convolution like ``torch.nn.functional.conv{n}d`` on compiled symconv kernels.

    ``x`` is (N, C_in, *spatial), ``weight`` (C_out, C_in // groups, *kernel), ``bias``
    (C_out,) or None; any number of spatial dims.  ``stride``, ``padding`` (ints, per-dim
    ints, (lo, hi) pairs, "same", "valid") and ``dilation`` take every form ``ConvSpec``
    accepts; ``padding_mode`` is ``zeros``, ``reflect``, ``replicate`` or ``circular``.
    An input in channels_last memory runs without a copy and gives a channels_last output.
    Differentiable to any order.
    """
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and \
            x.dim() != weight.dim():
        raise ValueError(f"symconv.torch.conv: input of shape {tuple(x.shape)} and weight of "
                         f"shape {tuple(weight.shape)} must have the same number of dims")
    moved = _channels_last(x)
    arrays = x if moved is None else moved
    dtype = _checked({"input": arrays, "weight": weight, "bias": bias}, allow_copy)
    handle = _handle("conv", _where(cache_dir), target, (
        ("input_shape", open_batch(x.shape)), ("weight_shape", tuple(weight.shape)),
        ("stride", stride), ("padding", padding), ("dilation", dilation), ("groups", groups),
        ("bias", bias is not None), ("dtype", dtype), ("padding_mode", padding_mode),
        ("layout", "channels_first" if moved is None else "channels_last")))
    y = _apply(handle, "forward", [arrays, weight] if bias is None else [arrays, weight, bias],
               x.shape[0])
    return y if moved is None else y.movedim(-1, 1)


def _channels_last(x: Any) -> torch.Tensor | None:
    """``x`` viewed (N, *spatial, C) when it holds its channels innermost (torch's
    channels_last memory, any rank) and not also channels first, else None: the kernel then
    reads that memory as it is, and the output keeps the same layout."""
    if not isinstance(x, torch.Tensor) or x.dim() < 3 or x.is_contiguous():
        return None
    moved = x.movedim(1, -1)
    return moved if moved.is_contiguous() else None


def conv_transpose(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   stride=1, padding=0, output_padding=0, groups: int = 1, dilation=1, *,
                   cache_dir=None, target=None, allow_copy: bool = True) -> torch.Tensor:
    """N-D transposed convolution like ``torch.nn.functional.conv_transpose{n}d`` (same
    argument order): ``weight`` is (C_in, C_out // groups, *kernel)."""
    dtype = _checked({"input": x, "weight": weight, "bias": bias}, allow_copy)
    handle = _handle("conv_transpose", _where(cache_dir), target, (
        ("input_shape", open_batch(x.shape)), ("weight_shape", tuple(weight.shape)),
        ("stride", stride), ("padding", padding), ("output_padding", output_padding),
        ("dilation", dilation), ("groups", groups), ("bias", bias is not None),
        ("dtype", dtype)))
    return _apply(handle, "forward", [x, weight] if bias is None else [x, weight, bias],
                  x.shape[0])


def avg_pool(x: torch.Tensor, kernel_size, stride=None, padding=0, *, cache_dir=None,
             target=None, allow_copy: bool = True) -> torch.Tensor:
    """N-D average pooling like ``torch.nn.functional.avg_pool{n}d`` with
    ``count_include_pad=True``."""
    dtype = _checked({"input": x}, allow_copy)
    handle = _handle("avg_pool", _where(cache_dir), target, (
        ("input_shape", open_batch(x.shape)), ("kernel_size", kernel_size), ("stride", stride),
        ("padding", padding), ("dtype", dtype)))
    return _apply(handle, "forward", [x], x.shape[0])


class SymConv(torch.nn.Module):
    """An N-D convolution layer for torch models, computed by symconv's compiled kernels.

    Arguments follow ``torch.nn.Conv{n}d``; the rank comes from ``kernel_size`` when it is
    a sequence, else from ``rank`` (``SymConv(1, 8, 3, rank=4)`` is a 4-D convolution, a
    layer PyTorch does not have).  Parameters are initialised like PyTorch's.  A kernel is
    compiled for every new input shape but the batch size, which it takes at run time (and
    cached on disk).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, *, rank: int | None = None, cache_dir=None,
                 target=None, allow_copy: bool = True):
        super().__init__()
        if isinstance(kernel_size, int):
            if rank is None:
                raise ValueError("SymConv: give kernel_size per spatial dim, or rank= with an "
                                 "int kernel_size")
            kernel_size = (kernel_size,) * rank
        kernel_size = tuple(int(k) for k in kernel_size)
        if rank is not None and len(kernel_size) != rank:
            raise ValueError(f"SymConv: kernel_size {kernel_size} does not have rank {rank}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"SymConv: channels {in_channels} -> {out_channels} are not "
                             f"divisible by groups {groups}")
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"SymConv: symconv's kernels run on the CPU, not {device}")
        dtype = dtype or torch.get_default_dtype()
        if dtype not in _DTYPES:
            raise TypeError(f"SymConv: dtype must be torch.float32 or torch.float64, got {dtype}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode = padding_mode
        self.cache_dir, self.target, self.allow_copy = cache_dir, target, allow_copy
        self.weight = torch.nn.Parameter(torch.empty(
            (out_channels, in_channels // groups, *kernel_size), dtype=dtype))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_channels, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def rank(self) -> int:
        return len(self.kernel_size)

    def reset_parameters(self) -> None:
        """PyTorch's ConvNd initialisation: Kaiming-uniform weights (a=√5), bias ±1/√fan_in."""
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels // self.groups * math.prod(self.kernel_size)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.rank + 2:
            raise ValueError(f"SymConv: a rank-{self.rank} layer takes (N, C, *{self.rank} "
                             f"spatial dims), got input of shape {tuple(x.shape)}")
        return conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                    self.groups, padding_mode=self.padding_mode, cache_dir=self.cache_dir,
                    target=self.target, allow_copy=self.allow_copy)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}"
                + (f", padding_mode={self.padding_mode!r}" if self.padding_mode != "zeros" else ""))

    @classmethod
    def from_torch(cls, module: torch.nn.modules.conv._ConvNd, **kwargs) -> "SymConv":
        """A SymConv computing the same as a ``torch.nn.Conv{1,2,3}d``, with copies of its
        weight and bias (so it drops into the model in the module's place)."""
        if not isinstance(module, torch.nn.modules.conv._ConvNd) or module.transposed:
            raise TypeError(f"SymConv.from_torch takes a torch.nn.Conv1d/2d/3d, got "
                            f"{type(module).__name__}")
        layer = cls(module.in_channels, module.out_channels, module.kernel_size,
                    stride=module.stride, padding=module.padding, dilation=module.dilation,
                    groups=module.groups, bias=module.bias is not None,
                    padding_mode=module.padding_mode, dtype=module.weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(module.weight)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        return layer


# --- user ops -----------------------------------------------------------------------------------

class SymOp(torch.nn.Module):
    """A user op from ``symconv.op`` (an index sum) as a module without parameters: called on
    tensors in the order of its ``shapes``, differentiable to any order by its derived
    gradients.  Made without a dtype it follows its tensors (float32 or float64)."""

    def __init__(self, index: IndexOp, *, cache_dir=None, target=None,
                 allow_copy: bool = True):
        super().__init__()
        if not isinstance(index, IndexOp):
            raise TypeError(f"SymOp takes a symconv.op(...), got {type(index).__name__}")
        self.index, self.allow_copy = index, allow_copy
        self.names = index.names
        self._handles = {dtype: package.handle
                         for dtype, package in index.packages(cache_dir, target).items()}

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        if len(tensors) != len(self.names):
            raise TypeError(f"op {self.index.spec.output_name} takes {len(self.names)} tensors "
                            f"({', '.join(self.names)}), got {len(tensors)}")
        dtype = _checked(dict(zip(self.names, tensors)), self.allow_copy)
        if dtype not in self._handles:
            raise TypeError(f"op {self.index.spec.output_name} was made with dtype="
                            f"{self.index.spec.dtype!r}; pass {self.index.spec.dtype} tensors, "
                            f"or make the op without a dtype to follow its tensors")
        return _apply(self._handles[dtype], "forward", tensors, _batch(tensors))

    def extra_repr(self) -> str:
        return self.index.spec.describe()


def op(expression, shapes=None, dtype: str | None = None, zero_outside=(), **kwargs) -> SymOp:
    """A user op on tensors: ``op(text, shapes, ...)`` takes ``symconv.op``'s arguments, or
    ``op(symconv.op(...))`` an op already made.  Keyword arguments ``cache_dir``, ``target``
    and ``allow_copy`` go to :class:`SymOp`."""
    return SymOp(as_op(expression, shapes, dtype, zero_outside, "symconv.torch.op"), **kwargs)
