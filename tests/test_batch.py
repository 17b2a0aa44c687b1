"""Batch sizes known only at run time: one package serves every batch.

The symbolic layer first (no C): which sums peel, which are refused and why,
and the formulas.  Then compiled kernels against the independent NumPy oracle
for batches 1, 2, 3, 7 and 33 from one package per spec, batch 0, mismatched
batches; then the graph, the bindings and an ahead-of-time package in a
SymPy-free process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import symconv as sc
from symconv.compiler import KERNELS, compilation
from symconv.errors import IRError
from symconv.spec import AvgPoolSpec, ConvSpec, ConvTransposeSpec, ExprSpec, GradientSpec

import oracle

BATCHES = (1, 2, 3, 7, 33)


# --- the symbolic layer -------------------------------------------------------------------------

def test_open_batch_spec_is_named_n_and_keyed_apart():
    spec = ConvSpec((None, 3, 8, 8), (4, 3, 3, 3), padding=1)
    assert spec.batch_open and ConvSpec(("N", 3, 8, 8), (4, 3, 3, 3), padding=1) == spec
    assert "(N, 3, 8, 8)" in spec.describe() and spec.output_shape == (None, 4, 8, 8)
    assert "_Nx3x8x8_" in spec.slug
    assert spec.key != spec.with_batch(2).key and not spec.with_batch(2).batch_open
    with pytest.raises(ValueError, match="first may be None"):
        ConvSpec((3, None, 8, 8), (4, 3, 3, 3))


def test_item_sums_have_every_other_extent_exact_and_formulas_show_the_batch():
    spec = ConvSpec((None, 3, 9, 9), (4, 3, 3, 3), stride=2, dilation=3)
    compiled = compilation(spec)
    forward = compiled.op.forward
    assert forward.output.shape == (4, 2, 2)          # the item: no batch axis
    assert {a.name: a.shape for a in forward.inputs}["input"] == (3, 9, 9)
    formulas = compiled.formulas()
    assert formulas["forward"]["text"].startswith("output[n, o, i0, i1] =")
    assert "input[n, c," in formulas["forward"]["text"]
    assert formulas["grad_weight"]["text"].count("Σ_{n=0..N - 1}") == 1
    assert r"\sum_{n=0}^{N - 1}" in formulas["grad_bias"]["latex"]
    assert "Σ_{n=" not in formulas["grad_input"]["text"]     # a map over the batch
    manifest = compiled.manifest()
    assert manifest["arrays"]["input"]["shape"] == [None, 3, 9, 9]
    assert manifest["key"] == spec.key and manifest["spec"]["input_shape"][0] is None
    assert manifest["description"] == spec.describe() and manifest["flops"] == spec.flops
    assert manifest["batch"] == {"extent": "N", "index": "n"}


def test_gradients_of_gradients_keep_the_batch_structure():
    parent = ConvSpec((None, 2, 6), (3, 2, 3), stride=2)
    compiled = compilation(GradientSpec(parent, "grad_weight"))
    shapes = compiled.manifest()["arrays"]
    assert shapes["grad_output"]["shape"] == [None, 3, 2]
    assert shapes["grad_grad_weight"]["shape"] == [3, 2, 3]      # a weight: no batch
    assert shapes["grad_input"]["shape"] == [None, 2, 6]


@pytest.mark.parametrize("text, shapes, fragment", [
    ("Y[n, c] = X[2*n, c]", {"X": ("n", 3)}, "must be read as a bare index"),
    ("Y[n, c] = X[n, c] * n", {"X": ("n", 3)}, "index n runs over the run-time extent n"),
    ("Y[n, c] = X[n, c] * X[n, n]", {"X": ("n", 3)}, "must be passed through"),
    ("Y[c] = sum(X[b, c], (b, 0, n - 1)) + B[c]", {"X": ("n", 3), "B": (3,)},
     "needs every term to read an array that has it"),
    ("Y[n, c] = sum(X[b, c], (b, 0, n - 1))", {"X": ("n", 3), "Y": ("n", 3)},
     "is not the output's n"),
    ("Y[n] = X[n, 0]", {"X": ("n", 3), "Y": ("n",)}, "give it at least one more axis"),
])
def test_run_time_extents_that_are_not_passed_through_are_refused(text, shapes, fragment):
    with pytest.raises(IRError, match=fragment):
        compilation(ExprSpec(text, shapes=shapes))


def test_named_extent_only_first_and_only_one():
    with pytest.raises(ValueError, match="the first may be a name"):
        ExprSpec("Y[c, n] = X[c, n]", shapes={"X": (3, "n")})
    with pytest.raises(IRError, match="one run-time extent per op"):
        ExprSpec("Y[n, m] = X[n, 0] * Z[m, 0]", shapes={"X": ("n", 1), "Z": ("m", 1)})


# --- compiled kernels against the oracle -------------------------------------------------------

def _tolerance(dtype):
    return (2e-4, 2e-4) if dtype == "float32" else (1e-10, 1e-10)


def _check(got, expected, dtype, what):
    rtol, atol = _tolerance(dtype)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol * scale, err_msg=what)


CONVS = [
    dict(input_shape=(None, 3, 11), weight_shape=(4, 3, 3), stride=2, padding=1,
         dtype="float64"),
    dict(input_shape=(None, 4, 7, 8), weight_shape=(6, 2, 3, 2), stride=(2, 1),
         dilation=(1, 2), padding=((1, 0), (2, 1)), groups=2),
    dict(input_shape=(None, 2, 5, 6, 5), weight_shape=(3, 2, 3, 3, 2), padding=1,
         dtype="float64"),
    dict(input_shape=(None, 2, 4, 5, 4, 3), weight_shape=(2, 2, 2, 2, 2, 2), bias=False),
    dict(input_shape=(None, 3, 8, 9), weight_shape=(2, 3, 3, 3), padding=2,
         padding_mode="reflect", dtype="float64"),
    dict(input_shape=(None, 2, 9), weight_shape=(2, 2, 3), padding=2, padding_mode="circular"),
    dict(input_shape=(None, 4, 6, 6), weight_shape=(4, 1, 3, 3), stride=2, padding=1, groups=4,
         padding_mode="replicate"),
]


@pytest.mark.parametrize("fields", CONVS, ids=lambda f: f"{len(f['input_shape']) - 2}d-"
                         f"{f.get('padding_mode', 'zeros')}-{f.get('dtype', 'float32')}")
def test_one_package_serves_every_batch(fields, cache_dir, rng):
    spec = ConvSpec(**fields)
    first = KERNELS.load(spec, cache_dir)
    kernel = first.kernel
    rank, mode = spec.rank, spec.padding_mode
    args = (spec.stride, spec.padding, spec.dilation, spec.groups)
    dtype = spec.dtype
    w = rng.standard_normal(spec.weight_shape).astype(dtype)
    b = rng.standard_normal(spec.bias_shape).astype(dtype) if spec.bias else None
    for batch in BATCHES:
        assert KERNELS.load(spec, cache_dir).cached       # no build after the first
        x = rng.standard_normal((batch, *spec.input_shape[1:])).astype(dtype)
        y = kernel.forward(x, w, b)
        _check(y, oracle.conv_forward_mode(x, w, b, *args, mode), dtype, f"forward N={batch}")
        gy = rng.standard_normal(y.shape).astype(dtype)
        gx, gw, gb = kernel.backward(x, w, gy)
        rx, rw, rb = oracle.conv_backward_mode(x, w, gy, *args, mode)
        _check(gx, rx, dtype, f"grad_input N={batch}")
        _check(gw, rw, dtype, f"grad_weight N={batch}")
        if spec.bias:
            _check(gb, rb, dtype, f"grad_bias N={batch}")
    assert rank == len(spec.kernel_size)


def test_transposed_and_pooling_serve_every_batch(cache_dir, rng):
    spec = ConvTransposeSpec((None, 4, 5, 4), (4, 3, 3, 2), stride=(2, 3), padding=1,
                             output_padding=(1, 0), groups=1, dtype="float64")
    kernel = KERNELS.load(spec, cache_dir).kernel
    adjoint = (spec.stride, spec.padding, spec.dilation, spec.groups)
    w = rng.standard_normal(spec.weight_shape)
    b = rng.standard_normal(spec.bias_shape)
    pool = KERNELS.load(AvgPoolSpec((None, 2, 6, 7), 2, padding=1, dtype="float64"),
                        cache_dir).kernel
    for batch in BATCHES:
        x = rng.standard_normal((batch, *spec.input_shape[1:]))
        out_shape = (batch, *spec.output_shape[1:])
        # a transposed convolution is the input gradient of its adjoint convolution
        expected = oracle.conv_backward(np.zeros(out_shape), w, x, *adjoint)[0] + \
            b.reshape(1, -1, 1, 1)
        y = kernel.forward(x, w, b)
        _check(y, expected, "float64", f"transposed forward N={batch}")
        gy = rng.standard_normal(y.shape)
        gx, gw, gb = kernel.backward(x, w, gy)
        _check(gx, oracle.conv_forward(gy, w, None, *adjoint), "float64", "transposed gx")
        _check(gw, oracle.conv_backward(gy, w, x, *adjoint)[1], "float64", "transposed gw")
        _check(gb, gy.sum(axis=(0, 2, 3)), "float64", "transposed gb")
        p = rng.standard_normal((batch, 2, 6, 7))
        padded = np.pad(p, [(0, 0), (0, 0), (1, 1), (1, 1)])
        windows = np.lib.stride_tricks.sliding_window_view(padded, (2, 2), axis=(2, 3))
        _check(pool.forward(p), windows[:, :, ::2, ::2].mean(axis=(-1, -2)), "float64",
               f"avg_pool N={batch}")


def test_batch_zero_and_mismatched_batches(cache_dir, rng):
    spec = ConvSpec((None, 2, 6, 6), (3, 2, 3, 3), padding=1, dtype="float64")
    kernel = KERNELS.load(spec, cache_dir).kernel
    w, b = rng.standard_normal(spec.weight_shape), rng.standard_normal(3)
    empty = np.zeros((0, 2, 6, 6))
    y = kernel.forward(empty, w, b)
    assert y.shape == (0, 3, 6, 6)
    gx, gw, gb = kernel.backward(empty, w, np.zeros((0, 3, 6, 6)))
    assert gx.shape == (0, 2, 6, 6)
    assert np.array_equal(gw, np.zeros_like(w)) and np.array_equal(gb, np.zeros(3))
    with pytest.raises(ValueError, match="disagree on the batch size.*input 2, grad_output 3"):
        kernel.backward(rng.standard_normal((2, 2, 6, 6)), w, rng.standard_normal((3, 3, 6, 6)))
    with pytest.raises(ValueError, match=r"expected \(N, 2, 6, 6\) for any batch size N"):
        kernel.forward(rng.standard_normal((2, 2, 6, 5)), w, b)
    with pytest.raises(ValueError, match="has shape"):
        kernel.forward(rng.standard_normal((4, 3, 6, 6)), w, b)


def test_sum_over_the_batch_is_bit_identical_for_every_thread_count(cache_dir, rng):
    spec = ConvSpec((None, 16, 24, 24), (16, 16, 3, 3), padding=1)
    kernel = KERNELS.load(spec, cache_dir).kernel
    x = rng.standard_normal((9, 16, 24, 24)).astype(np.float32)
    gy = rng.standard_normal((9, 16, 24, 24)).astype(np.float32)
    w = rng.standard_normal(spec.weight_shape).astype(np.float32)
    one = kernel.backward(x, w, gy, threads=1)
    for threads in (2, 3):
        for a, b in zip(one, kernel.backward(x, w, gy, threads=threads)):
            assert np.array_equal(a, b)


def test_user_op_with_a_named_extent(cache_dir, rng):
    spec = ExprSpec("Y[n, o, i] = sum(W[o, c, a] * X[n, c, i + a] ** 2, (c, 0, 2), (a, 0, 1))",
                    shapes={"X": ("n", 3, 6), "W": (4, 3, 2)}, dtype="float64")
    kernel = KERNELS.load(spec, cache_dir).kernel
    w = rng.standard_normal((4, 3, 2))
    windows = lambda x: np.stack([x[:, :, a:a + 5] for a in range(2)], axis=-1)  # noqa: E731
    for batch in (1, 3, 7):
        x = rng.standard_normal((batch, 3, 6))
        y = kernel.forward(x, w)
        _check(y, np.einsum("oca,ncia->noi", w, windows(x) ** 2), "float64", "user forward")
        gy = rng.standard_normal(y.shape)
        gx, gw = kernel.backward(x, w, gy)
        expected_gw = np.einsum("noi,ncia->oca", gy, windows(x) ** 2)
        _check(gw, expected_gw, "float64", "user grad W")
        expected_gx = np.zeros_like(x)
        for a in range(2):
            expected_gx[:, :, a:a + 5] += 2 * x[:, :, a:a + 5] * np.einsum("noi,oc->nci", gy,
                                                                          w[:, :, a])
        _check(gx, expected_gx, "float64", "user grad X")
    summed = ExprSpec("Y[o, c] = sum(X[b, c] * Z[b, o], (b, 0, n - 1))",
                      shapes={"X": ("n", 3), "Z": ("n", 4)}, dtype="float64")
    kernel = KERNELS.load(summed, cache_dir).kernel
    x, z = rng.standard_normal((5, 3)), rng.standard_normal((5, 4))
    _check(kernel.forward(x, z), z.T @ x, "float64", "a sum over the batch")


# --- everything above the kernels ----------------------------------------------------------------

def _builds(cache_dir, fragment):
    return sorted(p.name for p in cache_dir.iterdir() if fragment in p.name)


def test_graph_trains_on_batches_of_varying_size_with_one_build_per_layer(cache_dir):
    rng = np.random.default_rng(5)
    model = sc.nn.Sequential(sc.nn.Conv(2, 5, (3, 3), padding=1, rng=rng), sc.nn.ReLU(),
                             sc.nn.Conv(5, 3, (3, 3), stride=2, rng=rng))
    opt = sc.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for batch in (4, 3, 7, 1, 4, 2):
        x = rng.standard_normal((batch, 2, 9, 9)).astype(np.float32)
        loss = (model(sc.Tensor(x)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert _builds(cache_dir, "conv2d_Nx2x9x9_w5x2x3x3") != []
    assert len(_builds(cache_dir, "conv2d_Nx2x9x9_w5x2x3x3_f32")) == 1
    assert len(_builds(cache_dir, "conv2d_Nx5x9x9_w3x5x3x3_f32")) == 1
    assert not any("conv2d_4x2x9x9" in name or "conv2d_7x2x9x9" in name
                   for name in _builds(cache_dir, "conv2d"))
    assert losses[-1] < losses[0]


def test_torch_binding_two_batch_sizes_one_build(cache_dir):
    torch = pytest.importorskip("torch")
    import symconv.torch as st
    torch.manual_seed(0)
    layer = st.SymConv(3, 4, (3, 3), padding=1, dtype=torch.float64, cache_dir=cache_dir)
    reference = torch.nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        reference.weight.copy_(layer.weight)
        reference.bias.copy_(layer.bias)
    for batch in (2, 5):
        x = torch.randn(batch, 3, 7, 7, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        x_ref = x.detach().clone().requires_grad_()
        reference(x_ref).sum().backward()
        torch.testing.assert_close(y, reference(x_ref))
        torch.testing.assert_close(x.grad, x_ref.grad)
    assert len(_builds(cache_dir, "conv2d_Nx3x7x7_w4x3x3x3_f64")) == 1
    assert not _builds(cache_dir, "conv2d_5x3x7x7")


def test_jax_binding_two_batch_sizes_one_build(tmp_path):
    cache_dir = tmp_path     # its own: the session cache may hold the same slug with a bias
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import symconv.jax as sj
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((4, 3, 3)).astype(np.float32))
    for batch in (2, 6):
        x = jnp.asarray(rng.standard_normal((batch, 3, 10)).astype(np.float32))
        y = sj.conv(x, w, padding=1, cache_dir=cache_dir)
        expected = jax.lax.conv_general_dilated(x, w, (1,), [(1, 1)])
        np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-4, atol=1e-4)
        g = jax.grad(lambda w: jnp.sum(sj.conv(x, w, padding=1, cache_dir=cache_dir) ** 2))(w)
        g_ref = jax.grad(lambda w: jnp.sum(
            jax.lax.conv_general_dilated(x, w, (1,), [(1, 1)]) ** 2))(w)
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-3, atol=1e-3)
    assert len(_builds(cache_dir, "conv1d_Nx3x10_w4x3x3_f32")) == 1


def test_ahead_of_time_package_serves_batch_1_and_64_without_sympy(tmp_path):
    out = tmp_path / "aot"
    subprocess.run([sys.executable, "-m", "symconv", "compile", "--input", "N,3,12,12",
                    "--weight", "8,3,3,3", "--padding", "1", "--dtype", "float64",
                    "--out", str(out)], check=True, capture_output=True, text=True)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["sympy"] = None
        import numpy as np
        from pathlib import Path
        sys.path.insert(0, {str(out)!r})
        package = next(p for p in Path({str(out)!r}).iterdir() if p.name.startswith("conv2d_N"))
        kernel = __import__(package.name).kernel
        rng = np.random.default_rng(0)
        w, b = rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8)
        for batch in (1, 64):
            x = rng.standard_normal((batch, 3, 12, 12))
            y = kernel.forward(x, w, b)
            np.save(f"{tmp_path}/x{{batch}}.npy", x)
            np.save(f"{tmp_path}/y{{batch}}.npy", y)
        print("served", sorted(m for m in sys.modules if m.startswith("sympy") and sys.modules[m]))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "served []" in result.stdout
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8)
    for batch in (1, 64):
        x = np.load(tmp_path / f"x{batch}.npy")
        expected = oracle.conv_forward(x, w, b, (1, 1), [(1, 1), (1, 1)], (1, 1), 1)
        _check(np.load(tmp_path / f"y{batch}.npy"), expected, "float64", f"AOT N={batch}")


@pytest.mark.parametrize("spec, expected", [
    (ConvSpec((None, 4, 48, 48), (8, 4, 5, 5), padding=2),
     {"forward": "map", "grad_input": "map", "grad_weight": "whole", "grad_bias": "threaded"}),
    (ConvSpec((None, 3, 224, 224), (64, 3, 7, 7), stride=2, padding=3),
     {"forward": "map", "grad_weight": "adding", "grad_bias": "scratch"}),
    (ConvSpec((None, 16, 32, 32), (16, 1, 3, 3), stride=2, padding=1, groups=16),
     {"forward": "map staged", "grad_input": "map staged", "grad_weight": "threaded"}),
], ids=["whole", "adding", "staged"])
def test_each_function_over_a_run_time_batch_has_a_batch_plan(spec, expected):
    """How each function covers its run-time batch is a plan the schedule makes
    (schedule.batch_plan) and explain prints: items side by side, with a staged copy of
    the item where its output can be staged; or summed in order, the small items threading
    inside themselves, the chunks running over the whole batch, the items adding into the
    output or through a scratch array.  (The C of each is checked in the tests above.)"""
    from symconv.codegen import schedule
    plans = compilation(spec, "x86-64-v3").batch_plans
    assert set(plans) == {"forward", "grad_input", "grad_weight", "grad_bias"}
    for name, kind in expected.items():
        plan = plans[name]
        assert (plan.summed or "map") + (" staged" if plan.staged else "") == kind, name
        text = schedule.describe_batch(plan)
        assert ("side by side" in text) == plan.maps and ("staging" in text) == bool(plan.staged)
        assert plan.maps or schedule.BATCH_RUNS[plan.summed] in text
    assert compilation(spec.with_batch(2), "x86-64-v3").batch_plans == {}
