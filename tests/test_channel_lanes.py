"""The channel-lane plans (implicit GEMM) against the NumPy oracle, and every plan kind forced.

The shared cases have too few channels to fill a vector, so they mostly run the other
plans; these have enough, and each test first checks which plan ran, so that a change in
the schedule cannot turn it into a test of something else.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

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
    # the forward reads its input from a copy (schedule.Copy): with a zero halo and the
    # channels innermost (14-wide rows; 48 channel planes crowd an L1 set) ...
    pytest.param(ConvSpec((2, 48, 14, 14), (16, 48, 3, 3), padding=1), id="2d-copy-halo-moved"),
    # ... the channels innermost only (no padding, 4 KiB channel planes) ...
    pytest.param(ConvSpec((1, 16, 16, 64), (16, 16, 3, 3)), id="2d-copy-moved"),
    # ... for its halo, in float64, dilated (12-wide rows)
    pytest.param(ConvSpec((1, 16, 12, 12), (16, 16, 3, 3), padding=2, dilation=2,
                          dtype="float64"), id="2d-copy-halo-f64"),
    # ... and a stride's 8 channels, moved by register transposes (see the test below)
    pytest.param(ConvSpec((1, 8, 32, 32, 32), (16, 8, 3, 3, 3), stride=2, padding=1),
                 id="3d-stride2-copy-transposed"),
]
COPIES = {"2d-copy-halo-moved": (1, ((0, 0), (0, 0), (1, 1), (1, 1))),
          "2d-copy-moved": (1, None),
          "2d-copy-halo-f64": (1, ((0, 0), (0, 0), (2, 2), (2, 2))),
          "3d-stride2-copy-transposed": (1, ((0, 0), (0, 0), (1, 0), (1, 0), (1, 0)))}


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


def test_a_copy_moved_by_transposes_may_hold_a_larger_share():
    """The strided 3-D forward above reads its 8 channel planes 128 KiB apart; its input
    copied is 0.18 of its vector products, past MAX_COPY_SHARE (element by element) but
    within MAX_TRANSPOSED_COPY_SHARE: float32, whose 8 channels fill AVX2's 8x8 transposes,
    copies it; float64, which has no transposes, reads the array itself."""
    (spec,) = [p.values[0] for p in SPECS if p.id == "3d-stride2-copy-transposed"]
    copy, products = 8 * 34 ** 3, 16 ** 3 * 2 * 216     # AVX2: 16 lanes in 2 vectors
    assert schedule.MAX_COPY_SHARE < copy / products <= schedule.MAX_TRANSPOSED_COPY_SHARE
    for dtype, copied in (("float32", True), ("float64", False)):
        ((_, chosen),) = _compiled(replace(spec, dtype=dtype)).plans["forward"]
        assert bool(chosen.copies) == copied, dtype


@pytest.mark.parametrize("name", list(COPIES))
def test_which_inputs_are_read_from_a_copy(name):
    """The forward of each copy case copies its input as COPIES says; the copy is named in
    the plan's description."""
    (spec,) = [p.values[0] for p in SPECS if p.id == name]
    ((piece, chosen),) = _compiled(spec).plans["forward"]
    (copy,) = chosen.copies
    assert copy.array == "a_input" and (copy.axis, copy.halo) == COPIES[name]
    assert "a_input copied" in schedule.describe(piece, chosen)


def test_rows_of_a_copy_a_multiple_of_4_kib_apart_get_a_lead(compile_spec, rng):
    """A stride-2 layer over 512 channels reads its input from a copy with the channels
    innermost (its 256-byte channel rows crowd L1 sets over 512 steps); in the copy the
    block's rows would be 2 x 512 floats (4 KiB) apart, so the copy's channel axis is
    padded by a line: rows 2 x 528 floats apart, values unchanged.  (160 output channels:
    enough products to pay for the copy, see schedule.MAX_COPY_SHARE.)"""
    spec = ConvSpec((2, 512, 64), (160, 512, 3), stride=2, padding=1)
    for target in ("x86-64-v4", "x86-64-v3"):
        ((_, chosen),) = compiler.compilation(spec, target).plans["forward"]
        (copy,) = chosen.copies
        assert (copy.array, copy.axis, copy.lead) == ("a_input", 1, 16)
        assert copy.shape([2, 512, 64]) == (2, 528, 65)
    unpadded = ConvSpec((2, 512, 64), (160, 512, 3), padding=1)    # rows 512 floats apart
    ((_, chosen),) = compiler.compilation(unpadded, "x86-64-v4").plans["forward"]
    assert [c.lead for c in chosen.copies] == [0]
    x, w, b, _ = random_arrays(spec, rng)
    expected = conv_forward(x, w, b, *oracle_args(spec))
    for kernel in runnable_variants(compile_spec(spec)):
        assert_close(kernel.forward(x, w, b), expected, spec.dtype, kernel.variant.target)


def test_an_input_gradient_reads_a_halo_instead_of_bounding_its_taps():
    """The taps' loop bounds that keep grad_output's index in range along the rows become
    a zero halo of its copy: no loop bound, and so no block test, depends on the rows."""
    (spec,) = [p.values[0] for p in SPECS if p.id == "2d-copy-halo-moved"]
    ((_, chosen),) = _compiled(spec).plans["grad_input"]
    (copy,) = chosen.copies
    assert copy.array == "a_grad_output" and copy.halo[3] == (1, 1)
    (nest,) = chosen.nests
    assert "a_grad_output" in nest.zero_outside
    assert not any(chosen.block in b.num.free_symbols
                   for loop in nest.loops for b in (*loop.lower, *loop.upper))


def _check_weight_gradient(spec, kernel, rng, threads=()):
    """Every variant's weight and bias gradients of ``spec`` against the oracle; on each of
    ``threads`` the weight gradient bit-identical to one thread's."""
    x, w, b, gy = random_arrays(spec, rng)
    expected = conv_backward(x, w, gy, *oracle_args(spec))
    for kernel in runnable_variants(kernel):
        _, gw, gb = kernel.backward(x, w, gy)
        assert_close(gw, expected[1], spec.dtype, f"{kernel.variant.target} grad_weight")
        assert_close(gb, expected[2], spec.dtype, f"{kernel.variant.target} grad_bias")
        if threads:
            one = kernel.backward(x, None, gy, wrt=("weight",), threads=1)[1]
            for count in threads:
                np.testing.assert_array_equal(
                    kernel.backward(x, None, gy, wrt=("weight",), threads=count)[1], one)


def test_weight_gradient_rows_that_crowd_an_l2_set_run_in_groups(compile_spec, rng):
    """Channel planes of 16x32x32 floats lie 64 KiB apart, so every channel's line at one
    position falls in the same L2 set: AVX2's weight gradient then splits its 12 channel
    rows into groups of at most L2_WAYS (each packing the same chunks again); planes one
    column narrower keep them in one.  Against the oracle, bit-identical on 1-3 threads."""
    crowded = ConvSpec((1, 12, 16, 32, 32), (32, 12, 3, 3, 3), padding=1)
    spread = replace(crowded, input_shape=(1, 12, 16, 32, 31))

    def groups(spec, target):
        ((_, chosen),) = compiler.compilation(spec, target).plans["grad_weight"]
        assert isinstance(chosen, schedule.ChannelLanes) and chosen.chunking is not None
        return math.ceil(12 / chosen.chunking.group)
    assert groups(crowded, "x86-64-v3") == 2 and groups(spread, "x86-64-v3") == 1
    _check_weight_gradient(crowded, compile_spec(crowded), rng, threads=(2, 3))


def _check_non_finite_weight_gradient(spec, kernel, x, w, gy):
    """Every variant's weight gradient of arrays holding NaN or infinity: non-finite where
    the oracle's is, of the same kind, and close to it elsewhere."""
    expected = conv_backward(x, w, gy, *oracle_args(spec))[1]
    for variant in runnable_variants(kernel):
        got = variant.backward(x, None, gy, wrt=("weight",))[1]
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
        finite = np.isfinite(expected)
        assert_close(got[finite], expected[finite], spec.dtype, variant.variant.target)


def _assert_close_where_finite(got, expected, dtype: str, what: str) -> None:
    """Not finite where the oracle is not (a NaN or infinity in an input), close elsewhere."""
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))
    finite = np.isfinite(expected)
    assert_close(np.where(finite, got, 0), np.where(finite, expected, 0), dtype, what)


def _function_text(kernel, name: str, item: str = "") -> str:
    """The C of one function of the variant a kernel runs (with ``item``, its item over a
    run-time batch: "sc_item_", "sc_item_..._add" by its suffix)."""
    start, _, suffix = item.partition("...")
    text = kernel.source.split(f"void {start}{kernel.variant.prefix}{name}{suffix}(")[1]
    return text.split("\nvoid ")[0].split("\nstatic void ")[0]


