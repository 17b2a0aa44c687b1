"""The NumPy ops of the graph, each with its one backward rule beside it.

Every op computes its output with NumPy and passes :func:`record` a rule
``backward(grad, out)`` written with these same ops, so the rule runs as
plain array arithmetic in an ordinary backward pass and is recorded, and can
be differentiated again, under ``create_graph``.  Broadcasting is undone by
one helper, :func:`unbroadcast`.  Results follow NumPy's type promotion; a
Python number next to a tensor takes the tensor's dtype.

Names that would shadow Python builtins carry a trailing underscore here
(``sum_``, ``max_``, ``min_``, ``abs_``, ``pow_``); ``symconv.graph`` exports
them under their plain names.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..spec import is_int, per_dim
from .engine import Tensor, as_tensor, normal_axes, normal_axis, record


def _pair(a, b) -> tuple[Tensor, Tensor]:
    a = as_tensor(a, b if isinstance(b, Tensor) else None)
    return a, as_tensor(b, a)


def _constant(array: np.ndarray) -> Tensor:
    """An array the rule multiplies by but does not differentiate (a mask, a share)."""
    return Tensor(array)


def unbroadcast(grad: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Sum ``grad`` over the axes NumPy broadcasting added or stretched to reach ``shape``."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra < 0:
        raise ValueError(f"cannot reduce a gradient of shape {grad.shape} to {shape}")
    stretched = tuple(extra + i for i, n in enumerate(shape)
                      if n == 1 and grad.shape[extra + i] != 1)
    return reshape(sum_(grad, tuple(range(extra)) + stretched, keepdims=True), shape)


def _expand_reduced(grad: Tensor, shape: tuple[int, ...], axes: tuple[int, ...],
                    keepdims: bool) -> Tensor:
    """A reduction's output gradient put back in the input's shape (a broadcast)."""
    if not keepdims:
        grad = reshape(grad, tuple(1 if i in axes else n for i, n in enumerate(shape)))
    return broadcast_to(grad, shape)


def broadcast_to(a, shape) -> Tensor:
    """``a`` broadcast to ``shape`` (NumPy rules); the gradient sums over the copies."""
    a = as_tensor(a)
    shape, before = tuple(shape), a.shape
    return record("broadcast_to", np.broadcast_to(a.data, shape), (a,),
                  lambda g, out: (unbroadcast(g, before),))


# --- elementwise arithmetic (NumPy broadcasting; gradients reduced by unbroadcast) ----------------

def add(a, b) -> Tensor:
    a, b = _pair(a, b)
    sa, sb = a.shape, b.shape
    return record("add", a.data + b.data, (a, b),
                  lambda g, out: (unbroadcast(g, sa), unbroadcast(g, sb)))


def sub(a, b) -> Tensor:
    a, b = _pair(a, b)
    sa, sb = a.shape, b.shape
    return record("sub", a.data - b.data, (a, b),
                  lambda g, out: (unbroadcast(g, sa), unbroadcast(neg(g), sb)))


def mul(a, b) -> Tensor:
    a, b = _pair(a, b)
    return record("mul", a.data * b.data, (a, b),
                  lambda g, out: (unbroadcast(mul(g, b), a.shape),
                                  unbroadcast(mul(g, a), b.shape)))


def div(a, b) -> Tensor:
    a, b = _pair(a, b)

    def backward(g, out):
        ga = div(g, b)
        return unbroadcast(ga, a.shape), unbroadcast(neg(mul(ga, out)), b.shape)
    return record("div", a.data / b.data, (a, b), backward)


def neg(a) -> Tensor:
    a = as_tensor(a)
    return record("neg", -a.data, (a,), lambda g, out: (neg(g),))


def pow_(a, b) -> Tensor:
    """``a ** b``: either may be a tensor; a number exponent is a constant."""
    if not isinstance(b, Tensor) and np.ndim(b) == 0 and isinstance(a, Tensor):
        p = b.item() if isinstance(b, np.generic) else b     # a number keeps a's dtype

        def backward(g, out):
            return (mul(g, 0.0) if p == 0 else mul(g, mul(pow_(a, p - 1), p)),)
        return record("pow", a.data ** p, (a,), backward)
    a, b = _pair(a, b)
    nonzero = a.data != 0

    def backward(g, out):
        # d(a^b)/db = a^b log a; at a = 0 (where a^b = 0 or 1) it is taken as 0, like PyTorch:
        # log is taken of a where a != 0 and of 1 elsewhere, and the result masked.
        mask = _constant(nonzero.astype(a.dtype))
        safe = add(mul(a, mask), sub(1.0, mask))
        with np.errstate(divide="ignore", invalid="ignore"):
            ga = mul(g, mul(b, pow_(a, sub(b, 1.0))))
            gb = mul(mul(g, out), mul(log(safe), mask))
        return unbroadcast(ga, a.shape), unbroadcast(gb, b.shape)
    return record("pow", a.data ** b.data, (a, b), backward)


# --- elementwise functions ------------------------------------------------------------------------

def exp(a) -> Tensor:
    a = as_tensor(a)
    return record("exp", np.exp(a.data), (a,), lambda g, out: (mul(g, out),))


def log(a) -> Tensor:
    a = as_tensor(a)
    return record("log", np.log(a.data), (a,), lambda g, out: (div(g, a),))


def sqrt(a) -> Tensor:
    a = as_tensor(a)
    return record("sqrt", np.sqrt(a.data), (a,), lambda g, out: (div(g, mul(out, 2.0)),))


def tanh(a) -> Tensor:
    a = as_tensor(a)
    return record("tanh", np.tanh(a.data), (a,),
                  lambda g, out: (mul(g, sub(1.0, mul(out, out))),))


def sigmoid(a) -> Tensor:
    a = as_tensor(a)
    data = np.exp(-np.logaddexp(0, -a.data)).astype(a.dtype, copy=False)  # no overflow
    return record("sigmoid", data, (a,), lambda g, out: (mul(mul(g, out), sub(1.0, out)),))


def relu(a) -> Tensor:
    a = as_tensor(a)
    positive = a.data > 0
    return record("relu", np.maximum(a.data, 0), (a,),
                  lambda g, out: (mul(g, _constant(positive.astype(a.dtype))),))


def leaky_relu(a, slope: float = 0.01) -> Tensor:
    a = as_tensor(a)
    factor = np.where(a.data > 0, 1, slope).astype(a.dtype)
    return record("leaky_relu", a.data * factor, (a,),
                  lambda g, out: (mul(g, _constant(factor)),))


def abs_(a) -> Tensor:
    a = as_tensor(a)
    sign = np.sign(a.data)
    return record("abs", np.abs(a.data), (a,), lambda g, out: (mul(g, _constant(sign)),))


# --- reductions -----------------------------------------------------------------------------------

def sum_(a, axis=None, keepdims: bool = False) -> Tensor:
    a = as_tensor(a)
    axes, shape = normal_axes(axis, a.ndim), a.shape
    return record("sum", np.asarray(a.data.sum(axis=axes, keepdims=keepdims)), (a,),
                  lambda g, out: (_expand_reduced(g, shape, axes, keepdims),))


def mean(a, axis=None, keepdims: bool = False) -> Tensor:
    a = as_tensor(a)
    axes, shape = normal_axes(axis, a.ndim), a.shape
    count = int(np.prod([shape[i] for i in axes], dtype=np.int64))
    return record("mean", np.asarray(a.data.mean(axis=axes, keepdims=keepdims)), (a,),
                  lambda g, out: (_expand_reduced(div(g, float(count)), shape, axes, keepdims),))


def _extreme(op: str, reduce, a, axis, keepdims: bool) -> Tensor:
    a = as_tensor(a)
    axes, shape = normal_axes(axis, a.ndim), a.shape
    kept = reduce(a.data, axis=axes, keepdims=True)
    hits = a.data == kept
    share = (hits / hits.sum(axis=axes, keepdims=True)).astype(a.dtype)  # ties split evenly
    data = kept if keepdims else np.squeeze(kept, axis=axes)
    return record(op, data, (a,), lambda g, out: (
        mul(_expand_reduced(g, shape, axes, keepdims), _constant(share)),))


def max_(a, axis=None, keepdims: bool = False) -> Tensor:
    """Maximum over axes; where several elements tie, each gets an equal share of the gradient."""
    return _extreme("max", np.max, a, axis, keepdims)


def min_(a, axis=None, keepdims: bool = False) -> Tensor:
    """Minimum over axes; ties share the gradient like :func:`max_`."""
    return _extreme("min", np.min, a, axis, keepdims)


# --- shape and indexing ---------------------------------------------------------------------------

def reshape(a, shape) -> Tensor:
    a = as_tensor(a)
    before = a.shape
    shape = (shape,) if is_int(shape) else tuple(shape)
    return record("reshape", a.data.reshape(shape), (a,), lambda g, out: (reshape(g, before),))


def transpose(a, axes=None) -> Tensor:
    """Permute axes (reverse them when ``axes`` is None), like ``numpy.transpose``."""
    a = as_tensor(a)
    axes = tuple(reversed(range(a.ndim))) if axes is None else tuple(normal_axis(int(i), a.ndim)
                                                                     for i in axes)
    if sorted(axes) != list(range(a.ndim)):
        raise ValueError(f"transpose: {axes} is not a permutation of {a.ndim} axes")
    inverse = tuple(int(i) for i in np.argsort(axes))
    return record("transpose", a.data.transpose(axes), (a,),
                  lambda g, out: (transpose(g, inverse),))


def _basic_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, slice) or is_int(p) for p in parts)


def getitem(a, index) -> Tensor:
    """``a[index]``: slices, ints, None, Ellipsis, integer and boolean arrays."""
    a = as_tensor(a)
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    shape = a.shape
    return record("getitem", np.asarray(a.data[index]), (a,),
                  lambda g, out: (scatter(g, index, shape),))


def scatter(a, index, shape) -> Tensor:
    """Zeros of ``shape`` with ``a`` added at ``index`` (repeated elements summed): the
    adjoint of ``getitem(·, index)``, and its gradient is that getitem."""
    a = as_tensor(a)
    data = np.zeros(shape, a.dtype)
    if _basic_index(index):   # a view: every element is selected at most once
        data[index] = a.data
    else:                     # integer arrays may select an element several times
        np.add.at(data, index, a.data)
    return record("scatter", data, (a,), lambda g, out: (getitem(g, index),))


def _some_tensors(op: str, tensors: Sequence) -> tuple[Tensor, ...]:
    tensors = tuple(as_tensor(t) for t in tensors)
    if not tensors:
        raise ValueError(f"{op} needs at least one tensor")
    return tensors


def concatenate(tensors: Sequence, axis: int = 0) -> Tensor:
    tensors = _some_tensors("concatenate", tensors)
    data = np.concatenate([t.data for t in tensors], axis=axis)
    axis = normal_axis(axis, data.ndim)
    ends = np.cumsum([t.shape[axis] for t in tensors])
    pieces = [(slice(None),) * axis + (slice(int(end - t.shape[axis]), int(end)),)
              for t, end in zip(tensors, ends)]
    return record("concatenate", data, tensors,
                  lambda g, out: tuple(getitem(g, piece) for piece in pieces))


def stack(tensors: Sequence, axis: int = 0) -> Tensor:
    tensors = _some_tensors("stack", tensors)
    data = np.stack([t.data for t in tensors], axis=axis)
    axis = normal_axis(axis, data.ndim)
    return record("stack", data, tensors, lambda g, out: tuple(
        getitem(g, (slice(None),) * axis + (i,)) for i in range(len(tensors))))


# --- linear algebra -------------------------------------------------------------------------------

def matmul(a, b) -> Tensor:
    """``a @ b`` with NumPy's rules: 1-D operands, batched and broadcast stacks of matrices."""
    a, b = _pair(a, b)

    def backward(g, out):
        # Make both operands matrices again: a (k,) is a (1, k) row, b (k,) a (k, 1) column.
        a2 = reshape(a, (1, -1)) if a.ndim == 1 else a
        b2 = reshape(b, (-1, 1)) if b.ndim == 1 else b
        g2 = reshape(g, g.shape + (1,)) if b.ndim == 1 else g
        g2 = reshape(g2, g2.shape[:-1] + (1, g2.shape[-1])) if a.ndim == 1 else g2
        ga = gb = None
        if a.requires_grad:
            ga = matmul(g2, _swap_last(b2))
            ga = unbroadcast(reshape(ga, ga.shape[:-2] + ga.shape[-1:]) if a.ndim == 1 else ga,
                             a.shape)
        if b.requires_grad:
            gb = matmul(_swap_last(a2), g2)
            gb = unbroadcast(reshape(gb, gb.shape[:-1]) if b.ndim == 1 else gb, b.shape)
        return ga, gb
    return record("matmul", np.asarray(a.data @ b.data), (a, b), backward)


