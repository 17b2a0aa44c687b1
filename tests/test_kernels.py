"""Compiled kernels against the independent NumPy oracle (and PyTorch where installed)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cases import CASES, make_spec
from oracle import conv_backward, conv_forward
from symconv.kernel import cpu_features
from symconv.package import targets

TOLERANCE = {"float32": 2e-5, "float64": 1e-12}


def assert_close(got, expected, dtype, what):
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = float(np.abs(np.asarray(got, np.float64) - expected).max(initial=0.0)) / scale
    assert err <= TOLERANCE[dtype] * 10, f"{what}: relative error {err:.3g}"


def random_arrays(spec, rng):
    dtype = spec.dtype
    x = rng.standard_normal(spec.input_shape).astype(dtype)
    w = rng.standard_normal(spec.weight_shape).astype(dtype)
    b = rng.standard_normal(spec.bias_shape).astype(dtype) if spec.bias else None
    gy = rng.standard_normal(spec.output_shape).astype(dtype)
    return x, w, b, gy


def oracle_args(spec):
    return spec.stride, spec.padding, spec.dilation, spec.groups


def runnable_variants(kernel):
    """The kernel's package loaded once per instruction-set variant this CPU can run (the
    default package holds AVX-512 and AVX2 code; the loader alone would run only the best)."""
    from symconv.kernel import cpu_features, load
    have = cpu_features()
    return [load(kernel.path, v["target"]) for v in kernel.manifest["build"]["variants"]
            if have is None or set(v["cpu_features"]) <= have]


@pytest.mark.parametrize("fields", CASES)
def test_against_numpy_oracle(fields, compile_spec, rng):
    spec = make_spec(fields)
    x, w, b, gy = random_arrays(spec, rng)
    inputs = [x, w] + ([b] if b is not None else [])
    copies = [a.copy() for a in (*inputs, gy)]
    expected_y = conv_forward(x, w, b, *oracle_args(spec))
    expected = conv_backward(x, w, gy, *oracle_args(spec))
    for kernel in runnable_variants(compile_spec(spec)):
        where = kernel.variant.target
        y = kernel.forward(*inputs)
        assert y.shape == spec.output_shape and y.dtype == np.dtype(spec.dtype)
        assert_close(y, expected_y, spec.dtype, f"{where} forward")
        grads = kernel.backward(x, w, gy)
        assert len(grads) == 3 and (grads[2] is None) == (not spec.bias)
        for name, got, ref in zip(("input", "weight", "bias"), grads, expected):
            if got is None:             # no bias
                continue
            assert got.dtype == np.dtype(spec.dtype)
            assert_close(got, ref, spec.dtype, f"{where} grad_{name}")
        for before, after in zip(copies, (*inputs, gy)):
            np.testing.assert_array_equal(before, after)  # inputs are never written


@pytest.mark.parametrize("fields", [c for c in CASES if len(c.values[0]["input_shape"]) <= 5])
def test_against_torch(fields, compile_spec, rng):
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    spec = make_spec(fields)
    kernel = compile_spec(spec)
    x, w, b, gy = random_arrays(spec, rng)

    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True) if b is not None else None
    pads = [p for lo_hi in reversed(spec.padding) for p in lo_hi]   # F.pad: last dim first
    conv = getattr(functional, f"conv{spec.rank}d")
    ty = conv(functional.pad(tx, pads), tw, tb, stride=spec.stride, dilation=spec.dilation,
              groups=spec.groups)
    ty.backward(torch.tensor(gy))

    assert_close(kernel.forward(*[a for a in (x, w, b) if a is not None]),
                 ty.detach().numpy(), spec.dtype, "forward vs torch")
    grads = kernel.backward(x, w, gy)
    for got, tensor, name in zip(grads, (tx, tw, tb), ("input", "weight", "bias")):
        assert (got is None) == (tensor is None)
        if got is not None:
            assert_close(got, tensor.grad.numpy(), spec.dtype, f"grad_{name} vs torch")


F64_CASES = [c for c in CASES if c.values[0].get("dtype") == "float64"]


@pytest.mark.parametrize("fields", F64_CASES)
def test_adjoint_identity(fields, compile_spec, rng):
    """<J v, u> = <v, Jᵀ u> for each input, J applied by the forward kernel (it is linear in
    each input), Jᵀ by the gradient kernels."""
    spec = make_spec(fields)
    kernel = compile_spec(spec)
    x, w, b, _ = random_arrays(spec, rng)
    u = rng.standard_normal(spec.output_shape)
    zero_b = [np.zeros(spec.bias_shape)] if spec.bias else []

    v = rng.standard_normal(spec.input_shape)
    lhs = np.vdot(kernel.forward(v, w, *zero_b), u)
    rhs = np.vdot(v, kernel.grad_input(w, u))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))

    v = rng.standard_normal(spec.weight_shape)
    lhs = np.vdot(kernel.forward(x, v, *zero_b), u)
    rhs = np.vdot(v, kernel.grad_weight(x, u))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))

    if spec.bias:
        v = rng.standard_normal(spec.bias_shape)
        lhs = np.vdot(kernel.forward(np.zeros(spec.input_shape), w, v), u)
        rhs = np.vdot(v, kernel.grad_bias(u))
        assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


@pytest.mark.parametrize("fields", F64_CASES)
def test_finite_differences(fields, compile_spec, rng):
    """Each gradient element against a central difference of L = Σ gy · forward."""
    spec = make_spec(fields)
    kernel = compile_spec(spec)
    x, w, b, gy = random_arrays(spec, rng)
    inputs = {"input": x, "weight": w, **({"bias": b} if spec.bias else {})}
    grads = dict(zip(inputs, kernel.backward(x, w, gy)))
    eps = 1e-5
    for name, array in inputs.items():
        for flat in rng.choice(array.size, size=min(5, array.size), replace=False):
            at = np.unravel_index(flat, array.shape)
            shifted = []
            for sign in (1, -1):
                moved = {k: v.copy() for k, v in inputs.items()}
                moved[name][at] += sign * eps
                shifted.append(np.vdot(gy, kernel.forward(*moved.values())))
            numeric = (shifted[0] - shifted[1]) / (2 * eps)
            assert abs(numeric - grads[name][at]) <= 1e-6 * max(1.0, abs(numeric)), (name, at)


def test_backward_subsets(compile_spec, rng):
    spec = make_spec(CASES[0].values[0])
    kernel = compile_spec(spec)
    x, w, b, gy = random_arrays(spec, rng)
    full = kernel.backward(x, w, gy)
    only_w = kernel.backward(None, w, gy, wrt=("input",))
    assert only_w[1] is None and only_w[2] is None
    np.testing.assert_array_equal(only_w[0], full[0])
    gw, gb = kernel.backward(x, None, gy, wrt=("weight", "bias"))[1:]
    np.testing.assert_array_equal(gw, full[1])
    np.testing.assert_array_equal(gb, full[2])
    out = np.full(spec.weight_shape, np.nan, np.float32)
    result = kernel.backward(x, w, gy, wrt=("weight",), out={"weight": out})
    assert result[1] is out
    np.testing.assert_array_equal(out, full[1])


def test_a_bias_free_kernel_takes_and_returns_none_for_the_bias(compile_spec, rng):
    """As torch's conv2d(x, w, None): three arguments, three gradients, the last None."""
    from symconv import ConvSpec, ConvTransposeSpec
    for spec in (ConvSpec((2, 3, 7), (4, 3, 3), padding=1, bias=False, dtype="float64"),
                 ConvTransposeSpec((2, 3, 4), (3, 2, 3), stride=2, bias=False,
                                   dtype="float64")):
        kernel = compile_spec(spec)
        assert kernel.arguments == ("input", "weight", "bias") == kernel.gradients
        x, w = rng.standard_normal(spec.input_shape), rng.standard_normal(spec.weight_shape)
        y = kernel.forward(x, w, None)
        np.testing.assert_array_equal(y, kernel.forward(x, w))
        gy = rng.standard_normal(y.shape)
        gx, gw, gb = kernel.backward(x, w, gy)
        assert gb is None
        np.testing.assert_array_equal(gx, kernel.grad_input(w, gy))
        np.testing.assert_array_equal(gw, kernel.grad_weight(x, gy))
        with pytest.raises(TypeError, match="this kernel has no bias"):
            kernel.forward(x, w, np.zeros(y.shape[1]))
        with pytest.raises(ValueError, match="wrt must be a sequence of names"):
            kernel.backward(x, w, gy, wrt=("bias",))