def test_a_stem_weight_gradient_runs_its_rows_along_a_kernel_axis(compile_spec, rng):
    """Three input channels are too few rows; with the input copied into a zero halo the
    rows run along the 7 taps of the last kernel axis, which no padding test then uses."""
    spec = ConvSpec((1, 3, 260, 259), (16, 3, 7, 7), stride=2, padding=3)   # > MAX_GEMM_DEPTH
    ((piece, chosen),) = _compiled(spec).plans["grad_weight"]
    assert isinstance(chosen, schedule.ChannelLanes) and chosen.chunking is not None
    assert str(chosen.block) == "i_k1" and chosen.rows == 4       # 7 taps: blocks of 4 + 3
    (copy,) = chosen.copies
    assert copy.array == "a_input" and copy.axis is None and copy.halo[2:] == ((3, 2), (3, 3))
    _check_weight_gradient(spec, compile_spec(spec), rng)


def test_which_lane_a_1x1_weight_gradient_takes(compile_spec, rng):
    """Chunked, the shorter of two possible lanes leaves the longer index to the rows; a 1x1
    kernel's indices (one value each) do not stop the input from being packed."""
    short = _compiled(ConvSpec((2, 40, 6, 6), (8, 40, 1, 1))).plans["grad_weight"][0][1]
    assert (str(short.lane), str(short.block)) == ("i_o", "i_c")
    spec = ConvSpec((2, 40, 10, 10), (4, 40, 1, 1))          # 4 output channels: no lane
    ((_, chosen),) = _compiled(spec).plans["grad_weight"]
    assert (str(chosen.lane), str(chosen.block)) == ("i_c", "i_o") and chosen.chunking
    x, w, b, gy = random_arrays(spec, rng)
    expected = conv_backward(x, w, gy, *oracle_args(spec))[1]
    for kernel in runnable_variants(compile_spec(spec)):
        assert_close(kernel.backward(x, w, gy)[1], expected, spec.dtype, "grad_weight")


def test_lanes_that_fill_three_vectors(compile_spec, rng):
    """24 channels fill three AVX2 vectors: the forward's panels hold all three (two would
    leave every second block half empty), the chunked weight gradient one (rows of up to 13:
    its 40 input channels in 4 blocks of 10)."""
    spec = ConvSpec((2, 40, 6, 7), (24, 40, 1, 1), bias=False)
    plans = _compiled(spec).plans
    ((_, forward),), ((_, weight),) = plans["forward"], plans["grad_weight"]
    assert (str(forward.lane), forward.vectors, forward.chunking) == ("i_o", 3, None)
    assert (str(weight.lane), weight.vectors, weight.rows) == ("i_o", 1, 10) and weight.chunking
    x, w, _, gy = random_arrays(spec, rng)
    for kernel in runnable_variants(compile_spec(spec)):
        assert_close(kernel.forward(x, w), conv_forward(x, w, None, *oracle_args(spec)),
                     spec.dtype, "forward")
        assert_close(kernel.backward(x, w, gy)[1], conv_backward(x, w, gy, *oracle_args(spec))[1],
                     spec.dtype, "grad_weight")


@pytest.mark.parametrize("spec, kind", [
    # 16 -> 32 channels: one lane block, its summation in parts; reduction lanes would load
    # the input shifted off the vectors by each tap
    (ConvSpec((1, 16, 8, 8, 32), (32, 16, 3, 3, 3), padding=1), schedule.ChannelLanes),
    # 16 output channels, 1x1: channel lanes' blocks of one vector broadcast a scalar per FMA
    (ConvSpec((4, 48, 14, 14), (16, 48, 1, 1)), schedule.ReductionLanes),
    # 64 channels: 13 rows x 2 vectors a block
    (ConvSpec((2, 64, 14, 14), (64, 64, 3, 3), padding=1), schedule.ChannelLanes)])
def test_the_cost_model_picks_a_weight_gradients_plan(spec, kind, compile_spec, rng):
    """With AVX-512's 32 registers the estimate (schedule.cycles) decides between chunked
    channel lanes and reduction lanes for a weight gradient, and the default runs the one
    estimated cheaper; AVX2's keeps channel lanes (the estimate is not used there)."""
    ((piece, chosen),) = compiler.compilation(spec, "x86-64-v4").plans["grad_weight"]
    assert type(chosen) is kind
    makers = schedule._makers(piece, 16, 32)
    channel, reduction = makers["channel-lanes"](), makers["reduction-lanes"]()
    assert channel.chunking is not None and reduction is not None
    estimates = {type(p): schedule.cycles(piece, p, 16) for p in (channel, reduction)}
    assert min(estimates, key=estimates.get) is kind
    ((_, avx2),) = _compiled(spec).plans["grad_weight"]
    assert isinstance(avx2, schedule.ChannelLanes) and avx2.chunking is not None
    _check_weight_gradient(spec, compile_spec(spec), rng)


def test_a_large_panel_is_packed_whole_only_where_its_values_are_used_often():
    """A stem's weight gradient over one image would pack its 3.2 MB grad_output whole for
    147 uses of each value: it packs chunks instead, as at a batch of 2 (more steps than a
    panel takes); a ResNet 14x14 layer's input gradient keeps its 2.4 MB weight packed
    whole (1568 uses).  Schedules only; the chunked form is checked against the oracle
    above (test_a_stem_weight_gradient_runs_its_rows_along_a_kernel_axis)."""
    def plan(spec, name):
        ((_, chosen),) = _compiled(spec).plans[name]
        assert isinstance(chosen, schedule.ChannelLanes)
        return chosen
    stem = ConvSpec((None, 3, 224, 224), (64, 3, 7, 7), stride=2, padding=3)
    assert plan(stem, "grad_weight").chunking is not None
    assert plan(stem.with_batch(2), "grad_weight").chunking is not None
    resnet = ConvSpec((8, 256, 14, 14), (256, 256, 3, 3), padding=1)
    assert plan(resnet, "grad_input").chunking is None
    assert plan(replace(stem, input_shape=(None, 3, 64, 64)), "grad_weight").chunking is None


def test_output_lanes_replace_channel_lanes_that_leave_lanes_empty(compile_spec, rng):
    """With AVX-512, a 1x1 layer's forward into 24 output channels would leave a quarter of
    channel lanes' 32 empty and store each output lane by lane: it runs output lanes along
    its rows (their reads do not move with a tap); its input gradient into 96 channels
    fills them and keeps channel lanes, as does a 3x3 layer's forward (its taps move the
    rows' reads) and AVX2's (24 channels: three whole vectors); all against the oracle."""
    pointwise = ConvSpec((2, 96, 12, 16), (24, 96, 1, 1))
    dense = replace(pointwise, weight_shape=(24, 96, 3, 3), padding=1)
    for spec, target, kinds in (
            (pointwise, "x86-64-v4", [schedule.OutputLanes, schedule.ChannelLanes]),
            (pointwise, "x86-64-v3", [schedule.ChannelLanes, schedule.ChannelLanes]),
            (dense, "x86-64-v4", [schedule.ChannelLanes, schedule.ChannelLanes])):
        plans = compiler.compilation(spec, target).plans
        assert [type(c) for f in ("forward", "grad_input") for _, c in plans[f]] == kinds
    for spec in (pointwise, dense):
        _check_forward_and_input_gradient(spec, compile_spec(spec), *random_arrays(spec, rng))


def test_output_lane_blocks_leave_registers_for_their_loads(compile_spec, rng):
    """A stem's input gradient runs output lanes along each phase's 112 positions, rows of
    its 3 channels: AVX-512's register block holds 5 of its 7 vectors (each loads its own,
    with 3 accumulators: ROW_BLOCK_REGISTERS), so the row takes two blocks, both meeting an
    edge of the 7 taps; AVX2's holds 4 of 14.  A block of 4 vectors keeps WIDE_BLOCK_ROWS
    rows.  Against the oracle on every variant, on 1-3 threads."""
    spec = ConvSpec((1, 3, 12, 224), (8, 3, 7, 7), stride=2, padding=3)
    for target, vectors in (("x86-64-v4", 5), ("x86-64-v3", 4)):
        plans = compiler.compilation(spec, target).plans["grad_input"]
        assert len(plans) == 4
        assert all(isinstance(c, schedule.OutputLanes) and str(c.block) == "i_c" and
                   c.rows == 3 and c.vectors == vectors for _, c in plans), plans
    # 8 channels over rows of 4 vectors: WIDE_BLOCK_ROWS rows of all 4, not 8 rows of 2
    ((_, wide),) = compiler.compilation(ConvSpec((1, 8, 4, 64), (8, 8, 3, 3), padding=1),
                                        "x86-64-v4").plans["grad_input"]
    assert isinstance(wide, schedule.OutputLanes) and (wide.rows, wide.vectors) == (4, 4)
    _check_forward_and_input_gradient(spec, compile_spec(spec), *random_arrays(spec, rng))


