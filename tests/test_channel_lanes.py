"""The channel-lane plans (implicit GEMM) against the NumPy oracle, and every plan kind forced.

The shared cases have too few channels to fill a vector, so they mostly run the other
plans; these have enough, and each test first checks which plan ran, so that a change in
the schedule cannot turn it into a test of something else.
"""

from __future__ import annotations

import numpy as np
import pytest

from oracle import conv_backward, conv_forward
from symconv import ConvSpec, compiler
from symconv.codegen import schedule
from test_kernels import assert_close, oracle_args, random_arrays, runnable_variants


SPECS = [
    # forward/grad_input: lanes along channels, rows along the last axis, padded edges guarded
    pytest.param(ConvSpec((2, 16, 9, 13), (24, 16, 3, 3), padding=1), id="2d-pad1-24ch"),
    # a stride and a dilation only change the broadcast scalars; 20 channels: a partial block
    pytest.param(ConvSpec((1, 20, 11, 17), (20, 20, 3, 3), stride=2, dilation=2,
                          padding=((2, 1), (0, 3))), id="2d-stride2-dil2-asym-20ch"),
    pytest.param(ConvSpec((2, 8, 5, 6, 7), (16, 8, 3, 3, 3), padding=1, bias=False),
                 id="3d-pad1-nobias"),
    # long rows: the weight gradient's summation packed in several chunks and segments
    pytest.param(ConvSpec((2, 16, 1100), (16, 16, 5), padding=2, stride=1), id="1d-long"),
    pytest.param(ConvSpec((2, 12, 40), (8, 12, 3), padding=1, dilation=3, dtype="float64"),
                 id="1d-f64-dil3"),
    pytest.param(ConvSpec((3, 32, 6, 7), (16, 32, 1, 1), stride=(2, 1)), id="2d-1x1-stride"),
]


def _compiled(spec):
    return compiler.compilation(spec, "x86-64-v3")


@pytest.mark.parametrize("spec", SPECS)
def test_channel_lanes_against_the_oracle(spec, compile_spec, rng):
    compiled = _compiled(spec)
    kinds = {name: {type(c) for _, c in pieces} for name, pieces in compiled.plans.items()}
    assert kinds["forward"] == kinds["grad_weight"] == {schedule.ChannelLanes}, kinds
    assert schedule.ChannelLanes in kinds["grad_input"], kinds    # stride phases may differ
    (weight_plan,) = {c.chunking is not None for _, c in compiled.plans["grad_weight"]}
    assert weight_plan, "the weight gradient packs its summation chunk by chunk"
    x, w, b, gy = random_arrays(spec, rng)
    inputs = [a for a in (x, w, b) if a is not None]
    expected_y = conv_forward(x, w, b, *oracle_args(spec))
    expected = conv_backward(x, w, gy, *oracle_args(spec))
    for kernel in runnable_variants(compile_spec(spec)):
        where = kernel.variant.target
        assert_close(kernel.forward(*inputs), expected_y, spec.dtype, f"{where} forward")
        for name, got, ref in zip(("input", "weight", "bias"), kernel.backward(x, w, gy),
                                  expected):
            if got is not None:
                assert_close(got, ref, spec.dtype, f"{where} grad_{name}")


def test_the_chunked_weight_gradient_cuts_its_summation():
    """1d-long: 2 x 1100 positions in segments of GEMM_CHUNK, several tasks."""
    compiled = _compiled(SPECS[3].values[0])
    ((_, chosen),) = compiled.plans["grad_weight"]
    assert chosen.chunking.segment == schedule.GEMM_CHUNK and chosen.chunking.rows == 1
    assert str(chosen.lane) == "i_o" and str(chosen.block) == "i_c"
    assert chosen.chunking.group < 16          # more than one task


