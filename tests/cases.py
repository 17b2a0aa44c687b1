"""Convolution cases shared by the tests: every rank, every parameter and edge case."""

from __future__ import annotations

import pytest

from symconv import ConvSpec


def case(id_, **fields):
    return pytest.param(fields, id=id_)


CASES = [
    # rank 1
    case("1d-basic", input_shape=(2, 3, 10), weight_shape=(4, 3, 3), padding=1),
    case("1d-stride2-dil2-asym", input_shape=(2, 2, 13), weight_shape=(3, 2, 3), stride=2,
         dilation=2, padding=((2, 1),)),
    case("1d-stride3-dil2-coprime", input_shape=(1, 2, 17), weight_shape=(2, 2, 4), stride=3,
         dilation=2, padding=((1, 3),)),
    case("1d-stride-gt-kernel", input_shape=(2, 2, 11), weight_shape=(3, 2, 2), stride=4),
    case("1d-pad-gt-reach", input_shape=(1, 2, 4), weight_shape=(2, 2, 3), padding=((5, 4),)),
    case("1d-out-size-1", input_shape=(2, 3, 5), weight_shape=(2, 3, 5), dtype="float64"),
    case("1d-input-equals-dilated-kernel", input_shape=(1, 2, 7), weight_shape=(3, 2, 3),
         dilation=3),
    case("1d-kernel-1", input_shape=(2, 4, 6), weight_shape=(5, 4, 1), stride=2),
    case("1d-same-stride3", input_shape=(2, 2, 10), weight_shape=(2, 2, 4), stride=3,
         padding="same"),
    case("1d-groups2-nobias", input_shape=(2, 4, 9), weight_shape=(6, 2, 3), groups=2,
         padding=1, bias=False),
    case("1d-depthwise-f64", input_shape=(2, 3, 8), weight_shape=(3, 1, 3), groups=3,
         padding="same", dtype="float64"),
    # rank 2
    case("2d-basic", input_shape=(2, 3, 8, 7), weight_shape=(4, 3, 3, 3), padding=1),
    case("2d-stride2-pad1", input_shape=(2, 3, 9, 8), weight_shape=(5, 3, 3, 3), stride=2,
         padding=1),
    case("2d-mixed-stride-dil-asym", input_shape=(1, 2, 9, 11), weight_shape=(3, 2, 3, 2),
         stride=(2, 3), dilation=(2, 1), padding=((2, 0), (1, 2))),
    case("2d-same-stride2-f64", input_shape=(2, 2, 7, 6), weight_shape=(3, 2, 3, 2), stride=2,
         padding="same", dtype="float64"),
    case("2d-depthwise", input_shape=(2, 4, 6, 6), weight_shape=(4, 1, 3, 3), groups=4,
         padding=1),
    case("2d-depthwise-multiplier", input_shape=(1, 2, 6, 5), weight_shape=(6, 1, 3, 3),
         groups=2, padding=(1, 0), bias=False),
    case("2d-kernel1-stride2", input_shape=(2, 6, 5, 5), weight_shape=(3, 6, 1, 1), stride=2),
    case("2d-pad-gt-reach", input_shape=(1, 1, 3, 3), weight_shape=(2, 1, 2, 2),
         padding=((4, 3), (3, 4)), stride=(1, 2)),
    case("2d-out-1x1", input_shape=(2, 2, 4, 5), weight_shape=(3, 2, 4, 5), dtype="float64"),
    case("2d-groups-same-f64", input_shape=(1, 4, 5, 4), weight_shape=(4, 2, 3, 2), groups=2,
         padding="same", dtype="float64"),
    # rank 3
    case("3d-basic", input_shape=(2, 2, 5, 6, 4), weight_shape=(3, 2, 3, 3, 3), padding=1),
    case("3d-stride2-pad1", input_shape=(1, 3, 7, 6, 6), weight_shape=(4, 3, 3, 3, 3), stride=2,
         padding=1),
    case("3d-dil2-same-f64", input_shape=(1, 2, 6, 5, 5), weight_shape=(2, 2, 3, 2, 3),
         dilation=2, padding="same", dtype="float64"),
    case("3d-groups-mixed", input_shape=(2, 4, 5, 6, 5), weight_shape=(4, 2, 2, 3, 1),
         groups=2, stride=(1, 2, 3), padding=((1, 0), (0, 2), (1, 1)), bias=False),
    case("3d-stride-gt-kernel", input_shape=(1, 2, 9, 9, 9), weight_shape=(2, 2, 2, 2, 2),
         stride=4, padding=((0, 1), (1, 0), (2, 2))),
    # rank 4
    case("4d-basic", input_shape=(1, 2, 5, 4, 4, 3), weight_shape=(3, 2, 3, 2, 3, 2), padding=1),
    case("4d-strided-dilated", input_shape=(2, 2, 7, 6, 5, 5), weight_shape=(2, 2, 2, 3, 2, 2),
         stride=(2, 1, 2, 3), dilation=(3, 1, 2, 1), padding=((1, 2), 0, (0, 1), 1)),
    case("4d-groups-f64", input_shape=(1, 4, 4, 4, 3, 3), weight_shape=(2, 2, 2, 2, 2, 2),
         groups=2, padding="same", dtype="float64"),
    # rank 5
    case("5d-strided", input_shape=(1, 2, 4, 5, 4, 3, 4), weight_shape=(2, 2, 2, 3, 2, 2, 3),
         stride=(2, 1, 1, 2, 1), padding=1),
]

# Cases the fuzzers (tests/test_property.py, scripts/fuzz.py) once failed, shrunk: each runs on
# every build target inside guard regions (test_property.py::test_regressions_on_every_target).
REGRESSIONS = [
    # GCC 12.2's SLP vectorizer at -O3 -march=x86-64-v4 miscompiled this scalar input gradient
    # (grad_input[0, 1, 0:2] wrong); the build turns it off (-fno-tree-slp-vectorize).
    case("slp-avx512-grouped-f64", input_shape=(1, 4, 3), weight_shape=(2, 2, 3), groups=2,
         padding=1, bias=False, dtype="float64"),
    # A weight tap whose input column lies wholly in the padding (k1 = 0 reads column -1): the
    # reduction-lane code's "no plain vectors" sentinel INT64_MAX / 2 was multiplied by the
    # vector width, overflowed, and ran one unmasked vector at i0 = -W, reading before both
    # arrays (grad_weight NaN from the guard region; undefined behaviour).
    case("reduction-lanes-tap-wholly-in-padding", input_shape=(1, 1, 3, 1),
         weight_shape=(1, 1, 1, 1), stride=(1, 2), padding=((0, 1), (1, 0)), bias=False,
         dtype="float64"),
    case("reduction-lanes-tap-wholly-in-padding-f32", input_shape=(1, 1, 15, 1),
         weight_shape=(1, 1, 1, 1), stride=(1, 2), padding=((0, 1), (1, 0)), bias=False),
    # Output lanes stored with a stride (grad_input of a dilated kernel): AVX-512 code went
    # through a stack array that GCC stored with an aligned vmovapd it had not aligned, which
    # ASan caught as a fault; such stores are now one AVX-512 scatter.
    case("strided-output-lanes-avx512", input_shape=(2, 3, 7), weight_shape=(3, 3, 3),
         dilation=2, padding_mode="circular", dtype="float64"),
]


def make_spec(fields) -> ConvSpec:
    return ConvSpec(**fields)
