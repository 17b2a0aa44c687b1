"""ConvSpec: normalisation, output shapes, FLOPs, keys and errors that name the field."""

from __future__ import annotations

import numpy as np
import pytest

from oracle import output_size, same_padding
from symconv import ConvSpec


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5])
def test_output_shape_every_rank(rank):
    spatial = tuple(range(7, 7 + rank))
    spec = ConvSpec((2, 4, *spatial), (6, 2, *(3,) * rank), stride=2, padding=1, dilation=1,
                    groups=2)
    expected = [output_size(n, 3, 2, 1, 1, 1) for n in spatial]
    assert spec.output_shape == (2, 6, *expected)
    assert spec.rank == rank and spec.kernel_size == (3,) * rank
    assert spec.flops == 2 * 2 * 6 * np.prod(expected) * 2 * 3 ** rank


def test_normalised_fields():
    spec = ConvSpec((1, 3, 8, 9), (4, 3, 3, 2), stride=(2, 1), padding=((1, 0), 2), dilation=2)
    assert spec.stride == (2, 1) and spec.dilation == (2, 2)
    assert spec.padding == ((1, 0), (2, 2))
    assert spec.bias_shape == (4,)
    assert ConvSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_same_padding_matches_definition(stride):
    spec = ConvSpec((1, 1, 10, 7), (1, 1, 4, 3), stride=stride, dilation=(1, 2), padding="same")
    assert [list(p) for p in spec.padding] == [list(p) for p in same_padding((10, 7), (4, 3),
                                                                            (stride,) * 2, (1, 2))]
    assert spec.output_shape[2:] == (-(-10 // stride), -(-7 // stride))


def test_valid_padding_and_equivalent_specs_share_a_key():
    explicit = ConvSpec((1, 1, 10), (1, 1, 3), padding=((1, 1),))
    same = ConvSpec((1, 1, 10), (1, 1, 3), padding="same")
    assert explicit == same and explicit.key == same.key
    assert ConvSpec((1, 1, 10), (1, 1, 3), padding="valid").padding == ((0, 0),)
    assert ConvSpec((1, 1, 10), (1, 1, 3), stride=2).key != explicit.key


def test_key_is_stable_across_processes():
    import subprocess
    import sys
    code = "from symconv import ConvSpec; print(ConvSpec((2,3,9,9),(4,3,3,3),stride=2).key)"
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
            for seed in ("1", "2")}
    assert len(keys) == 1


def test_numpy_arrays_are_sequences_not_ints():
    spec = ConvSpec((1, 2, 9, 9), (2, 2, 3, 3), stride=np.array([2, 1]), padding=np.array([1, 0]))
    assert spec.stride == (2, 1) and spec.padding == ((1, 1), (0, 0))


def test_numpy_integers_are_accepted():
    spec = ConvSpec(np.array([1, 2, 5]), (np.int64(3), 2, 3), stride=np.int32(2))
    assert spec.input_shape == (1, 2, 5) and spec.stride == (2,)


@pytest.mark.parametrize("fields, field, fragment", [
    (dict(input_shape=(1, 2, 5), weight_shape=(3, 2, 7)), "weight_shape", "larger than the padded"),
    (dict(input_shape=(1, 3, 5), weight_shape=(3, 1, 3), groups=2), "groups", "not divisible"),
    (dict(input_shape=(1, 4, 5), weight_shape=(3, 2, 3), groups=2), "groups",
     "output channels 3"),
    (dict(input_shape=(1, 4, 5), weight_shape=(4, 4, 3), groups=2), "weight_shape",
     "input channels // groups"),
    (dict(input_shape=(1, 0, 5), weight_shape=(3, 0, 3)), "input_shape", "positive"),
    (dict(input_shape=(1, 2), weight_shape=(3, 2)), "input_shape", "at least 3 dims"),
    (dict(input_shape=(1, 2, 5, 5), weight_shape=(3, 2, 3)), "weight_shape", "4 dims"),
    (dict(input_shape=(1, 2, 5), weight_shape=(3, 2, 3), stride=0), "stride", ">= 1"),
    (dict(input_shape=(1, 2, 5), weight_shape=(3, 2, 3), stride=(1, 1)), "stride", "1 ints"),
    (dict(input_shape=(1, 2, 5), weight_shape=(3, 2, 3), dilation=1.5), "dilation", "an int"),
    (dict(input_shape=(1, 2, 5), weight_shape=(3, 2, 3), padding=-1), "padding", "non-negative"),
    (dict(input_shape=(1, 2, 5), weight_shape=(3, 2, 3), padding="full"), "padding", "'same'"),
    (dict(input_shape=(1, 2, 5), weight_shape=(3, 2, 3), padding=((1, 2, 3),)), "padding",
     "(lo, hi) pair"),
    (dict(input_shape=(1, 2, 5), weight_shape=(3, 2, 3), groups=0), "groups", "positive"),
    (dict(input_shape=(1, 2, 5), weight_shape=(3, 2, 3), bias="yes"), "bias", "True or False"),
    (dict(input_shape=(1, 2, 5), weight_shape=(3, 2, 3), dtype="float16"), "dtype", "float32"),
    (dict(input_shape=(1, 2.0, 5), weight_shape=(3, 2, 3)), "input_shape", "positive ints"),
])
def test_invalid_specs_name_the_field(fields, field, fragment):
    with pytest.raises(ValueError) as info:
        ConvSpec(**fields)
    assert f"ConvSpec.{field}" in str(info.value) and fragment in str(info.value)


def test_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(ValueError, match="unknown field"):
        ConvSpec.from_dict({"input_shape": [1, 1, 4], "weight_shape": [1, 1, 3], "strides": 2})
    with pytest.raises(ValueError, match="weight_shape: missing"):
        ConvSpec.from_dict({"input_shape": [1, 1, 4]})


def test_spec_is_frozen_and_hashable():
    spec = ConvSpec((1, 1, 4), (1, 1, 3))
    with pytest.raises(Exception):
        spec.stride = (2,)
    assert len({spec, ConvSpec((1, 1, 4), (1, 1, 3))}) == 1


def test_numpy_dtypes_are_accepted_as_their_names():
    plain = ConvSpec((1, 2, 8), (3, 2, 3), dtype="float64")
    for dtype in (np.float64, np.dtype("float64"), "float64"):
        spec = ConvSpec((1, 2, 8), (3, 2, 3), dtype=dtype)
        assert spec.dtype == "float64" and spec.key == plain.key
    with pytest.raises(ValueError, match="ConvSpec.dtype"):
        ConvSpec((1, 2, 8), (3, 2, 3), dtype=np.int32)