def test_out_argument(compile_spec, rng):
    spec = make_spec(CASES[0].values[0])
    kernel = compile_spec(spec)
    x, w, b, _ = random_arrays(spec, rng)
    out = np.full(spec.output_shape, np.nan, np.float32)
    assert kernel.forward(x, w, b, out=out) is out
    np.testing.assert_array_equal(out, kernel.forward(x, w, b))


def test_calls_from_several_threads_at_once(compile_spec, rng):
    """Kernels keep no state between calls: concurrent calls (the GIL is released inside cffi
    calls) give the results of sequential ones."""
    from concurrent.futures import ThreadPoolExecutor
    spec = make_spec(CASES[11].values[0])
    kernel = compile_spec(spec)
    batches = [random_arrays(spec, np.random.default_rng(seed)) for seed in range(8)]
    expected = [(kernel.forward(x, w, b), *kernel.backward(x, w, gy)) for x, w, b, gy in batches]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda a: (kernel.forward(*a[:3]), *kernel.backward(a[0], a[1], a[3])),
                            batches))
    for g, e in zip(got, expected):
        for a, b in zip(g, e):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fields", [
    dict(input_shape=(2, 3, 9), kernel_size=3),
    dict(input_shape=(2, 2, 7, 6), kernel_size=(3, 2), stride=(2, 1), padding=1),
    dict(input_shape=(1, 2, 5, 6, 7), kernel_size=2, padding=((1, 0), 0, (0, 1)), dtype="float64"),
])
def test_average_pooling_against_torch(fields, cache_dir, rng):
    """Average pooling (count_include_pad) compiled through the same pipeline."""
    torch = pytest.importorskip("torch")
    from symconv import AvgPoolSpec, compile_op
    spec = AvgPoolSpec(**fields)
    kernel = compile_op(spec, cache_dir=cache_dir)
    x = rng.standard_normal(spec.input_shape).astype(spec.dtype)
    gy = rng.standard_normal(spec.output_shape).astype(spec.dtype)
    tx = torch.tensor(x, requires_grad=True)
    pads = [p for lo_hi in reversed(spec.padding) for p in lo_hi]
    pool = getattr(torch.nn.functional, f"avg_pool{spec.rank}d")
    ty = pool(torch.nn.functional.pad(tx, pads), spec.kernel_size, spec.stride)
    ty.backward(torch.tensor(gy))
    assert_close(kernel.forward(x), ty.detach().numpy(), spec.dtype, "avg_pool forward")
    (gx,) = kernel.backward(gy)
    assert_close(gx, tx.grad.numpy(), spec.dtype, "avg_pool grad_input")


