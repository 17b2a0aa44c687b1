"""``ConvSpec(layout="channels_last")``: input and output arrays (N, *spatial, C).

The spec and its index sum first (no C), then the compiled kernels against the NumPy oracle
run on the same data moved channels first, then the bindings: torch passes channels_last
tensors through without a copy, JAX and the graph take a ``layout`` argument.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from oracle import conv_backward, conv_forward
from symconv import ConvSpec, compiler
from symconv.codegen import schedule
from symconv.symbolic import define
from test_kernels import assert_close, oracle_args, random_arrays, runnable_variants


def last(a):
    """A channels-first array's memory moved channels last: (N, C, *s) -> (N, *s, C)."""
    return None if a is None else np.ascontiguousarray(np.moveaxis(a, 1, -1))


def first(a):
    return np.moveaxis(a, -1, 1)


# --- the spec and its index sum ---------------------------------------------------------------

def test_layout_is_checked_and_named():
    with pytest.raises(ValueError, match=r"ConvSpec.layout: expected one of .*'nhwc'"):
        ConvSpec((1, 2, 5, 5), (3, 2, 3, 3), layout="nhwc")
    spec = ConvSpec((None, 2, 5, 6), (3, 2, 3, 3), stride=2, layout="channels_last")
    assert spec.array_shape("input") == (None, 5, 6, 2)
    assert spec.array_shape("output") == (None, 2, 2, 3)
    assert spec.array_shape("weight") == (3, 2, 3, 3) and spec.array_shape("bias") == (3,)
    assert "channels_last" in spec.describe() and spec.slug.endswith("_nhwc")


def test_channels_first_keys_do_not_change_and_layouts_round_trip():
    """The default layout stays out of the spec's dict, so packages compiled before the field
    existed keep their key; channels_last is a field of its own and a key of its own."""
    spec = ConvSpec((2, 3, 8, 8), (4, 3, 3, 3), padding=1)
    assert "layout" not in spec.to_dict()
    cl = replace(spec, layout="channels_last")
    assert cl.to_dict()["layout"] == "channels_last" and cl.key != spec.key
    assert ConvSpec.from_dict(cl.to_dict()) == cl and ConvSpec.from_dict(spec.to_dict()) == spec


def test_the_index_sum_reads_and_writes_channels_last():
    """Only the order of the arrays' axes changes: input[n, ..., c], output[n, ..., o]."""
    op = define.definition(ConvSpec((2, 4, 6, 5), (6, 2, 3, 3), groups=2, padding=1,
                                    layout="channels_last"))
    assert op.shapes["input"] == (2, 6, 5, 4) and op.shapes["output"] == (2, 6, 5, 6)
    assert op.forward.output.shape == (2, 6, 5, 2, 3)         # (n, i0, i1, g, o)
    assert [str(i) for i in op.forward.indices] == ["n", "i0", "i1", "g", "o"]
    (x,) = [a for a in op.inputs if a.name == "input"]
    assert x.shape == (2, 6, 5, 2, 2)


# --- compiled kernels against the oracle ------------------------------------------------------

SPECS = [
    # dense: lanes along the output channels, rows along the last spatial axis
    pytest.param(ConvSpec((2, 16, 9, 13), (24, 16, 3, 3), padding=1), id="2d-pad1-24ch"),
    pytest.param(ConvSpec((1, 20, 11, 17), (20, 20, 3, 3), stride=2, dilation=2,
                          padding=((2, 1), (0, 3))), id="2d-stride2-dil2-asym"),
    pytest.param(ConvSpec((2, 8, 5, 6, 7), (16, 8, 3, 3, 3), padding=1, bias=False),
                 id="3d-nobias"),
    pytest.param(ConvSpec((None, 12, 40), (8, 12, 3), padding=1, dilation=3, dtype="float64"),
                 id="1d-f64-open"),
    # grouped, depthwise and three input channels: the other plans, or the plain loops
    pytest.param(ConvSpec((2, 6, 7, 6, 5), (6, 2, 3, 2, 3), padding=(1, 0, 2), groups=3),
                 id="3d-groups"),
    pytest.param(ConvSpec((2, 16, 10, 9), (16, 1, 3, 3), padding=1, groups=16),
                 id="2d-depthwise"),
    pytest.param(ConvSpec((1, 3, 20, 19), (16, 3, 7, 7), stride=2, padding=3), id="stem"),
    pytest.param(ConvSpec((2, 3, 9, 8), (4, 3, 3, 3), padding_mode="reflect", padding=1),
                 id="reflect"),
]


