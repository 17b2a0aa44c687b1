"""Bad arrays and bad calls: a clear Python exception naming the problem, never a crash."""

from __future__ import annotations

import numpy as np
import pytest

from symconv import ConvSpec

SPEC = ConvSpec((2, 3, 6, 5), (4, 3, 3, 3), padding=1)


@pytest.fixture(scope="module")
def kernel(compile_spec):
    return compile_spec(SPEC)


@pytest.fixture
def arrays(rng):
    x = rng.standard_normal(SPEC.input_shape).astype(np.float32)
    w = rng.standard_normal(SPEC.weight_shape).astype(np.float32)
    b = rng.standard_normal(SPEC.bias_shape).astype(np.float32)
    gy = rng.standard_normal(SPEC.output_shape).astype(np.float32)
    return x, w, b, gy


def misaligned(shape, dtype=np.float32):
    raw = np.zeros(int(np.prod(shape)) * np.dtype(dtype).itemsize + 1, np.uint8)
    array = raw[1:].view(dtype).reshape(shape)
    assert not array.flags.aligned
    return array


@pytest.mark.parametrize("make, error, fragment", [
    (lambda x: x[:1], ValueError, "input has shape (1, 3, 6, 5), expected (2, 3, 6, 5)"),
    (lambda x: x[0], ValueError, "input has shape (3, 6, 5)"),
    (lambda x: x.astype(np.float64), TypeError, "input has dtype float64, expected float32"),
    (lambda x: x.astype(np.int32), TypeError, "dtype int32"),
    (lambda x: x.tolist(), TypeError, "input must be a numpy.ndarray, got list"),
    (lambda x: np.asfortranarray(x), ValueError, "not C-contiguous"),
    (lambda x: np.concatenate([x, x], axis=3)[..., ::2], ValueError, "not C-contiguous"),
    (lambda x: x[:, :, ::-1, :], ValueError, "not C-contiguous"),
    (lambda x: misaligned(x.shape), ValueError, "not aligned"),
    (lambda x: None, TypeError, "input must be a numpy.ndarray, got NoneType"),
])
def test_bad_input_array(kernel, arrays, make, error, fragment):
    x, w, b, _ = arrays
    with pytest.raises(error) as info:
        kernel.forward(make(x), w, b)
    assert fragment in str(info.value) and str(info.value).startswith("forward:")


def test_read_only_inputs_are_fine(kernel, arrays):
    x, w, b, _ = arrays
    expected = kernel.forward(x, w, b)
    for a in (x, w, b):
        a.flags.writeable = False
    np.testing.assert_array_equal(kernel.forward(x, w, b), expected)


@pytest.mark.parametrize("make, error, fragment", [
    (lambda y: y[:1], ValueError, "out (output) has shape"),
    (lambda y: y.astype(np.float64), TypeError, "out (output) has dtype float64"),
    (lambda y: np.asfortranarray(y), ValueError, "out (output) is not C-contiguous"),
    (lambda y: misaligned(y.shape), ValueError, "out (output) is not aligned"),
    (lambda y: np.frombuffer(y.tobytes(), np.float32).reshape(y.shape), ValueError, "read-only"),
])
def test_bad_out_array(kernel, arrays, make, error, fragment):
    x, w, b, gy = arrays
    with pytest.raises(error) as info:
        kernel.forward(x, w, b, out=make(np.empty(SPEC.output_shape, np.float32)))
    assert fragment in str(info.value)


