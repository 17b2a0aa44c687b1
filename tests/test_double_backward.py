"""Gradients of gradients: derived sums differentiated again, compiled, and run by the graph.

References: torch.autograd.grad(create_graph=True) and float64 central differences of the
first gradient.
"""

from __future__ import annotations

import numpy as np
import pytest

import symconv as sc

CONVS = [
    pytest.param(dict(x=(2, 3, 9), w=(4, 3, 3), stride=2, padding=1, dilation=1, groups=1),
                 id="1d-stride2"),
    pytest.param(dict(x=(1, 4, 6, 7), w=(4, 2, 3, 2), stride=(1, 2), padding=((1, 0), 1),
                      dilation=(2, 1), groups=2), id="2d-groups-dilated"),
    pytest.param(dict(x=(1, 2, 4, 5, 4), w=(3, 2, 2, 3, 2), stride=1, padding=1, dilation=1,
                      groups=1), id="3d"),
]


def penalty_graph(x, w, b, cfg, gy):
    """||dL/dx||² + sum(dL/dw · w) with L = <gy, tanh(conv(x))>: first derivatives through
    the conv's derived gradients, second through their own derived gradients."""
    y = sc.conv(x, w, b, stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"],
                groups=cfg["groups"])
    loss = (y.tanh() * gy).sum()
    gx, gw = sc.grad(loss, [x, w], create_graph=True)
    return (gx ** 2).sum() + (gw * w).sum()


@pytest.mark.parametrize("cfg", CONVS)
def test_double_backward_against_torch(cfg, cache_dir, rng):
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    x = rng.standard_normal(cfg["x"])
    w = rng.standard_normal(cfg["w"]) * 0.5
    b = rng.standard_normal(cfg["w"][0])
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    rank = len(cfg["x"]) - 2
    pad = cfg["padding"] if isinstance(cfg["padding"], int) else None
    pads = [p for lo_hi in reversed([(p, p) if isinstance(p, int) else p for p in
                                     (cfg["padding"] if pad is None else (pad,) * rank)])
            for p in lo_hi]
    conv = getattr(functional, f"conv{rank}d")
    ty = conv(functional.pad(tx, pads), tw, tb, stride=cfg["stride"], dilation=cfg["dilation"],
              groups=cfg["groups"])
    gy = rng.standard_normal(tuple(ty.shape))
    loss = (ty.tanh() * torch.tensor(gy)).sum()
    gx, gw = torch.autograd.grad(loss, [tx, tw], create_graph=True)
    ((gx ** 2).sum() + (gw * tw).sum()).backward()

    sx, sw, sb = (sc.Tensor(a, requires_grad=True) for a in (x, w, b))
    value = penalty_graph(sx, sw, sb, cfg, sc.Tensor(gy))
    value.backward()
    np.testing.assert_allclose(value.item(), ((gx ** 2).sum() + (gw * tw).sum()).item(),
                               rtol=1e-10)
    for ours, theirs in ((sx, tx), (sw, tw), (sb, tb)):
        np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-8, atol=1e-10)


def test_second_derivative_by_finite_differences(cache_dir, rng):
    """d/dw <v, dL/dx(w)> against central differences of the first gradient (float64)."""
    cfg = dict(stride=2, padding=1, dilation=1, groups=1)
    x = rng.standard_normal((1, 2, 7))
    w = rng.standard_normal((3, 2, 3))
    gy = sc.Tensor(rng.standard_normal((1, 3, 4)))
    v = rng.standard_normal(x.shape)

    def first(w_values):
        sx, sw = sc.Tensor(x, requires_grad=True), sc.Tensor(w_values, requires_grad=True)
        y = sc.conv(sx, sw, None, **cfg)
        (gx,) = sc.grad(((y ** 2) * gy).sum(), [sx], create_graph=True)
        return sx, sw, gx

    sx, sw, gx = first(w)
    (gx * sc.Tensor(v)).sum().backward()
    eps = 1e-6
    for at in [(0, 0, 0), (1, 1, 2), (2, 0, 1)]:
        bump = np.zeros_like(w)
        bump[at] = eps
        up = np.vdot(first(w + bump)[2].data, v)
        down = np.vdot(first(w - bump)[2].data, v)
        assert abs((up - down) / (2 * eps) - sw.grad[at]) < 1e-6


def test_transposed_convolution_and_user_ops_differentiate_twice(cache_dir, rng):
    """Third-order closure: the gradient of a transposed convolution's gradient, and of a
    user op with a nonlinear body, against central differences."""
    square = sc.op("Y[i] = sum(W[k] * X[i + k], (k, 0, 2))**2", {"X": (7,), "W": (3,)},
                   dtype="float64")
    x0, w0 = rng.standard_normal(7), rng.standard_normal(3)

    def gradient_norm(x_values, w_values):
        x, w = sc.Tensor(x_values, requires_grad=True), sc.Tensor(w_values, requires_grad=True)
        (gx,) = sc.grad(square(x, w).sum(), [x], create_graph=True)
        return x, w, (gx ** 2).sum()

    x, w, value = gradient_norm(x0, w0)
    value.backward()
    eps = 1e-6
    for k in range(3):
        bump = np.zeros(3)
        bump[k] = eps
        numeric = (gradient_norm(x0, w0 + bump)[2].item() -
                   gradient_norm(x0, w0 - bump)[2].item()) / (2 * eps)
        assert abs(numeric - w.grad[k]) < 1e-5 * max(1, abs(numeric))

    xt = sc.Tensor(rng.standard_normal((1, 2, 4)), requires_grad=True)
    wt = sc.Tensor(rng.standard_normal((2, 3, 3)), requires_grad=True)
    y = sc.conv_transpose(xt, wt, stride=2, padding=1, output_padding=1)
    (gw,) = sc.grad((y ** 2).sum(), [wt], create_graph=True)
    (gw ** 2).sum().backward()
    assert xt.grad.shape == xt.shape and np.isfinite(xt.grad).all()


def test_backward_create_graph_fills_grad_with_tensors(cache_dir, rng):
    w = sc.Tensor(rng.standard_normal((2, 1, 3)), requires_grad=True)
    x = sc.Tensor(rng.standard_normal((1, 1, 5)))
    (sc.conv(x, w) ** 2).sum().backward(create_graph=True)
    assert isinstance(w.grad, sc.Tensor) and w.grad.requires_grad
    first = w.grad.data.copy()
    w.grad = None
    (sc.conv(x, w) ** 2).sum().backward()
    np.testing.assert_allclose(first, w.grad)


def test_gradient_penalty_script_matches_torch(cache_dir):
    """scripts/gradient_penalty.py: one WGAN-GP step against PyTorch, then a few steps."""
    pytest.importorskip("torch")
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "gradient_penalty.py"
    result = subprocess.run([sys.executable, str(script), "--check-torch", "--steps", "5"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if "against PyTorch" in l)
    assert float(line.rsplit(" ", 1)[1]) < 1e-10