@pytest.mark.parametrize("spec", SPECS)
def test_channels_last_against_the_oracle(spec, compile_spec, rng):
    spec = replace(spec, layout="channels_last")
    x, w, b, gy = random_arrays(spec.with_batch(spec.input_shape[0] or 3), rng)
    mode = spec.padding_mode
    if mode == "zeros":
        expected_y = conv_forward(x, w, b, *oracle_args(spec))
        expected = conv_backward(x, w, gy, *oracle_args(spec))
    else:
        from oracle import conv_backward_mode, conv_forward_mode
        expected_y = conv_forward_mode(x, w, b, *oracle_args(spec), mode)
        expected = conv_backward_mode(x, w, gy, *oracle_args(spec), mode)
    inputs = [a for a in (last(x), w, b) if a is not None]
    for kernel in runnable_variants(compile_spec(spec)):
        where = kernel.variant.target
        y = kernel.forward(*inputs)
        assert y.shape == (x.shape[0], *spec.output_shape[2:], spec.output_shape[1])
        assert_close(first(y), expected_y, spec.dtype, f"{where} forward")
        gx, gw, gb = kernel.backward(last(x), w, last(gy))
        assert_close(first(gx), expected[0], spec.dtype, f"{where} grad_input")
        assert_close(gw, expected[1], spec.dtype, f"{where} grad_weight")
        if spec.bias:
            assert_close(gb, expected[2], spec.dtype, f"{where} grad_bias")


def test_too_few_channels_for_a_vector_still_take_channel_lanes():
    """The stem's input gradient (the "stem" case above, against the oracle): no plan fits
    its 3 channels at the default lane use, so each stride phase runs channel lanes over 3
    of the 8 or 16 lanes (the fallback) instead of scalar loops.  One channel has nothing to
    put in lanes."""
    stem = replace(SPECS[6].values[0], layout="channels_last")
    for target in ("x86-64-v3", "x86-64-v4"):
        plans = compiler.compilation(stem, target).plans["grad_input"]
        assert len(plans) == 4
        for _, chosen in plans:
            assert isinstance(chosen, schedule.ChannelLanes) and str(chosen.lane) == "i_c"
    single = ConvSpec((1, 1, 20, 19), (16, 1, 7, 7), stride=2, padding=3, layout="channels_last")
    for _, chosen in compiler.compilation(single, "x86-64-v3").plans["grad_input"]:
        assert not isinstance(chosen, schedule.ChannelLanes)


def test_half_empty_output_lanes_give_way_to_channel_lanes(compile_spec, rng):
    """A layer over 4 input channels: in AVX2 its input gradient's lanes along them fill
    half a vector either way, and channel lanes (packed weight, broadcast rows) run instead
    of output lanes (tested, masked rows; 3x as long measured); its forward, along 16
    output channels, keeps whole channel lanes.  Against the oracle on every variant."""
    spec = ConvSpec((2, 4, 10, 20), (16, 4, 3, 3), padding=1, layout="channels_last")
    plans = compiler.compilation(spec, "x86-64-v3").plans
    ((_, backward),) = plans["grad_input"]
    assert isinstance(backward, schedule.ChannelLanes) and str(backward.lane) == "i_c"
    assert schedule.lane_use(backward.lane, 8) == 0.5
    ((_, forward),) = plans["forward"]
    assert isinstance(forward, schedule.ChannelLanes) and str(forward.lane) == "i_o"
    x, w, b, gy = random_arrays(spec, rng)
    expected = conv_backward(x, w, gy, *oracle_args(spec))[0]
    for kernel in runnable_variants(compile_spec(spec)):
        got = kernel.backward(None, w, last(gy), wrt=("input",))[0]
        assert_close(first(got), expected, spec.dtype, kernel.variant.target)


