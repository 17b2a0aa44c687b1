"""Whole networks against PyTorch, optimisers against torch.optim, modules, save and load.

A small network (conv -> relu -> pool -> linear -> cross-entropy) is built in
symconv, copied weight for weight into PyTorch, and must give the same loss and
the same gradient for every parameter (and the input) to float32 tolerance, for
1-, 2- and 3-D convolutions with max and average pooling.
"""

from __future__ import annotations

import numpy as np
import pytest

import symconv as sc
from symconv import nn, optim
from symconv.graph import Tensor

NETWORKS = {
    # rank: input shape, conv keyword arguments (PyTorch accepts them as they are)
    1: ((4, 2, 16), dict(stride=2, dilation=2, padding=2)),
    2: ((3, 2, 8, 7), dict(padding=1, groups=2)),
    3: ((2, 2, 6, 5, 4), dict(padding=1)),
}
CLASSES = 5


def assert_close(got, expected, what, tolerance=2e-5):
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.abs(expected).max()), 1e-3)
    error = float(np.abs(np.asarray(got, np.float64) - expected).max()) / scale
    assert error <= tolerance, f"{what}: relative error {error:.3g}"


class Net(nn.Module):
    def __init__(self, rank: int, pool: str, seed: int = 0):
        shape, kwargs = NETWORKS[rank]
        rng = np.random.default_rng(seed)
        self.rank, self.pool, self.kwargs = rank, pool, kwargs
        self.conv = nn.Conv(2, 4, (3,) * rank, rng=rng, **kwargs)
        with sc.no_grad():
            features = self.features(Tensor(np.zeros(shape, np.float32))).shape[1]
        self.linear = nn.Linear(features, CLASSES, rng=rng)

    def features(self, x):
        h = self.conv(x).relu()
        h = sc.max_pool(h, 2) if self.pool == "max" else sc.avg_pool(h, 2)
        return h.flatten(1)

    def forward(self, x):
        return self.linear(self.features(x))


def torch_net(net: Net):
    """The same network in PyTorch, sharing nothing but copied weights."""
    import torch
    functional = torch.nn.functional
    params = {name: torch.tensor(p.data.copy(), requires_grad=True)
              for name, p in net.named_parameters()}
    conv = getattr(functional, f"conv{net.rank}d")
    pool = getattr(functional, f"{net.pool}_pool{net.rank}d")

    def forward(x):
        h = functional.relu(conv(x, params["conv.weight"], params["conv.bias"], **net.kwargs))
        h = torch.flatten(pool(h, 2), 1)
        return functional.linear(h, params["linear.weight"], params["linear.bias"])
    return forward, params


def batch(rank, seed=1):
    shape, _ = NETWORKS[rank]
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape).astype(np.float32),
            rng.integers(0, CLASSES, size=shape[0]))


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_network_loss_and_gradients_match_torch(rank, pool, cache_dir):
    torch = pytest.importorskip("torch")
    net = Net(rank, pool)
    x, y = batch(rank)
    forward, params = torch_net(net)

    tx = Tensor(x.copy(), requires_grad=True)
    loss = sc.cross_entropy(net(tx), y)
    loss.backward()
    t_x = torch.tensor(x, requires_grad=True)
    t_loss = torch.nn.functional.cross_entropy(forward(t_x), torch.tensor(y))
    t_loss.backward()

    assert loss.dtype == np.float32
    assert_close(loss.data, t_loss.item(), "loss", 1e-5)
    assert_close(tx.grad, t_x.grad.numpy(), "input gradient")
    names = [name for name, _ in net.named_parameters()]
    assert names == ["conv.weight", "conv.bias", "linear.weight", "linear.bias"]
    for name, p in net.named_parameters():
        assert p.grad.dtype == np.float32
        assert_close(p.grad, params[name].grad.numpy(), f"{name} gradient")


