"""The autodiff engine: Tensor, the graph it records, and the reverse pass.

A :class:`Tensor` wraps a NumPy array.  An op (``ops.py``, ``compiled.py``)
computes its output and calls :func:`record` with one backward rule: a
function of the output gradient (a Tensor) and the output itself that returns
one input gradient per input (None where there is none), written with graph
ops.  ``backward`` orders the graph once, iteratively (no recursion, the same
order every time), and runs the rules from the output back to the leaves,
summing the contributions of a tensor used several times.  The same rule
serves both kinds of pass: with gradients disabled it just computes arrays;
with ``create_graph`` it records its own ops, so the gradient can be
differentiated again.

Rules the engine keeps:

* After ``backward()`` each node drops its rule and its inputs, so the saved
  tensors and intermediate results are freed even while the output is still
  referenced; ``backward(retain_graph=True)`` keeps them for another pass.  A
  second pass through a freed graph raises RuntimeError.
* Gradients of leaves (tensors created by the user with ``requires_grad=True``)
  accumulate in ``.grad`` across passes, like PyTorch; set ``.grad = None`` (or
  use an optimiser's ``zero_grad``) to reset.
* Gradients have the dtype of their tensor.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Sequence

import numpy as np

from ..spec import is_int

Rule = Callable[["Tensor", "Tensor"], Sequence["Tensor | np.ndarray | None"]]


# --- gradient mode --------------------------------------------------------------------------------

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


@contextlib.contextmanager
def _grad_enabled(enabled: bool):
    saved = _mode.enabled
    _mode.enabled = enabled
    try:
        yield
    finally:
        _mode.enabled = saved


# --- Tensor ---------------------------------------------------------------------------------------

class Node:
    """How a tensor was made: the op's name, its inputs and its backward rule."""

    __slots__ = ("op", "inputs", "backward")

    def __init__(self, op: str, inputs: tuple["Tensor", ...], backward: Rule):
        self.op = op
        self.inputs = inputs
        self.backward: Rule | None = backward

    def __repr__(self) -> str:
        state = "freed" if self.backward is None else f"{len(self.inputs)} inputs"
        return f"<Node {self.op}: {state}>"