def _swap_last(t: Tensor) -> Tensor:
    axes = list(range(t.ndim))
    axes[-1], axes[-2] = axes[-2], axes[-1]
    return transpose(t, axes)


def linear(x, weight, bias=None) -> Tensor:
    """``x @ weight.T + bias`` with ``weight`` (out, in), like ``torch.nn.functional.linear``."""
    x, weight = _pair(x, weight)
    wshape = weight.shape
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != wshape[1]:
        raise ValueError(f"linear: input of shape {x.shape} does not fit a weight of shape "
                         f"{wshape} (expected (..., {wshape[-1] if weight.ndim else '?'}) "
                         f"and (out, in))")
    data = x.data @ weight.data.T
    inputs: tuple[Tensor, ...] = (x, weight)
    if bias is not None:
        bias = as_tensor(bias, x)
        if bias.shape != (wshape[0],):
            raise ValueError(f"linear: bias has shape {bias.shape}, expected ({wshape[0]},)")
        data = data + bias.data
        inputs += (bias,)

    def backward(g, out):
        g2 = reshape(g, (-1, wshape[0]))
        gx = matmul(g, weight) if x.requires_grad else None
        gw = matmul(transpose(g2), reshape(x, (-1, wshape[1]))) if weight.requires_grad else None
        return (gx, gw) + ((sum_(g2, 0),) if len(inputs) == 3 else ())
    return record("linear", data, inputs, backward)