THREADED = [  # large enough that forward and the input and weight gradients run on threads
    dict(input_shape=(2, 8, 24, 24), weight_shape=(8, 8, 3, 3), padding=1),
    dict(input_shape=(4, 8, 90, 90), weight_shape=(12, 4, 3, 2), stride=(2, 3), dilation=(2, 1),
         padding=((1, 2), 1), groups=2),
    dict(input_shape=(1, 8, 24, 25, 26), weight_shape=(8, 8, 3, 3, 3), stride=2, padding=1,
         dtype="float64"),
]


@pytest.mark.parametrize("fields", THREADED)
def test_results_do_not_depend_on_the_thread_count(fields, compile_spec, rng, monkeypatch):
    """Bit-identical outputs for 1, 2 and 3 threads, and with SYMCONV_NUM_THREADS."""
    spec = make_spec(fields)
    kernel = compile_spec(spec)
    functions = kernel.source.split("void " + kernel.variant.prefix)[1:]
    for name in ("forward", "grad_input", "grad_weight"):   # else the test proves nothing
        (text,) = [f for f in functions if f.startswith(name + "(")]
        assert "#pragma omp parallel" in text, f"{name} does not run on threads"
    x, w, b, gy = random_arrays(spec, rng)
    inputs = [a for a in (x, w, b) if a is not None]
    reference = [kernel.forward(*inputs, threads=1), *kernel.backward(x, w, gy, threads=1)]
    for threads in (2, 3):
        got = [kernel.forward(*inputs, threads=threads),
               *kernel.backward(x, w, gy, threads=threads)]
        for a, e in zip(got, reference):
            np.testing.assert_array_equal(a, e)
    monkeypatch.setenv("SYMCONV_NUM_THREADS", "2")
    np.testing.assert_array_equal(kernel.forward(*inputs), reference[0])
    monkeypatch.setenv("SYMCONV_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="SYMCONV_NUM_THREADS must be a positive integer"):
        kernel.forward(*inputs)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        kernel.forward(*inputs, threads=0)


def _targets():
    """Single-target packages: x86-64 (plain C) always, AVX2 and AVX-512 where this CPU has
    them, each with the vector type its C must (or must not) use."""
    from symconv.kernel import cpu_features
    have = cpu_features() or set()
    found = [pytest.param("x86-64", None, id="x86-64")]
    if {"avx2", "fma"} <= have:
        found.append(pytest.param("x86-64-v3", "__m256", id="x86-64-v3"))
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= have:
        found.append(pytest.param("x86-64-v4", "__m512", id="x86-64-v4"))
    return found


@pytest.mark.parametrize("target, marker", _targets())
@pytest.mark.parametrize("fields", [c for c in CASES if c.id in (
    "1d-stride3-dil2-coprime", "2d-mixed-stride-dil-asym", "2d-depthwise", "3d-groups-mixed",
    "4d-strided-dilated", "2d-same-stride2-f64", "2d-stride2-pad1", "3d-basic",
    "1d-depthwise-f64")])
def test_other_targets(fields, target, marker, cache_dir, rng):
    """Packages built for one instruction set give the oracle's results."""
    from symconv.compiler import compile_op
    spec = make_spec(fields)
    kernel = compile_op(spec, cache_dir=cache_dir, target=target)
    assert kernel.manifest["build"]["target"] == target
    assert [v["source"] for v in kernel.manifest["build"]["variants"]] == ["kernels.c"]
    for vector in ("__m256", "__m512"):
        assert (vector in kernel.source) == (vector == marker)
    x, w, b, gy = random_arrays(spec, rng)
    args = oracle_args(spec)
    assert_close(kernel.forward(*[a for a in (x, w, b) if a is not None]),
                 conv_forward(x, w, b, *args), spec.dtype, "forward")
    for name, got, ref in zip(("input", "weight", "bias"), kernel.backward(x, w, gy),
                              conv_backward(x, w, gy, *args)):
        if got is not None or spec.bias:
            assert_close(got, ref, spec.dtype, f"grad_{name}")


@pytest.mark.skipif(not set(targets.TARGET_FEATURES["x86-64-v3"]) <= (cpu_features() or set()),
                    reason="two x86-64 variants, of which the CPU runs at least AVX2")
def test_default_package_runs_the_best_variant_the_cpu_has(cache_dir, monkeypatch, rng):
    """AVX-512 and AVX2 code in one package (the default target on x86-64 with AVX2): the
    loader picks AVX-512 where the CPU has it and AVX2 where it does not; a named variant
    loads if the CPU can run it."""
    from symconv import kernel as runtime
    from symconv.compiler import compile_conv
    from symconv.kernel import PackageError, load
    spec = make_spec(CASES[0].values[0])
    kernel = compile_conv(spec, cache_dir=cache_dir, target="x86-64-v4,x86-64-v3")
    variants = kernel.manifest["build"]["variants"]
    assert [v["target"] for v in variants] == ["x86-64-v4", "x86-64-v3"]    # the manifest's
    assert [v["isa"] for v in variants] == ["avx512", "avx2"]
    assert kernel.manifest["build"]["cpu_features"] == variants[-1]["cpu_features"]
    have = runtime.cpu_features()
    best = "x86-64-v4" if set(variants[0]["cpu_features"]) <= have else "x86-64-v3"
    assert kernel.variant.target == best
    assert ("__m512" in kernel.source) == (best == "x86-64-v4")

    avx2_only = frozenset(have - {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"})
    monkeypatch.setattr(runtime, "cpu_features", lambda: avx2_only)
    older = load(kernel.path)
    assert older.variant.target == "x86-64-v3" and "__m512" not in older.source
    x, w, b, gy = random_arrays(spec, rng)
    inputs = [a for a in (x, w, b) if a is not None]
    assert_close(older.forward(*inputs), conv_forward(x, w, b, *oracle_args(spec)), spec.dtype,
                 "forward")
    with pytest.raises(PackageError, match="variant x86-64-v4 needs CPU features this CPU "
                                           "lacks: avx512"):
        load(kernel.path, variant="x86-64-v4")
    with pytest.raises(PackageError, match="has no variant 'x86-64'; it was built for "
                                           "x86-64-v4, x86-64-v3"):
        load(kernel.path, variant="x86-64")


def test_padded_reads_split_into_edge_and_interior_bands():
    """A masked block's loop over a padded read's position runs in three bands; in the middle
    one every lane reads inside the array, so the read's mask is hoisted (no per-position
    compare).  The C says so, and the kernel still matches the oracle."""
    from symconv import ConvSpec, compiler
    text = compiler.compilation(ConvSpec((None, 2, 40), (3, 2, 9), padding=4),
                                "x86-64-v3").source.text
    grad_weight = text[text.index("grad_weight(const"):]
    assert "sc_band0_lo" in grad_weight
    interior = grad_weight[grad_weight.index("= sc_band0_lo; i_i0 <= sc_band0_hi"):]
    assert re.search(r"const __m256i sc_l0_\d+_\d+_0 = sc_valid0;", interior.split("}")[0])


@pytest.mark.parametrize("length, padding, dilation", [
    (1, 4, 1), (5, 4, 1), (8, 4, 1), (9, 4, 1), (17, 4, 1), (23, ((0, 8),), 1), (30, 7, 2)])
def test_band_edges_against_oracle(length, padding, dilation, compile_spec, rng):
    """Lengths around the block's span (no interior band, one position of it, several) with
    padding on one side, both sides, and dilated taps."""
    from symconv import ConvSpec
    spec = ConvSpec((2, 3, length), (4, 3, 9), padding=padding, dilation=dilation,
                    dtype="float64")
    x, w, b, gy = random_arrays(spec, rng)
    expected = conv_backward(x, w, gy, *oracle_args(spec))
    for kernel in runnable_variants(compile_spec(spec)):
        assert_close(kernel.forward(x, w, b), conv_forward(x, w, b, *oracle_args(spec)),
                     spec.dtype, "forward")
        for got, want, what in zip(kernel.backward(x, w, gy), expected,
                                   ("grad_input", "grad_weight", "grad_bias")):
            assert_close(got, want, spec.dtype, what)