class Tensor:
    """A NumPy array in the autodiff graph.

    ``Tensor(data, requires_grad=False, dtype=None)`` wraps ``data`` without
    copying it when it already is an array of the dtype (like
    ``torch.from_numpy``): optimisers update parameters in place.  Operators
    and methods (``+``, ``@``, ``.sum()``, ``.relu()``...) are the ops of
    ``ops.py``, attached there.
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
        self.grad: Any = None
        self.requires_grad = bool(requires_grad)
        self.node: Node | None = None
        self._retains_grad = False

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
                leaf.grad = grad if leaf.grad is None else _add(leaf.grad, grad)
            elif leaf.grad is None:
                leaf.grad = np.array(grad.data, dtype=leaf.dtype, copy=True)  # owned, writable
            else:
                leaf.grad += grad.data


def record(op: str, data: np.ndarray, inputs: tuple[Tensor, ...], backward: Rule) -> Tensor:
    """The output tensor of an op; records a node when gradients are enabled and needed.

    ``backward(grad, out)`` is the op's vector-Jacobian product: given the output
    gradient and the output tensor, one gradient per input (None where there is none),
    written with graph ops so that ``create_graph`` can record it."""
    out = Tensor(data)
    if _mode.enabled and any(t.requires_grad for t in inputs):
        out.requires_grad = True
        out.node = Node(op, inputs, backward)
    return out


def _add(a: Tensor, b: Tensor) -> Tensor:
    """``a + b`` as a graph op (recorded when gradients are enabled)."""
    return record("add", a.data + b.data, (a, b), lambda g, out: (g, g))


# --- the reverse pass -----------------------------------------------------------------------------

def _seed(output: Tensor, gradient: Any) -> np.ndarray:
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


def _run_backward(roots: Sequence[Tensor], seeds: Sequence[np.ndarray], retain_graph: bool,
                  create_graph: bool, capture: frozenset = frozenset()
                  ) -> dict[int, tuple[Tensor, Tensor]]:
    """One reverse pass from ``roots``: the gradient (a Tensor) of every leaf it reaches and
    of every tensor that retains its grad or whose id is in ``capture``, keyed by id.  With
    ``create_graph`` the rules' ops are recorded, so the pass can be differentiated."""
    reached: dict[int, tuple[Tensor, Tensor]] = {}
    pending: dict[int, Tensor] = {}

    def deliver(tensor: Tensor, g: Tensor) -> None:
        key = id(tensor)
        if tensor.node is None:
            previous = reached.get(key)
            reached[key] = (tensor, g if previous is None else _add(previous[1], g))
        else:
            pending[key] = g if key not in pending else _add(pending[key], g)

    order = _topological_order(roots)
    with _grad_enabled(create_graph):
        for root, seed in zip(roots, seeds):
            deliver(root, Tensor(seed))
        for position, tensor in enumerate(order):
            order[position] = None  # let each intermediate go as soon as it is done
            node = tensor.node
            grad = pending.pop(id(tensor), None)
            if node.backward is None:
                raise RuntimeError(f"backward through the graph a second time: the saved arrays "
                                   f"of '{node.op}' were freed by the first backward(); pass "
                                   f"retain_graph=True to the first call to keep them")
            if grad is not None:
                if tensor._retains_grad or id(tensor) in capture:
                    reached[id(tensor)] = (tensor, grad)
                grads = node.backward(grad, tensor)
                if len(grads) != len(node.inputs):
                    raise RuntimeError(f"'{node.op}' backward returned {len(grads)} gradients "
                                       f"for {len(node.inputs)} inputs")
                for parent, g in zip(node.inputs, grads):
                    if g is not None and parent.requires_grad:
                        deliver(parent, _checked_gradient(node.op, g, parent, create_graph))
            if not retain_graph:
                node.backward, node.inputs = None, ()
    return reached


def _checked_gradient(op: str, g: Any, parent: Tensor, create_graph: bool) -> Tensor:
    """A rule's gradient for ``parent``, checked for shape, in the parent's dtype."""
    if not isinstance(g, Tensor):
        if create_graph:
            raise RuntimeError(f"create_graph: '{op}' backward returned an array, not a Tensor, "
                               f"so its gradient cannot be differentiated again")
        g = Tensor(g)
    if g.shape != parent.shape:
        raise RuntimeError(f"'{op}' backward returned a gradient of shape {g.shape} for an "
                           f"input of shape {parent.shape}")
    if not create_graph and g.dtype != parent.dtype:
        g = Tensor(g.data.astype(parent.dtype))
    return g


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


def grad(outputs, inputs, grad_outputs=None, retain_graph: bool | None = None,
         create_graph: bool = False, allow_unused: bool = False) -> tuple[Tensor | None, ...]:
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
        result.append(None if found is None else found[1])
    return tuple(result)


# --- helpers the ops share ------------------------------------------------------------------------

def as_tensor(value: Any, like: Tensor | None = None) -> Tensor:
    """``value`` as a Tensor; a Python number takes the dtype of ``like``."""
    if isinstance(value, Tensor):
        return value
    if like is not None and isinstance(value, (int, float)) and like.dtype.kind == "f":
        return Tensor(np.asarray(value, like.dtype))
    return Tensor(value)


def normal_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for {ndim} dimensions")
    return axis % ndim


def normal_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    """Normalise None / an int / ints to sorted non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if is_int(axis) else tuple(axis)
    normal = tuple(sorted(normal_axis(int(a), ndim) for a in axes))
    if len(set(normal)) != len(normal):
        raise ValueError(f"repeated axis in {axis!r}")
    return normal
