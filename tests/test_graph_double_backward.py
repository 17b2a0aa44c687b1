"""Every NumPy graph op differentiates its own backward rule: create_graph against PyTorch.

For an op ``f`` and random ``r``, the first gradient is ``g = d/dx Σ r·tanh(f(x))`` with
``create_graph=True`` (the tanh makes ``g`` depend on ``x`` through the op's rule), and the
second is ``d/dx Σ g²``; both are compared with torch.autograd in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

import symconv as sc
from symconv import graph as G

torch = pytest.importorskip("torch")
F = torch.nn.functional

TARGET = np.array([[2, 0, 1], [1, 1, 0]])        # class indices for (2, 3, 3) logits

OPS = [
    pytest.param(lambda a, b: a ** b, lambda a, b: a ** b, [(2, 3), (2, 3)], id="pow-tensor"),
    pytest.param(lambda a: a ** 3, lambda a: a ** 3, [(2, 3)], id="pow-number"),
    pytest.param(lambda a: a[1:, ::2], lambda a: a[1:, ::2], [(3, 4)], id="getitem-slices"),
    pytest.param(lambda a: a[[0, 2, 0]], lambda a: a[[0, 2, 0]], [(3, 4)],
                 id="getitem-repeated-indices"),
    pytest.param(lambda a: a[a.data > 1.0], lambda a: a[a > 1.0], [(3, 4)], id="getitem-mask"),
    pytest.param(lambda a, b: G.concatenate([a, b, a], axis=1),
                 lambda a, b: torch.cat([a, b, a], dim=1), [(2, 3), (2, 2)], id="concatenate"),
    pytest.param(lambda a, b: G.stack([a, b], axis=1), lambda a, b: torch.stack([a, b], dim=1),
                 [(2, 3), (2, 3)], id="stack"),
    pytest.param(lambda a: G.cross_entropy(a, TARGET),
                 lambda a: F.cross_entropy(a, torch.tensor(TARGET)), [(2, 3, 3)],
                 id="cross_entropy-mean"),
    pytest.param(lambda a: G.cross_entropy(a, TARGET, reduction="none"),
                 lambda a: F.cross_entropy(a, torch.tensor(TARGET), reduction="none"),
                 [(2, 3, 3)], id="cross_entropy-none"),
    pytest.param(lambda a: G.max_pool(a, 2, stride=1, padding=1),
                 lambda a: F.max_pool2d(a, 2, stride=1, padding=1), [(2, 2, 4, 5)],
                 id="max_pool-overlapping-padded"),
    pytest.param(lambda a: G.max_pool(a, (2, 2, 3)), lambda a: F.max_pool3d(a, (2, 2, 3)),
                 [(1, 2, 4, 4, 6)], id="max_pool-3d"),
    pytest.param(lambda a, b: a @ b, lambda a, b: a @ b, [(3,), (3, 2)], id="matmul-vector"),
    pytest.param(lambda a, b: G.linear(a, b), lambda a, b: F.linear(a, b), [(4, 3), (2, 3)],
                 id="linear"),
    pytest.param(lambda a: G.log_softmax(a, 0), lambda a: torch.log_softmax(a, 0), [(3, 2)],
                 id="log_softmax"),
    pytest.param(lambda a, b: (a / b).sqrt().log(), lambda a, b: (a / b).sqrt().log(),
                 [(2, 3), (3,)], id="div-sqrt-log-broadcast"),
    pytest.param(lambda a: a.max(axis=1) - a.min(), lambda a: a.amax(1) - a.amin(), [(3, 4)],
                 id="max-min"),
]


def _second_order(fn, arrays, r, tensor, grad, tanh):
    """Leaf gradients of Σ g² where g = d/dx Σ r·tanh(fn(x)), in either framework."""
    leaves = [tensor(a) for a in arrays]
    out = fn(*leaves)
    first = grad((tanh(out) * r).sum(), leaves)
    return leaves, first, sum((g ** 2).sum() for g in first)


@pytest.mark.parametrize("fn, torch_fn, shapes", OPS)
def test_create_graph_matches_torch(fn, torch_fn, shapes):
    rng = np.random.default_rng(7)
    arrays = [rng.uniform(0.5, 2.0, s) for s in shapes]       # positive: pow, log, sqrt
    ours_out = fn(*(sc.Tensor(a) for a in arrays))
    r = rng.standard_normal(ours_out.shape)

    leaves, first, second = _second_order(
        fn, arrays, sc.Tensor(r), lambda a: sc.Tensor(a, requires_grad=True),
        lambda out, xs: sc.grad(out, xs, create_graph=True), lambda t: t.tanh())
    second.backward()
    t_leaves, t_first, t_second = _second_order(
        torch_fn, arrays, torch.tensor(r), lambda a: torch.tensor(a, requires_grad=True),
        lambda out, xs: torch.autograd.grad(out, xs, create_graph=True), torch.tanh)
    t_second.backward()

    np.testing.assert_allclose(second.item(), t_second.item(), rtol=1e-10)
    for ours, theirs in zip(first, t_first):
        np.testing.assert_allclose(ours.data, theirs.detach().numpy(), rtol=1e-10, atol=1e-14)
    for ours, theirs in zip(leaves, t_leaves):
        np.testing.assert_allclose(ours.grad.data, theirs.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_a_rule_that_returns_arrays_cannot_be_differentiated_again():
    x = sc.Tensor(np.ones(3), requires_grad=True)
    y = G.record("opaque", x.data * 2, (x,), lambda g, out: (g.data * 2,))
    y.sum().backward()                                   # fine without create_graph
    np.testing.assert_array_equal(x.grad, [2.0, 2.0, 2.0])
    with pytest.raises(RuntimeError, match="'opaque' backward returned an array"):
        sc.grad(G.record("opaque", x.data * 2, (x,), lambda g, out: (g.data * 2,)).sum(), [x],
                create_graph=True)