def test_dense_layers_run_channel_lanes_along_the_channels_and_rows_along_the_last_axis():
    """Channels innermost are what channel lanes want: each accumulator vector is stored
    straight to its channels (no tile between; 20 channels in blocks of 24 lanes: the
    lanes past the last masked), the input's channels are broadcast from consecutive
    addresses, no copy.  (The oracle tests above check the values.)"""
    spec = ConvSpec((2, 16, 9, 13), (24, 16, 3, 3), padding=1, layout="channels_last")
    compiled = compiler.compilation(spec, "x86-64-v3")
    for name, lane in (("forward", "i_o"), ("grad_input", "i_c")):
        ((_, chosen),) = compiled.plans[name]
        assert isinstance(chosen, schedule.ChannelLanes) and chosen.chunking is None
        assert (str(chosen.lane), str(chosen.block)) == (lane, "i_i1" if name == "forward"
                                                         else "i_j1")
        assert not any(c.axis is not None for c in chosen.copies)
        text = compiled.source.text.split(f"_{name}(const")[1].split("\n}\n")[0]
        assert "sc_tile" not in text and "_mm256_storeu_ps(a_" in text
    twenty = replace(spec, input_shape=(2, 20, 9, 13), weight_shape=(20, 20, 3, 3))
    text = compiler.compilation(twenty, "x86-64-v3").source.text
    assert "_mm256_maskstore_ps(a_output + " in text.split("_forward(const")[1]


def test_channels_last_results_are_bit_identical_for_every_thread_count(compile_spec, rng):
    spec = ConvSpec((4, 16, 12, 12), (16, 16, 3, 3), padding=1, layout="channels_last")
    x, w, b, gy = random_arrays(spec, rng)
    kernel = compile_spec(spec)
    one = (kernel.forward(last(x), w, b, threads=1), *kernel.backward(last(x), w, last(gy),
                                                                        threads=1))
    two = (kernel.forward(last(x), w, b, threads=2), *kernel.backward(last(x), w, last(gy),
                                                                        threads=2))
    for a, c in zip(one, two):
        assert np.array_equal(a, c)


def test_a_channels_first_array_is_refused_by_a_channels_last_kernel(compile_spec, rng):
    spec = ConvSpec((2, 4, 8, 6), (5, 4, 3, 3), layout="channels_last")
    x, w, b, _ = random_arrays(spec, rng)
    with pytest.raises(ValueError, match="input"):
        compile_spec(spec).forward(x, w, b)


# --- bindings --------------------------------------------------------------------------------

def test_torch_passes_channels_last_tensors_through_without_a_copy(cache_dir, monkeypatch):
    torch = pytest.importorskip("torch")
    import symconv.torch as st
    torch.manual_seed(0)
    x = torch.randn(2, 16, 10, 9).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(24, 16, 3, 3), torch.randn(24)
    seen = []
    real = st._array
    monkeypatch.setattr(st, "_array", lambda t: seen.append(t.data_ptr()) or real(t))
    y = st.conv(x, w, b, padding=1, stride=(2, 1), allow_copy=False, cache_dir=cache_dir)
    assert seen[0] == x.data_ptr(), "the input reached the kernel as the tensor's own memory"
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    expected = torch.nn.functional.conv2d(x, w, b, padding=1, stride=(2, 1))
    assert torch.allclose(y, expected, atol=1e-4)


