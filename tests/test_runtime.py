"""Runtime behaviour: the GIL is released, results repeat bit for bit across processes, and
neither calls nor compiles leak memory or file descriptors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import test_kernels
from symconv import ConvSpec

TESTS = str(Path(__file__).parent)


def run_python(code: str, env=None, timeout=600) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_kernel_calls_release_the_gil(cache_dir):
    """While one thread is inside a long kernel call, another keeps running Python: the
    longest pause it sees is a small part of the call (holding the GIL would stall it for
    the whole call)."""
    from symconv.compiler import compile_conv
    spec = ConvSpec((1, 32, 96, 96), (32, 32, 5, 5), padding=2, dtype="float64", bias=False)
    kernel = compile_conv(spec, cache_dir=cache_dir, target="x86-64")     # plain C: slow
    x = np.ones(spec.input_shape)
    w = np.ones(spec.weight_shape)
    kernel.forward(x, w, threads=1)
    window = {}

    def call():
        window["start"] = time.perf_counter()
        kernel.forward(x, w, threads=1)
        window["end"] = time.perf_counter()

    ticks = []
    worker = threading.Thread(target=call)
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    duration = window["end"] - window["start"]
    inside = [t for t in ticks if window["start"] <= t <= window["end"]]
    assert duration > 0.05, f"the call took only {duration:.3f} s: too short to tell"
    gaps = np.diff([window["start"], *inside, window["end"]])
    assert gaps.max() < duration / 3, (
        f"the main thread stalled {gaps.max():.3f} s of a {duration:.3f} s call")


THREADED = test_kernels.THREADED[1]     # every function but grad_bias runs on threads


def test_results_are_bit_identical_across_processes_and_thread_counts(cache_dir, tmp_path):
    """Fresh processes (other hash seeds, other thread counts, the kernel loaded from the
    cache or just built) give byte-identical forward and gradients."""
    spec = ConvSpec(**THREADED)
    rng = np.random.default_rng(5)
    x = rng.standard_normal(spec.input_shape).astype(np.float32)
    w = rng.standard_normal(spec.weight_shape).astype(np.float32)
    b = rng.standard_normal(spec.bias_shape).astype(np.float32)
    gy = rng.standard_normal(spec.output_shape).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x, w=w, b=b, gy=gy)
    code = f"""
        import hashlib, sys, numpy as np, symconv
        from symconv import ConvSpec
        k = symconv.compile_conv(ConvSpec(**{THREADED!r}), cache_dir=sys.argv[1])
        d = np.load({str(tmp_path / 'in.npz')!r})
        out = [k.forward(d['x'], d['w'], d['b']), *k.backward(d['x'], d['w'], d['gy'])]
        print(hashlib.sha256(b''.join(a.tobytes() for a in out)).hexdigest())
    """
    digests = set()
    for seed, threads, where in (("1", "1", cache_dir), ("2", "2", cache_dir),
                                 ("3", "3", tmp_path / "fresh")):
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(where)],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONHASHSEED": seed,
                                  "SYMCONV_NUM_THREADS": threads})
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def _rss_and_fds() -> str:
    return textwrap.dedent("""
        import os, resource
        def rss():
            with open('/proc/self/statm') as f:
                return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
        def fds():
            return len(os.listdir('/proc/self/fd'))
    """)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_100000_calls_do_not_grow_memory(cache_dir):
    """100,000 calls of a small kernel (fresh outputs, out=, gradients, refused bad calls)
    grow the resident set by no more than a few MB."""
    out = run_python(_rss_and_fds() + textwrap.dedent(f"""
        import numpy as np, symconv
        from symconv import ConvSpec
        spec = ConvSpec((1, 2, 8), (2, 2, 3), padding=1)
        k = symconv.compile_conv(spec, cache_dir={str(cache_dir)!r})
        x = np.ones(spec.input_shape, np.float32); w = np.ones(spec.weight_shape, np.float32)
        b = np.ones(2, np.float32); gy = np.ones(spec.output_shape, np.float32)
        out = np.empty(spec.output_shape, np.float32)
        bad = np.ones((1, 2, 9), np.float32)
        def batch(n):
            for i in range(n):
                k.forward(x, w, b)
                k.forward(x, w, b, out=out)
                k.grad_input(w, gy)
                k.backward(x, w, gy, wrt=("weight", "bias"))
                if i % 10 == 0:
                    try:
                        k.forward(bad, w, b)
                    except ValueError:
                        pass
        batch(5000)
        before, fds_before = rss(), fds()
        batch(25000)           # 25,000 x 4 = 100,000 calls
        print(rss() - before, fds() - fds_before)
    """))
    growth, fds = map(int, out.split())
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MB"
    assert fds == 0


def _compile_120_specs() -> subprocess.Popen:
    """Compile and call 120 distinct specs in one fresh process, into a cache of its own;
    print the growth of memory and open file descriptors from the 30th to the 120th."""
    import tempfile
    cache = tempfile.mkdtemp(prefix="symconv-120-")
    code = _rss_and_fds() + textwrap.dedent(f"""
        import shutil, numpy as np, symconv
        from symconv import ConvSpec
        def spec(i):
            return ConvSpec((1, 1 + i % 2, 3 + i // 2), (1 + i % 3, 1 + i % 2, 1 + i % 3),
                            padding=i % 2, bias=bool(i % 2))
        samples = {{}}
        for i in range(120):
            s = spec(i)
            k = symconv.compile_conv(s, cache_dir={cache!r}, target="x86-64")
            args = [np.ones(s.input_shape, np.float32), np.ones(s.weight_shape, np.float32)]
            if s.bias:
                args.append(np.zeros(s.bias_shape, np.float32))
            assert k.forward(*args).shape == s.output_shape
            if i in (29, 119):
                samples[i] = (rss(), fds())
        print(samples[119][0] - samples[29][0], samples[119][1] - samples[29][1])
        shutil.rmtree({cache!r}, ignore_errors=True)
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


BACKGROUND = {"test_compiling_120_specs_leaks_no_descriptors_and_bounded_memory":
              _compile_120_specs}


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_compiling_120_specs_leaks_no_descriptors_and_bounded_memory():
    """120 distinct specs compiled and called in one process: no file descriptor stays open,
    and memory grows by a bounded amount per loaded kernel (no leak per build beyond it).
    The process starts right after collection (conftest.py) and runs beside the suite."""
    from conftest import background_job
    job = background_job("test_compiling_120_specs_leaks_no_descriptors_and_bounded_memory")
    stdout, stderr = job.communicate(timeout=1200)
    assert job.returncode == 0, stderr[-4000:]
    growth, fds = map(int, stdout.split())
    assert fds == 0, f"{fds} file descriptors leaked over 90 compiles"
    assert growth < 90 * 160 * 1024, f"memory grew {growth / 2**20:.1f} MB over 90 compiles"