@pytest.mark.parametrize("width", [5, 21])
def test_channels_first_blocks_store_through_transposes(width, compile_spec, rng):
    """A channels-first forward's block holds neighbouring positions of 40 channels: it
    goes to the output through register transposes, a masked vector store per channel
    (rows of 5: fewer than a vector; of 21: AVX2's 8-lane transposes three times per
    block, with a partial lane block), the bias added per channel; channels-last outputs
    keep the element stores.  Against the oracle on every variant."""
    spec = ConvSpec((2, 16, 7, width), (40, 16, 3, 3), padding=1)
    transposes = {"x86-64-v4": "sc_transpose16_ps", "x86-64-v3": "sc_transpose8_ps"}
    for target in transposes:
        ((_, chosen),) = compiler.compilation(spec, target).plans["forward"]
        assert isinstance(chosen, schedule.ChannelLanes) and chosen.transposed
        last = compiler.compilation(replace(spec, layout="channels_last"), target)
        assert not last.plans["forward"][0][1].transposed
    kernel = compile_spec(spec)
    assert f"{transposes[kernel.variant.target]}(sc_tile" in _function_text(kernel, "forward")
    x, w, b, _ = random_arrays(spec, rng)
    expected = conv_forward(x, w, b, *oracle_args(spec))
    for kernel in runnable_variants(kernel):
        assert_close(kernel.forward(x, w, b), expected, spec.dtype, kernel.variant.target)


def test_the_estimate_charges_packing_strides_and_empty_lanes():
    """schedule.cycles on one weight-gradient piece: more tasks packing the same chunks,
    stride-2 reads, and lanes left empty each cost more."""
    spec = ConvSpec((2, 32, 12, 16), (32, 32, 3, 3), padding=1)
    ((piece, _),) = compiler.compilation(spec, "x86-64-v4").plans["grad_weight"]
    makers = schedule._makers(piece, 16, 32)
    channel, reduction = makers["channel-lanes"](), makers["reduction-lanes"]()
    fewer_tasks = replace(channel, chunking=replace(channel.chunking, group=32))
    assert schedule.cycles(piece, fewer_tasks, 16) < schedule.cycles(piece, channel, 16)
    strided = ConvSpec((2, 32, 24, 32), (32, 32, 3, 3), padding=1, stride=2)
    ((strided_piece, _),) = compiler.compilation(strided, "x86-64-v4").plans["grad_weight"]
    strided_reduction = schedule._makers(strided_piece, 16, 32)["reduction-lanes"]()
    assert schedule.cycles(strided_piece, strided_reduction, 16) > \
        schedule.cycles(piece, reduction, 16)
    # 16-wide rows fill one vector; with 8 lanes the same row takes two of them, full too
    assert schedule.cycles(piece, reduction, 8) == pytest.approx(
        2 * schedule.cycles(piece, reduction, 16) - 8 * 32 * 32 * 9)
    with pytest.raises(TypeError, match="no cost estimate"):
        schedule.cycles(piece, schedule.Scalar(), 16)


def test_no_copy_where_it_does_not_pay():
    """56-wide rows, channel planes 12.25 KiB apart: read in place."""
    compiled = _compiled(ConvSpec((1, 16, 56, 56), (16, 16, 3, 3), padding=1))
    ((_, chosen),) = compiled.plans["forward"]
    assert chosen.copies == ()
    assert schedule._crowded(32 * 32, 16) and not schedule._crowded(56 * 56, 64)
    assert not schedule._crowded(16000, 64)     # 8 lines a set: as many as it holds


def test_no_copy_larger_than_its_share_of_the_products(compile_spec, monkeypatch, rng):
    """A stride-2 3-D layer over 8 channels: its input is 8x its output and each output
    has 216 products, so a copy would hold 0.3 elements per vector FMA (MAX_COPY_SHARE:
    0.08); the forward reads the input in place, its padded edges in guarded blocks."""
    spec = ConvSpec((1, 8, 24, 24, 24), (16, 8, 3, 3, 3), stride=2, padding=1)
    ((_, chosen),) = compiler.compilation(spec, "x86-64-v4").plans["forward"]
    assert isinstance(chosen, schedule.ChannelLanes) and chosen.copies == ()
    x, w, b, _ = random_arrays(spec, rng)
    expected = conv_forward(x, w, b, *oracle_args(spec))
    for kernel in runnable_variants(compile_spec(spec)):
        assert_close(kernel.forward(x, w, b), expected, spec.dtype, kernel.variant.target)
    monkeypatch.setattr(schedule, "MAX_COPY_SHARE", 1.0)      # the copy it would make
    ((_, chosen),) = compiler.compilation(spec, "x86-64-v4").plans["forward"]
    assert [(c.array, c.axis) for c in chosen.copies] == [("a_input", 1)]


def test_rows_only_the_next_task_reads_are_prefetched(compile_spec, rng):
    """A channels-first 1x1 layer's forward reads each input channel's row a few lines per
    task, the channels 1120 bytes apart, and no tap reaches the next task's rows: at each
    summation step it prefetches where the next row of outputs (i0 + 1: 28 elements on)
    will read, and as each lane stores its 28 outputs, where it will store next (for
    writing); its input gradient likewise in grad_output and grad_input; output lanes
    prefetch the rows their vectors read.  A 3x3 layer's taps read the next rows
    themselves; channels-last, a step moves one element; a stride's phases run their next
    rows on the other thread as often as not; a depthwise layer's one output channel per
    group is no loop: no prefetch."""
    spec = ConvSpec((2, 64, 10, 28), (32, 64, 1, 1))
    compiled = compiler.compilation(spec, "x86-64-v4")
    for name, index, array, output in (("forward", "i_i0", "a_input", "a_output"),
                                       ("grad_input", "i_j0", "a_grad_output", "a_grad_input")):
        ((_, chosen),) = compiled.plans[name]
        prefetch = chosen.prefetch
        assert (str(prefetch.index), prefetch.arrays, prefetch.output) == (index, (array,), True)
        text = compiled.sources["x86-64-v4"].text.split(f"void symconv_{name}(")[1]
        text = text.split("\nvoid ")[0]
        ahead = set(re.findall(r"__builtin_prefetch\(&(\w+)\[.*? \+ 28\](, 1)?\);", text))
        assert ahead == {(array, ""), (output, ", 1")}, ahead
        assert text.count("__builtin_prefetch") == 2        # no edge blocks: no padding
    for other, names in ((replace(spec, layout="channels_last"), ("forward", "grad_input")),
                         (ConvSpec((1, 16, 56, 56), (16, 16, 3, 3), padding=1),
                          ("forward", "grad_input")),
                         (ConvSpec((2, 32, 16, 28), (64, 32, 3, 3), stride=2, padding=1),
                          ("grad_input",)),
                         (ConvSpec((2, 64, 10, 28), (64, 1, 3, 3), padding=1, groups=64,
                                   layout="channels_last"), ("forward", "grad_bias"))):
        plans = compiler.compilation(other, "x86-64-v4").plans
        assert all(getattr(c, "prefetch", None) is None for f in names for _, c in plans[f])
    # 24 output channels: output lanes along the rows, whose vectors read 48 channels'
    # rows in place; they prefetch those, not their output (a vector store per row)
    lanes = ConvSpec((2, 48, 10, 28), (24, 48, 1, 1))
    compiled = compiler.compilation(lanes, "x86-64-v4")
    ((_, chosen),) = compiled.plans["forward"]
    assert isinstance(chosen, schedule.OutputLanes)
    assert chosen.prefetch == schedule.Prefetch(chosen.prefetch.index, ("a_input",), False)
    assert str(chosen.prefetch.index) == "i_i0"
    text = compiled.sources["x86-64-v4"].text
    assert re.findall(r"__builtin_prefetch\(&a_input\[.*? \+ 28\]\);",
                      text.split("void symconv_forward(")[1].split("\nvoid ")[0])
    for checked in (spec, lanes):        # and bit-identical on 1, 2 and 3 threads
        _check_forward_and_input_gradient(checked, compile_spec(checked),
                                          *random_arrays(checked, rng))


def _ring_elements(plan, spec) -> int:
    """Elements of one thread's rings in a plan."""
    shapes = {"a_input": spec.array_shape("input"), "a_grad_output": spec.array_shape("output")}
    return sum(c.ring.rows * math.prod(c.row_shape(shapes[c.array])) for c in plan.copies)


WINDOWED = ConvSpec((2, 16, 33, 10, 11), (64, 16, 3, 3, 3), stride=(2, 1, 1), padding=1)
WINDOWED_1D = ConvSpec((2, 512, 1024), (256, 512, 3), stride=2, padding=1)


