"""symconv: N-D convolutions compiled from SymPy index sums, with derived gradients.

    spec = symconv.ConvSpec(input_shape=(2, 3, 16, 16, 16), weight_shape=(8, 3, 3, 3, 3),
                            stride=2, padding=1)
    k = symconv.compile_conv(spec)          # derive -> emit C -> build -> load (cached)
    y = k.forward(x, w, b)
    gx, gw, gb = k.backward(x, w, gy)
    print(k.formulas["grad_input"])
    k2 = symconv.load("generated/<name>")   # an ahead-of-time package

    x = symconv.Tensor(x); w = symconv.Tensor(w, requires_grad=True)
    loss = (symconv.conv(x, w, padding=1).relu() ** 2).mean()   # the autodiff graph
    loss.backward()                                              # w.grad

``import symconv`` and ``symconv.load`` need only NumPy and cffi; the
compiler's symbolic stages import SymPy when first used.
"""

from ._version import __version__
from .errors import BuildError, InternalError, IRError
from .kernel import Kernel, PackageError, load
from .spec import AvgPoolSpec, ConvSpec, ConvTransposeSpec, ExprSpec, GradientSpec
from .graph import (GradcheckError, IndexOp, Tensor, avg_pool, concatenate, conv,
                    conv_transpose, cross_entropy, grad, gradcheck, is_grad_enabled, linear,
                    log_softmax, matmul, max_pool, nn, no_grad, op, optim, stack)

_LAZY = {
    "compile_conv": "compiler",
    "compile_op": "compiler",
    "compilation": "compiler",
    "Compilation": "compiler",
}

__all__ = ["__version__", "AvgPoolSpec", "ConvSpec", "ConvTransposeSpec", "ExprSpec",
           "GradientSpec", "BuildError", "InternalError", "IRError", "GradcheckError", "Kernel",
           "PackageError",
           "gradcheck", "load", "nn", "optim", "Tensor",
           "avg_pool", "concatenate", "conv", "conv_transpose", "cross_entropy", "grad",
           "IndexOp", "is_grad_enabled", "linear", "log_softmax", "matmul", "max_pool", "no_grad",
           "op", "stack", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'symconv' has no attribute {name!r}")