def test_out_overlapping_an_input_is_refused(compile_spec, rng):
    spec = ConvSpec((1, 2, 5), (2, 2, 1), bias=False)       # output shape == input shape
    kernel = compile_spec(spec)
    x = rng.standard_normal(spec.input_shape).astype(np.float32)
    w = rng.standard_normal(spec.weight_shape).astype(np.float32)
    with pytest.raises(ValueError, match="out overlaps the input input"):
        kernel.forward(x, w, out=x)
    # views of one buffer: the input and out each a slice, partly overlapping
    shared = np.zeros(2 * x.size, np.float32)
    view_x = shared[:x.size].reshape(x.shape)
    view_x[...] = x
    with pytest.raises(ValueError, match="out overlaps the input input"):
        kernel.forward(view_x, w, out=shared[x.size // 2:x.size // 2 + x.size].reshape(x.shape))
    # out sharing one element with the weight
    w_buffer = np.zeros(w.size + x.size, np.float32)
    view_w = w_buffer[:w.size].reshape(w.shape)
    view_w[...] = w
    with pytest.raises(ValueError, match="out overlaps the input weight"):
        kernel.forward(x, view_w, out=w_buffer[w.size - 1:w.size - 1 + x.size].reshape(x.shape))
    # an owned input and a view out of another buffer do not overlap: accepted
    other = np.zeros(2 * x.size, np.float32)
    kernel.forward(x, w, out=other[x.size:].reshape(x.shape))


def test_wrong_number_of_arrays(kernel, arrays):
    x, w, b, gy = arrays
    with pytest.raises(TypeError, match=r"forward takes 3 arrays \(input, weight, bias\), got 2"):
        kernel.forward(x, w)
    with pytest.raises(TypeError, match=r"backward takes 3 arrays \(input, weight, grad_output\)"):
        kernel.backward(x, gy)


def test_backward_argument_errors(kernel, arrays):
    x, w, b, gy = arrays
    with pytest.raises(ValueError, match="wrt must be a sequence of names"):
        kernel.backward(x, w, gy, wrt=("inputs",))
    with pytest.raises(ValueError, match="wrt must be a sequence of names"):
        kernel.backward(x, w, gy, wrt="input")
    with pytest.raises(TypeError, match="the gradient for weight needs input"):
        kernel.backward(None, w, gy, wrt=("weight",))
    with pytest.raises(ValueError, match="out given for"):
        kernel.backward(x, w, gy, wrt=("input",), out={"weight": np.empty_like(w)})
    with pytest.raises(ValueError, match="grad_output has shape"):
        kernel.backward(x, w, gy[:, :2])


def test_unknown_function_attribute(kernel):
    with pytest.raises(AttributeError, match="no attribute or function 'grad_foo'"):
        kernel.grad_foo


def test_nan_and_inf_propagate(kernel, arrays):
    x, w, b, _ = arrays
    x = x.copy()
    x[0, 0, 2, 2] = np.nan
    x[1, 1, 0, 0] = np.inf
    y = kernel.forward(x, w, b)
    assert np.isnan(y[0, :, 1:4, 1:4]).all()          # every output that reads the NaN
    assert not np.isnan(y[0, :, 5, :]).any()
    assert not np.isfinite(y[1, :, 0:2, 0:2]).any()


def test_inf_weights_meet_padding_like_the_definition(kernel, arrays):
    """Zero padding takes part in the sum: an infinite weight times a padded zero is NaN, as in
    the textbook definition (the oracle) and in PyTorch."""
    from oracle import conv_forward, conv_backward
    x, w, b, gy = arrays
    w = w.copy()
    w[1, 2, 0, 0] = np.inf
    args = (SPEC.stride, SPEC.padding, SPEC.dilation, SPEC.groups)
    with np.errstate(invalid="ignore"):
        expected = conv_forward(x, w, b, *args)
        expected_gx = conv_backward(x, w, gy, *args)[0]
    y = kernel.forward(x, w, b)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    assert np.isnan(y[:, 1, 0, :]).all() and np.isnan(y[:, 1, :, 0]).all()
    np.testing.assert_array_equal(np.isnan(kernel.grad_input(w, gy)), np.isnan(expected_gx))


def test_inf_grad_output_meets_padding_in_the_weight_gradient(compile_spec):
    """grad_weight[o, c, 1] = grad_output · (padded zero) = inf · 0 = NaN by the definition.
    (The oracle once computed this with BLAS, which skips zeros and gave 0; found by the
    fuzzer, scripts/fuzz.py seed 2116.)"""
    from oracle import conv_backward
    spec = ConvSpec((1, 1, 2), (2, 1, 2), dilation=2, padding=((0, 1),), bias=False)
    kernel = compile_spec(spec)
    x = np.array([[[1.0, 2.0]]], np.float32)
    gy = np.array([[[np.inf], [1.0]]], np.float32)
    with np.errstate(invalid="ignore"):
        expected = conv_backward(x, np.zeros(spec.weight_shape), gy, spec.stride, spec.padding,
                                 spec.dilation, spec.groups)[1]
    got = kernel.grad_weight(x, gy)
    np.testing.assert_array_equal(expected.ravel(), [np.inf, np.nan, 1.0, 0.0])
    np.testing.assert_array_equal(got, expected.astype(np.float32))


@pytest.mark.parametrize("make, error, fragment", [
    (lambda x: np.empty((0,) + x.shape[1:], np.float32), ValueError,
     "input has shape (0, 3, 6, 5), expected (2, 3, 6, 5)"),
    (lambda x: np.empty((2, 3, 0, 5), np.float32), ValueError, "input has shape (2, 3, 0, 5)"),
    (lambda x: np.empty(0, np.float32), ValueError, "input has shape (0,)"),
    (lambda x: np.float32(1.0), TypeError, "must be a numpy.ndarray, got float32"),
    (lambda x: np.broadcast_to(np.float32(0), (2**40, 3, 6, 5)), ValueError,
     "input has shape (1099511627776, 3, 6, 5)"),
    (lambda x: np.broadcast_to(np.float32(0), x.shape), ValueError, "not C-contiguous"),
    (lambda x: np.ma.masked_less(x, 0), TypeError, "input is a masked array"),
    (lambda x: x.view(np.int32), TypeError, "dtype int32"),
    (lambda x: x.astype(np.complex64), TypeError, "dtype complex64"),
    (lambda x: x.astype(">f4"), TypeError, "dtype >f4"),
    (lambda x: np.lib.stride_tricks.as_strided(x, strides=(0,) + x.strides[1:]), ValueError,
     "not C-contiguous"),
])
def test_degenerate_and_huge_inputs(kernel, arrays, make, error, fragment):
    """Zero-size arrays (specs have positive sizes), huge ones (refused by their shape before
    anything is allocated: a broadcast view of 2**40 rows costs nothing), masked and
    byte-swapped arrays: each a clear error."""
    x, w, b, _ = arrays
    with pytest.raises(error) as info:
        kernel.forward(make(x), w, b)
    assert fragment in str(info.value)


def test_out_that_is_not_an_array(kernel, arrays):
    x, w, b, _ = arrays
    with pytest.raises(TypeError, match=r"out \(output\) must be a numpy.ndarray, got list"):
        kernel.forward(x, w, b, out=[0.0] * 10)


def test_zero_size_specs_are_refused():
    for fields in (dict(input_shape=(0, 3, 5), weight_shape=(2, 3, 3)),
                   dict(input_shape=(1, 3, 0), weight_shape=(2, 3, 1)),
                   dict(input_shape=(1, 3, 5), weight_shape=(0, 3, 3))):
        with pytest.raises(ValueError, match="every size must be positive"):
            ConvSpec(**fields)


def test_specs_whose_arrays_no_machine_can_index_are_refused(tmp_path):
    """An array of 2**63 bytes or more, whose int64 offsets in the C would wrap: an IRError
    naming it (its public shape; per item over a run-time batch) before any C is written;
    one just under the limit is defined."""
    from symconv import compile_conv
    from symconv.errors import IRError
    from symconv.symbolic.define import definition
    definition(ConvSpec((1, 1, 2**60), (1, 1, 3)))                  # 2**62 bytes
    for spec, shape in [(ConvSpec((2, 1, 2**60), (1, 1, 3)), (2, 1, 2**60)),
                        (ConvSpec((1, 1, 2**60), (1, 1, 3), dtype="float64"), (1, 1, 2**60)),
                        (ConvSpec((None, 3, 10**10, 10**10), (4, 3, 3, 3)),
                         (None, 3, 10**10, 10**10))]:
        with pytest.raises(IRError) as info:
            compile_conv(spec, cache_dir=tmp_path)
        assert f"input of shape {shape}" in str(info.value)
        assert "under 2**63 bytes" in str(info.value)
        assert ("per item" in str(info.value)) == (spec.input_shape[0] is None)
    assert [p.parent.name for p in tmp_path.rglob("*") if p.is_file()] == [".locks"] * 3


@pytest.mark.parametrize("threads", [256, 10**6, 2**40])
def test_absurd_thread_counts_run_like_one_thread(compile_spec, rng, threads, monkeypatch):
    """OpenMP crashes when asked for a million threads and cffi cannot pass 2**40 as an int:
    counts above kernel.MAX_THREADS run with that many (results never depend on the count)."""
    spec = ConvSpec((2, 8, 40, 41), (8, 8, 3, 3), padding=1)     # large enough to run threaded
    kernel = compile_spec(spec)
    x = rng.standard_normal(spec.input_shape).astype(np.float32)
    w = rng.standard_normal(spec.weight_shape).astype(np.float32)
    b = rng.standard_normal(spec.bias_shape).astype(np.float32)
    expected = kernel.forward(x, w, b, threads=1)
    np.testing.assert_array_equal(kernel.forward(x, w, b, threads=threads), expected)
    monkeypatch.setenv("SYMCONV_NUM_THREADS", str(threads))
    np.testing.assert_array_equal(kernel.forward(x, w, b), expected)