@pytest.mark.parametrize("spec, budget, index, ring", [
    (WINDOWED, None, "i_n", None),
    (WINDOWED, 8000, "i_i0", (2, 2, 3, 3, False)),
    (WINDOWED_1D, 51200, "i_i0", (2, 2, None, 95, True)),
], ids=["image-per-task", "rows-as-they-come", "1d-chunks"])
def test_copies_fill_rings_a_window_at_a_time(spec, budget, index, ring, tmp_path,
                                              monkeypatch, rng):
    """A forward's input copy is held a window at a time per thread (schedule.Window): by
    default a whole image per task here (the rows copied first, then each of the 64
    channels' two or four lane blocks over them); with a budget of 8000 elements, three
    rows of the first spatial axis (stride 2: each output row reads three, two of them
    new), each lane block run at each output row as its rows come; a 1-D layer, with a
    budget of 100 positions of its 512 channels, in chunks of the blocks' starts, the
    stride-2 rows a chunk reads copied as one range (many chunks per item, so blocks start
    at both ends of one).  Against the oracle on every variant, bit-identical on 1, 2 and 3
    threads."""
    if budget is not None:
        monkeypatch.setattr(schedule, "WINDOW_ELEMENTS", budget)
    for target in ("x86-64-v4", "x86-64-v3"):
        ((_, chosen),) = compiler.compilation(spec, target).plans["forward"]
        (copy,) = chosen.copies
        assert str(chosen.window.index.label) == index
        assert chosen.window.lanes_inside == (index == "i_i0" and not copy.ring.ranged)
        assert _ring_elements(chosen, spec) <= schedule.WINDOW_ELEMENTS
        if ring is not None:
            got = (copy.ring.axis, copy.ring.step, copy.ring.span, copy.ring.rows,
                   copy.ring.ranged)
            assert got == tuple(g if r is None else r for g, r in zip(got, ring))
    kernel = compiler.compile_conv(spec, cache_dir=tmp_path)
    assert "sc_rings_a_input" in _function_text(kernel, "forward")
    x, w, b, gy = random_arrays(spec, rng)
    expected = [conv_forward(x, w, b, *oracle_args(spec)),
                *conv_backward(x, w, gy, *oracle_args(spec))[:2]]
    for variant in runnable_variants(kernel):
        one = [variant.forward(x, w, b, threads=1), *variant.backward(x, w, gy, threads=1)[:2]]
        for got, want, name in zip(one, expected, ("forward", "grad_input", "grad_weight")):
            assert_close(got, want, spec.dtype, f"{variant.variant.target} {name}")
        for threads in (2, 3):
            got = [variant.forward(x, w, b, threads=threads),
                   *variant.backward(x, w, gy, threads=threads)[:2]]
            for a, e in zip(got, one):
                np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("spec", [
    ConvSpec((2, 16, 32, 32, 32), (32, 16, 3, 3, 3), padding=1),
    ConvSpec((1, 32, 48, 48, 48), (32, 32, 3, 3, 3), padding=1),
    ConvSpec((8, 256, 14, 14), (256, 256, 3, 3), padding=1),
    ConvSpec((2, 512, 4000), (512, 512, 3), stride=2, padding=1),
], ids=["3d-32", "unet3d-48", "resnet-14", "wav2vec"])
def test_copies_of_large_layers_stay_within_the_window_budget(spec):
    """The bench's layers whose forward or input gradient copy their broadcast array: each
    copy is a ring within WINDOW_ELEMENTS per thread, none of the whole array (3d-32 copied
    5 and 10 MiB, the U-Net layer 15 MiB each, wav2vec's forward 16 MiB)."""
    for target in ("x86-64-v4", "x86-64-v3"):
        compiled = compiler.compilation(spec, target)
        plans = [c for name in ("forward", "grad_input") for _, c in compiled.plans[name]
                 if isinstance(c, schedule.ChannelLanes)]
        assert any(c.copies for c in plans)
        for chosen in plans:
            assert all(c.ring is not None for c in chosen.copies)
            assert _ring_elements(chosen, spec) <= schedule.WINDOW_ELEMENTS


@pytest.mark.parametrize("extent", [1, 2, 3, 5, 6, 7, 13, 14, 16, 32, 48, 56, 61])
@pytest.mark.parametrize("inside", ["all", "pad1", "pad2", "none"])
def test_block_runs_cover_each_position_once(extent, inside):
    """Blocks cover 0..extent-1 exactly once, at most ``rows`` each; no block tested for a
    padding condition is inside the interior only; edge blocks are not one row when the
    row is long enough."""
    from symconv.codegen.vector import block_runs
    interior = {"all": (0, extent - 1), "pad1": (1, extent - 2), "pad2": (2, extent - 3),
                "none": (1, 0)}[inside]
    runs = block_runs(extent, 6, interior)
    covered = [start + b * rows + r for start, count, rows, _ in runs
               for b in range(count) for r in range(rows)]
    assert covered == list(range(extent))
    low, high = interior
    for start, count, rows, guarded in runs:
        assert 1 <= rows <= 6
        stop = start + count * rows - 1
        if not guarded:
            assert low <= start and stop <= high
        if extent >= 14:
            assert rows >= schedule.MIN_GEMM_ROWS


def test_the_chunked_weight_gradient_cuts_its_summation():
    """1d-long: 2 x 1100 positions in segments of GEMM_CHUNK, several tasks."""
    compiled = _compiled(SPECS[3].values[0])
    ((_, chosen),) = compiled.plans["grad_weight"]
    assert chosen.chunking.segment == schedule.GEMM_CHUNK and chosen.chunking.rows == 1
    assert str(chosen.lane) == "i_o" and str(chosen.block) == "i_c"
    assert chosen.chunking.group < 16          # more than one task


def test_a_chunked_weight_gradient_cuts_its_rows_into_nearly_equal_blocks(cache_dir, rng):
    """32 input channels in register blocks of at most 6 rows (AVX2): 6+6+5+5+5+5, not five
    of 6 and one of 2, whose four accumulators would leave the FMA units half idle.  Against
    the oracle, bit-identical on 1, 2 and 3 threads."""
    spec = ConvSpec((2, 32, 2048), (16, 32, 3), padding=1)
    compiled = _compiled(spec)
    ((_, chosen),) = compiled.plans["grad_weight"]
    assert chosen.rows == 6 and chosen.chunking.group >= 32     # one group: all the rows
    text = compiled.source.text.split("_grad_weight(const")[1].split("\n}\n")[0]
    assert re.findall(r"sc_k < (\d+); \+\+sc_k, i_c \+= (\d+)", text) == [("2", "6"), ("4", "5")]
    # 18 rows in groups of 12, the last group 6: blocks of 6, and no block for a rest of none
    uneven = _compiled(ConvSpec((1, 18, 9, 10), (64, 18, 3, 3), padding=1))
    ((_, chosen),) = uneven.plans["grad_weight"]
    assert (chosen.rows, chosen.chunking.group) == (6, 12)
    text = uneven.source.text.split("_grad_weight(const")[1].split("\n}\n")[0]
    assert "i_c + 6 <= sc_b1" in text and "if (i_c < sc_b1)" not in text
    kernel = compiler.compile_conv(spec, cache_dir=cache_dir, target="x86-64-v3")
    _check_weight_gradient(spec, kernel, rng, threads=(2, 3))


def test_a_weight_gradient_with_few_tasks_splits_its_summation(cache_dir, rng):
    """16 output channels make one lane block (AVX2): the summation over 7000 positions (14
    chunks) runs in eight parts of uneven length, their tiles added in order, rather than
    the rows in groups that would each pack the same chunks; against the oracle, and
    bit-identical on 1, 2 and 3 threads."""
    spec = ConvSpec((1, 8, 7000), (16, 8, 3), padding=1)
    ((_, chosen),) = _compiled(spec).plans["grad_weight"]
    assert chosen.chunking.parts == 8 and "in 8 parts" in schedule.describe(_, chosen)
    assert chosen.chunking.group == 8             # one group: all the rows
    kernel = compiler.compile_conv(spec, cache_dir=cache_dir, target="x86-64-v3")
    assert "sc_part" in _function_text(kernel, "grad_weight")
    _check_weight_gradient(spec, kernel, rng, threads=(2, 3))


def test_crowded_lanes_pack_a_line_at_a_time(cache_dir, rng):
    """grad_output's channel planes 24 KiB apart put all 16 lanes of a float64 weight
    gradient's panel in one L1 set: the chunk is packed 16 steps of one lane at a time (a
    line), not one step of every lane (doubles have no transposes); 24-wide rows end in a
    part tile.  Against the oracle, and bit-identical on 1, 2 and 3 threads."""
    spec = ConvSpec((1, 16, 8, 16, 24), (32, 16, 3, 3, 3), padding=1, dtype="float64")
    ((_, chosen),) = compiler.compilation(spec, "x86-64-v4").plans["grad_weight"]
    assert isinstance(chosen, schedule.ChannelLanes) and chosen.chunking.pack_tile == 16
    ((_, wide),) = compiler.compilation(ConvSpec((1, 16, 8, 9, 36), (32, 16, 3, 3, 3),
                                                 padding=1), "x86-64-v4").plans["grad_weight"]
    assert wide.chunking.pack_tile == 0          # planes 10.1 KiB apart: lanes innermost
    _check_weight_gradient(spec, compiler.compile_conv(spec, cache_dir=cache_dir), rng,
                           threads=(2, 3))


def test_weight_gradient_chunks_pack_by_transposes(cache_dir, rng):
    """A channels-first grad_output's steps are neighbours and its channels are not: each
    whole vector of 40 channels is packed by register transposes, 16 (AVX2: 8) steps at a
    time; the 8 channels of the last lane block and the steps past the last whole tile of
    a 21-wide row element by element.  Against the oracle, bit-identical on 1, 2 and 3
    threads; a non-finite grad_output takes the plain loop nest, which puts NaN and
    infinity where the definition does."""
    spec = ConvSpec((2, 16, 9, 21), (40, 16, 3, 3), padding=1)
    for target in ("x86-64-v4", "x86-64-v3"):
        ((_, chosen),) = compiler.compilation(spec, target).plans["grad_weight"]
        assert isinstance(chosen, schedule.ChannelLanes) and chosen.chunking.transposed
    kernel = compiler.compile_conv(spec, cache_dir=cache_dir)
    assert "(&a_grad_output[" in _function_text(kernel, "grad_weight")
    _check_weight_gradient(spec, kernel, rng, threads=(2, 3))
    x, w, _, gy = random_arrays(spec, rng)
    # on the edges, where some taps have no product: a packed zero-halo product would
    # make NaN of them; a lane of the last block, and one of a whole vector in a tile
    gy[1, 37, 0, 5] = np.inf
    gy[0, 3, 8, 7] = np.nan
    _check_non_finite_weight_gradient(spec, kernel, x, w, gy)


