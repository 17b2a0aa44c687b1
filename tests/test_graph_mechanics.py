"""Graph mechanics: accumulation, no_grad, detach, deep chains, retain_graph, freeing, errors."""

from __future__ import annotations

import gc
import sys
import threading
import weakref

import numpy as np
import pytest

import symconv
from symconv import graph as G
from symconv.graph import Tensor, no_grad


def leaf(*values):
    return Tensor(np.array(values, dtype=np.float64), requires_grad=True)


def test_a_tensor_used_twice_gets_both_contributions():
    x = leaf(1.0, 2.0, 3.0)
    y = x * x + x.exp() * 2 - x          # three uses of x
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 2 * np.exp(x.data) - 1)


def test_diamond_and_shared_intermediate():
    x = leaf(0.5, -1.5)
    h = x.tanh()                         # an intermediate feeding two branches
    z = (h * 3 + h ** 2).sum()
    z.backward()
    t = np.tanh(x.data)
    np.testing.assert_allclose(x.grad, (3 + 2 * t) * (1 - t ** 2))


def test_leaf_gradients_accumulate_across_backward_calls():
    x = leaf(1.0, 2.0)
    (x * 3).sum().backward()
    first = x.grad
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, 3 + 2 * x.data)
    assert x.grad is first               # accumulated in place, like PyTorch
    x.grad = None
    (x * 5).sum().backward()
    np.testing.assert_allclose(x.grad, [5, 5])


def test_backward_on_a_leaf_and_explicit_gradient():
    x = leaf(1.0, 2.0)
    x.backward(np.array([0.5, 4.0]))
    np.testing.assert_allclose(x.grad, [0.5, 4.0])
    y = x * 2
    y.backward(Tensor(np.array([1.0, -1.0])))
    np.testing.assert_allclose(x.grad, [2.5, 2.0])


def test_no_grad_records_nothing_and_restores():
    x = leaf(1.0, 2.0)
    with no_grad():
        assert not symconv.is_grad_enabled()
        y = x * 2
        with no_grad():
            pass
        assert not symconv.is_grad_enabled()   # nested exit keeps the outer state
    assert symconv.is_grad_enabled()
    assert not y.requires_grad and y.node is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()

    @no_grad()
    def f(t):
        return t * t
    assert not f(x).requires_grad and symconv.is_grad_enabled()
    with pytest.raises(KeyError), no_grad():
        raise KeyError("inside")
    assert symconv.is_grad_enabled()          # restored after an exception


def test_no_grad_is_per_thread():
    seen = []
    with no_grad():
        worker = threading.Thread(target=lambda: seen.append(symconv.is_grad_enabled()))
        worker.start()
        worker.join()
    assert seen == [True]


def test_detach_stops_the_gradient_and_shares_data():
    x = leaf(1.0, 2.0)
    d = (x * 2).detach()
    assert not d.requires_grad and d.is_leaf
    y = (x * d).sum()                    # d is a constant 2x
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * x.data)
    assert x.detach().data is x.data


def test_ten_thousand_node_chain_without_recursion():
    x = leaf(0.3)
    y = x
    for _ in range(10_000):
        y = y * 1.0001 + 0.0
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)           # the pass must not recurse at all
    try:
        y.sum().backward()
    finally:
        sys.setrecursionlimit(limit)
    np.testing.assert_allclose(x.grad, [1.0001 ** 10_000], rtol=1e-9)
    del y                                # and the chain is released without a crash


def test_topological_order_is_deterministic():
    def build():
        x = leaf(1.0, 2.0)
        a, b = x.exp(), x.tanh()
        c = a * b + a.sigmoid()
        d = G.concatenate([c, b, a])
        return x, d.sum()

    orders = [[t.node.op for t in G._topological_order([build()[1]])] for _ in range(3)]
    assert orders[0] == orders[1] == orders[2]
    assert orders[0][0] == "sum" and set(orders[0]) >= {"exp", "tanh", "mul", "add", "sigmoid"}
    grads = []
    for _ in range(2):
        x, loss = build()
        loss.backward()
        grads.append(x.grad)
    np.testing.assert_array_equal(grads[0], grads[1])


def test_order_puts_every_tensor_after_its_consumers():
    x = leaf(1.0)
    layer = [x * float(i) for i in range(1, 5)]
    for _ in range(6):                   # a dense, irregular DAG
        layer = [layer[i] * layer[(i + 1) % 4] + layer[(i + 3) % 4] for i in range(4)]
    order = G._topological_order([sum(layer[1:], layer[0])])
    position = {id(t): i for i, t in enumerate(order)}
    for t in order:
        for parent in t.node.inputs:
            if parent.node is not None:
                assert position[id(parent)] > position[id(t)]


def test_second_backward_needs_retain_graph():
    x = leaf(1.0, 2.0)
    y = (x.exp() * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * np.exp(x.data) * (1 + x.data))
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.backward()


