"""Nonlinear bodies: every function a body may apply is refused or derived, printed and run.

The symbolic checks need no C.  The compiled ops are checked against torch autograd in
float64: values, first gradients, and (through the graph) second gradients.
"""

from __future__ import annotations

import numpy as np
import pytest

import symconv as sc
from symconv import ExprSpec, compilation
from symconv.errors import IRError
from symconv.symbolic.ir import BODY_FUNCTIONS

# Each group is one op: Y[i] = Σ_k W[k] · (f1(X[i+k], W[k]) + f2(...) + ...).  Inputs lie in
# (0.2, 0.8), where every function is defined and no step sits on a tie.
GROUPS = {
    "smooth": ["exp({x})", "log({x})", "sin({x})", "cos({x})", "tan({x})", "asin({x})",
               "acos({x})", "atan({x})", "sinh({x})", "cosh({x})", "tanh({x})", "asinh({x})",
               "acosh({x} + 2)", "atanh({x})", "erf({x})", "erfc({x})", "{x}**{w}",
               "sqrt({x})", "atan2({x}, {w})"],
    "steps": ["Abs({x} - 0.5)", "sign({x} - 0.5)*{x}", "Heaviside({x} - 0.5)*{x}",
              "Max({x}, {w})", "Min({x}, 0.5)", "floor(3*{x})*{x}", "ceiling(3*{x})"],
}


def _torch_term(torch, text, x, w):
    names = {"exp": torch.exp, "log": torch.log, "sin": torch.sin, "cos": torch.cos,
             "tan": torch.tan, "asin": torch.asin, "acos": torch.acos, "atan": torch.atan,
             "sinh": torch.sinh, "cosh": torch.cosh, "tanh": torch.tanh, "asinh": torch.asinh,
             "acosh": torch.acosh, "atanh": torch.atanh, "erf": torch.erf, "erfc": torch.erfc,
             "sqrt": torch.sqrt, "atan2": torch.atan2, "Abs": torch.abs, "sign": torch.sign,
             "Heaviside": lambda v: (v > 0).to(v.dtype),     # no ties here; torch has no grad
             "Max": torch.maximum,
             "Min": lambda a, b: torch.minimum(a, torch.full_like(a, b)),
             "floor": torch.floor, "ceiling": torch.ceil}
    return eval(text.format(x="x", w="w"), {**names, "x": x, "w": w})


def _group_text(terms):
    body = " + ".join(t.format(x="X[i + k]", w="W[k]") for t in terms)
    return f"Y[i] = sum(W[k] * ({body}), (k, 0, 2))"


def test_the_groups_cover_every_body_function():
    used = {name.split("(")[0].split("*")[-1] for group in GROUPS.values() for name in group}
    assert {f.__name__ for f in BODY_FUNCTIONS} <= used | {"Pow"}


@pytest.mark.parametrize("group", GROUPS)
def test_every_body_function_against_torch(group, cache_dir, rng):
    torch = pytest.importorskip("torch")
    op = sc.op(_group_text(GROUPS[group]), {"X": (9,), "W": (3,)}, dtype="float64")
    x, w = rng.uniform(0.2, 0.8, 9), rng.uniform(0.2, 0.8, 3)
    tx, tw = (torch.tensor(a, requires_grad=True) for a in (x, w))
    windows = tx.unfold(0, 3, 1)                                  # (7, 3): X[i + k]
    ty = sum(tw * _torch_term(torch, t, windows, tw) for t in GROUPS[group]).sum(dim=1)
    gy = rng.standard_normal(7)
    tgx, tgw = torch.autograd.grad(ty, [tx, tw], torch.tensor(gy), create_graph=True)
    ((tgx ** 2).sum() + (tgw ** 2).sum()).backward()

    sx, sw = sc.Tensor(x, requires_grad=True), sc.Tensor(w, requires_grad=True)
    y = op(sx, sw)
    np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), rtol=1e-12)
    gx, gw = sc.grad((y * sc.Tensor(gy)).sum(), [sx, sw], create_graph=True)
    np.testing.assert_allclose(gx.numpy(), tgx.detach().numpy(), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(gw.numpy(), tgw.detach().numpy(), rtol=1e-11, atol=1e-12)
    ((gx ** 2).sum() + (gw ** 2).sum()).backward()
    np.testing.assert_allclose(sx.grad, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sw.grad, tw.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("body, refused", [
    ("gamma(X[i])", "gamma is not supported"),
    ("sigmoid(X[i])", "sigmoid is not supported"),
    ("polygamma(1, X[i])", "polygamma is not supported"),
    ("Mod(X[i], 2)", "Mod is not supported"),
    ("X[i] % 2", "Mod is not supported"),
    ("X[i] / 0", "zoo is not a finite real"),
    ("sqrt(-1) * X[i]", "I is not a finite real"),
])
def test_unsupported_bodies_are_refused_at_definition(body, refused):
    """No C involved: the definition alone refuses them, naming the function."""
    with pytest.raises(IRError, match=refused):
        compilation(ExprSpec(f"Y[i] = {body}", {"X": (3,)}), "x86-64")


def test_the_derivative_of_a_step_is_zero_and_of_abs_is_sign():
    formulas = compilation(ExprSpec("Y[i] = Abs(X[i]) + floor(X[i]) + sign(X[i])",
                                    {"X": (3,)}), "x86-64").formulas()
    assert formulas["grad_X"]["text"] == "grad_X[i] = sign(X[i])*grad_Y[i]"