def test_results_do_not_depend_on_the_thread_count(cache_dir, rng):
    """Every channel-lane form on threads: bit-identical for 1, 2 and 3 threads."""
    spec = ConvSpec((2, 32, 40, 41), (32, 32, 3, 3), padding=1)
    kernel = compiler.compile_conv(spec, cache_dir=cache_dir)
    for name in ("forward", "grad_input", "grad_weight"):
        text = _function_text(kernel, name)
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


@pytest.mark.parametrize("dtype, stride, shape", [("float32", 1, (13, 16)),
                                                  ("float64", 1, (13, 16)),
                                                  ("float32", 2, (29, 37))])
def test_depthwise_rows_load_their_own_vectors(dtype, stride, shape, compile_spec, rng):
    """A depthwise layer has no index that only broadcast reads use: its output-lane blocks
    take rows of output lines, each loading its own vectors and sharing the weights; the
    forward's rows share their loads down the taps of the rows' axis (a window: each input
    row loaded once per block, at stride 2 the rows two lines apart), but in a block
    clamped at the end of 13 rows."""
    spec = ConvSpec((2, 8, *shape), (8, 1, 3, 3), stride=stride, padding=1, groups=8,
                    dtype=dtype)
    ((_, chosen),) = _compiled(spec).plans["forward"]
    assert isinstance(chosen, schedule.OutputLanes) and str(chosen.block) == "i_i0"
    assert chosen.rows > 1 and str(chosen.window) == "i_k0"
    dilated = ConvSpec((2, 8, 13, 16), (8, 1, 3, 3), padding=2, dilation=2, groups=8)
    assert _compiled(dilated).plans["forward"][0][1].window is None   # row + 2 x tap
    x, w, b, gy = random_arrays(spec, rng)
    expected = conv_forward(x, w, b, *oracle_args(spec))
    for kernel in runnable_variants(compile_spec(spec)):
        assert_close(kernel.forward(x, w, b), expected, dtype, kernel.variant.target)
        for got, ref in zip(kernel.backward(x, w, gy), conv_backward(x, w, gy,
                                                                       *oracle_args(spec))):
            assert_close(got, ref, dtype, f"{kernel.variant.target} backward")


def test_lanes_are_masked_only_where_the_reads_need_it(compile_spec, rng):
    """A depthwise forward over rows of 32 (whole vectors in both instruction sets) has no
    lane past a row's end: its edge blocks (the padding at a row's start) define no range
    mask and store whole vectors, masking only the loads of the taps that reach into the
    padding (AVX2's masked loads cost 2-3x as much: mbv2-dw-s2's forward 6.0 -> 1.8 ms);
    rows of 30 keep the range mask on their last block.  Against the oracle for both."""
    from symconv.codegen.emit import emit_function
    for width, tail in ((32, False), (30, True)):
        spec = ConvSpec((2, 8, 9, width), (8, 1, 3, 3), padding=1, groups=8)
        forward = next(f for f in compiler.compilation(spec, "x86-64-v3").functions
                       if f.name == "forward")
        for isa, masked_load in (("avx2", "_mm256_maskload_ps(a_input"),
                                 ("avx512", "_mm512_maskz_loadu_ps(sc_l")):
            text, _ = emit_function(forward, "float32", isa)
            assert ("sc_valid" in text) == tail and ("_loadu_ps(a_input" in text or tail)
            assert ("mask_storeu" in text or "maskstore" in text) == tail
            assert masked_load in text
        x, w, b, _ = random_arrays(spec, rng)
        expected = conv_forward(x, w, b, *oracle_args(spec))
        for kernel in runnable_variants(compile_spec(spec)):
            assert_close(kernel.forward(x, w, b), expected, spec.dtype, kernel.variant.target)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_depthwise_weight_gradient_blocks_all_its_taps(stride, compile_spec, rng):
    """A depthwise weight gradient's grad_output has no index of its own (its channel is
    one value): with AVX-512's registers, its partial sums take both blocks along the
    input's taps, all nine per task, each input row read at three shifts for three rows of
    taps; AVX2 keeps one block.  Against the oracle with a NaN and an infinity on the edges
    (where some taps have no product), and bit-identical on 1, 2 and 3 threads."""
    spec = ConvSpec((2, 8, 13, 21), (8, 1, 3, 3), stride=stride, padding=1, groups=8)
    ((_, wide),) = compiler.compilation(spec, "x86-64-v4").plans["grad_weight"]
    assert isinstance(wide, schedule.ReductionLanes)
    assert [(str(u), rows) for u, rows in wide.blocks] == [("i_k0", 3), ("i_k1", 3)]
    ((_, narrow),) = _compiled(spec).plans["grad_weight"]
    assert [str(u) for u, _ in narrow.blocks] == ["i_k0"]
    kernel = compile_spec(spec)
    _check_weight_gradient(spec, kernel, rng, threads=(2, 3))
    x, w, _, gy = random_arrays(spec, rng)
    x[1, 5, 0, 3] = np.nan
    gy[0, 2, -1, -1] = np.inf
    _check_non_finite_weight_gradient(spec, kernel, x, w, gy)


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_input_gradient_rows_skip_the_taps_outside(stride, compile_spec, rng):
    """A depthwise input gradient's rows bound its taps (grad_output's edges); blocked along
    the rows, grad_output reads as zero there and each row outside skips the product: a
    non-finite weight still meets no zero where the definition has no product.  The rows
    share their loads up a window of three taps (at stride 2, the odd phases' down one of
    two), and a window row outside skips all its products."""
    rows = 13 if stride == 1 else 14      # 14: row 13's window reaches past grad_output
    spec = ConvSpec((2, 8, rows, 16), (8, 1, 3, 3), stride=stride, padding=1, groups=8)
    for target in ("x86-64-v4", "x86-64-v3"):
        plans = compiler.compilation(spec, target).plans["grad_input"]
        for _, chosen in plans:
            assert isinstance(chosen, schedule.OutputLanes) and chosen.rows > 1
            assert chosen.bounded == ("a_grad_output",) or len(plans) > 1
        assert any(c.window is not None for _, c in plans)
    x, w, _, gy = random_arrays(spec, rng)
    w[3, 0, 0, :] = np.inf           # taps the top row of each plane never uses
    w[5, 0, 2, 1] = np.nan           # ... and the bottom row
    expected = conv_backward(x, w, gy, *oracle_args(spec))[0]
    for kernel in runnable_variants(compile_spec(spec)):
        _assert_close_where_finite(kernel.backward(None, w, gy, wrt=("input",))[0], expected,
                                   spec.dtype, kernel.variant.target)


def test_stride_phases_run_inside_shared_loops(compile_spec, rng):
    """A stride-2 depthwise input gradient's four phases (output lanes each) run one after
    another inside one threaded loop over the batch and the channels, so the phases write
    each channel's rows while they are in cache; every element still from one phase, on any
    number of threads."""
    from symconv.codegen.schedule import shared_loops
    spec = ConvSpec((3, 16, 97, 82), (16, 1, 3, 3), stride=2, padding=1, groups=16)
    for target in ("x86-64-v4", "x86-64-v3"):
        plans = compiler.compilation(spec, target).plans["grad_input"]
        assert len(plans) == 4 and all(isinstance(c, schedule.OutputLanes) for _, c in plans)
        assert [str(i) for i in shared_loops(plans)][:2] == ["i_n", "i_g"]
    kernel = compile_spec(spec)
    text = _function_text(kernel, "grad_input")
    # one threaded loop for the phases, and one for the plain nest where the weight is
    # not finite (phases whose lanes meet the taps' bounds check it)
    assert text.count("#pragma omp parallel") == 1 + text.count("sc_acc = 0;")
    assert text.count("/* phase ") == 4
    _check_forward_and_input_gradient(spec, kernel, *random_arrays(spec, rng))
    # phases over rows of different lengths (an odd size: 5 even rows, 4 odd) keep their
    # own loops
    dense = compiler.compilation(ConvSpec((2, 16, 9, 12), (16, 16, 3, 3), stride=2),
                                 "x86-64-v4").arrangements["grad_input"]
    assert shared_loops(dense.plans) == () == dense.shared
    assert schedule.describe_shared(dense) is None
    # ... and so do phases whose shared loops would be too few tasks to thread
    few = compiler.compilation(ConvSpec((1, 4, 33, 30), (4, 1, 3, 3), stride=2, padding=1,
                                        groups=4), "x86-64-v4").plans["grad_input"]
    assert all(isinstance(c, schedule.OutputLanes) for _, c in few) and shared_loops(few) == ()


