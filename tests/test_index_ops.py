"""User-defined ops: index sums written as text, derived and compiled like convolutions.

Every expected value comes from a NumPy implementation written here from the op's meaning,
and every gradient from float64 central differences of that implementation.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from symconv import ExprSpec
from symconv.compiler import compile_op
from symconv.errors import IRError


def stencil(x, w):             # depthwise 3x3, stride 2, valid
    n, c, h, wd = x.shape
    out = np.zeros((n, c, (h - 3) // 2 + 1, (wd - 3) // 2 + 1))
    for a, b in itertools.product(range(3), range(3)):
        out += w[None, :, a, b, None, None] * x[:, :, a::2, b::2][:, :, :out.shape[2], :out.shape[3]]
    return out


def cost_volume(f, g, displacements):
    n, c, width = f.shape
    out = np.zeros((n, displacements, width))
    for d in range(displacements):
        shift = d - displacements // 2
        for i in range(width):
            if 0 <= i + shift < width:
                out[:, d, i] = (f[:, :, i] * g[:, :, i + shift]).sum(axis=1)
    return out


def correlate(x, w):
    return np.array([np.dot(w, x[i:i + len(w)]) for i in range(len(x) - len(w) + 1)])


OPS = {
    "batched-matmul": ("C[b, i, j] = sum(A[b, i, k] * B[b, k, j], (k, 0, 4))",
                       {"A": (2, 3, 5), "B": (2, 5, 4)}, (),
                       lambda A, B: np.einsum("bik,bkj->bij", A, B)),
    "depthwise-stencil": ("Y[n, c, i, j] = sum(W[c, a, b] * X[n, c, 2*i + a, 2*j + b], "
                          "(a, 0, 2), (b, 0, 2))", {"X": (2, 3, 9, 8), "W": (3, 3, 3)}, (),
                          stencil),
    "average-pooling": ("P[n, c, i, j] = sum(X[n, c, 2*i + a, 2*j + b], (a, 0, 1), (b, 0, 1)) / 4",
                        {"X": (2, 2, 6, 4)}, (),
                        lambda X: X.reshape(2, 2, 3, 2, 2, 2).mean(axis=(3, 5))),
    "nearest-upsampling": ("U[n, c, i, j] = X[n, c, i // 2, j // 2]",
                           {"X": (1, 2, 3, 4), "U": (1, 2, 6, 8)}, (),
                           lambda X: X.repeat(2, axis=2).repeat(2, axis=3)),
    "cost-volume": ("V[n, d, i] = sum(F[n, c, i] * G[n, c, i + d - 2], (c, 0, 3))",
                    {"F": (2, 4, 7), "G": (2, 4, 7), "V": (2, 5, 7)}, ("G",),
                    lambda F, G: cost_volume(F, G, 5)),
    "bilinear-form": ("Q[n] = sum(X[n, i] * M[i, j] * Z[n, j], (i, 0, 2), (j, 0, 3))",
                      {"X": (2, 3), "M": (3, 4), "Z": (2, 4)}, (),
                      lambda X, M, Z: np.einsum("ni,ij,nj->n", X, M, Z)),
    "fused-tanh": ("Y[i] = sum(tanh(W[k] * X[i + k]), (k, 0, 2))", {"X": (9,), "W": (3,)}, (),
                   lambda X, W: np.array([np.tanh(W * X[i:i + 3]).sum() for i in range(7)])),
    "squared-conv": ("Y[i] = sum(W[k] * X[i + k], (k, 0, 2))**2", {"X": (8,), "W": (3,)}, (),
                     lambda X, W: correlate(X, W) ** 2),
}


def numeric_gradient(fn, arrays, wrt, cotangent, eps=1e-6):
    grad = np.zeros_like(arrays[wrt])
    for at in itertools.product(*(range(n) for n in grad.shape)):
        values = []
        for sign in (1, -1):
            moved = [a.copy() for a in arrays.values()]
            moved[list(arrays).index(wrt)][at] += sign * eps
            values.append(np.vdot(cotangent, fn(*moved)))
        grad[at] = (values[0] - values[1]) / (2 * eps)
    return grad


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_user_op_against_numpy(name, dtype, cache_dir, rng):
    text, shapes, zero_outside, reference = OPS[name]
    spec = ExprSpec(text, shapes, dtype=dtype, zero_outside=zero_outside)
    kernel = compile_op(spec, cache_dir=cache_dir)
    arrays = {a: rng.standard_normal(s) for a, s in spec.shapes if a in kernel.inputs}
    expected = reference(*arrays.values())
    got = kernel.forward(*(a.astype(dtype) for a in arrays.values()))
    tolerance = 1e-10 if dtype == "float64" else 1e-4
    np.testing.assert_allclose(got, expected, atol=tolerance * max(1, np.abs(expected).max()))
    if dtype == "float32":
        return
    cotangent = rng.standard_normal(expected.shape)
    given = {**arrays, kernel.manifest["backward_args"][-1]: cotangent}
    grads = kernel.backward(*(given[a] for a in kernel.manifest["backward_args"]))
    for (array_name, grad) in zip(kernel.differentiable, grads):
        numeric = numeric_gradient(reference, arrays, array_name, cotangent)
        np.testing.assert_allclose(grad, numeric, atol=1e-6, err_msg=array_name)


def test_output_shape_is_inferred_from_the_reads():
    from symconv import compilation
    spec = ExprSpec("Y[n, i] = sum(W[k] * X[n, 3*i + k], (k, 0, 2))", {"X": (2, 11), "W": (3,)})
    text = compilation(spec).formulas()["forward"]["text"]
    assert text.startswith("Y[n, i] =")
    assert compilation(spec).op.forward.output.shape == (2, 3)


@pytest.mark.parametrize("text, shapes, fragment", [
    ("Y[i] = X[i*i]", {"X": (4,), "Y": (2,)}, "not affine"),
    ("Y[i] = sum(X[i + m], (k, 0, 2))", {"X": (6,), "Y": (3,)}, "unbound index m"),
    ("Y[i] = sum(X[i + k], (k, 0, 3))", {"X": (6,), "Y": (4,)}, "reaches 0..6, outside 0..5"),
    ("Y[i] = X[i] + Z[i]", {"X": (3,)}, "no shape given for Z"),
    ("Y[i] = X[i]", {"X": (3,), "W": (2,)}, "W given a shape but never read"),
    ("Y[i, i] = X[i]", {"X": (3,)}, "repeated output index"),
    ("Y = X[0]", {"X": (3,)}, "left side must read Out[i, j, ...]"),
    ("Y[i] = tanh(sum(X[i + k], (k, 0, 1)))", {"X": (3,), "Y": (2,)}, "applies a function to a sum"),
    ("Y[i] = sum(X[i + k], (k, 0, n))", {"X": (3,), "Y": (2,)}, "integer bounds"),
    ("Y[i] = sum(X[i + k], (k, 0, 2)", {"X": (5,), "Y": (3,)}, "cannot read"),
])
def test_bad_expressions_name_the_problem(text, shapes, fragment, cache_dir):
    with pytest.raises(IRError, match=fragment.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        compile_op(ExprSpec(text, shapes), cache_dir=cache_dir)


def test_spec_fields_are_checked():
    with pytest.raises(ValueError, match="ExprSpec.expression"):
        ExprSpec("no equals sign", {"X": (2,)})
    with pytest.raises(ValueError, match="ExprSpec.shapes: shape of X must be positive"):
        ExprSpec("Y[i] = X[i]", {"X": (0,)})
    with pytest.raises(ValueError, match="ExprSpec.zero_outside"):
        ExprSpec("Y[i] = X[i]", {"X": (2,)}, zero_outside=("Z",))


def test_an_op_without_a_dtype_follows_its_arrays(cache_dir, rng):
    import symconv as sc
    text, shapes = "Y[i] = sum(W[k] * X[i + k], (k, 0, 2))", {"X": (7,), "W": (3,)}
    x, w = rng.standard_normal(7), rng.standard_normal(3)
    expected = np.correlate(x, w, "valid")
    free = sc.op(text, shapes)
    y64 = free(x, w)
    assert y64.dtype == np.float64
    np.testing.assert_allclose(y64, expected, rtol=1e-13)     # no float32 round trip
    y32 = free(x.astype(np.float32), w.astype(np.float32))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, expected, rtol=1e-5)
    assert free(sc.Tensor(x), w).dtype == np.float64
    with pytest.raises(TypeError, match="float32 or float64 arrays, got int64"):
        free(np.arange(7), np.arange(3))
    fixed = sc.op(text, shapes, dtype="float32")
    with pytest.raises(TypeError, match="X has dtype float64, but the op was made with "
                                        "dtype='float32'"):
        fixed(x, w)


@pytest.mark.parametrize("text", [
    "Y[N, I] = sum(W[E] * X[N, I + E + O], (E, 0, 2), (O, 0, 0))",
    "Y[S, Q] = sum(W[pi] * X[S, Q + pi], (pi, 0, 2))",
])
def test_names_sympy_reads_as_constants_are_plain_indices(text, cache_dir, rng):
    """I, E, S, N, O, Q and pi are indices here, free and summed."""
    import symconv as sc
    x, w = rng.standard_normal((2, 7)), rng.standard_normal(3)
    expected = np.stack([np.correlate(row, w, "valid") for row in x])
    np.testing.assert_allclose(sc.op(text, {"X": (2, 7), "W": (3,)})(x, w), expected,
                               rtol=1e-12)


@pytest.mark.parametrize("shapes, clash", [
    ({"X": (3,), "grad_Y": (3,)}, "grad_Y would clash with the gradient of Y"),
    ({"X": (3,), "grad_X": (3,)}, "grad_X would clash with the gradient of X"),
])
def test_an_array_named_like_a_gradient_is_refused_at_definition(shapes, clash):
    second = [name for name in shapes if name != "X"][0]
    with pytest.raises(IRError, match=clash):
        ExprSpec(f"Y[i] = X[i] + {second}[i]", shapes)


@pytest.mark.parametrize("out, x, w, i, k", [
    ("int", "restrict", "double", "main", "for"),      # C keywords and main
    ("sc_acc", "sc_a0", "sc_threads", "sc_lo", "sc_a0_0"),  # like generated names
    ("memcpy", "printf", "exp", "a", "sc_row0"),        # libc symbols; the README's index a
])
def test_any_c_name_works_for_arrays_and_indices(out, x, w, i, k, cache_dir, rng):
    """User names reach C only under a private prefix: none can meet a keyword, a libc
    symbol or a name the generator uses."""
    text = f"{out}[{i}] = sum({w}[{k}] * {x}[2*{i} + {k}], ({k}, 0, 2))"
    kernel = compile_op(ExprSpec(text, {x: (11,), w: (3,)}, dtype="float64"),
                        cache_dir=cache_dir)
    xs, ws = rng.standard_normal(11), rng.standard_normal(3)
    expected = np.array([ws @ xs[2 * j:2 * j + 3] for j in range(5)])
    np.testing.assert_allclose(kernel.forward(xs, ws), expected, rtol=1e-12)
    gy = rng.standard_normal(5)
    gx, gw = kernel.backward(xs, ws, gy)
    np.testing.assert_allclose(gw, [gy @ xs[t:t + 9:2] for t in range(3)], rtol=1e-12)
    expected_gx = np.zeros(11)
    for j in range(5):
        expected_gx[2 * j:2 * j + 3] += gy[j] * ws
    np.testing.assert_allclose(gx, expected_gx, rtol=1e-12)


def test_a_floor_index_never_takes_a_users_name(cache_dir, rng):
    """x // 2 becomes a new summation index; the user already has one named q0."""
    text = "Y[i] = sum(X[(i + q0) // 2] * W[q0], (q0, 0, 1))"
    kernel = compile_op(ExprSpec(text, {"X": (5,), "W": (2,), "Y": (8,)}, dtype="float64"),
                        cache_dir=cache_dir)
    xs, ws = rng.standard_normal(5), rng.standard_normal(2)
    expected = [sum(xs[(i + q) // 2] * ws[q] for q in range(2)) for i in range(8)]
    np.testing.assert_allclose(kernel.forward(xs, ws), expected, rtol=1e-12)
