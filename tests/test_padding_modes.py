"""Padding modes reflect, replicate and circular: derived per affine region, any rank."""

from __future__ import annotations

import numpy as np
import pytest

from oracle import conv_backward_mode, conv_forward_mode
from symconv import ConvSpec

MODES = ("reflect", "replicate", "circular")
SHAPES = [
    pytest.param(dict(input_shape=(2, 2, 9), weight_shape=(3, 2, 3), padding=((2, 1),), stride=2),
                 id="1d"),
    pytest.param(dict(input_shape=(1, 2, 6, 7), weight_shape=(3, 2, 3, 2), padding=((2, 1), 1),
                      dilation=(2, 1)), id="2d"),
    pytest.param(dict(input_shape=(1, 2, 5, 4, 6), weight_shape=(2, 1, 3, 3, 2), groups=2,
                      padding=1, stride=(1, 2, 1)), id="3d-groups"),
    pytest.param(dict(input_shape=(1, 1, 4, 4, 3, 4), weight_shape=(2, 1, 2, 3, 2, 3),
                      padding=((1, 0), 1, (1, 1), (0, 2)), dtype="float64"), id="4d"),
]


def arrays(spec, rng):
    x = rng.standard_normal(spec.input_shape).astype(spec.dtype)
    w = rng.standard_normal(spec.weight_shape).astype(spec.dtype)
    b = rng.standard_normal(spec.bias_shape).astype(spec.dtype)
    gy = rng.standard_normal(spec.output_shape).astype(spec.dtype)
    return x, w, b, gy


def close(got, expected, dtype):
    scale = max(1.0, float(np.abs(expected).max()))
    return float(np.abs(got - expected).max()) <= (2e-4 if dtype == "float32" else 1e-11) * scale


# every mode in ranks 1-3; rank 4 by circular alone: each mode's index arithmetic is the
# same on every axis, and the three 4-D float64 packages took over a minute of the suite
CASES = [pytest.param(mode, shape.values[0], id=f"{mode}-{shape.id}")
         for shape in SHAPES for mode in MODES if shape.id != "4d" or mode == "circular"]


@pytest.mark.parametrize("mode, fields", CASES)
def test_padding_mode_against_numpy_pad(mode, fields, compile_spec, rng):
    spec = ConvSpec(**fields, padding_mode=mode)
    kernel = compile_spec(spec)
    x, w, b, gy = arrays(spec, rng)
    args = (spec.stride, spec.padding, spec.dilation, spec.groups, mode)
    assert close(kernel.forward(x, w, b), conv_forward_mode(x, w, b, *args), spec.dtype)
    for got, ref in zip(kernel.backward(x, w, gy), conv_backward_mode(x, w, gy, *args)):
        assert close(got, ref, spec.dtype)


@pytest.mark.parametrize("fields", SHAPES[:3])
@pytest.mark.parametrize("mode", MODES)
def test_padding_mode_against_torch(mode, fields, compile_spec, rng):
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    spec = ConvSpec(**fields, padding_mode=mode)
    kernel = compile_spec(spec)
    x, w, b, gy = arrays(spec, rng)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    pads = [p for lo_hi in reversed(spec.padding) for p in lo_hi]
    conv = getattr(functional, f"conv{spec.rank}d")
    ty = conv(functional.pad(tx, pads, mode=mode), tw, tb, stride=spec.stride,
              dilation=spec.dilation, groups=spec.groups)
    ty.backward(torch.tensor(gy))
    assert close(kernel.forward(x, w, b), ty.detach().numpy(), spec.dtype)
    for got, tensor in zip(kernel.backward(x, w, gy), (tx, tw, tb)):
        assert close(got, tensor.grad.numpy(), spec.dtype)


def test_padding_mode_limits_name_the_field():
    with pytest.raises(ValueError, match="ConvSpec.padding_mode: reflect padding 4 must be less"):
        ConvSpec((1, 1, 4), (1, 1, 3), padding=4, padding_mode="reflect")
    with pytest.raises(ValueError, match="ConvSpec.padding_mode: circular padding 5"):
        ConvSpec((1, 1, 4), (1, 1, 3), padding=5, padding_mode="circular")
    with pytest.raises(ValueError, match="ConvSpec.padding_mode: expected one of"):
        ConvSpec((1, 1, 4), (1, 1, 3), padding=1, padding_mode="mirror")
    assert ConvSpec((1, 1, 4), (1, 1, 3), padding=9, padding_mode="replicate").output_shape[2] == 20


def test_regions_are_terms_of_the_formula():
    from symconv import compiler
    text = compiler.compilation(ConvSpec((1, 1, 6), (1, 1, 3), padding=1, padding_mode="reflect",
                                     bias=False)).formulas()["forward"]["text"]
    assert "input[n, 0, -i0 - k0 + 1]" in text          # the mirrored left edge
    assert "input[n, 0, -i0 - k0 + 11]" in text or "input[n, 0, 11 - i0 - k0]" in text
