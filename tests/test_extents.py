"""Extents past 2³¹: compiling costs the same whatever the extents, and the kernels index
in 64 bits.  The reference is written here from the convolution's definition."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from symconv import ConvSpec
from symconv.codegen.vector import _lane_runs
from symconv.compiler import compile_op

STRIDE = 2 ** 21
HUGE = ConvSpec(input_shape=(1, 1, 2 ** 31 + 9), weight_shape=(1, 1, 3), stride=STRIDE,
                padding=1, bias=False)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("width, wide", [(8, 1), (8, 3), (16, 2)])
def test_lane_runs_cover_every_lane_once_and_unmasked_only_inside(width, wide, merged):
    for extent, low, high in itertools.product(range(1, 40), range(-2, 42, 3), range(-2, 42, 5)):
        high = min(high, extent - 1)            # the interior lies inside the lanes
        runs = _lane_runs(extent, width, wide, (low, high), merged)
        lanes = []
        for start, count, vectors, masked in runs:
            for block in range(count):
                first = start + block * vectors * width
                block_lanes = range(first, first + vectors * width)
                assert masked or (first >= low and block_lanes[-1] <= high)
                lanes += block_lanes
        assert lanes[:extent] == list(range(extent)) and len(lanes) - extent < width
    assert len(_lane_runs(2 ** 40, 8, 3, (5, 2 ** 40 - 7))) <= 4     # closed form, at once


def test_compiling_a_huge_extent_needs_little_memory(tmp_path):
    """The spec of the issue, built in a child process limited to 512 MiB of address space."""
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))
        from symconv import ConvSpec
        from symconv.compiler import compile_op
        spec = ConvSpec(input_shape=(1, 1, 2**31 + 9), weight_shape=(1, 1, 3), stride=2**21,
                        padding=1)
        kernel = compile_op(spec, cache_dir={str(tmp_path)!r})
        print(sorted(kernel.functions))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={"OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "grad_input" in done.stdout


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


def test_a_gradient_of_more_than_two_to_the_31_elements(cache_dir, rng):
    """grad_input has 2³¹ + 9 elements; the nonzero ones sit at both ends and across 2³¹."""
    size = HUGE.input_shape[-1]
    if _available_bytes() < 3 * 4 * size // 2:
        pytest.skip("needs about 13 GB of free memory")
    kernel = compile_op(HUGE, cache_dir=cache_dir)
    outputs = HUGE.output_shape[-1]
    w = rng.standard_normal((1, 1, 3)).astype(np.float32)
    x = np.zeros(HUGE.input_shape, np.float32)         # untouched pages cost nothing
    taps = {(i, t): i * STRIDE + t - 1 for i in range(outputs) for t in range(3)}
    inside = {p for p in taps.values() if 0 <= p < size}
    assert max(inside) > 2 ** 31
    x[0, 0, sorted(inside)] = rng.standard_normal(len(inside)).astype(np.float32)
    expected = np.zeros(outputs)
    for (i, t), p in taps.items():
        if p in inside:
            expected[i] += w[0, 0, t] * x[0, 0, p]
    np.testing.assert_allclose(kernel.forward(x, w)[0, 0], expected, rtol=1e-5, atol=1e-6)
    del x
    gy = rng.standard_normal((1, 1, outputs)).astype(np.float32)
    gx = kernel.grad_input(w, gy)[0, 0]
    expected_gx = {}
    for (i, t), p in taps.items():
        if p in inside:
            expected_gx[p] = expected_gx.get(p, 0.0) + gy[0, 0, i] * w[0, 0, t]
    positions = np.flatnonzero(gx)
    assert set(positions.tolist()) <= set(expected_gx)
    np.testing.assert_allclose(gx[sorted(expected_gx)], [expected_gx[p] for p in
                                                         sorted(expected_gx)], rtol=1e-5)