@pytest.mark.parametrize("rank", [2, 3])
def test_torch_channels_last_gradients_match_torch(rank, cache_dir):
    torch = pytest.importorskip("torch")
    import symconv.torch as st
    torch.manual_seed(1)
    fmt = torch.channels_last if rank == 2 else torch.channels_last_3d
    x = torch.randn(2, 8, *(6,) * rank, dtype=torch.float64).contiguous(memory_format=fmt)
    w = torch.randn(12, 4, *(3,) * rank, dtype=torch.float64)
    b = torch.randn(12, dtype=torch.float64)
    for t in (x, w, b):
        t.requires_grad_()
    conv = getattr(torch.nn.functional, f"conv{rank}d")
    mine = st.conv(x, w, b, padding=1, groups=2, cache_dir=cache_dir)
    ref = conv(x, w, b, padding=1, groups=2)
    g = torch.randn_like(ref)
    got = torch.autograd.grad((mine * g).sum(), (x, w, b))
    want = torch.autograd.grad((ref * g).sum(), (x, w, b))
    assert torch.allclose(mine, ref)
    for a, c in zip(got, want):
        assert torch.allclose(a, c)
    if rank == 2:       # in 3-D, gradcheck's perturbations cost 15 s; the gradients matched
        assert torch.autograd.gradcheck(
            lambda a, c: st.conv(a, c, None, padding=1, groups=2, cache_dir=cache_dir),
            (x[:1].detach().contiguous(memory_format=fmt).requires_grad_(),
             w.detach().requires_grad_()))


def test_jax_conv_takes_channels_last_arrays(cache_dir):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import symconv.jax as sj
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 9, 8, 6)), jnp.float32)       # NHWC
    w = jnp.asarray(rng.standard_normal((5, 6, 3, 3)), jnp.float32)       # OIHW
    b = jnp.asarray(rng.standard_normal(5), jnp.float32)

    def mine(x, w):
        return sj.conv(x, w, b, padding=1, stride=2, layout="channels_last",
                       cache_dir=cache_dir)

    def ref(x, w):
        return jax.lax.conv_general_dilated(x, w, (2, 2), [(1, 1), (1, 1)],
                                            dimension_numbers=("NHWC", "OIHW", "NHWC")) + b
    assert np.allclose(mine(x, w), ref(x, w), atol=1e-4)
    loss = [lambda x, w, f=f: (f(x, w) ** 2).sum() for f in (mine, ref)]
    for a, c in zip(jax.grad(loss[0], (0, 1))(x, w), jax.grad(loss[1], (0, 1))(x, w)):
        assert np.allclose(a, c, atol=1e-3, rtol=1e-4)


