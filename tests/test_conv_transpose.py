"""Transposed convolution: the input gradient of a convolution, as its own differentiable op."""

from __future__ import annotations

import numpy as np
import pytest

from oracle import conv_backward
from symconv import ConvTransposeSpec
from symconv.compiler import compile_op

CASES = [
    pytest.param(dict(input_shape=(2, 3, 7), weight_shape=(3, 2, 3), stride=2, padding=1,
                      output_padding=1), id="1d-stride2-outpad"),
    pytest.param(dict(input_shape=(1, 4, 5, 4), weight_shape=(4, 1, 3, 2), stride=(2, 3),
                      padding=((1, 1), (0, 0)), dilation=(1, 2), groups=2, output_padding=(1, 2)),
                 id="2d-groups-dilated"),
    pytest.param(dict(input_shape=(1, 2, 3, 4, 3), weight_shape=(2, 3, 2, 3, 2), stride=2,
                      padding=1, dtype="float64"), id="3d-f64"),
    pytest.param(dict(input_shape=(2, 2, 5, 5), weight_shape=(2, 2, 3, 3), stride=1, padding=1,
                      bias=False), id="2d-stride1-nobias"),
]


def close(got, expected, dtype):
    scale = max(1.0, float(np.abs(expected).max()))
    return float(np.abs(got - expected).max()) <= (2e-4 if dtype == "float32" else 1e-11) * scale


def arrays(spec, rng):
    x = rng.standard_normal(spec.input_shape).astype(spec.dtype)
    w = rng.standard_normal(spec.weight_shape).astype(spec.dtype)
    b = rng.standard_normal(spec.bias_shape).astype(spec.dtype) if spec.bias else None
    gy = rng.standard_normal(spec.output_shape).astype(spec.dtype)
    return x, w, b, gy


@pytest.mark.parametrize("fields", CASES)
def test_against_torch(fields, cache_dir, rng):
    torch = pytest.importorskip("torch")
    spec = ConvTransposeSpec(**fields)
    kernel = compile_op(spec, cache_dir=cache_dir)
    x, w, b, gy = arrays(spec, rng)
    inputs = [a for a in (x, w, b) if a is not None]
    tensors = [torch.tensor(a, requires_grad=True) for a in inputs]
    transpose = getattr(torch.nn.functional, f"conv_transpose{spec.rank}d")
    ty = transpose(*tensors, *([None] if b is None else []), stride=spec.stride,
                   padding=[lo for lo, _ in spec.padding], output_padding=spec.output_padding,
                   dilation=spec.dilation, groups=spec.groups)
    assert tuple(ty.shape) == spec.output_shape
    ty.backward(torch.tensor(gy))
    assert close(kernel.forward(*inputs), ty.detach().numpy(), spec.dtype)
    for got, tensor in zip(kernel.backward(x, w, gy), tensors):
        assert close(got, tensor.grad.numpy(), spec.dtype)


@pytest.mark.parametrize("fields", CASES[:2])
def test_forward_is_the_input_gradient_of_the_adjoint(fields, cache_dir, rng):
    """conv_transpose(x, w) equals the oracle's convolution input gradient with gy = x."""
    spec = ConvTransposeSpec(**fields, )
    kernel = compile_op(spec, cache_dir=cache_dir)
    x, w, b, _ = arrays(spec, rng)
    adjoint = spec.adjoint
    expected = conv_backward(np.zeros(adjoint.input_shape), w, x, adjoint.stride, adjoint.padding,
                             adjoint.dilation, adjoint.groups)[0]
    expected += b.reshape(1, -1, *(1,) * spec.rank)
    assert close(kernel.forward(x, w, b), expected, spec.dtype)


@pytest.mark.parametrize("fields, fragment", [
    (dict(input_shape=(1, 2, 5), weight_shape=(3, 2, 3)), "weight_shape: dim 0 must be"),
    (dict(input_shape=(1, 2, 5), weight_shape=(2, 2, 3), stride=2, output_padding=2),
     "output_padding: each entry must be smaller than the stride"),
    (dict(input_shape=(1, 2, 2), weight_shape=(2, 2, 1), padding=2), "padding: leaves no output"),
    (dict(input_shape=(1, 3, 5), weight_shape=(3, 2, 3), groups=2), "groups: input channels 3"),
])
def test_invalid_transposed_specs(fields, fragment):
    with pytest.raises(ValueError, match=f"ConvTransposeSpec.{fragment}"):
        ConvTransposeSpec(**fields)


def test_compile_conv_takes_every_spec_kind(cache_dir):
    from symconv import AvgPoolSpec, compile_conv
    transposed = ConvTransposeSpec(input_shape=(1, 2, 4), weight_shape=(2, 3, 3), stride=2)
    assert compile_conv(transposed) is compile_op(transposed)      # one cached kernel
    assert compile_conv(AvgPoolSpec((1, 2, 6), kernel_size=2)).forward(
        np.ones((1, 2, 6), np.float32)).shape == (1, 2, 3)
    with pytest.raises(TypeError, match="compile_conv takes a spec"):
        compile_conv({"input_shape": (1, 2, 4)})
