"""PyTorch binding: symconv's compiled kernels as a ``torch.autograd.Function`` and a module.

    import torch, symconv.torch as st
    layer = st.SymConv(3, 8, 3, stride=2, padding=1, rank=4)   # any rank, 4-D included
    y = layer(torch.randn(2, 3, 9, 8, 7, 6))                    # (2, 8, 5, 4, 4, 3)
    y.square().mean().backward()                                # layer.weight.grad, ...
    y = st.conv(x, w, b, stride=2, padding=1)                   # functional, like F.conv{n}d
    model.conv1 = st.SymConv.from_torch(model.conv1)            # replace a torch.nn.ConvNd

Semantics are ``torch.nn.functional.conv{1,2,3}d``'s (the kernels are
specialised to the shapes of the first call and cached like every symconv
kernel).  Tensors are handed to the kernels without copying: a CPU tensor's
memory is viewed as a NumPy array (``Tensor.numpy()``) and the result is
written straight into a fresh tensor.

What is and is not accepted:

* **Device**: CPU only.  A CUDA (or other) tensor raises ``ValueError``; move
  it with ``.cpu()`` yourself if a round trip is what you want.
* **Layout**: strided dense tensors.  A non-contiguous tensor (a transpose, a
  slice, ``channels_last`` memory format) is **copied** to a contiguous one
  before the call (one ``.contiguous()``, documented here); pass
  ``allow_copy=False`` to get a ``ValueError`` instead.  The incoming
  gradient in ``backward`` is made contiguous the same way.
* **Dtype**: float32 or float64, the same for every tensor; others raise
  ``TypeError``.

Gradients: the backward pass calls the kernels' ``grad_input``,
``grad_weight`` and ``grad_bias``.  Those are themselves differentiable
Functions (each is bilinear in its arguments, and its derivatives are again
the forward and gradient kernels), so double backward
(``torch.autograd.grad(..., create_graph=True)``, ``gradgradcheck``) works to
any order.

This module needs PyTorch (``pip install symconv[torch]``, or torch itself);
``import symconv`` does not import it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .binding import conv_kernel as kernel_for

__all__ = ["conv", "SymConv", "SymConvFunction", "kernel_for"]

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
def _array(tensor: torch.Tensor, name: str, allow_copy: bool = True) -> np.ndarray:
    """A CPU tensor's memory as a C-contiguous NumPy array, without a copy where possible."""
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
    if not tensor.is_contiguous():
        if not allow_copy:
            raise ValueError(f"symconv.torch: {name} is not contiguous (strides "
                             f"{tensor.stride()}); pass .contiguous() or allow_copy=True")
        tensor = tensor.contiguous()
    return tensor.detach().numpy()