def test_graph_conv_takes_channels_last_arrays(cache_dir, monkeypatch):
    monkeypatch.setenv("SYMCONV_CACHE_DIR", str(cache_dir))
    from symconv.graph import Tensor, conv
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 4, 7, 7)), rng.standard_normal((3, 4, 3, 3))
    xt, wt = Tensor(last(x), requires_grad=True), Tensor(w, requires_grad=True)
    y = conv(xt, wt, padding=1, layout="channels_last")
    assert np.allclose(first(y.data), conv_forward(x, w, None, (1, 1), ((1, 1), (1, 1)),
                                                    (1, 1), 1))
    y.sum().backward()
    gx, gw, _ = conv_backward(x, w, np.ones((2, 3, 7, 7)), (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    assert np.allclose(first(xt.grad), gx) and np.allclose(wt.grad, gw)


def test_dask_refuses_channels_last():
    from symconv.dask import ChunkedConv
    spec = ConvSpec((1, 2, 8, 8), (2, 2, 3, 3), layout="channels_last")
    with pytest.raises(NotImplementedError, match="layout 'channels_last'"):
        ChunkedConv(spec, ((1,), (2,), (8,), (8,)))


def test_cli_explains_a_channels_last_layer(capsys, cache_dir):
    from symconv.cli import main
    assert main(["explain", "--input", "1,16,8,8", "--weight", "16,16,3,3", "--padding", "1",
                 "--layout", "channels_last", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "output[n, i0, i1, o]" in out and "channels_last" in out
    assert "vector lanes along i_o" in out
    assert main(["explain", "--input", "1,4,8,8", "--weight", "4,2,3,3", "--transpose",
                 "--layout", "channels_last"]) == 2
    assert "--layout" in capsys.readouterr().err


def test_depthwise_channels_last_runs_lanes_along_the_channels():
    """A depthwise layer's channels are no GEMM (each is read by every array): output lanes
    along them, the forward's weight read from a copy with the channel axis innermost (its
    stride is the 9 taps), the weight gradient's rows along the taps of the last axis."""
    spec = ConvSpec((2, 16, 10, 9), (16, 1, 3, 3), padding=1, groups=16, layout="channels_last")
    plans = compiler.compilation(spec, "x86-64-v3").plans
    ((piece, forward),) = plans["forward"]
    assert isinstance(forward, schedule.OutputLanes) and str(forward.lane) == "i_g"
    assert [(c.array, c.axis, c.halo) for c in forward.copies] == [("a_weight", 0, None)]
    assert "a_weight copied with axis 0 innermost" in schedule.describe(piece, forward)
    ((_, weight),) = plans["grad_weight"]
    assert isinstance(weight, schedule.OutputLanes) and not weight.copies
    assert (str(weight.lane), str(weight.block), weight.rows) == ("i_g", "i_k1", 3)


def test_input_rows_that_crowd_l2_cut_the_weight_gradients_chunks(compile_spec, rng):
    """The weight gradient broadcasts the input, one row of channels per summation step: 256
    channels put the rows 1 KiB apart, in 64 of L2's sets, and 512 steps would fill more
    than half their ways, so the chunks are cut to 256 steps (700 positions: three
    segments, the last short); 128 channels (512 B apart) keep GEMM_CHUNK.  Against the
    oracle, bit-identical on 1, 2 and 3 threads."""
    spec = ConvSpec((1, 256, 700), (16, 256, 3), padding=1, layout="channels_last")
    narrow = replace(spec, input_shape=(1, 128, 700), weight_shape=(16, 128, 3))
    for case, steps in ((spec, 256), (narrow, schedule.GEMM_CHUNK)):
        ((_, chosen),) = compiler.compilation(case, "x86-64-v3").plans["grad_weight"]
        assert (chosen.chunking.segment, chosen.chunking.rows) == (steps, 1)
    x, w, _, gy = random_arrays(spec, rng)
    expected = conv_backward(x, w, gy, *oracle_args(spec))[1]
    for kernel in runnable_variants(compile_spec(spec)):
        got = kernel.backward(last(x), None, last(gy), wrt=("weight",))[1]
        assert_close(got, expected, spec.dtype, kernel.variant.target)
        for threads in (2, 3):
            np.testing.assert_array_equal(
                kernel.backward(last(x), None, last(gy), wrt=("weight",), threads=threads)[1],
                got)


def test_lane_blocks_share_the_chunks_of_an_input_too_large_for_the_cache(compile_spec, rng):
    """An input too large to stay in cache (LANES_INSIDE_ELEMENTS) whose rows crowd L2 (256
    or 768 channels, 1 or 3 KiB apart): each task of the weight gradient takes up to
    LANE_SET lane blocks and runs them chunk by chunk (140 output channels: 9 lane blocks of
    16, the last partial, in a set of 8 and a set of 1), the summation in parts (256
    channels: too few groups of rows for the tasks) or not (768).  Against the oracle,
    bit-identical on 1, 2 and 3 threads, and with the batch left to run time."""
    parted = ConvSpec((1, 256, 4200), (140, 256, 3), padding=1, layout="channels_last")
    whole = ConvSpec((1, 768, 1400), (140, 768, 3), padding=1, layout="channels_last")
    for spec, parts in ((parted, True), (whole, False)):
        assert np.prod(spec.input_shape) > schedule.LANES_INSIDE_ELEMENTS
        ((_, chosen),) = compiler.compilation(spec, "x86-64-v3").plans["grad_weight"]
        assert chosen.chunking.lanes == schedule.LANE_SET
        assert chosen.chunking.segment < schedule.GEMM_CHUNK
        assert (chosen.chunking.parts > 1) == parts
        x, w, _, gy = random_arrays(spec, rng)
        expected = conv_backward(x, w, gy, *oracle_args(spec))[1]
        for case in (spec, spec.with_batch(None)):
            for kernel in runnable_variants(compile_spec(case)):
                got = kernel.backward(last(x), None, last(gy), wrt=("weight",))[1]
                assert_close(got, expected, spec.dtype, kernel.variant.target)
                for threads in (2, 3):
                    np.testing.assert_array_equal(
                        kernel.backward(last(x), None, last(gy), wrt=("weight",),
                                        threads=threads)[1], got)