def test_output_lane_phases_run_their_rows_inside_shared_loops(compile_spec, rng):
    """A dense stride-2 3-D input gradient over few channels runs output lanes in each of its
    eight phases, a register block holding rows of every channel (with AVX-512's 32
    registers, all 8 of an 8-channel layer): the block of channels is no shared loop, so
    the phases share the batch and the leading phase rows around it and write each task's
    rows of grad_input while they are in cache; against the oracle and bit-identical on
    1-3 threads (the forward too)."""
    from symconv.codegen.schedule import shared_loops
    spec = ConvSpec((2, 4, 10, 10, 64), (8, 4, 3, 3, 3), stride=2, padding=1)
    loops = ["i_n", "sc_i_j0_phase", "sc_i_j1_phase"]
    for target in ("x86-64-v4", "x86-64-v3"):
        arrangement = compiler.compilation(spec, target).arrangements["grad_input"]
        plans = list(arrangement.plans)
        assert len(plans) == 8 and all(isinstance(c, schedule.OutputLanes) and
                                       str(c.block) == "i_c" for _, c in plans)
        assert [str(i) for i in shared_loops(plans)] == loops
        assert [str(i) for i in arrangement.shared] == loops
    # AVX-512's registers hold a block of all 8 channels' rows (AVX2's 8 run channel lanes)
    wider = compiler.compilation(replace(spec, input_shape=(2, 8, 10, 10, 64),
                                         weight_shape=(8, 8, 3, 3, 3)), "x86-64-v4")
    assert all(isinstance(c, schedule.OutputLanes) and (c.rows, c.vectors) == (8, 2)
               for _, c in wider.plans["grad_input"])
    kernel = compile_spec(spec)
    assert _function_text(kernel, "grad_input").count("#pragma omp parallel") == 2
    _check_forward_and_input_gradient(spec, kernel, *random_arrays(spec, rng))


@pytest.mark.parametrize("spec, loops", [
    (ConvSpec((1, 8, 12, 12, 12), (16, 8, 3, 3, 3), stride=2, padding=1),
     ["i_n", "sc_i_j0_phase", "sc_i_j1_phase"]),
    (ConvSpec((4, 40, 12, 14), (16, 40, 3, 3), stride=2, padding=1),
     ["i_n", "sc_i_j0_phase"]),
    (ConvSpec((1, 16, 32, 32), (36, 16, 4, 4), stride=2, padding=1),
     ["i_n", "sc_i_j0_phase"]),
], ids=["3d-8-channels", "2d-partial-lane-block", "2d-task-copy"])
def test_channel_lane_phases_run_inside_shared_loops(spec, loops, compile_spec, rng):
    """A stride-2 input gradient's phases, channel lanes each, run one after another inside
    one threaded loop over the batch and the leading phase rows, each phase's lane blocks
    inside it (40 channels: the last lane block partly empty); against the oracle and
    bit-identical on 1-3 threads, over a run-time batch too (its phases reading the panels
    the batch function packs); a weight holding NaN or infinity runs the whole plain sum."""
    from symconv.codegen.schedule import shared_loops
    for target in ("x86-64-v4", "x86-64-v3"):
        arrangement = compiler.compilation(spec, target).arrangements["grad_input"]
        plans = list(arrangement.plans)
        assert len(plans) == 2 ** spec.rank
        assert all(isinstance(c, schedule.ChannelLanes) and c.lanes_inside for _, c in plans)
        assert [str(i) for i in shared_loops(plans)] == loops
        assert [str(i) for i in arrangement.shared] == loops     # what the printer is given
        assert f"share their loops over {', '.join(loops)}:" in \
            schedule.describe_shared(arrangement)
    kernel = compile_spec(spec)
    text = _function_text(kernel, "grad_input")
    # one threaded loop for the phases, the others the plain nest's (for a packed value
    # that is not finite)
    assert text.count("#pragma omp parallel") == 1 + text.count("sc_acc = 0;")
    assert text.count("/* phase ") == 2 ** spec.rank
    x, w, b, gy = random_arrays(spec, rng)
    expected = conv_backward(x, w, gy, *oracle_args(spec))[0]
    opened = compile_spec(spec.with_batch(None))
    for kernel, batch_open in [(k, False) for k in runnable_variants(kernel)] + \
            [(k, True) for k in runnable_variants(opened)]:
        label = f"{kernel.variant.target}{' batch-open' if batch_open else ''}"
        one = kernel.backward(None, w, gy, wrt=("input",), threads=1)[0]
        assert_close(one, expected, spec.dtype, label)
        for threads in (2, 3):
            np.testing.assert_array_equal(
                kernel.backward(None, w, gy, wrt=("input",), threads=threads)[0], one)
    bad = w.copy()
    bad[1, 3, 0, 1] = np.nan
    bad[0, 2, 1, 1] = np.inf
    expected = conv_backward(x, bad, gy, *oracle_args(spec))[0]
    for kernel in runnable_variants(compile_spec(spec)):
        got = kernel.backward(None, bad, gy, wrt=("input",))[0]
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        _assert_close_where_finite(got, expected, spec.dtype, kernel.variant.target)


def test_a_tap_loop_and_a_channel_loop_that_step_evenly_run_as_one():
    """Channels innermost in the input's copy and in the weight's panel: the last tap's loop
    and the channel loop inside it step through both evenly, and the forward prints them as
    one loop of 3 x 48 steps (the same addresses in the same order); a dilation breaks that
    evenness, and the loops stay two.  Both specs run against the oracle in
    test_channel_lanes_against_the_oracle."""
    params = {p.id: p.values[0] for p in SPECS}

    def forward(spec_id):
        text = _compiled(params[spec_id]).source.text
        return text.split("void symconv_forward(")[1].split("\nvoid ")[0]
    fused = forward("2d-copy-halo-moved")
    assert "const int64_t i_k1 = 0;" in fused
    assert re.search(r"for \(int64_t i_c = 0; i_c <= 143; \+\+i_c\)", fused)
    dilated = forward("2d-copy-halo-f64")
    assert "const int64_t i_k1 = 0;" not in dilated
    assert re.search(r"for \(int64_t i_c = 0; i_c <= 15; \+\+i_c\)", dilated)


def test_phases_read_crowded_planes_from_a_task_copy(compile_spec):
    """An input gradient whose 36 grad_output planes lie 1 KiB apart (16 x 16 positions),
    so the summation's steps over them crowd four L1 sets: each task of its phases copies
    the rows they read, every plane's rows j - 1 .. j + 1 of phase row j (a 4-tap kernel
    reads the row before it too; at j = 0 there is none), and the phases broadcast from
    the copy.  The results against the oracle are checked by
    test_channel_lane_phases_run_inside_shared_loops[2d-task-copy]."""
    spec = ConvSpec((1, 16, 32, 32), (36, 16, 4, 4), stride=2, padding=1)
    for target in ("x86-64-v3", "x86-64-v4"):
        plans = compiler.compilation(spec, target).plans["grad_input"]
        (copy,) = {c.task_copy for _, c in plans}
        assert copy.array == "a_grad_output"
        assert [(str(i), low, count) for i, low, count in copy.axes] == \
            [("i_n", 0, 1), ("None", 0, 36), ("sc_i_j0_phase", -1, 3), ("None", 0, 16)]
        assert copy.shape == (1, 36, 3, 16)
    # where the planes do not crowd a set (12 x 12 positions), the phases read grad_output
    plain = ConvSpec((1, 16, 24, 24), (36, 16, 4, 4), stride=2, padding=1)
    plans = compiler.compilation(plain, "x86-64-v3").plans["grad_input"]
    assert all(c.lanes_inside and c.task_copy is None for _, c in plans)
    for kernel in runnable_variants(compile_spec(spec)):
        text = _function_text(kernel, "grad_input")
        assert "sc_tasks_a_grad_output" in text
        threaded = text.split("#pragma omp parallel")[1].split("if (sc_bad)")[0]
        assert " a_grad_output[" not in threaded and "(a_grad_output[" not in threaded
        assert "sc_copy_a_grad_output[" in threaded


def test_phases_drop_their_copies_to_share_loops(compile_spec, monkeypatch, rng):
    """2d-32-s2's input gradient at a batch of 1 (AVX2): alone, every phase with more than
    one tap (the odd-odd phase's four the most products) would read grad_output from a
    copy with the channels innermost, moved by transposes, and the phases could not share
    their loops; run together, they drop the copies (their reads keep their bounds: a
    phase's copy has no halo) and all four share them.  Against the oracle."""
    from symconv.codegen.schedule import shared_loops
    spec = ConvSpec((1, 32, 32, 32), (64, 32, 3, 3), stride=2, padding=1)
    plans = compiler.compilation(spec, "x86-64-v3").plans["grad_input"]
    assert all(not c.copies and c.lanes_inside for _, c in plans)
    assert [str(i) for i in shared_loops(plans)] == ["i_n", "sc_i_j0_phase"]
    with monkeypatch.context() as patched:
        patched.setattr(schedule, "run_together", lambda plans: plans)
        alone = compiler.compilation(spec, "x86-64-v3").plans["grad_input"]
    assert [len(c.copies) for _, c in alone] == [0, 1, 1, 1]
    assert all(c.halo is None for _, p in alone for c in p.copies)
    assert shared_loops(alone) == ()
    x, w, b, gy = random_arrays(spec, rng)
    expected = conv_backward(x, w, gy, *oracle_args(spec))[0]
    for kernel in runnable_variants(compile_spec(spec)):
        assert_close(kernel.backward(None, w, gy, wrt=("input",))[0], expected, spec.dtype,
                     kernel.variant.target)


