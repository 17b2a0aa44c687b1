"""Runtime autodiff: a reverse-mode graph on NumPy arrays whose convolutions call compiled kernels.

A :class:`Tensor` wraps a NumPy array.  Every op computes its output with
NumPy (or, for ``conv`` and ``avg_pool``, with the kernels symconv compiles
from index sums) and returns it together with a ``backward`` closure: the
op's vector-Jacobian product, written beside the forward it differentiates.
``Tensor.backward`` orders the graph once, iteratively (no recursion, the
same order every time), and runs the closures from the output back to the
leaves, summing the contributions of a tensor used several times.

    x = Tensor(np.random.rand(8, 1, 28, 28).astype("float32"))
    w = Tensor(np.random.randn(16, 1, 3, 3).astype("float32") * 0.1, requires_grad=True)
    b = Tensor(np.zeros(16, "float32"), requires_grad=True)
    loss = (conv(x, w, b, padding=1).relu() ** 2).mean()
    loss.backward()                    # w.grad, b.grad: NumPy arrays

Rules the ops keep:

* A ``backward`` closure captures arrays (never tensors), computed at forward
  time, and returns one gradient per input (None where there is none).
  Broadcasting is undone by one helper, :func:`unbroadcast`.
* After ``backward()`` each node drops its closure and its inputs, so the
  saved arrays and intermediate results are freed even while the output is
  still referenced; ``backward(retain_graph=True)`` keeps them for another
  pass.  A second pass through a freed graph raises RuntimeError.
* Gradients of leaves (tensors created by the user with
  ``requires_grad=True``) accumulate in ``.grad`` across passes, like
  PyTorch; set ``.grad = None`` (or use an optimiser's ``zero_grad``) to reset.
* Results follow NumPy's type promotion; a Python number next to a tensor
  takes the tensor's dtype.  Gradients have the dtype of their tensor.

Convolution and average-pooling kernels are specialised to exact shapes: the
first call with new shapes compiles them (``symconv.compiler``, imported on
first use so ``import symconv`` stays free of SymPy) into the kernel cache
(``$SYMCONV_CACHE_DIR`` or ``~/.cache/symconv``), and later calls reuse them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Callable, Sequence

import numpy as np

from .spec import (AvgPoolSpec, ConvSpec, ConvTransposeSpec, ExprSpec, GradientSpec, is_int,
                   per_dim)

__all__ = [
    "Tensor", "no_grad", "is_grad_enabled", "unbroadcast",
    "add", "sub", "mul", "div", "neg", "pow", "exp", "log", "sqrt", "tanh", "sigmoid", "relu",
    "leaky_relu", "abs", "sum", "mean", "max", "min", "reshape", "transpose", "getitem",
    "concatenate", "stack", "matmul", "linear", "log_softmax", "softmax", "cross_entropy",
    "mse_loss", "conv", "conv_transpose", "avg_pool", "max_pool", "broadcast_to", "grad", "op",
    "IndexOp",
]

Backward = Callable[[np.ndarray], Sequence["np.ndarray | None"]]
GraphBackward = Callable[["Tensor"], Sequence["Tensor | None"]]


# ------------------------------------------------------------------------------------------------
# Gradient mode
# ------------------------------------------------------------------------------------------------

class _GradMode(threading.local):
    enabled = True


_mode = _GradMode()


def is_grad_enabled() -> bool:
    """False inside ``no_grad()`` (in this thread)."""
    return _mode.enabled


class no_grad(contextlib.ContextDecorator):
    """Record no graph inside: results have ``requires_grad=False``.  Works as a decorator."""

    def __init__(self) -> None:
        self._saved: list[bool] = []

    def __enter__(self) -> "no_grad":
        self._saved.append(_mode.enabled)
        _mode.enabled = False
        return self

    def __exit__(self, *exc) -> None:
        _mode.enabled = self._saved.pop()

    def _recreate_cm(self) -> "no_grad":  # a fresh context per decorated call (threads, recursion)
        return type(self)()


# ------------------------------------------------------------------------------------------------
# Tensor and the backward pass
# ------------------------------------------------------------------------------------------------

class Node:
    """How a tensor was made: the op's name, its inputs and its backward closures.

    ``backward`` maps an output gradient array to input gradient arrays;
    ``graph_backward``, where the op has one, maps an output gradient Tensor to
    input gradient Tensors built from graph ops, so that ``create_graph=True``
    records the backward pass itself and it can be differentiated again.
    """

    __slots__ = ("op", "inputs", "backward", "graph_backward")

    def __init__(self, op: str, inputs: tuple["Tensor", ...], backward: Backward,
                 graph_backward: GraphBackward | None = None):
        self.op = op
        self.inputs = inputs
        self.backward: Backward | None = backward
        self.graph_backward = graph_backward

    def __repr__(self) -> str:
        state = "freed" if self.backward is None else f"{len(self.inputs)} inputs"
        return f"<Node {self.op}: {state}>"


class Tensor:
    """A NumPy array in the autodiff graph.

    ``Tensor(data, requires_grad=False, dtype=None)`` wraps ``data`` without
    copying it when it already is an array of the dtype (like
    ``torch.from_numpy``): optimisers update parameters in place.
    """

    __slots__ = ("data", "grad", "requires_grad", "node", "_retains_grad", "__weakref__")
    __array_ufunc__ = None  # ndarray <op> Tensor defers to Tensor's reflected operators

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None):
        if isinstance(data, Tensor):
            data = data.data
        array = np.asarray(data, dtype=dtype)
        if requires_grad and array.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype "
                            f"{array.dtype}")
        self.data: np.ndarray = array
        self.grad: np.ndarray | None = None
        self.requires_grad = bool(requires_grad)
        self.node: Node | None = None
        self._retains_grad = False

    # --- what it is ------------------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    dtype = property(lambda self: self.data.dtype)

    @property
    def is_leaf(self) -> bool:
        return self.node is None

    def __repr__(self) -> str:
        flag = f", op={self.node.op}" if self.node else (", requires_grad=True"
                                                          if self.requires_grad else "")
        return f"Tensor({np.array2string(self.data, precision=4, threshold=20)}{flag})"

    def __len__(self) -> int:
        return len(self.data)

    def __bool__(self) -> bool:
        return bool(self.data)      # like NumPy: an error for more than one element

    def __float__(self) -> float:
        return float(self.data)

    def numpy(self) -> np.ndarray:
        """The array itself (not a copy)."""
        return self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> "Tensor":
        """The same data, outside the graph."""
        return Tensor(self.data)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        if not self.is_leaf:
            raise RuntimeError("requires_grad_ can only change leaf tensors; use detach()")
        if flag and self.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, got {self.dtype}")
        self.requires_grad = bool(flag)
        return self

    def retain_grad(self) -> "Tensor":
        """Also store this non-leaf tensor's gradient in ``.grad`` during backward."""
        if not self.requires_grad:
            raise RuntimeError("retain_grad() on a tensor that does not require grad")
        self._retains_grad = True
        return self

    # --- backward --------------------------------------------------------------------------------
    def backward(self, gradient: Any = None, retain_graph: bool = False,
                 create_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) · gradient into every leaf's ``.grad``.

        ``gradient`` defaults to 1 for a one-element tensor and is required
        otherwise.  Without ``retain_graph`` the graph's saved arrays are freed.
        With ``create_graph`` the backward pass is itself recorded (and the graph
        kept): ``.grad`` then holds Tensors that can be differentiated again.
        """
        seed = _seed(self, gradient)
        grads = _run_backward([self], [seed], retain_graph or create_graph, create_graph)
        for leaf, grad in grads.values():
            if create_graph:
                grad = grad if leaf.grad is None else add(leaf.grad, grad)
                leaf.grad = grad
            else:
                _accumulate_leaf(leaf, grad)

    # --- operators -------------------------------------------------------------------------------
    def __add__(self, other): return add(self, other)
    def __radd__(self, other): return add(other, self)
    def __sub__(self, other): return sub(self, other)
    def __rsub__(self, other): return sub(other, self)
    def __mul__(self, other): return mul(self, other)
    def __rmul__(self, other): return mul(other, self)
    def __truediv__(self, other): return div(self, other)
    def __rtruediv__(self, other): return div(other, self)
    def __pow__(self, other): return pow(self, other)
    def __rpow__(self, other): return pow(other, self)
    def __matmul__(self, other): return matmul(self, other)
    def __rmatmul__(self, other): return matmul(other, self)
    def __neg__(self): return neg(self)
    def __getitem__(self, index): return getitem(self, index)

    # --- methods ---------------------------------------------------------------------------------
    def exp(self): return exp(self)
    def log(self): return log(self)
    def sqrt(self): return sqrt(self)
    def tanh(self): return tanh(self)
    def sigmoid(self): return sigmoid(self)
    def relu(self): return relu(self)
    def leaky_relu(self, slope: float = 0.01): return leaky_relu(self, slope)
    def abs(self): return abs(self)
    def sum(self, axis=None, keepdims=False): return sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return max(self, axis, keepdims)
    def min(self, axis=None, keepdims=False): return min(self, axis, keepdims)
    def log_softmax(self, axis=-1): return log_softmax(self, axis)
    def softmax(self, axis=-1): return softmax(self, axis)

    def reshape(self, *shape):
        return reshape(self, shape[0] if len(shape) == 1 and not is_int(shape[0]) else shape)

    def flatten(self, start: int = 0) -> "Tensor":
        """Merge the axes from ``start`` on into one."""
        start = _axis(start, self.ndim)
        return reshape(self, self.shape[:start] + (-1,))

    def transpose(self, *axes):
        return transpose(self, axes[0] if len(axes) == 1 and not is_int(axes[0])
                         else (axes or None))

    permute = transpose

    @property
    def T(self) -> "Tensor":
        return transpose(self)


def _seed(output: "Tensor", gradient: Any) -> np.ndarray:
    """The gradient that starts a backward pass from ``output``."""
    if not output.requires_grad:
        raise RuntimeError("backward() on a tensor that does not require grad: none of the "
                           "tensors it was computed from has requires_grad=True, or it was "
                           "computed under no_grad()")
    if gradient is None:
        if output.size != 1:
            raise RuntimeError(f"backward() without a gradient needs a one-element (scalar) "
                               f"tensor, this one has shape {output.shape}; pass "
                               f"gradient= with that shape")
        return np.ones_like(output.data)
    seed = np.asarray(gradient.data if isinstance(gradient, Tensor) else gradient)
    if seed.shape != output.shape:
        raise ValueError(f"backward(): gradient has shape {seed.shape}, but the tensor "
                         f"has shape {output.shape}")
    return seed.astype(output.dtype, copy=False)


def _run_backward(roots: Sequence["Tensor"], seeds: Sequence[np.ndarray], retain_graph: bool,
                  create_graph: bool, capture: frozenset = frozenset()
                  ) -> dict[int, tuple["Tensor", Any]]:
    """One reverse pass from ``roots``: the gradient of every leaf it reaches and of every
    tensor that retains its grad or whose id is in ``capture``, keyed by id.  With
    ``create_graph`` the gradients are Tensors built by each node's graph_backward, so the
    pass is recorded too."""
    reached: dict[int, tuple[Tensor, Any]] = {}
    pending: dict[int, Any] = {}

    def deliver(tensor: "Tensor", g: Any) -> None:
        key = id(tensor)
        if tensor.node is None:
            previous = reached.get(key)
            reached[key] = (tensor, g if previous is None else _plus(previous[1], g,
                                                                     create_graph))
        else:
            pending[key] = g if key not in pending else _plus(pending[key], g, create_graph)

    for root, seed in zip(roots, seeds):
        deliver(root, Tensor(seed) if create_graph else seed)
    order = _topological_order(roots)
    with _grad_enabled(create_graph):
        for position, tensor in enumerate(order):
            order[position] = None  # let each intermediate go as soon as it is done
            node = tensor.node
            grad = pending.pop(id(tensor), None)
            if node.backward is None:
                raise RuntimeError(f"backward through the graph a second time: the saved arrays "
                                   f"of '{node.op}' were freed by the first backward(); pass "
                                   f"retain_graph=True to the first call to keep them")
            if grad is None:  # no path carried a gradient here (every contribution was None)
                if not retain_graph:
                    node.backward, node.graph_backward, node.inputs = None, None, ()
                continue
            if tensor._retains_grad or id(tensor) in capture:
                reached[id(tensor)] = (tensor, grad)
            if create_graph:
                if node.graph_backward is None:
                    raise RuntimeError(f"create_graph: '{node.op}' has no differentiable "
                                       f"backward, so its gradient cannot be differentiated "
                                       f"again")
                grads = node.graph_backward(grad)
            else:
                grads = node.backward(grad)
            if len(grads) != len(node.inputs):
                raise RuntimeError(f"'{node.op}' backward returned {len(grads)} gradients for "
                                   f"{len(node.inputs)} inputs")
            for parent, g in zip(node.inputs, grads):
                if g is None or not parent.requires_grad:
                    continue
                if not create_graph:
                    g = np.asarray(g)
                if g.shape != parent.shape:
                    raise RuntimeError(f"'{node.op}' backward returned a gradient of shape "
                                       f"{g.shape} for an input of shape {parent.shape}")
                if not create_graph:
                    g = g.astype(parent.dtype, copy=False)
                deliver(parent, g)
            if not retain_graph:
                node.backward, node.graph_backward, node.inputs = None, None, ()
    return reached


def _plus(a: Any, b: Any, tensors: bool) -> Any:
    return add(a, b) if tensors else a + b


@contextlib.contextmanager
def _grad_enabled(enabled: bool):
    saved = _mode.enabled
    _mode.enabled = enabled
    try:
        yield
    finally:
        _mode.enabled = saved


def grad(outputs, inputs, grad_outputs=None, retain_graph: bool | None = None,
         create_graph: bool = False, allow_unused: bool = False) -> tuple["Tensor | None", ...]:
    """The gradients of ``outputs`` (weighted by ``grad_outputs``) with respect to
    ``inputs``, as Tensors, without touching any ``.grad``; like ``torch.autograd.grad``.

    With ``create_graph`` the returned gradients are part of the graph, so they can be
    differentiated again (gradient penalties, Hessian-vector products).
    """
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    weights = [None] * len(outputs) if grad_outputs is None else (
        [grad_outputs] if isinstance(grad_outputs, Tensor) or not isinstance(grad_outputs,
                                                                           (list, tuple))
        else list(grad_outputs))
    if len(weights) != len(outputs):
        raise ValueError(f"grad: {len(weights)} grad_outputs for {len(outputs)} outputs")
    if not all(t.requires_grad for t in inputs):
        raise RuntimeError("grad: an input does not require grad")
    seeds = [_seed(o, g) for o, g in zip(outputs, weights)]
    reached = _run_backward(outputs, seeds, create_graph if retain_graph is None else retain_graph,
                            create_graph, frozenset(id(t) for t in inputs))
    result = []
    for tensor in inputs:
        found = reached.get(id(tensor))
        if found is None and not allow_unused:
            raise RuntimeError("grad: an input is not reached from the outputs (pass "
                               "allow_unused=True to get None for it)")
        value = None if found is None else found[1]
        result.append(value if value is None or isinstance(value, Tensor) else Tensor(value))
    return tuple(result)


def _accumulate_leaf(tensor: Tensor, grad: np.ndarray) -> None:
    if tensor.grad is None:
        tensor.grad = np.array(grad, dtype=tensor.dtype, copy=True)  # owned, writable
    else:
        tensor.grad += grad


def _topological_order(roots: Sequence[Tensor]) -> list[Tensor]:
    """Non-leaf tensors that lead to ``roots``, each after every tensor computed from it.

    Iterative depth-first search (inputs in order), reversed post-order: no
    recursion, and the same graph always gives the same order.
    """
    post: list[Tensor] = []
    seen: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False) for root in reversed(roots)
                                        if root.node is not None]
    while stack:
        tensor, expanded = stack.pop()
        if expanded:
            post.append(tensor)
            continue
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        stack.append((tensor, True))
        for parent in reversed(tensor.node.inputs):
            if parent.node is not None and parent.requires_grad and id(parent) not in seen:
                stack.append((parent, False))
    post.reverse()
    return post


def _result(op: str, data: np.ndarray, inputs: tuple[Tensor, ...], backward: Backward,
            graph_backward: GraphBackward | None = None) -> Tensor:
    """The output tensor of an op; records a node when gradients are enabled and needed."""
    out = Tensor(data)
    if _mode.enabled and any(t.requires_grad for t in inputs):
        out.requires_grad = True
        out.node = Node(op, inputs, backward, graph_backward)
    return out


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def _tensor(value: Any, like: Tensor | None = None) -> Tensor:
    """``value`` as a Tensor; a Python number takes the dtype of ``like``."""
    if isinstance(value, Tensor):
        return value
    if like is not None and isinstance(value, (int, float)) and like.dtype.kind == "f":
        return Tensor(np.asarray(value, like.dtype))
    return Tensor(value)


def _pair(a: Any, b: Any) -> tuple[Tensor, Tensor]:
    a = _tensor(a, b if isinstance(b, Tensor) else None)
    return a, _tensor(b, a)


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for {ndim} dimensions")
    return axis % ndim


def _axes(axis: Any, ndim: int) -> tuple[int, ...]:
    """Normalise None / an int / ints to sorted non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if is_int(axis) else tuple(axis)
    normal = tuple(sorted(_axis(int(a), ndim) for a in axes))
    if len(set(normal)) != len(normal):
        raise ValueError(f"repeated axis in {axis!r}")
    return normal


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` over the axes NumPy broadcasting added or stretched to reach ``shape``."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra < 0:
        raise ValueError(f"cannot reduce a gradient of shape {grad.shape} to {shape}")
    stretched = tuple(extra + i for i, n in enumerate(shape)
                      if n == 1 and grad.shape[extra + i] != 1)
    return grad.sum(axis=tuple(range(extra)) + stretched, keepdims=True).reshape(shape)


def _expand_reduced(grad: np.ndarray, shape: tuple[int, ...], axes: tuple[int, ...],
                    keepdims: bool) -> np.ndarray:
    """A reduction's output gradient put back in the input's shape (a broadcast view)."""
    if not keepdims:
        grad = np.expand_dims(grad, axes)
    return np.broadcast_to(grad, shape)


# The same two helpers on Tensors, for differentiable backward passes (create_graph).

def _unbroadcast_t(grad: "Tensor", shape: tuple[int, ...]) -> "Tensor":
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    stretched = tuple(extra + i for i, n in enumerate(shape)
                      if n == 1 and grad.shape[extra + i] != 1)
    return reshape(sum(grad, tuple(range(extra)) + stretched, keepdims=True), shape)


def _expand_reduced_t(grad: "Tensor", shape, axes, keepdims: bool) -> "Tensor":
    if not keepdims:
        grad = reshape(grad, tuple(1 if i in axes else n for i, n in enumerate(shape)))
    return broadcast_to(grad, shape)


def broadcast_to(a, shape) -> Tensor:
    """``a`` broadcast to ``shape`` (NumPy rules); the gradient sums over the copies."""
    a = _tensor(a)
    shape, before = tuple(shape), a.shape
    return _result("broadcast_to", np.broadcast_to(a.data, shape), (a,),
                   lambda g: (unbroadcast(g, before),),
                   lambda g: (_unbroadcast_t(g, before),))


# ------------------------------------------------------------------------------------------------
# Elementwise arithmetic (NumPy broadcasting; gradients reduced by unbroadcast)
# ------------------------------------------------------------------------------------------------

def add(a, b) -> Tensor:
    a, b = _pair(a, b)
    sa, sb = a.shape, b.shape

    def backward(g):
        return unbroadcast(g, sa), unbroadcast(g, sb)

    def graph_backward(g):
        return _unbroadcast_t(g, sa), _unbroadcast_t(g, sb)
    return _result("add", a.data + b.data, (a, b), backward, graph_backward)


def sub(a, b) -> Tensor:
    a, b = _pair(a, b)
    sa, sb = a.shape, b.shape

    def backward(g):
        return unbroadcast(g, sa), unbroadcast(-g, sb)

    def graph_backward(g):
        return _unbroadcast_t(g, sa), _unbroadcast_t(neg(g), sb)
    return _result("sub", a.data - b.data, (a, b), backward, graph_backward)


def mul(a, b) -> Tensor:
    a, b = _pair(a, b)
    ad, bd = a.data, b.data

    def backward(g):
        return unbroadcast(g * bd, ad.shape), unbroadcast(g * ad, bd.shape)

    def graph_backward(g):
        return _unbroadcast_t(mul(g, b), ad.shape), _unbroadcast_t(mul(g, a), bd.shape)
    return _result("mul", ad * bd, (a, b), backward, graph_backward)


def div(a, b) -> Tensor:
    a, b = _pair(a, b)
    ad, bd = a.data, b.data
    out = ad / bd

    def backward(g):
        ga = g / bd
        return unbroadcast(ga, ad.shape), unbroadcast(-ga * out, bd.shape)

    def graph_backward(g):
        ga = div(g, b)
        return (_unbroadcast_t(ga, ad.shape),
                _unbroadcast_t(neg(mul(ga, div(a, b))), bd.shape))
    return _result("div", out, (a, b), backward, graph_backward)


def neg(a) -> Tensor:
    a = _tensor(a)
    return _result("neg", -a.data, (a,), lambda g: (-g,), lambda g: (neg(g),))


def pow(a, b) -> Tensor:
    """``a ** b``: either may be a tensor; a number exponent is a constant."""
    if not isinstance(b, Tensor) and np.ndim(b) == 0 and isinstance(a, Tensor):
        ad, p = a.data, b.item() if isinstance(b, np.generic) else b  # a number keeps a's dtype
        out = ad ** p

        def backward(g):
            if p == 0:
                return (np.zeros_like(g),)
            return (g * (p * ad ** (p - 1)),)

        def graph_backward(g):
            if p == 0:
                return (mul(g, 0.0),)
            return (mul(g, mul(pow(a, p - 1), p)),)
        return _result("pow", out, (a,), backward, graph_backward)
    a, b = _pair(a, b)
    ad, bd = a.data, b.data
    out = ad ** bd

    def backward(g):
        with np.errstate(divide="ignore", invalid="ignore"):
            ga = g * bd * ad ** (bd - 1)
            # d(a^b)/db = a^b log a; at a = 0 (where a^b = 0 or 1) it is taken as 0, like PyTorch
            gb = np.where(ad == 0, 0, g * out * np.log(np.where(ad == 0, 1, ad)))
        return unbroadcast(ga, ad.shape), unbroadcast(gb.astype(out.dtype, copy=False), bd.shape)
    return _result("pow", out, (a, b), backward)


# ------------------------------------------------------------------------------------------------
# Elementwise functions
# ------------------------------------------------------------------------------------------------

def exp(a) -> Tensor:
    a = _tensor(a)
    out = np.exp(a.data)
    return _result("exp", out, (a,), lambda g: (g * out,), lambda g: (mul(g, exp(a)),))


def log(a) -> Tensor:
    a = _tensor(a)
    ad = a.data
    return _result("log", np.log(ad), (a,), lambda g: (g / ad,), lambda g: (div(g, a),))


def sqrt(a) -> Tensor:
    a = _tensor(a)
    out = np.sqrt(a.data)
    return _result("sqrt", out, (a,), lambda g: (g / (2 * out),),
                   lambda g: (div(g, mul(sqrt(a), 2.0)),))


def tanh(a) -> Tensor:
    a = _tensor(a)
    out = np.tanh(a.data)
    return _result("tanh", out, (a,), lambda g: (g * (1 - out * out),),
                   lambda g: (mul(g, sub(1.0, pow(tanh(a), 2))),))


def sigmoid(a) -> Tensor:
    a = _tensor(a)
    out = np.exp(-np.logaddexp(0, -a.data)).astype(a.dtype, copy=False)  # no overflow
    def graph_backward(g):
        s = sigmoid(a)
        return (mul(g, mul(s, sub(1.0, s))),)
    return _result("sigmoid", out, (a,), lambda g: (g * out * (1 - out),), graph_backward)


def relu(a) -> Tensor:
    a = _tensor(a)
    positive = a.data > 0
    return _result("relu", np.maximum(a.data, 0), (a,), lambda g: (g * positive,),
                   lambda g: (mul(g, Tensor(positive.astype(a.dtype))),))


def leaky_relu(a, slope: float = 0.01) -> Tensor:
    a = _tensor(a)
    factor = np.where(a.data > 0, 1, slope).astype(a.dtype)
    return _result("leaky_relu", a.data * factor, (a,), lambda g: (g * factor,),
                   lambda g: (mul(g, Tensor(factor)),))


def abs(a) -> Tensor:
    a = _tensor(a)
    sign = np.sign(a.data)
    return _result("abs", np.abs(a.data), (a,), lambda g: (g * sign,),
                   lambda g: (mul(g, Tensor(sign)),))


# ------------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------------

def sum(a, axis=None, keepdims: bool = False) -> Tensor:
    a = _tensor(a)
    axes, shape = _axes(axis, a.ndim), a.shape
    out = np.asarray(a.data.sum(axis=axes, keepdims=keepdims))
    return _result("sum", out, (a,), lambda g: (_expand_reduced(g, shape, axes, keepdims),),
                   lambda g: (_expand_reduced_t(g, shape, axes, keepdims),))


def mean(a, axis=None, keepdims: bool = False) -> Tensor:
    a = _tensor(a)
    axes, shape = _axes(axis, a.ndim), a.shape
    count = int(np.prod([shape[i] for i in axes], dtype=np.int64))
    out = np.asarray(a.data.mean(axis=axes, keepdims=keepdims))

    def backward(g):
        return (_expand_reduced(g / count, shape, axes, keepdims),)

    def graph_backward(g):
        return (_expand_reduced_t(div(g, float(count)), shape, axes, keepdims),)
    return _result("mean", out, (a,), backward, graph_backward)


def _extreme(op: str, reduce, a, axis, keepdims: bool) -> Tensor:
    a = _tensor(a)
    axes, shape = _axes(axis, a.ndim), a.shape
    kept = reduce(a.data, axis=axes, keepdims=True)
    hits = a.data == kept
    share = (hits / hits.sum(axis=axes, keepdims=True)).astype(a.dtype)  # ties split evenly
    out = kept if keepdims else np.squeeze(kept, axis=axes)

    def backward(g):
        return (_expand_reduced(g, shape, axes, keepdims) * share,)

    def graph_backward(g):
        return (mul(_expand_reduced_t(g, shape, axes, keepdims), Tensor(share)),)
    return _result(op, out, (a,), backward, graph_backward)


def max(a, axis=None, keepdims: bool = False) -> Tensor:
    """Maximum over axes; where several elements tie, each gets an equal share of the gradient."""
    return _extreme("max", np.max, a, axis, keepdims)


def min(a, axis=None, keepdims: bool = False) -> Tensor:
    """Minimum over axes; ties share the gradient like :func:`max`."""
    return _extreme("min", np.min, a, axis, keepdims)


# ------------------------------------------------------------------------------------------------
# Shape and indexing
# ------------------------------------------------------------------------------------------------

def reshape(a, shape) -> Tensor:
    a = _tensor(a)
    before = a.shape
    shape = (shape,) if is_int(shape) else tuple(shape)
    return _result("reshape", a.data.reshape(shape), (a,), lambda g: (g.reshape(before),),
                   lambda g: (reshape(g, before),))


def transpose(a, axes=None) -> Tensor:
    """Permute axes (reverse them when ``axes`` is None), like ``numpy.transpose``."""
    a = _tensor(a)
    axes = tuple(reversed(range(a.ndim))) if axes is None else tuple(_axis(int(i), a.ndim)
                                                                     for i in axes)
    if sorted(axes) != list(range(a.ndim)):
        raise ValueError(f"transpose: {axes} is not a permutation of {a.ndim} axes")
    inverse = tuple(np.argsort(axes))
    return _result("transpose", a.data.transpose(axes), (a,), lambda g: (g.transpose(inverse),),
                   lambda g: (transpose(g, inverse),))


def _basic_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, slice) or is_int(p) for p in parts)


def getitem(a, index) -> Tensor:
    """``a[index]``: slices, ints, None, Ellipsis, integer and boolean arrays."""
    a = _tensor(a)
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    shape, dtype, basic = a.shape, a.dtype, _basic_index(index)

    def backward(g):
        grad = np.zeros(shape, dtype)
        if basic:  # a view: every element is selected at most once
            grad[index] = g
        else:      # integer arrays may select an element several times
            np.add.at(grad, index, g)
        return (grad,)
    return _result("getitem", np.asarray(a.data[index]), (a,), backward)


def concatenate(tensors: Sequence, axis: int = 0) -> Tensor:
    tensors = tuple(_tensor(t) for t in tensors)
    if not tensors:
        raise ValueError("concatenate needs at least one tensor")
    out = np.concatenate([t.data for t in tensors], axis=axis)
    axis = _axis(axis, out.ndim)
    bounds = np.cumsum([t.shape[axis] for t in tensors])[:-1]
    return _result("concatenate", out, tensors, lambda g: tuple(np.split(g, bounds, axis=axis)))


def stack(tensors: Sequence, axis: int = 0) -> Tensor:
    tensors = tuple(_tensor(t) for t in tensors)
    if not tensors:
        raise ValueError("stack needs at least one tensor")
    out = np.stack([t.data for t in tensors], axis=axis)
    axis, count = _axis(axis, out.ndim), len(tensors)
    return _result("stack", out, tensors,
                   lambda g: tuple(np.take(g, i, axis=axis) for i in range(count)))


# ------------------------------------------------------------------------------------------------
# Linear algebra
# ------------------------------------------------------------------------------------------------

def matmul(a, b) -> Tensor:
    """``a @ b`` with NumPy's rules: 1-D operands, batched and broadcast stacks of matrices."""
    a, b = _pair(a, b)
    ad, bd = a.data, b.data
    need_a, need_b = a.requires_grad, b.requires_grad

    def backward(g):
        # Make both operands matrices again: a (k,) is a (1, k) row, b (k,) a (k, 1) column.
        a2 = ad[None, :] if ad.ndim == 1 else ad
        b2 = bd[:, None] if bd.ndim == 1 else bd
        g2 = g[..., None] if bd.ndim == 1 else g
        g2 = g2[..., None, :] if ad.ndim == 1 else g2
        ga = gb = None
        if need_a:
            ga = g2 @ np.swapaxes(b2, -1, -2)
            ga = unbroadcast(ga[..., 0, :] if ad.ndim == 1 else ga, ad.shape)
        if need_b:
            gb = np.swapaxes(a2, -1, -2) @ g2
            gb = unbroadcast(gb[..., 0] if bd.ndim == 1 else gb, bd.shape)
        return ga, gb

    def graph_backward(g):
        if ad.ndim < 2 or bd.ndim < 2:
            raise RuntimeError("create_graph: matmul of a 1-D operand has no differentiable "
                               "backward; reshape it to a matrix")
        return (_unbroadcast_t(matmul(g, _swap_last(b)), ad.shape),
                _unbroadcast_t(matmul(_swap_last(a), g), bd.shape))
    return _result("matmul", np.asarray(ad @ bd), (a, b), backward, graph_backward)


def _swap_last(t: "Tensor") -> "Tensor":
    axes = list(range(t.ndim))
    axes[-1], axes[-2] = axes[-2], axes[-1]
    return transpose(t, axes)


def linear(x, weight, bias=None) -> Tensor:
    """``x @ weight.T + bias`` with ``weight`` (out, in), like ``torch.nn.functional.linear``."""
    x, weight = _pair(x, weight)
    xd, wd = x.data, weight.data
    if wd.ndim != 2 or xd.ndim < 1 or xd.shape[-1] != wd.shape[1]:
        raise ValueError(f"linear: input of shape {xd.shape} does not fit a weight of shape "
                         f"{wd.shape} (expected (..., {wd.shape[-1] if wd.ndim else '?'}) "
                         f"and (out, in))")
    out = xd @ wd.T
    inputs: tuple[Tensor, ...] = (x, weight)
    if bias is not None:
        bias = _tensor(bias, x)
        if bias.shape != (wd.shape[0],):
            raise ValueError(f"linear: bias has shape {bias.shape}, expected ({wd.shape[0]},)")
        out = out + bias.data
        inputs += (bias,)
    need = [t.requires_grad for t in inputs]

    def backward(g):
        g2 = g.reshape(-1, wd.shape[0])
        gx = (g @ wd) if need[0] else None
        gw = (g2.T @ xd.reshape(-1, wd.shape[1])) if need[1] else None
        return (gx, gw) + ((g2.sum(axis=0),) if len(need) == 3 else ())

    def graph_backward(g):
        g2 = reshape(g, (-1, wd.shape[0]))
        gx = matmul(g, weight)
        gw = matmul(transpose(g2), reshape(x, (-1, wd.shape[1])))
        return (gx, gw) + ((sum(g2, 0),) if len(need) == 3 else ())
    return _result("linear", out, inputs, backward, graph_backward)


# ------------------------------------------------------------------------------------------------
# Softmax and losses
# ------------------------------------------------------------------------------------------------

def _log_softmax(values: np.ndarray, axis: int) -> np.ndarray:
    shifted = values - values.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def log_softmax(a, axis: int = -1) -> Tensor:
    a = _tensor(a)
    out = _log_softmax(a.data, axis)

    def backward(g):
        return (g - np.exp(out) * g.sum(axis=axis, keepdims=True),)

    def graph_backward(g):
        return (sub(g, mul(exp(log_softmax(a, axis)), sum(g, axis, keepdims=True))),)
    return _result("log_softmax", out, (a,), backward, graph_backward)


def softmax(a, axis: int = -1) -> Tensor:
    return exp(log_softmax(a, axis))


def cross_entropy(logits, target, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of ``logits`` (N, C, *d) against class indices ``target`` (N, *d).

    Like ``torch.nn.functional.cross_entropy``: ``reduction`` is "mean",
    "sum" or "none".
    """
    logits = _tensor(logits)
    target = np.asarray(target.data if isinstance(target, Tensor) else target)
    if logits.ndim < 2:
        raise ValueError(f"cross_entropy: logits need shape (N, C, ...), got {logits.shape}")
    if target.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: target must hold integer class indices, got dtype "
                        f"{target.dtype}")
    expected = logits.shape[:1] + logits.shape[2:]
    if target.shape != expected:
        raise ValueError(f"cross_entropy: target has shape {target.shape}, expected {expected} "
                         f"for logits of shape {logits.shape}")
    classes = logits.shape[1]
    if target.size and (target.min() < 0 or target.max() >= classes):
        raise ValueError(f"cross_entropy: target values must lie in [0, {classes})")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got "
                         f"{reduction!r}")
    logp = _log_softmax(logits.data, axis=1)
    picked = np.expand_dims(target, 1)
    losses = -np.take_along_axis(logp, picked, axis=1)[:, 0]
    count = losses.size
    out = {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]

    shape = losses.shape

    def backward(g):
        weight = g if reduction == "none" else np.broadcast_to(g / count if reduction == "mean"
                                                               else g, shape)
        grad = np.exp(logp)
        np.put_along_axis(grad, picked, np.take_along_axis(grad, picked, axis=1) - 1, axis=1)
        return (grad * np.expand_dims(weight, 1),)
    return _result("cross_entropy", np.asarray(out, logits.dtype), (logits,), backward)


def mse_loss(a, b) -> Tensor:
    """Mean squared difference."""
    return mean((_tensor(a) - b) ** 2)


# ------------------------------------------------------------------------------------------------
# Compiled ops: convolution and average pooling
# ------------------------------------------------------------------------------------------------

_KERNELS: dict[tuple, Any] = {}


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return int(value) if is_int(value) else value


def _compiled(kind: type, **fields) -> tuple[Any, Any]:
    """(spec, loaded kernel) of a spec class and its fields, compiled on first use and
    memoised per process.

    The key is the raw fields, so repeated calls skip building and hashing
    the spec; a new ``$SYMCONV_CACHE_DIR`` gets its own entry.
    """
    key = (kind.__name__, os.environ.get("SYMCONV_CACHE_DIR"), tuple(sorted(
        (name, _freeze(value)) for name, value in fields.items())))
    found = _KERNELS.get(key)
    if found is None:
        spec = kind(**fields)
        found = _KERNELS[key] = (spec, _kernel_for(spec))
    return found


def _kernel_for(spec) -> Any:
    """The loaded kernel of any spec, memoised per process (and cache directory)."""
    key = (spec, os.environ.get("SYMCONV_CACHE_DIR"))
    kernel = _KERNELS.get(key)
    if kernel is None:
        from . import compiler  # here, not at import: SymPy loads only if a build is needed
        kernel = _KERNELS[key] = compiler.compile_op(spec)
    return kernel


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


def _kernel_op(name: str, spec: Any, kernel: Any, inputs: tuple[Tensor, ...],
               dtype: np.dtype) -> Tensor:
    """An op run by compiled kernels: the forward kernel now, the derived gradient kernels
    in backward, writing into reused buffers.  Its differentiable backward calls each
    gradient function as an op of its own (a GradientSpec), whose gradients are derived in
    turn: any order of derivative."""
    arrays = [np.ascontiguousarray(t.data, dtype) for t in inputs]
    forward = kernel.functions["forward"]
    out = forward(*arrays, out=_buffers.get(forward.shapes[forward.output], dtype))
    names = kernel.inputs
    wrt = tuple(n for n, t in zip(names, inputs) if t.requires_grad and n in kernel.differentiable)
    args = kernel.manifest["backward_args"]
    read = {a for n in wrt for a in kernel.functions[f"grad_{n}"].args}
    saved = {n: a for n, a in zip(names, arrays) if n in read}   # only what backward reads

    def backward(g):
        given = {**saved, args[-1]: np.ascontiguousarray(g, dtype)}
        functions = (kernel.functions[f"grad_{n}"] for n in wrt)
        outs = {n: _buffers.get(f.shapes[f.output], dtype) for n, f in zip(wrt, functions)}
        grads = dict(zip(kernel.differentiable,
                         kernel.backward(*(given.get(a) for a in args), wrt=wrt, out=outs)))
        return tuple(grads.get(n) for n in names)

    def graph_backward(g):
        operands = {**dict(zip(names, inputs)), args[-1]: g}
        grads = []
        for n in names:
            if n not in wrt:
                grads.append(None)
                continue
            gradient = GradientSpec(spec, f"grad_{n}")
            gkernel = _kernel_for(gradient)
            grads.append(_kernel_op(f"grad_{n}", gradient, gkernel,
                                    tuple(operands[a] for a in gkernel.inputs), dtype))
        return tuple(grads)
    return _result(name, out, inputs, backward, graph_backward)


def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1,
         padding_mode: str = "zeros") -> Tensor:
    """N-D convolution (cross-correlation, channels first) like ``torch.nn.functional.conv{n}d``.

    ``x`` is (N, C_in, *spatial), ``weight`` (C_out, C_in // groups, *kernel),
    ``bias`` (C_out,) or None; any number of spatial dims.  ``stride``,
    ``padding``, ``dilation`` and ``padding_mode`` take every form ``ConvSpec``
    accepts.  The compiled kernel is chosen by shapes and arguments and built once.
    """
    x, weight = _tensor(x), _tensor(weight)
    inputs = (x, weight) if bias is None else (x, weight, _tensor(bias))
    dtype = _float_dtype("conv", *inputs)
    if x.ndim != weight.ndim:
        raise ValueError(f"conv: input of shape {x.shape} and weight of shape {weight.shape} "
                         f"must have the same number of dims")
    spec, kernel = _compiled(ConvSpec, input_shape=x.shape, weight_shape=weight.shape,
                             stride=stride, padding=padding, dilation=dilation, groups=groups,
                             bias=bias is not None, dtype=dtype.name, padding_mode=padding_mode)
    return _kernel_op("conv", spec, kernel, inputs, dtype)


def conv_transpose(x, weight, bias=None, stride=1, padding=0, output_padding=0, dilation=1,
                   groups: int = 1) -> Tensor:
    """N-D transposed convolution like ``torch.nn.functional.conv_transpose{n}d``: ``weight``
    is (C_in, C_out // groups, *kernel); derived as a convolution's input gradient."""
    x, weight = _tensor(x), _tensor(weight)
    inputs = (x, weight) if bias is None else (x, weight, _tensor(bias))
    dtype = _float_dtype("conv_transpose", *inputs)
    spec, kernel = _compiled(ConvTransposeSpec, input_shape=x.shape, weight_shape=weight.shape,
                             stride=stride, padding=padding, output_padding=output_padding,
                             dilation=dilation, groups=groups, bias=bias is not None,
                             dtype=dtype.name)
    return _kernel_op("conv_transpose", spec, kernel, inputs, dtype)


def avg_pool(x, kernel_size, stride=None, padding=0) -> Tensor:
    """N-D average pooling over (N, C, *spatial), zero padding counted in the window like
    PyTorch's ``count_include_pad=True``; compiled from its index sum like ``conv``."""
    x = _tensor(x)
    dtype = _float_dtype("avg_pool", x)
    spec, kernel = _compiled(AvgPoolSpec, input_shape=x.shape, kernel_size=kernel_size,
                             stride=stride, padding=padding, dtype=dtype.name)
    return _kernel_op("avg_pool", spec, kernel, (x,), dtype)


class IndexOp:
    """A user-defined op: an index sum compiled with its derived gradients.

    Call it on NumPy arrays for the output array, or on Tensors for a graph op whose
    gradients (of any order) are the derived ones.  ``formulas`` shows the forward sum
    and every gradient sum.
    """

    def __init__(self, spec: Any):
        self.spec = spec

    @property
    def kernel(self) -> Any:
        return _kernel_for(self.spec)

    @property
    def formulas(self) -> dict[str, str]:
        return self.kernel.formulas

    def __repr__(self) -> str:
        return f"<symconv op {self.spec.describe()}>"

    def __call__(self, *inputs):
        kernel = self.kernel
        dtype = np.dtype(self.spec.dtype)
        if any(isinstance(t, Tensor) for t in inputs):
            tensors = tuple(_tensor(t) for t in inputs)
            return _kernel_op(self.spec.output_name, self.spec, kernel, tensors, dtype)
        return kernel.forward(*(np.ascontiguousarray(a, dtype) for a in inputs))


def op(expression: str, shapes, dtype: str = "float32", zero_outside=()) -> IndexOp:
    """A user-defined op from an index sum, e.g.
    ``op("Y[n, c, i] = sum(W[c, a] * X[n, c, 2*i + a], (a, 0, 2))", {"X": (2, 3, 9),
    "W": (3, 3)})``; see ``symconv.ExprSpec`` for the notation.  Inputs are called in the
    order of ``shapes``.  A SymPy ``Eq(Y[...], Sum(...))`` is accepted as well."""
    if not isinstance(expression, str):
        import sympy
        if not isinstance(expression, sympy.Eq):
            raise TypeError(f"op: expected a string or sympy.Eq, got "
                            f"{type(expression).__name__}")
        expression = f"{sympy.sstr(expression.lhs)} = {sympy.sstr(expression.rhs)}"
    return IndexOp(ExprSpec(expression, shapes, dtype=dtype, zero_outside=zero_outside))


def max_pool(x, kernel_size, stride=None, padding=0) -> Tensor:
    """N-D max pooling over (N, C, *spatial) like ``torch.nn.functional.max_pool{n}d``.

    Padding is -inf; ``stride`` defaults to the window.  The gradient goes to
    the first maximum of each window.  A maximum is not an index sum, so
    this op is NumPy (a strided window view and an argmax), not compiled.
    """
    x = _tensor(x)
    if x.ndim < 3:
        raise ValueError(f"max_pool: input needs shape (N, C, *spatial), got {x.shape}")
    rank = x.ndim - 2
    window = per_dim("max_pool.kernel_size", kernel_size, rank, 1)
    step = window if stride is None else per_dim("max_pool.stride", stride, rank, 1)
    pads = (padding,) * rank if is_int(padding) else tuple(padding)
    pads = tuple((p, p) if is_int(p) else tuple(p) for p in pads)
    if len(pads) != rank or any(lo < 0 or hi < 0 for lo, hi in pads):
        raise ValueError(f"max_pool: padding must be a non-negative int, {rank} ints or (lo, hi) "
                         f"pairs, got {padding!r}")
    spatial_axes = tuple(range(2, 2 + rank))
    padded = x.data
    if any(lo or hi for lo, hi in pads):
        padded = np.pad(padded, ((0, 0), (0, 0), *pads), constant_values=-np.inf)
    if any(n < k for n, k in zip(padded.shape[2:], window)):
        raise ValueError(f"max_pool: window {window} is larger than the padded input "
                         f"{padded.shape[2:]}")
    views = np.lib.stride_tricks.sliding_window_view(padded, window, axis=spatial_axes)
    views = views[(slice(None), slice(None), *(slice(None, None, s) for s in step))]
    out_spatial = views.shape[2:2 + rank]
    flat = views.reshape(*views.shape[:2 + rank], -1)
    best = flat.argmax(axis=-1)
    out = np.take_along_axis(flat, best[..., None], axis=-1)[..., 0]
    padded_shape, shape, dtype = padded.shape, x.shape, x.dtype

    def backward(g):
        # Flat index, in the padded input, of each window's maximum: channel-plane offset
        # plus, per spatial dim, (output position * stride + offset in the window).
        offsets = np.unravel_index(best, window)
        where = np.arange(shape[0] * shape[1]).reshape(shape[0], shape[1], *(1,) * rank)
        for dim in range(rank):
            grid = np.arange(out_spatial[dim]).reshape((-1,) + (1,) * (rank - 1 - dim))
            where = where * padded_shape[2 + dim] + (grid * step[dim] + offsets[dim])
        grad = np.bincount(where.ravel(), weights=g.ravel(), minlength=int(np.prod(padded_shape)))
        grad = grad.reshape(padded_shape)
        inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, shape[2:]))
        return (grad[(slice(None), slice(None), *inner)].astype(dtype),)
    return _result("max_pool", np.ascontiguousarray(out), (x,), backward)
