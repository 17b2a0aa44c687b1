"""Every graph op's backward against float64 central differences (broadcasting included).

The reference here is written in this file, not taken from symconv: perturb one
element of one input, rerun the forward, difference.  The loss is
``Σ r · op(inputs)`` with a fixed random ``r``, so every output element counts.
Forward values of the less obvious ops are checked against NumPy or PyTorch.
"""

from __future__ import annotations

import numpy as np
import pytest

import symconv
from symconv import graph as G
from symconv.graph import Tensor

EPS = 1e-6


def numeric_gradients(fn, arrays, weights):
    """Central differences of Σ weights · fn(*arrays) for every element of every array."""
    grads = []
    for i, array in enumerate(arrays):
        grad = np.zeros_like(array)
        for at in np.ndindex(array.shape):
            values = []
            for sign in (1, -1):
                moved = [a.copy() for a in arrays]
                moved[i][at] += sign * EPS
                values.append(np.vdot(weights, fn(*(Tensor(m) for m in moved)).data))
            grad[at] = (values[0] - values[1]) / (2 * EPS)
        grads.append(grad)
    return grads


def assert_backward_matches(fn, *arrays, seed=0, rtol=1e-6, atol=1e-7):
    arrays = [np.asarray(a, np.float64) for a in arrays]
    tensors = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    out = fn(*tensors)
    weights = np.random.default_rng(seed).standard_normal(out.shape)
    out.backward(weights)
    expected = numeric_gradients(fn, arrays, weights)
    for i, (t, ref) in enumerate(zip(tensors, expected)):
        assert t.grad is not None, f"input {i} got no gradient"
        assert t.grad.shape == t.shape and t.grad.dtype == np.float64
        np.testing.assert_allclose(t.grad, ref, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {i}")
    return out


def r(*shape, seed=1, low=None):
    """A seeded random array; with ``low``, uniform in [low, low + 1] (positive domains)."""
    rng = np.random.default_rng(seed + 7 * len(shape) + int(np.prod(shape, dtype=np.int64)))
    if low is not None:
        return rng.uniform(low, low + 1, size=shape)
    return rng.standard_normal(shape)


def away_from_zero(*shape, seed=1):
    a = r(*shape, seed=seed)
    return np.where(np.abs(a) < 0.1, 0.5, a)


# (id, function of tensors, input arrays)
ELEMENTWISE = [
    ("add-same", lambda a, b: a + b, [r(3, 4), r(3, 4, seed=2)]),
    ("add-broadcast-row", lambda a, b: a + b, [r(3, 4), r(4)]),
    ("add-broadcast-both", lambda a, b: a + b, [r(2, 1, 3), r(4, 1)]),
    ("add-scalar-shaped", lambda a, b: a + b, [r(2, 3), r()]),
    ("add-python-number", lambda a: 2.5 + a + 1, [r(3)]),
    ("sub-broadcast", lambda a, b: a - b, [r(2, 3, 1), r(1, 4)]),
    ("rsub-number", lambda a: 1.0 - a, [r(4)]),
    ("mul-broadcast", lambda a, b: a * b, [r(3, 1, 5), r(1, 4, 1)]),
    ("mul-self", lambda a: a * a, [r(5)]),
    ("div-broadcast", lambda a, b: a / b, [r(3, 4), r(3, 1, low=0.5)]),
    ("rdiv-number", lambda a: 2.0 / a, [r(4, low=0.5)]),
    ("neg", lambda a: -a, [r(2, 3)]),
    ("pow-int", lambda a: a ** 3, [r(3, 2)]),
    ("pow-fraction", lambda a: a ** 1.5, [r(4, low=0.2)]),
    ("pow-negative", lambda a: a ** -2, [r(4, low=0.5)]),
    ("pow-zero", lambda a: a ** 0 + a, [r(3)]),
    ("pow-tensor-broadcast", lambda a, b: a ** b, [r(2, 3, low=0.5), r(3)]),
    ("rpow-number", lambda a: 2.0 ** a, [r(3)]),
    ("exp", lambda a: a.exp(), [r(2, 3)]),
    ("log", lambda a: a.log(), [r(2, 3, low=0.3)]),
    ("sqrt", lambda a: a.sqrt(), [r(2, 3, low=0.3)]),
    ("tanh", lambda a: a.tanh(), [r(2, 3)]),
    ("sigmoid", lambda a: a.sigmoid(), [r(2, 3) * 4]),
    ("relu", lambda a: a.relu(), [away_from_zero(3, 4)]),
    ("leaky_relu", lambda a: a.leaky_relu(0.2), [away_from_zero(3, 4)]),
    ("abs", lambda a: a.abs(), [away_from_zero(5)]),
    ("chain", lambda a, b: ((a * b).tanh() + (b ** 2).exp() / (1 + a.sigmoid())).log(),
     [r(3, 1), r(4, seed=3)]),
]

REDUCTIONS = [
    ("sum-all", lambda a: a.sum(), [r(3, 4)]),
    ("sum-axis", lambda a: a.sum(axis=1), [r(3, 4, 2)]),
    ("sum-axes-keepdims", lambda a: a.sum(axis=(0, 2), keepdims=True), [r(3, 4, 2)]),
    ("sum-negative-axis", lambda a: a.sum(axis=-1), [r(3, 4)]),
    ("mean-all", lambda a: a.mean(), [r(3, 4)]),
    ("mean-axes", lambda a: a.mean(axis=(1, 2)), [r(2, 3, 4)]),
    ("mean-keepdims-broadcast", lambda a: a - a.mean(axis=0, keepdims=True), [r(3, 4)]),
    ("max-all", lambda a: a.max(), [r(3, 4)]),
    ("max-axis", lambda a: a.max(axis=1), [r(3, 4, 2)]),
    ("max-axes-keepdims", lambda a: a.max(axis=(0, 2), keepdims=True), [r(3, 4, 2)]),
    ("min-axis", lambda a: a.min(axis=0), [r(3, 4)]),
]

SHAPES = [
    ("reshape", lambda a: a.reshape(4, 6) * r(4, 6), [r(2, 3, 4)]),
    ("reshape-tuple-infer", lambda a: a.reshape((-1, 2)), [r(3, 4)]),
    ("flatten", lambda a: a.flatten(1), [r(2, 3, 4)]),
    ("transpose-reverse", lambda a: a.T, [r(2, 3, 4)]),
    ("permute", lambda a: a.permute(1, 2, 0) * r(3, 4, 2), [r(2, 3, 4)]),
    ("slice", lambda a: a[1:, ::2], [r(3, 5)]),
    ("slice-negative-step-ellipsis", lambda a: a[..., ::-2, None], [r(2, 5)]),
    ("int-index", lambda a: a[1], [r(3, 4)]),
    ("fancy-index-repeats", lambda a: a[np.array([0, 2, 0, 0])], [r(3, 2)]),
    ("fancy-index-pairs", lambda a: a[np.array([0, 1, 1]), np.array([2, 0, 2])], [r(2, 3)]),
    ("boolean-mask", lambda a: a[np.array([[True, False, True], [False, True, True]])], [r(2, 3)]),
    ("concatenate", lambda a, b, c: G.concatenate([a, b, c], axis=1),
     [r(2, 1), r(2, 3), r(2, 2)]),
    ("concatenate-reuse", lambda a, b: G.concatenate([a, b, a], axis=0), [r(1, 3), r(2, 3)]),
    ("stack", lambda a, b: G.stack([a, b], axis=1), [r(2, 3), r(2, 3, seed=5)]),
]

LINEAR_ALGEBRA = [
    ("matmul-2d", lambda a, b: a @ b, [r(3, 4), r(4, 5)]),
    ("matmul-vector-matrix", lambda a, b: a @ b, [r(4), r(4, 3)]),
    ("matmul-matrix-vector", lambda a, b: a @ b, [r(3, 4), r(4)]),
    ("matmul-vector-vector", lambda a, b: a @ b, [r(4), r(4, seed=2)]),
    ("matmul-batched-broadcast", lambda a, b: a @ b, [r(2, 1, 3, 4), r(5, 4, 2)]),
    ("matmul-vector-batched", lambda a, b: a @ b, [r(4), r(2, 4, 3)]),
    ("linear", lambda x, w, b: G.linear(x, w, b), [r(5, 4), r(3, 4), r(3)]),
    ("linear-3d-no-bias", lambda x, w: G.linear(x, w), [r(2, 3, 4), r(5, 4)]),
]

SOFTMAX_AND_LOSSES = [
    ("log_softmax-last", lambda a: a.log_softmax(), [r(3, 5) * 3]),
    ("log_softmax-axis0", lambda a: G.log_softmax(a, axis=0), [r(4, 2) * 3]),
    ("softmax", lambda a: a.softmax(axis=1), [r(2, 4)]),
    ("cross_entropy-mean", lambda a: G.cross_entropy(a, np.array([1, 0, 3])), [r(3, 4) * 2]),
    ("cross_entropy-sum", lambda a: G.cross_entropy(a, np.array([2, 2]), reduction="sum"),
     [r(2, 3)]),
    ("cross_entropy-none", lambda a: G.cross_entropy(a, np.array([0, 1]), reduction="none"),
     [r(2, 3)]),
    ("cross_entropy-spatial", lambda a: G.cross_entropy(a, np.array([[0, 2, 1], [1, 1, 0]])),
     [r(2, 3, 3)]),
    ("mse_loss", lambda a, b: G.mse_loss(a, b), [r(3, 2), r(3, 2, seed=4)]),
]

ALL = ELEMENTWISE + REDUCTIONS + SHAPES + LINEAR_ALGEBRA + SOFTMAX_AND_LOSSES


@pytest.mark.parametrize("fn, arrays", [pytest.param(f, a, id=i) for i, f, a in ALL])
def test_backward_matches_finite_differences(fn, arrays):
    assert_backward_matches(fn, *arrays)


# --- compiled and pooling ops ------------------------------------------------------------------

CONVS = [
    ("conv1d-stride-dilation", dict(stride=2, dilation=2, padding=2), (2, 2, 9), (3, 2, 3), True),
    ("conv2d-groups-same", dict(padding="same", groups=2), (1, 4, 5, 4), (4, 2, 3, 2), True),
    ("conv3d-no-bias", dict(padding=1), (1, 2, 3, 4, 3), (2, 2, 2, 3, 2), False),
    ("conv4d", dict(padding=((1, 0), 0, 1, (0, 1))), (1, 1, 3, 3, 3, 3), (2, 1, 2, 2, 2, 2), True),
]


@pytest.mark.parametrize("kwargs, x_shape, w_shape, bias",
                         [pytest.param(*c[1:], id=c[0]) for c in CONVS])
def test_conv_backward_matches_finite_differences(kwargs, x_shape, w_shape, bias, cache_dir):
    arrays = [r(*x_shape), r(*w_shape, seed=2)] + ([r(w_shape[0], seed=3)] if bias else [])
    out = assert_backward_matches(lambda *t: G.conv(*t, **kwargs), *arrays)
    assert out.dtype == np.float64


def test_conv_composed_with_other_ops(cache_dir):
    """The chain rule through conv from both sides: a bias shared by two branches, a weight
    computed from another tensor, a nonlinearity on the output."""
    def fn(x, v, b):
        w = (v * 0.5).tanh()
        y = G.conv(x, w, b, padding=1) + G.conv(x * 2.0, w, b, padding=1).sigmoid()
        return (y ** 2).mean(axis=(2, 3))
    assert_backward_matches(fn, r(2, 2, 4, 4), r(3, 2, 3, 3, seed=2), r(3, seed=3))


@pytest.mark.parametrize("kwargs, shape", [
    pytest.param(dict(kernel_size=2), (2, 2, 4, 4), id="2d"),
    pytest.param(dict(kernel_size=(2, 3), stride=1, padding=(1, 0)), (1, 2, 3, 5),
                 id="2d-overlap-pad"),
    pytest.param(dict(kernel_size=2, stride=1, padding=((1, 0), 0, (0, 1))), (1, 1, 3, 3, 2),
                 id="3d-asym-pad"),
])
def test_avg_pool_backward_matches_finite_differences(kwargs, shape, cache_dir):
    assert_backward_matches(lambda x: G.avg_pool(x, **kwargs), r(*shape))


@pytest.mark.parametrize("kwargs, shape", [
    pytest.param(dict(kernel_size=3, stride=2, padding=1), (2, 2, 7), id="1d-overlap-pad"),
    pytest.param(dict(kernel_size=2), (2, 3, 4, 6), id="2d"),
    pytest.param(dict(kernel_size=(3, 2), stride=(1, 2), padding=((1, 1), (0, 1))), (1, 2, 5, 5),
                 id="2d-overlap-asym"),
    pytest.param(dict(kernel_size=2, stride=(1, 2, 2)), (1, 2, 3, 4, 4), id="3d"),
    pytest.param(dict(kernel_size=2), (1, 1, 2, 4, 2, 4), id="4d"),
])
def test_max_pool_backward_matches_finite_differences(kwargs, shape):
    # distinct values more than eps apart, so no window has a tie the differences could cross
    values = np.random.default_rng(3).permutation(int(np.prod(shape))).reshape(shape) * 0.01
    assert_backward_matches(lambda x: G.max_pool(x, **kwargs), values)


@pytest.mark.parametrize("rank, kwargs", [
    (1, dict(kernel_size=3, stride=2, padding=1)),
    (2, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0))),
    (3, dict(kernel_size=2, stride=2)),
])
def test_max_pool_against_torch(rank, kwargs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((2, 3) + (6,) * rank).astype("float32")
    t = Tensor(x, requires_grad=True)
    y = G.max_pool(t, **kwargs)
    gy = rng.standard_normal(y.shape).astype("float32")
    y.backward(gy)
    tx = torch.tensor(x, requires_grad=True)
    ty = getattr(torch.nn.functional, f"max_pool{rank}d")(tx, **kwargs)
    ty.backward(torch.tensor(gy))
    np.testing.assert_array_equal(y.data, ty.detach().numpy())
    np.testing.assert_allclose(t.grad, tx.grad.numpy(), rtol=1e-6, atol=1e-6)
    assert y.dtype == np.float32 and t.grad.dtype == np.float32


def test_max_ties_share_the_gradient_like_torch_amax():
    torch = pytest.importorskip("torch")
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    t = Tensor(x, requires_grad=True)
    t.max(axis=1).sum().backward()
    tx = torch.tensor(x, requires_grad=True)
    torch.amax(tx, dim=1).sum().backward()
    np.testing.assert_allclose(t.grad, tx.grad.numpy())
    np.testing.assert_allclose(t.grad, [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])


def test_softmax_and_losses_forward_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((4, 5, 3)) * 10
    target = rng.integers(0, 5, size=(4, 3))
    functional = torch.nn.functional
    np.testing.assert_allclose(G.log_softmax(Tensor(logits), axis=1).data,
                               functional.log_softmax(torch.tensor(logits), dim=1).numpy(),
                               rtol=1e-12, atol=1e-12)
    for reduction in ("mean", "sum", "none"):
        ours = G.cross_entropy(Tensor(logits), target, reduction=reduction).data
        theirs = functional.cross_entropy(torch.tensor(logits), torch.tensor(target),
                                          reduction=reduction).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    big = np.array([[1000.0, -1000.0, 0.0]])  # no overflow
    assert np.isfinite(G.cross_entropy(Tensor(big), np.array([1])).item())
    assert np.isfinite(G.sigmoid(Tensor(np.array([-1000.0, 1000.0]))).data).all()


def test_unbroadcast_reduces_added_and_stretched_axes():
    g = np.arange(24.0).reshape(2, 3, 4)
    t = Tensor(g)
    np.testing.assert_array_equal(G.unbroadcast(t, (3, 1)).data, g.sum(axis=(0, 2))[:, None])
    np.testing.assert_array_equal(G.unbroadcast(t, (4,)).data, g.sum(axis=(0, 1)))
    np.testing.assert_array_equal(G.unbroadcast(t, ()).data, g.sum())
    assert G.unbroadcast(t, (2, 3, 4)) is t


def test_dtype_is_kept_in_float32():
    a = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    y = ((a * 2.0 + 1) ** 2 / 3.0 - 0.5).exp().sum()
    assert y.dtype == np.float32
    y.backward()
    assert a.grad.dtype == np.float32
    b = Tensor(np.ones(3, np.float64), requires_grad=True)
    (a * b).sum().backward()        # mixed: NumPy promotion forward, each grad in its own dtype
    assert a.grad.dtype == np.float32 and b.grad.dtype == np.float64


# --- symconv.gradcheck itself ------------------------------------------------------------------

def broken_square(x):
    """x ** 2 with a backward that is wrong at one element."""
    data = x.data

    def backward(g, out):
        grad = 2 * data * g.data
        grad[1, 2] += 0.1
        return (grad,)
    return G.record("broken_square", data ** 2, (x,), backward)


def test_gradcheck_passes_and_reports():
    x = r(2, 3)
    targets = np.array([2, 0])
    report = symconv.gradcheck(lambda a, w, t: G.cross_entropy(a @ w, t),
                               [x, Tensor(r(3, 4), requires_grad=True), targets])
    assert report and report.passed
    assert [i.index for i in report.inputs] == [0, 1]       # the integer targets pass through
    assert report.inputs[0].checked == 6 and report.inputs[1].shape == (3, 4)
    assert "passed" in str(report) and "input 1 (3, 4)" in str(report)


def test_gradcheck_finds_a_wrong_backward():
    x = r(3, 4)
    with pytest.raises(symconv.GradcheckError) as error:
        symconv.gradcheck(lambda a, b: broken_square(a) * b, [x, r(3, 4, seed=9)])
    report = error.value.report
    bad, good = report.inputs
    assert not bad.passed and good.passed
    assert bad.worst_at == (1, 2)
    assert bad.max_abs_error > 0.01
    assert "FAILED" in str(error.value) and "(1, 2)" in str(error.value)
    quiet = symconv.gradcheck(broken_square, [x], raise_exception=False)
    assert not quiet and quiet.inputs[0].worst_at == (1, 2)


def test_gradcheck_samples_and_rejects_bad_calls():
    report = symconv.gradcheck(lambda a: a.tanh(), [r(40, 30)], max_elements=25)
    assert report.inputs[0].checked == 25
    with pytest.raises(ValueError, match="no input to check"):
        symconv.gradcheck(lambda t: G.cross_entropy(Tensor(r(2, 3)), t), [np.array([0, 1])])
    with pytest.raises(TypeError, match="float64"):   # a float32 computation is too coarse
        symconv.gradcheck(lambda a: G.record("to_f32", a.data.astype(np.float32), (a,),
                                             lambda g, out: (g,)), [r(3)])