def test_large_outputs_stage_each_task_and_stream_it():
    """A stride-2 depthwise input gradient the size of MobileNetV2's (8 x 144 x 56 x 56) stages
    each task's plane (its four phases, every other element each) in L1 and streams it out;
    its forward's output (a quarter the size) and smaller layers store in place, and so do
    channel-lane plans and tasks whose outputs would not fit the stage."""
    def stages(spec, name):
        return {c.stage for _, c in _compiled(spec).plans[name]}
    mbv2 = ConvSpec((8, 144, 56, 56), (144, 1, 3, 3), stride=2, padding=1, groups=144)
    assert stages(mbv2, "grad_input") == {schedule.Stage(3, 56 * 56)}
    assert stages(mbv2, "forward") == {None}
    assert stages(replace(mbv2, input_shape=(4, 144, 56, 56)), "grad_input") == {None}
    assert stages(ConvSpec((8, 144, 112, 112), (144, 1, 3, 3), stride=2, padding=1,
                           groups=144), "grad_input") == {None}       # 12544 per plane
    dense = ConvSpec((8, 64, 56, 56), (64, 64, 3, 3), padding=1)
    assert not hasattr(_compiled(dense).plans["grad_input"][0][1], "stage")
    ((piece, chosen),) = _compiled(replace(mbv2, stride=1)).plans["forward"]
    assert chosen.stage == schedule.Stage(3, 56 * 56)
    assert "outputs staged in L1 and streamed out" in schedule.describe(piece, chosen)


@pytest.mark.parametrize("spec", [
    ConvSpec((3, 8, 27, 22), (8, 1, 3, 3), stride=2, padding=1, groups=8),
    ConvSpec((3, 8, 13, 21), (8, 1, 3, 3), padding=1, groups=8, dtype="float64"),
], ids=["phases", "float64"])
@pytest.mark.parametrize("shift", [0, 3])
def test_staged_outputs_against_the_oracle(spec, shift, tmp_path, monkeypatch, rng):
    """Staged outputs forced on small layers (STREAM_ELEMENTS lowered): a stride-2 input
    gradient's four phases fill each plane's stage between them, and a stride-1 forward and
    input gradient fill theirs alone; planes of 594 and 273 elements and outputs ``shift``
    elements past a 64-byte line take the plain stores before and after the streamed lines.
    Against the oracle, and bit-identical on 1, 2 and 3 threads."""
    monkeypatch.setattr(schedule, "STREAM_ELEMENTS", 1000)
    plans = compiler.compilation(spec, "x86-64-v4").plans
    assert all(c.stage is not None for _, c in plans["grad_input"])
    assert {c.stage is not None for _, c in plans["forward"]} == \
        {math.prod(spec.output_shape) >= 1000}
    kernel = compiler.compile_conv(spec, cache_dir=tmp_path)
    assert "sc_stream_" in _function_text(kernel, "grad_input")
    x, w, b, gy = random_arrays(spec, rng)
    expected = conv_forward(x, w, b, *oracle_args(spec))
    grad = conv_backward(x, w, gy, *oracle_args(spec))[0]

    def shifted(shape):
        """NaNs, and an array over them ``shift`` elements past a 64-byte line."""
        buffer = np.full(math.prod(shape) + 64, np.nan, spec.dtype)
        start = (-buffer.ctypes.data) % 64 // buffer.itemsize + shift
        return buffer, start, buffer[start:start + math.prod(shape)].reshape(shape)

    for kernel in runnable_variants(kernel):
        buffer, start, out = shifted(spec.input_shape)
        one = kernel.grad_input(w, gy, out=out, threads=1)
        assert_close(one, grad, spec.dtype, f"{kernel.variant.target} grad_input")
        assert np.isnan(buffer[:start]).all() and np.isnan(buffer[start + one.size:]).all()
        _, _, out = shifted(spec.output_shape)
        assert_close(kernel.forward(x, w, b, out=out, threads=1), expected, spec.dtype,
                     f"{kernel.variant.target} forward")
        for threads in (2, 3):
            np.testing.assert_array_equal(kernel.grad_input(w, gy, threads=threads), one)


def test_a_batch_open_map_stages_its_items_once_the_batch_is_large(tmp_path, monkeypatch,
                                                                   rng):
    """A batch-open input gradient whose items' planes could be staged keeps a staged copy
    of its item and runs it where the batch's output reaches STREAM_ELEMENTS (lowered here
    to 10000: 2 items of 8 x 27 x 22 stay in place, 3 are staged).  Against the oracle on
    both sides, on 1 and 2 threads."""
    monkeypatch.setattr(schedule, "STREAM_ELEMENTS", 10000)
    spec = ConvSpec((None, 8, 27, 22), (8, 1, 3, 3), stride=2, padding=1, groups=8)
    kernel = compiler.compile_conv(spec, cache_dir=tmp_path)
    text = kernel.source
    assert f"sc_batch * {8 * 27 * 22} >= 10000 ? sc_item_" in text
    assert "_grad_input_staged(" in text and "_grad_weight_staged(" not in text
    for batch in (2, 3):
        fixed = replace(spec, input_shape=(batch, 8, 27, 22))
        x, w, _, gy = random_arrays(fixed, rng)
        expected = conv_backward(x, w, gy, *oracle_args(fixed))[0]
        for variant in runnable_variants(kernel):
            for threads in (1, 2):
                got = variant.backward(None, w, gy, wrt=("input",), threads=threads)[0]
                assert_close(got, expected, spec.dtype, f"{variant.variant.target} {batch}")


@pytest.mark.parametrize("open_batch", [False, True])
def test_nan_and_infinity_where_the_definition_puts_them(open_batch, cache_dir):
    """A plan skips products with padding zeros, which are NaN when the other factor is not
    finite: a NaN or ±∞ among the packed values sends the piece to its plain loop nest.
    (fuzzing.check_case plants NaN and ±∞ in every array and compares where they land.)"""
    import fuzzing
    depthwise = ConvSpec((2, 8, 13, 16), (8, 1, 3, 3), padding=1, groups=8)
    for spec in [p.values[0] for p in SPECS[:3] + [p for p in SPECS if p.id in COPIES]] + \
            [depthwise]:
        for seed in range(3):      # each seed plants NaN and ±∞ in other places
            case = fuzzing.Case(spec, "x86-64-v3", seed, True, open_batch)
            kernel = compiler.compile_conv(case.kernel_spec, cache_dir=cache_dir,
                                           target=case.target)
            fuzzing.check_case(kernel, case)


def _check_forward_and_input_gradient(spec, kernel, x, w, b, gy):
    """Every variant's forward and input gradient against the oracle, and bit-identical on
    2 and 3 threads to 1 thread's."""
    expected = conv_forward(x, w, b, *oracle_args(spec)), \
        conv_backward(x, w, gy, *oracle_args(spec))[0]
    for variant in runnable_variants(kernel):
        one = variant.forward(x, w, b, threads=1), variant.grad_input(w, gy, threads=1)
        for got, want, name in zip(one, expected, ("forward", "grad_input")):
            assert_close(got, want, spec.dtype, f"{variant.variant.target} {name} {spec.slug}")
        for threads in (2, 3):
            got = variant.forward(x, w, b, threads=threads), \
                variant.grad_input(w, gy, threads=threads)
            for a, e in zip(got, one):
                np.testing.assert_array_equal(a, e)


def test_the_items_of_a_run_time_batch_share_one_packed_weight(compile_spec, rng):
    """Over a run-time batch, the forward's and input gradient's weight is packed once, by
    the batch function, and every item reads that panel; a weight holding infinity passes
    no panel, and every item runs its plain nest (infinity times a padded zero is NaN, as
    in the definition; the input gradient has no such product)."""
    spec = ConvSpec((None, 16, 12, 12), (32, 16, 3, 3), padding=1)
    for target in ("x86-64-v4", "x86-64-v3"):
        for name in ("forward", "grad_input"):
            plans = compiler.compilation(spec, target).plans[name]
            assert all(isinstance(c, schedule.ChannelLanes) and c.chunking is None
                       for _, c in plans)
    kernel = compile_spec(spec)
    for name in ("forward", "grad_input"):
        batch, item = _function_text(kernel, name), _function_text(kernel, name, "sc_item_")
        assert "a_weight[" in batch and batch.count("sc_alloc(") == 1 + (name == "forward")
        assert "= sc_panels[" in item and "sc_panel0 = sc_alloc(" not in item
    for size in (1, 3):
        fixed = spec.with_batch(size)
        x, w, b, gy = random_arrays(fixed, rng)
        _check_forward_and_input_gradient(fixed, kernel, x, w, b, gy)
        infinite = w.copy()
        infinite[5, 3, 0, 0] = np.inf       # meets the padded zeros of the top row
        with np.errstate(invalid="ignore"):
            nan = conv_forward(x, infinite, b, *oracle_args(fixed)), \
                conv_backward(x, infinite, gy, *oracle_args(fixed))[0]
        for variant in runnable_variants(kernel):
            got = variant.forward(x, infinite, b), variant.grad_input(infinite, gy)
            for g, e in zip(got, nan):
                np.testing.assert_array_equal(np.isnan(g), np.isnan(e))
                np.testing.assert_array_equal(np.isinf(g), np.isinf(e))
            assert np.isnan(got[0]).any() and np.isinf(got[1]).any()