# --- softmax and losses ---------------------------------------------------------------------------

def _log_softmax(values: np.ndarray, axis: int) -> np.ndarray:
    shifted = values - values.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def log_softmax(a, axis: int = -1) -> Tensor:
    a = as_tensor(a)
    return record("log_softmax", _log_softmax(a.data, axis), (a,),
                  lambda g, out: (sub(g, mul(exp(out), sum_(g, axis, keepdims=True))),))


def softmax(a, axis: int = -1) -> Tensor:
    return exp(log_softmax(a, axis))


def cross_entropy(logits, target, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of ``logits`` (N, C, *d) against class indices ``target`` (N, *d).

    Like ``torch.nn.functional.cross_entropy``: ``reduction`` is "mean",
    "sum" or "none".
    """
    logits = as_tensor(logits)
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
    data = {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]

    def backward(g, out):
        # d loss / d logits = softmax(logits) - one_hot(target), weighted per loss
        one_hot = np.zeros(logits.shape, logits.dtype)
        np.put_along_axis(one_hot, picked, 1, axis=1)
        weight = g if reduction == "none" else broadcast_to(
            div(g, float(losses.size)) if reduction == "mean" else g, losses.shape)
        weight = reshape(weight, (weight.shape[0], 1) + weight.shape[1:])
        return (mul(sub(softmax(logits, 1), _constant(one_hot)), weight),)
    return record("cross_entropy", np.asarray(data, logits.dtype), (logits,), backward)


def mse_loss(a, b) -> Tensor:
    """Mean squared difference."""
    return mean(pow_(sub(a, b), 2))


# --- max pooling (NumPy: a maximum is not an index sum) -------------------------------------------

def max_pool(x, kernel_size, stride=None, padding=0) -> Tensor:
    """N-D max pooling over (N, C, *spatial) like ``torch.nn.functional.max_pool{n}d``.

    Padding is -inf; ``stride`` defaults to the window.  The gradient goes to
    the first maximum of each window.  A maximum is not an index sum, so
    this op is NumPy (a strided window view and an argmax), not compiled.
    """
    x = as_tensor(x)
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
    data = np.take_along_axis(flat, best[..., None], axis=-1)[..., 0]
    padded_shape, shape = padded.shape, x.shape

    def backward(g, out):
        # Flat index, in the padded input, of each window's maximum: channel-plane offset
        # plus, per spatial dim, (output position * stride + offset in the window).
        offsets = np.unravel_index(best, window)
        where = np.arange(shape[0] * shape[1]).reshape(shape[0], shape[1], *(1,) * rank)
        for dim in range(rank):
            grid = np.arange(out_spatial[dim]).reshape((-1,) + (1,) * (rank - 1 - dim))
            where = where * padded_shape[2 + dim] + (grid * step[dim] + offsets[dim])
        spread = scatter(reshape(g, -1), where.ravel(), (int(np.prod(padded_shape)),))
        inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, shape[2:]))
        return (getitem(reshape(spread, padded_shape), (slice(None), slice(None), *inner)),)
    return record("max_pool", np.ascontiguousarray(data), (x,), backward)


# --- Tensor's operators and methods: the ops above --------------------------------------------------

def _install_methods() -> None:
    """Give Tensor its operators and methods, each the op of the same meaning."""
    def reshape_method(self, *shape):
        return reshape(self, shape[0] if len(shape) == 1 and not is_int(shape[0]) else shape)

    def transpose_method(self, *axes):
        return transpose(self, axes[0] if len(axes) == 1 and not is_int(axes[0])
                         else (axes or None))

    def flatten(self, start: int = 0) -> Tensor:
        """Merge the axes from ``start`` on into one."""
        start = normal_axis(start, self.ndim)
        return reshape(self, self.shape[:start] + (-1,))

    methods = {
        "__add__": add, "__radd__": lambda s, o: add(o, s),
        "__sub__": sub, "__rsub__": lambda s, o: sub(o, s),
        "__mul__": mul, "__rmul__": lambda s, o: mul(o, s),
        "__truediv__": div, "__rtruediv__": lambda s, o: div(o, s),
        "__pow__": pow_, "__rpow__": lambda s, o: pow_(o, s),
        "__matmul__": matmul, "__rmatmul__": lambda s, o: matmul(o, s),
        "__neg__": neg, "__getitem__": getitem,
        "exp": exp, "log": log, "sqrt": sqrt, "tanh": tanh, "sigmoid": sigmoid, "relu": relu,
        "leaky_relu": leaky_relu, "abs": abs_, "sum": sum_, "mean": mean, "max": max_,
        "min": min_, "log_softmax": log_softmax, "softmax": softmax,
        "reshape": reshape_method, "transpose": transpose_method, "permute": transpose_method,
        "flatten": flatten, "T": property(lambda self: transpose(self)),
    }
    for name, method in methods.items():
        setattr(Tensor, name, method)


_install_methods()