def _empty(shape, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    tensor = torch.empty(tuple(shape), dtype=dtype)
    return tensor, tensor.numpy()


def _zeros_bias(kernel) -> np.ndarray:
    """A zero bias for calling a biased kernel as a plain convolution (double backward)."""
    zeros = getattr(kernel, "_symconv_torch_zero_bias", None)
    if zeros is None:
        zeros = np.zeros(kernel.record.shapes["bias"], kernel.record.dtype)
        zeros.flags.writeable = False
        kernel._symconv_torch_zero_bias = zeros
    return zeros


def _has_bias(kernel) -> bool:
    return "bias" in kernel.inputs


class SymConvFunction(torch.autograd.Function):
    """``y = conv(x, w) + b`` through a compiled kernel: ``SymConvFunction.apply(x, w, b, kernel,
    allow_copy)`` (``b`` may be None).  Use :func:`conv` rather than calling this directly."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernel, allow_copy=True):
        dtype = x.dtype
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and isinstance(t, torch.Tensor) and t.dtype != dtype:
                raise TypeError(f"symconv.torch: {name} has dtype {t.dtype} but input has "
                                f"{dtype}; use one dtype")
        arrays = [_array(x, "input", allow_copy), _array(weight, "weight", allow_copy)]
        if _has_bias(kernel):
            arrays.append(_array(bias, "bias", allow_copy) if bias is not None
                          else _zeros_bias(kernel))
        elif bias is not None:
            raise ValueError("symconv.torch: a bias was given to a kernel compiled without one")
        y, out = _empty(kernel.functions["forward"].output_shape(*arrays), dtype)
        kernel.forward(*arrays, out=out)
        ctx.save_for_backward(x, weight)
        ctx.kernel, ctx.allow_copy = kernel, allow_copy
        return y

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        kernel = ctx.kernel
        gy = grad_output.contiguous()  # documented copy when autograd hands us a strided view
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = _GradInput.apply(weight, gy, kernel) if need_x else None
        gw = _GradWeight.apply(x, gy, kernel, ctx.allow_copy) if need_w else None
        gb = _GradBias.apply(gy, kernel) if need_b else None
        return gx, gw, gb, None, None


class _GradInput(torch.autograd.Function):
    """``grad_input(w, gy)``: linear in each argument.  Its vector-Jacobian products:
    ``<u, GI(w, gy)> = <conv(u, w), gy>``, so d/dw is ``grad_weight(u, gy)`` and d/dgy is
    ``conv(u, w)`` without bias."""

    @staticmethod
    def forward(ctx, weight, gy, kernel):
        arrays = (_array(weight, "weight"), _array(gy, "grad_output"))
        gx, out = _empty(kernel.grad_input.output_shape(*arrays), gy.dtype)
        kernel.grad_input(*arrays, out=out)
        ctx.save_for_backward(weight, gy)
        ctx.kernel = kernel
        return gx

    @staticmethod
    def backward(ctx, u):
        weight, gy = ctx.saved_tensors
        u = u.contiguous()
        need_w, need_gy = ctx.needs_input_grad[:2]
        dw = _GradWeight.apply(u, gy, ctx.kernel, True) if need_w else None
        dgy = SymConvFunction.apply(u, weight, None, ctx.kernel, True) if need_gy else None
        return dw, dgy, None


class _GradWeight(torch.autograd.Function):
    """``grad_weight(x, gy)``: ``<v, GW(x, gy)> = <conv(x, v), gy>``, so d/dx is
    ``grad_input(v, gy)`` and d/dgy is ``conv(x, v)`` without bias."""

    @staticmethod
    def forward(ctx, x, gy, kernel, allow_copy=True):
        arrays = (_array(x, "input", allow_copy), _array(gy, "grad_output"))
        gw, out = _empty(kernel.grad_weight.output_shape(*arrays), gy.dtype)
        kernel.grad_weight(*arrays, out=out)
        ctx.save_for_backward(x, gy)
        ctx.kernel = kernel
        return gw

    @staticmethod
    def backward(ctx, v):
        x, gy = ctx.saved_tensors
        v = v.contiguous()
        need_x, need_gy = ctx.needs_input_grad[:2]
        dx = _GradInput.apply(v, gy, ctx.kernel) if need_x else None
        dgy = SymConvFunction.apply(x, v, None, ctx.kernel, True) if need_gy else None
        return dx, dgy, None, None


class _GradBias(torch.autograd.Function):
    """``grad_bias(gy)``: the sum over batch and space; its adjoint broadcasts back."""

    @staticmethod
    def forward(ctx, gy, kernel):
        array = _array(gy, "grad_output")
        gb, out = _empty(kernel.grad_bias.output_shape(array), gy.dtype)
        kernel.grad_bias(array, out=out)
        ctx.shape = gy.shape
        return gb

    @staticmethod
    def backward(ctx, t):
        shape = ctx.shape
        return t.reshape(1, shape[1], *(1,) * (len(shape) - 2)).expand(shape), None


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
         padding=0, dilation=1, groups: int = 1, *, padding_mode: str = "zeros",
         cache_dir=None, target=None, allow_copy: bool = True) -> torch.Tensor:
    """N-D convolution like ``torch.nn.functional.conv{n}d`` on compiled symconv kernels.

    ``x`` is (N, C_in, *spatial), ``weight`` (C_out, C_in // groups, *kernel), ``bias``
    (C_out,) or None; any number of spatial dims.  ``stride``, ``padding`` (ints, per-dim
    ints, (lo, hi) pairs, "same", "valid") and ``dilation`` take every form ``ConvSpec``
    accepts.  Differentiable to any order.
    """
    for name, t in (("input", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"symconv.torch.conv: {name} must be a torch.Tensor, got "
                            f"{type(t).__name__}")
    if x.dim() != weight.dim():
        raise ValueError(f"symconv.torch.conv: input of shape {tuple(x.shape)} and weight of "
                         f"shape {tuple(weight.shape)} must have the same number of dims")
    if x.dtype not in _DTYPES:
        raise TypeError(f"symconv.torch: input has dtype {x.dtype}; symconv's kernels take "
                        f"torch.float32 or torch.float64")
    kernel = kernel_for(tuple(x.shape), tuple(weight.shape), stride, padding, dilation, groups,
                        bias is not None, _DTYPES[x.dtype], padding_mode, cache_dir, target)
    return SymConvFunction.apply(x, weight, bias, kernel, allow_copy)


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