@pytest.mark.parametrize("spec, form", [
    (ConvSpec((None, 16, 16, 16), (32, 16, 3, 3), padding=1), "whole"),
    (ConvSpec((None, 3, 260, 259), (16, 3, 7, 7), stride=2, padding=3), "add"),
], ids=["whole-batch", "items-add"])
def test_a_weight_gradient_over_a_run_time_batch_sums_it_in_place(spec, form, compile_spec,
                                                                  rng):
    """Over a run-time batch, a chunked weight gradient runs its chunks over every item in
    turn, each task's tile summing the whole batch ("whole"); where it copies an item's
    input first (the stem's halo), the items after the first add their sums to the output
    ("add").  Neither goes through a scratch array.  A grad_output holding infinity in the
    last item takes the plain nests, item by item (infinity times a padded zero is NaN, as
    in the definition)."""
    ((_, chosen),) = compiler.compilation(spec, "x86-64-v3").plans["grad_weight"]
    assert isinstance(chosen, schedule.ChannelLanes) and chosen.chunking is not None
    assert bool(chosen.copies) == (form == "add")
    kernel = compile_spec(spec)
    batch = _function_text(kernel, "grad_weight")
    if kernel.variant.target == "x86-64-v3":
        assert ("sc_batch_a_input + sc_n" in batch) == (form == "whole")
        assert ("_grad_weight_add(" in batch) == (form == "add")
        assert "sc_scratch[" not in batch.split("if (sc_failed)")[0]
    fixed = spec.with_batch(3 if form == "whole" else 2)
    _check_weight_gradient(fixed, kernel, rng, threads=(2, 3))
    x, w, _, gy = random_arrays(fixed, rng)
    gy[-1, 4, 0, -1] = np.inf      # the last item: every earlier one has been summed
    _check_non_finite_weight_gradient(fixed, kernel, x, w, gy)


def test_lane_blocks_run_inside_the_tasks_where_the_input_leaves_the_cache(tmp_path,
                                                                          monkeypatch, rng):
    """A 1x1 layer 8 x 256 x 28² -> 64 would read its 6.4 MB input from memory once per
    lane block: each task (one output row) runs every lane block instead (AVX-512; AVX2
    copies the input a window at a time, which orders the lane blocks itself); at a batch
    of 1 (0.8 MB) each lane block keeps its panel in cache over every row.  With the limit
    lowered, a small layer's forward and input gradient run so, against the oracle and
    bit-identical on 1, 2 and 3 threads."""
    def inside(spec, target, name="forward"):
        return [c.lanes_inside for _, c in compiler.compilation(spec, target).plans[name]]
    large = ConvSpec((8, 256, 28, 28), (64, 256, 1, 1))
    assert inside(large, "x86-64-v4") == [True]
    ((_, copied),) = compiler.compilation(large, "x86-64-v3").plans["forward"]
    assert copied.copies and copied.window is not None
    for target in ("x86-64-v4", "x86-64-v3"):
        assert inside(large.with_batch(1), target) == [False]
    monkeypatch.setattr(schedule, "LANES_INSIDE_ELEMENTS", 0)
    monkeypatch.setattr(schedule, "L1_SHARE", 1.0)    # no copies: a window orders its own
    spec = ConvSpec((2, 64, 5, 40), (64, 64, 3, 3), padding=1)
    for target in ("x86-64-v4", "x86-64-v3"):
        assert inside(spec, target) == [True] and inside(spec, target, "grad_input") == [True]
    kernel = compiler.compile_conv(spec, cache_dir=tmp_path)
    _check_forward_and_input_gradient(spec, kernel, *random_arrays(spec, rng))


def _copied_axes(spec, name: str) -> list:
    """Per piece of ``name``'s AVX2 plan, the axis each copy moves innermost."""
    return [[c.axis for c in chosen.copies] for _, chosen in _compiled(spec).plans[name]]


def test_a_register_block_whose_reads_leave_l1_reads_a_copy(tmp_path, rng):
    """A 1-D layer's 32 channels lie 1 KiB apart, so a register block's pass over its 9
    taps reads 64 lines of 8 L1 sets, 8 deep: its forward and input gradient read copies
    with the channels innermost.  16 channels fill the sets 4 deep (half the ways: the
    panel's share) and are read in place.  Against the oracle and bit-identical on 1, 2
    and 3 threads."""
    spec = ConvSpec((2, 32, 256), (32, 32, 9), padding=4)
    assert _copied_axes(spec, "forward") == _copied_axes(spec, "grad_input") == [[1]]
    fewer = ConvSpec((2, 16, 256), (16, 16, 9), padding=4)
    assert _copied_axes(fewer, "forward") == _copied_axes(fewer, "grad_input") == [[]]
    kernel = compiler.compile_conv(spec, cache_dir=tmp_path)
    _check_forward_and_input_gradient(spec, kernel, *random_arrays(spec, rng))


def test_channel_lanes_run_along_the_fewer_lanes_where_the_other_panel_is_large(tmp_path,
                                                                                 rng):
    """A stride-2 1-D layer's input gradient over a run-time batch: the phase of its
    positions that one tap reaches could run its lanes along those 4096 positions, packing
    2 MiB of grad_output (128 channels) as the panel (too large to pack whole: it would
    pack chunks), or along the 16 input channels, packing the weight whole; it packs the
    weight.  Against the oracle at a batch of 2, on 1-3 threads."""
    spec = ConvSpec((None, 16, 8192), (128, 16, 3), stride=2, padding=1)
    lanes = [(str(chosen.lane), chosen.chunking) for _, chosen in
             _compiled(spec).plans["grad_input"]]
    assert lanes == [("i_c", None)] * 2, lanes     # the weight packed whole
    kernel = compiler.compile_conv(spec, cache_dir=tmp_path)
    batch = spec.with_batch(2)
    _check_forward_and_input_gradient(batch, kernel, *random_arrays(batch, rng))


def test_short_rows_with_taps_over_both_edges_add_fused_products(compile_spec, rng):
    """The input gradient of a 4 -> 8 channel layer with 16-wide rows: too few channels for
    channel lanes, so lanes along the rows, where every vector meets an edge and is masked
    by the taps' bounds.  The one masked block spans both vectors (8 accumulators with
    AVX2, not 4); the weight is checked finite, so each product is one FMA of a load zero
    outside the bounds.  Against the oracle, and with a NaN and an infinity in the weight
    (the plain nest then runs: NaN and infinity exactly where the definition puts them)."""
    spec = ConvSpec((2, 4, 6, 16), (8, 4, 3, 3), padding=1, bias=False)
    ((piece, chosen),) = _compiled(spec).plans["grad_input"]
    assert isinstance(chosen, schedule.OutputLanes) and str(chosen.lane) == "i_j1", chosen
    assert chosen.finite == ("a_weight",) and chosen.vectors == 2, chosen
    text = compiler.compilation(spec, "x86-64-v3").source.text
    assert "_mm256_mul_ps" not in text.split("_grad_input(const")[1].split("\n}\n")[0]
    _check_input_gradient_with_special_weights(spec, compile_spec, rng)


def test_stride_phases_fall_back_to_the_whole_plain_sum(compile_spec, rng):
    """A stride-2 layer's input-gradient phases whose lanes meet the taps' bounds check the
    weight finite; where it is not, the plain nests of the whole sum run (one nest with
    the stride's tests, not a copy per phase)."""
    spec = ConvSpec((2, 3, 9, 32), (8, 3, 3, 3), stride=2, padding=1, bias=False)
    plans = _compiled(spec).plans["grad_input"]
    assert len(plans) == 4 and any(c.finite == ("a_weight",) for _, c in plans), plans
    text = compiler.compilation(spec, "x86-64-v3").source.text
    function = text.split("_grad_input(const")[1].split("\n}\n")[0]
    assert function.count("sc_acc = 0;") == 1, "one plain nest for the whole sum"
    _check_input_gradient_with_special_weights(spec, compile_spec, rng)


def _check_input_gradient_with_special_weights(spec, compile_spec, rng):
    x, w, b, gy = random_arrays(spec, rng)
    for special in (False, True):
        if special:
            w.flat[5], w.flat[-4] = np.inf, np.nan
        with np.errstate(invalid="ignore"):
            expected = conv_backward(x, w, gy, *oracle_args(spec))[0]
        for kernel in runnable_variants(compile_spec(spec)):
            got = kernel.backward(None, w, gy, wrt=("input",))[0]
            where = f"{kernel.variant.target}, special values: {special}"
            assert np.array_equal(np.isnan(got), np.isnan(expected)), where
            assert np.array_equal(np.isinf(got), np.isinf(expected)), where
            finite = np.isfinite(expected)
            assert_close(got[finite], expected[finite], spec.dtype, where)
