"""The runtime autodiff graph: a reverse-mode engine on NumPy arrays whose convolutions,
pooling and user-defined index sums call compiled kernels.

    x = Tensor(np.random.rand(8, 1, 28, 28).astype("float32"))
    w = Tensor(np.random.randn(16, 1, 3, 3).astype("float32") * 0.1, requires_grad=True)
    b = Tensor(np.zeros(16, "float32"), requires_grad=True)
    loss = (conv(x, w, b, padding=1).relu() ** 2).mean()
    loss.backward()                    # w.grad, b.grad: NumPy arrays

``engine`` is Tensor and the reverse pass; ``ops`` the NumPy ops, each with its one
backward rule; ``compiled`` the ops run by compiled kernels; ``nn`` and ``optim`` the
training kit; ``gradcheck`` the finite-difference check.  This namespace exports them
all, the ops under their plain names (``sum``, ``max``, ``min``, ``abs``, ``pow``).
"""

from .compiled import IndexOp, avg_pool, conv, conv_transpose, op
from .engine import Node, Tensor, grad, is_grad_enabled, no_grad, record
from .gradcheck import GradcheckError, GradcheckReport, gradcheck
from .ops import (abs_ as abs, add, broadcast_to, concatenate, cross_entropy, div, exp, getitem,
                  leaky_relu, linear, log, log_softmax, matmul, max_ as max, max_pool, mean,
                  min_ as min, mse_loss, mul, neg, pow_ as pow, relu, reshape, scatter, sigmoid,
                  softmax, sqrt, stack, sub, sum_ as sum, tanh, transpose, unbroadcast)
from .engine import _topological_order  # noqa: F401  (for tests of the traversal order)
from . import nn, optim  # noqa: E402  (after the ops they use)

__all__ = [
    "Tensor", "Node", "no_grad", "is_grad_enabled", "grad", "record", "unbroadcast",
    "add", "sub", "mul", "div", "neg", "pow", "exp", "log", "sqrt", "tanh", "sigmoid", "relu",
    "leaky_relu", "abs", "sum", "mean", "max", "min", "reshape", "transpose", "getitem",
    "scatter", "concatenate", "stack", "matmul", "linear", "log_softmax", "softmax",
    "cross_entropy", "mse_loss", "conv", "conv_transpose", "avg_pool", "max_pool",
    "broadcast_to", "op", "IndexOp", "gradcheck", "GradcheckError", "GradcheckReport",
    "nn", "optim",
]