def test_training_steps_match_torch(cache_dir):
    """Five Adam steps, then five SGD-with-momentum steps: the parameters follow PyTorch's."""
    torch = pytest.importorskip("torch")
    net = Net(2, "max")
    forward, params = torch_net(net)
    ours = [optim.Adam(net.parameters(), lr=1e-2), None]
    theirs = [torch.optim.Adam(params.values(), lr=1e-2), None]
    for step in range(10):
        if step == 5:
            ours[1] = optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
            theirs[1] = torch.optim.SGD(params.values(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        opt, t_opt = (ours[0], theirs[0]) if step < 5 else (ours[1], theirs[1])
        x, y = batch(2, seed=10 + step)
        opt.zero_grad()
        loss = sc.cross_entropy(net(Tensor(x)), y)
        loss.backward()
        opt.step()
        t_opt.zero_grad()
        t_loss = torch.nn.functional.cross_entropy(forward(torch.tensor(x)), torch.tensor(y))
        t_loss.backward()
        t_opt.step()
        assert_close(loss.data, t_loss.item(), f"loss at step {step}", 1e-4)
    for name, p in net.named_parameters():
        assert_close(p.data, params[name].detach().numpy(), f"{name} after 10 steps", 1e-4)


@pytest.mark.parametrize("make", [
    pytest.param(lambda ps: (optim.SGD(ps, lr=0.1),
                             lambda tp: __import__("torch").optim.SGD(tp, lr=0.1)), id="sgd"),
    pytest.param(lambda ps: (optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01),
                             lambda tp: __import__("torch").optim.SGD(
                                 tp, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01)),
                 id="sgd-momentum"),
    pytest.param(lambda ps: (optim.SGD(ps, lr=0.1, momentum=0.8, nesterov=True),
                             lambda tp: __import__("torch").optim.SGD(tp, lr=0.1, momentum=0.8,
                                                                      nesterov=True)),
                 id="sgd-nesterov"),
    pytest.param(lambda ps: (optim.Adam(ps, lr=0.05),
                             lambda tp: __import__("torch").optim.Adam(tp, lr=0.05)), id="adam"),
    pytest.param(lambda ps: (optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6,
                                        weight_decay=0.1),
                             lambda tp: __import__("torch").optim.Adam(
                                 tp, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
                 id="adam-options"),
])
def test_optimisers_follow_torch_optim(make):
    """Float64, a non-quadratic loss, a parameter that misses a step (grad None)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    start = [rng.standard_normal((3, 2)), rng.standard_normal(4)]
    ps = [Tensor(a.copy(), requires_grad=True) for a in start]
    tps = [torch.tensor(a.copy(), requires_grad=True) for a in start]
    opt, make_torch = make(ps)
    t_opt = make_torch(tps)
    for step in range(12):
        opt.zero_grad()
        t_opt.zero_grad()
        (ps[0].tanh() ** 2).sum().backward()
        (torch.tanh(tps[0]) ** 2).sum().backward()
        if step % 3:                     # the second parameter gets a gradient 2 steps in 3
            (((ps[1] - 1) ** 4).sum() * 0.05).backward()
            (((tps[1] - 1) ** 4).sum() * 0.05).backward()
        opt.step()
        t_opt.step()
    for p, tp, a in zip(ps, tps, start):
        assert np.isfinite(p.data).all() and np.abs(p.data - a).max() > 1e-2   # it moved
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_optimiser_rejects_bad_parameters():
    with pytest.raises(ValueError, match="no parameters"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="requires_grad"):
        optim.Adam([Tensor(np.ones(2))])
    with pytest.raises(ValueError, match="lr"):
        optim.SGD([Tensor(np.ones(2), requires_grad=True)], lr=0)


def test_module_parameters_names_and_zero_grad():
    shared = nn.Linear(3, 3, rng=0)
    model = nn.Sequential(nn.Conv(1, 2, (3, 3), rng=1), nn.ReLU(), nn.Flatten(), shared, shared,
                          nn.Linear(3, 2, bias=False, rng=2))
    names = [name for name, _ in model.named_parameters()]
    assert names == ["layers.0.weight", "layers.0.bias", "layers.3.weight", "layers.3.bias",
                     "layers.5.weight"]                          # the shared layer once
    for p in model.parameters():
        p.grad = np.ones_like(p.data)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert nn.Conv(2, 4, 3, rank=4, groups=2, rng=0).weight.shape == (4, 1, 3, 3, 3, 3)
    bound = 1 / np.sqrt(2 * 9)                                   # PyTorch's default init range
    conv = nn.Conv(2, 8, (3, 3), rng=0)
    assert np.abs(conv.weight.data).max() <= bound and np.abs(conv.bias.data).max() <= bound
    with pytest.raises(ValueError, match="does not have rank 3"):
        nn.Conv(1, 2, (3, 3), rank=3)


def test_save_and_load_round_trip(tmp_path, cache_dir):
    model = Net(2, "max", seed=0)
    other = Net(2, "max", seed=1)
    x, _ = batch(2)
    path = tmp_path / "params.npz"
    model.save(path)
    with np.load(path) as saved:
        assert sorted(saved.files) == ["conv.bias", "conv.weight", "linear.bias", "linear.weight"]
    weight = other.conv.weight
    other.load(path)
    assert other.conv.weight is weight                           # updated in place
    np.testing.assert_array_equal(other(Tensor(x)).data, model(Tensor(x)).data)
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"conv.weight": model.conv.weight.data})
    state = model.state_dict()
    state["linear.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="linear.weight"):
        other.load_state_dict(state)


def test_an_int_kernel_size_without_rank_is_2d_like_torch(cache_dir):
    torch = pytest.importorskip("torch")
    layer, reference = nn.Conv(1, 4, 3, padding=1), torch.nn.Conv2d(1, 4, 3, padding=1)
    assert layer.weight.shape == tuple(reference.weight.shape)
    x = np.random.default_rng(0).standard_normal((2, 1, 5, 6)).astype(np.float32)
    assert layer(Tensor(x)).shape == tuple(reference(torch.from_numpy(x)).shape)