def test_backward_frees_saved_arrays_unless_retained():
    def build():
        x = leaf(1.0, 2.0, 3.0)
        h = x.exp()                      # its output is saved by exp's backward
        saved = weakref.ref(h.data)
        y = (h * 2).sum()
        del h
        return y, saved

    y, saved = build()
    y.backward(retain_graph=True)
    assert saved() is not None
    y.backward()
    assert saved() is None               # freed by reference counting, no gc pass needed
    y, saved = build()
    y.backward()
    assert saved() is None and y.node.backward is None and y.node.inputs == ()
    gc.collect()


def test_retain_grad_keeps_an_intermediate_gradient():
    x = leaf(1.0, 2.0)
    h = (x * 3).retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(h.grad, 2 * h.data)
    np.testing.assert_allclose(x.grad, 6 * h.data)


def test_errors():
    x = leaf(1.0, 2.0)
    with pytest.raises(RuntimeError, match="scalar"):
        (x * 2).backward()                               # non-scalar without a gradient
    with pytest.raises(ValueError, match=r"gradient has shape \(3,\)"):
        (x * 2).backward(np.ones(3))                     # gradient of the wrong shape
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(np.ones(2)).sum().backward()
    with pytest.raises(ValueError):
        x + Tensor(np.ones(3))                           # shapes that do not broadcast
    with pytest.raises(ValueError):
        x @ Tensor(np.ones((3, 2)))
    with pytest.raises(TypeError, match="floating-point"):
        Tensor(np.arange(3), requires_grad=True)
    with pytest.raises(ValueError, match="axis"):
        x.sum(axis=2)
    with pytest.raises(ValueError, match="linear"):
        G.linear(Tensor(np.ones((2, 3))), Tensor(np.ones((4, 5))))
    logits = Tensor(np.zeros((2, 3)), requires_grad=True)
    with pytest.raises(ValueError, match="target"):
        G.cross_entropy(logits, np.array([0, 3]))        # class out of range
    with pytest.raises(ValueError, match="target has shape"):
        G.cross_entropy(logits, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        G.cross_entropy(logits, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="window"):
        G.max_pool(Tensor(np.ones((1, 1, 2, 2))), 3)


def test_conv_errors_name_the_problem(cache_dir):
    x = Tensor(np.ones((1, 2, 5, 5), np.float32))
    with pytest.raises(ValueError, match="weight_shape"):
        G.conv(x, Tensor(np.ones((3, 4, 3, 3), np.float32)))   # channel mismatch
    with pytest.raises(ValueError, match="same number of dims"):
        G.conv(x, Tensor(np.ones((3, 2, 3), np.float32)))
    with pytest.raises(TypeError, match="float32 or float64"):
        G.conv(Tensor(np.ones((1, 2, 5, 5), np.int32)), Tensor(np.ones((3, 2, 3, 3), np.int32)))
    with pytest.raises(ValueError, match="bias"):
        G.conv(x, Tensor(np.ones((3, 2, 3, 3), np.float32)), Tensor(np.ones(4, np.float32)))


def test_conv_accepts_non_contiguous_and_mixed_inputs(cache_dir):
    """The graph hands the kernels C-contiguous arrays of one dtype whatever it is given."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((1, 5, 2, 6)).astype(np.float32)
    x = Tensor(base.transpose(0, 2, 1, 3))               # (1, 2, 5, 6), not contiguous
    w = Tensor(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), requires_grad=True)
    y = G.conv(x, w, padding=1)
    y_ref = G.conv(Tensor(np.ascontiguousarray(x.data)), Tensor(w.data), padding=1)
    np.testing.assert_array_equal(y.data, y_ref.data)
    y.backward(np.ones(y.shape, np.float64)[..., ::-1])  # a float64, negatively strided gradient
    assert w.grad.dtype == np.float32 and w.grad.shape == w.shape


def test_scalar_conversions():
    assert float(leaf(2.5).sum()) == 2.5 and leaf(1.5).sum().item() == 1.5
    assert not Tensor(np.array(0.0)) and Tensor(np.array(3.0))
    with pytest.raises(ValueError):
        bool(leaf(1.0, 2.0))             # ambiguous, like NumPy


def test_arrays_on_the_left_and_numbers_keep_the_tensor():
    x = leaf(1.0, 2.0)
    y = np.array([2.0, 3.0]) * x + 1
    assert isinstance(y, Tensor)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [2.0, 3.0])


def test_kernel_outputs_reuse_released_buffers(cache_dir):
    """A training loop writes each step's conv output and gradients into the arrays the
    previous step released, not into freshly mapped pages; results stay exact."""
    rng = np.random.default_rng(7)
    x = G.Tensor(rng.standard_normal((2, 3, 8, 8)).astype("float32"))
    w = G.Tensor(rng.standard_normal((4, 3, 3, 3)).astype("float32"), requires_grad=True)
    seen, grads = set(), []
    for _ in range(4):
        y = G.conv(x, w, padding=1)
        seen.add(id(y.data))
        (y * y).sum().backward()
        grads.append(w.grad.copy())
        w.grad = None
        del y
    assert len(seen) <= 2                         # recycled, not four fresh arrays
    for g in grads[1:]:
        np.testing.assert_array_equal(g, grads[0])
    kept = G.conv(x, w, padding=1)
    other = G.conv(x, w, padding=1)
    assert kept.data is not other.data            # a referenced output is never reused
