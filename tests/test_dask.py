"""symconv.dask: the chunking's invariants (property test, no C), and chunked forward,
grad_input, grad_weight and grad_bias equal to the single-machine kernel and to the NumPy
oracle, on dask's synchronous scheduler and on a LocalCluster of two worker processes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oracle import conv_backward, conv_forward

da = pytest.importorskip("dask.array")
sd = pytest.importorskip("symconv.dask")

from symconv import ConvSpec  # noqa: E402


# --- the chunking, checked element by element (pure Python) ---------------------------------------

@st.composite
def axes(draw):
    kernel = draw(st.integers(1, 5))
    dilation = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 4))
    lo, hi = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    reach = dilation * (kernel - 1) + 1
    size = draw(st.integers(max(1, reach - lo - hi), 40))
    n_chunks = draw(st.integers(1, 6))
    cuts = sorted(set(draw(st.lists(st.integers(1, size - 1), max_size=n_chunks)) if size > 1
                      else []))
    chunks = np.diff([0, *cuts, size]).tolist()
    return size, (lo, hi), stride, dilation, kernel, chunks


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(axes())
def test_plan_owns_every_output_once_and_halos_cover_every_read(axis):
    size, (lo, hi), stride, dilation, kernel, chunks = axis
    reach = dilation * (kernel - 1) + 1
    padded = size + lo + hi
    out = (padded - reach) // stride + 1
    chunking = sd.AxisChunking.make(size, (lo, hi), stride, dilation, kernel, out, chunks)
    bounds, outputs, inputs = chunking.bounds, chunking.outputs, chunking.input_bounds
    assert bounds[0] == 0 and bounds[-1] == padded and outputs[0] == 0 and outputs[-1] == out
    assert inputs[0] == 0 and inputs[-1] == size
    assert all(a < b for a, b in zip(outputs, outputs[1:])), "every chunk owns an output"
    assert all(a < b for a, b in zip(inputs, inputs[1:])), "every chunk holds some input"
    assert all(b % stride == 0 for b in bounds[:-1])
    # dask's map_overlap needs every chunk at least as large as the halo it lends
    if len(chunking.chunks) > 1:
        assert min(chunking.input_chunks) >= chunking.halo_in and min(chunking.out_chunks) >= chunking.halo_out
    last = len(chunking.chunks) - 1
    for j in range(last + 1):
        owned = range(outputs[j], outputs[j + 1])
        assert all(bounds[j] <= stride * i < bounds[j + 1] for i in owned) or j == last
        # forward: the block (its input chunk plus the next one's halo) holds every input
        # position its outputs read; the rest of the region is outside the input (padding)
        held = (inputs[j], min(inputs[j + 1] + (chunking.halo_in if j < last else 0), size))
        start = bounds[j] - lo  # the region, in input coordinates
        stop = start + chunking.forward_length(j)
        for i in owned:
            window = (stride * i - lo, stride * i - lo + reach)
            assert start <= window[0] and window[1] <= stop
        for p in range(start, stop):
            assert held[0] <= p < held[1] or p < 0 or p >= size, (j, p, held)
        # grad_input: every output whose window touches the chunk's input is in the block
        first = chunking.first_gather_output(j)
        touching = [i for i in range(out) if stride * i - lo < inputs[j + 1]
                    and stride * i - lo + reach > inputs[j]]
        assert all(first <= i < outputs[j + 1] for i in touching)
        if j > 0:  # the halo is exactly what the previous block lends
            assert outputs[j] - first == chunking.halo_out
        assert stride * first <= inputs[j] + lo  # the local region starts at or before the chunk


# --- against the single-machine kernel and the oracle ----------------------------------------

CASES = [  # input, weight, conv arguments, input chunks
    pytest.param((2, 3, 17, 15), (4, 3, 3, 2),
                 dict(stride=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2)), (1, 3, 9, 8),
                 id="2d-strided-asym"),
    pytest.param((1, 4, 23), (6, 2, 3), dict(stride=3, padding=((2, 1),), dilation=2, groups=2),
                 (1, 2, 5), id="1d-groups-coprime"),
    pytest.param((1, 1, 30), (2, 1, 2), dict(stride=5), (1, 1, 7), id="1d-stride-gt-kernel"),
]


def reference(x, w, b, gy, spec, compile_spec):
    kernel = compile_spec(spec)
    args = (spec.stride, spec.padding, spec.dilation, spec.groups)
    single = (kernel.forward(x, w, b), *kernel.backward(x, w, gy))
    oracle = (conv_forward(x, w, b, *args), *conv_backward(x, w, gy, *args))
    return single, oracle


def check(results, single, oracle, tolerance=1e-12):
    for name, got, one, ref in zip(("forward", "grad_input", "grad_weight", "grad_bias"),
                                   results, single, oracle):
        assert got.shape == one.shape and got.dtype == one.dtype, name
        scale = max(1.0, float(np.abs(ref).max()))
        assert float(np.abs(got - one).max()) / scale <= tolerance, f"{name} vs single kernel"
        assert float(np.abs(got - ref).max()) / scale <= tolerance, f"{name} vs oracle"


def problem(input_shape, weight_shape, kwargs, seed=0):
    rng = np.random.default_rng(seed)
    spec = ConvSpec(input_shape, weight_shape, dtype="float64", **kwargs)
    x = rng.standard_normal(input_shape)
    w = rng.standard_normal(weight_shape)
    b = rng.standard_normal(weight_shape[0])
    gy = rng.standard_normal(spec.output_shape)
    return spec, x, w, b, gy


@pytest.mark.parametrize("input_shape, weight_shape, kwargs, chunks", CASES)
def test_synchronous_scheduler(input_shape, weight_shape, kwargs, chunks, compile_spec, cache_dir):
    import dask
    spec, x, w, b, gy = problem(input_shape, weight_shape, kwargs)
    xd = da.from_array(x, chunks=chunks)
    y = sd.conv(xd, w, b, cache_dir=cache_dir, **kwargs)
    assert y.numblocks[2:] == tuple(len(p.out_chunks) for p in sd.chunking(
        input_shape, weight_shape, dtype="float64", chunks=chunks, precompile=False,
        cache_dir=cache_dir, **kwargs).chunkings)
    assert max(y.numblocks[2:]) > 1, "the case must really be cut"
    gx, gw, gb = sd.conv_backward(xd, w, gy, cache_dir=cache_dir, **kwargs)
    with dask.config.set(scheduler="synchronous"):
        results = dask.compute(y, gx, gw, gb)
    check(results, *reference(x, w, b, gy, spec, compile_spec))


def test_functional_pieces_and_errors(compile_spec, cache_dir):
    import dask
    spec, x, w, b, gy = problem((2, 2, 12), (3, 2, 3), dict(stride=2, padding=1))
    with dask.config.set(scheduler="synchronous"):
        gx = sd.grad_input(w, gy, x.shape, 2, 1, chunks=(1, 2, 5), cache_dir=cache_dir).compute()
        gw = sd.grad_weight(x, gy, w.shape, 2, 1, chunks=(1, 2, 5), cache_dir=cache_dir).compute()
    single = compile_spec(ConvSpec(x.shape, w.shape, stride=2, padding=1, bias=False,
                                   dtype="float64"))
    np.testing.assert_allclose(gx, single.grad_input(w, gy), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gw, single.grad_weight(x, gy), rtol=1e-12, atol=1e-12)
    free = sd.chunking(x.shape, w.shape, 2, 1, bias=False, dtype="float64", chunks=(1, 2, 6),
                       cache_dir=cache_dir)
    with dask.config.set(scheduler="synchronous"):
        lazy_gx, lazy_gw, lazy_gb = free.backward(x, w, gy)      # by default all it has
        np.testing.assert_allclose(lazy_gw.compute(), gw, rtol=1e-12, atol=1e-12)
    assert lazy_gb is None
    with pytest.raises(ValueError, match="give chunks="):
        sd.conv(x, w, b, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="pass bias="):
        sd.chunking(x.shape, w.shape, chunks=(1, 2, 6), dtype="float64", cache_dir=cache_dir,
                precompile=False).forward(x, w)
    with pytest.raises(ValueError, match="bias has shape"):
        sd.conv(x, w, b[:2], chunks=(1, 2, 6), cache_dir=cache_dir, precompile=False)
    with pytest.raises(ValueError, match="grad_output has shape"):
        sd.grad_input(w, gy[:, :, :-1], x.shape, 2, 1, chunks=(1, 2, 5), cache_dir=cache_dir)
    with pytest.raises(TypeError, match="weight has dtype float32"):
        sd.conv(x, w.astype(np.float32), b, chunks=(1, 2, 6), cache_dir=cache_dir,
                precompile=False)


# --- a LocalCluster with two worker processes ------------------------------------------------

@pytest.fixture(scope="module")
def client(cache_dir):
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", memory_limit="1GiB")
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def test_local_cluster_two_worker_processes(client, compile_spec, cache_dir):
    from distributed import get_task_stream
    spec, x, w, b, gy = problem((2, 3, 20, 18), (4, 3, 3, 3),
                                dict(stride=2, padding=1, dilation=(1, 2)), seed=7)
    kwargs = dict(stride=2, padding=1, dilation=(1, 2))
    xd = da.from_array(x, chunks=(1, 3, 7, 9))
    y = sd.conv(xd, w, b, cache_dir=cache_dir, **kwargs)
    gx, gw, gb = sd.conv_backward(xd, w, gy, cache_dir=cache_dir, **kwargs)
    with get_task_stream(client) as stream:
        results = client.compute([y, gx, gw, gb], sync=True)
    check(results, *reference(x, w, b, gy, spec, compile_spec))
    workers = {task["worker"] for task in stream.data}
    assert len(workers) == 2, "both worker processes ran blocks"
    pids = set(client.run(lambda: __import__("os").getpid()).values())
    assert len(pids) == 2 and __import__("os").getpid() not in pids