def test_results_do_not_depend_on_the_thread_count(cache_dir, rng):
    """Every channel-lane form on threads: bit-identical for 1, 2 and 3 threads."""
    spec = ConvSpec((2, 32, 40, 41), (32, 32, 3, 3), padding=1)
    kernel = compiler.compile_conv(spec, cache_dir=cache_dir)
    for name in ("forward", "grad_input", "grad_weight"):
        text = kernel.source.split(f"void {kernel.variant.prefix}{name}(")[1].split("\nvoid ")[0]
        assert "implicit GEMM" in text and "#pragma omp parallel" in text, name
    x, w, b, gy = random_arrays(spec, rng)
    reference = [kernel.forward(x, w, b, threads=1), *kernel.backward(x, w, gy, threads=1)]
    for threads in (2, 3):
        got = [kernel.forward(x, w, b, threads=threads),
               *kernel.backward(x, w, gy, threads=threads)]
        for a, e in zip(got, reference):
            np.testing.assert_array_equal(a, e)


def test_batch_open_packages_run_channel_lanes_per_item(cache_dir, rng):
    spec = ConvSpec((None, 16, 9, 10), (16, 16, 3, 3), padding=1)
    kernel = compiler.compile_conv(spec, cache_dir=cache_dir)
    assert "implicit GEMM" in kernel.source
    fixed = ConvSpec((5, 16, 9, 10), (16, 16, 3, 3), padding=1)
    x, w, b, gy = random_arrays(fixed, rng)
    assert_close(kernel.forward(x, w, b), conv_forward(x, w, b, *oracle_args(fixed)),
                 "float32", "forward")
    for got, ref in zip(kernel.backward(x, w, gy), conv_backward(x, w, gy, *oracle_args(fixed))):
        assert_close(got, ref, "float32", "backward")


@pytest.mark.parametrize("kinds", [
    (schedule.OutputLanes, schedule.ReductionLanes), (schedule.ReductionLanes,), (),
], ids=["output+reduction", "reduction-only", "scalar-only"])
def test_every_plan_kind_forced(kinds, tmp_path, monkeypatch, rng):
    """With the plans the schedule may choose restricted, each kind runs where it can (the
    plain loop nest elsewhere) and the results still match the oracle."""
    monkeypatch.setattr(schedule, "PLAN_KINDS", kinds)
    spec = SPECS[1].values[0]
    kernel = compiler.compile_conv(spec, cache_dir=tmp_path, target="x86-64-v3")
    compiled = _compiled(spec)
    chosen = {type(c) for pieces in compiled.plans.values() for _, c in pieces}
    assert set(kinds) <= chosen <= {*kinds, schedule.Scalar}
    x, w, b, gy = random_arrays(spec, rng)
    assert_close(kernel.forward(x, w, b), conv_forward(x, w, b, *oracle_args(spec)),
                 spec.dtype, "forward")
    for got, ref in zip(kernel.backward(x, w, gy), conv_backward(x, w, gy, *oracle_args(spec))):
        assert_close(got, ref, spec.dtype, "backward")


def test_what_channel_lanes_leave_to_other_plans():
    """Too few channels to fill a vector, grouped channels (the input depends on the output
    channel), and a first layer's input gradient (3 lanes) keep the other plans."""
    few = _compiled(ConvSpec((2, 4, 12, 12), (4, 4, 3, 3), padding=1))
    assert not any(isinstance(c, schedule.ChannelLanes)
                   for pieces in few.plans.values() for _, c in pieces)
    grouped = _compiled(ConvSpec((1, 32, 8, 8), (32, 16, 3, 3), groups=2))
    assert isinstance(grouped.plans["forward"][0][1], schedule.OutputLanes)
    stem = _compiled(ConvSpec((1, 3, 32, 32), (16, 3, 3, 3), padding=1))
    assert isinstance(stem.plans["forward"][0][1], schedule.ChannelLanes)
    assert not isinstance(stem.plans["grad_input"][0][1], schedule.ChannelLanes)


@pytest.mark.parametrize("open_batch", [False, True])
def test_nan_and_infinity_where_the_definition_puts_them(open_batch, cache_dir):
    """A plan skips products with padding zeros, which are NaN when the other factor is not
    finite: a NaN or ±∞ among the packed values sends the piece to its plain loop nest.
    (fuzzing.check_case plants NaN and ±∞ in every array and compares where they land.)"""
    import fuzzing
    for param in SPECS[:3]:
        for seed in range(6):
            case = fuzzing.Case(param.values[0], "x86-64-v3", seed, True, open_batch)
            kernel = compiler.compile_conv(case.kernel_spec, cache_dir=cache_dir,
                                           target=case.target)
            fuzzing.check_case(kernel, case)
