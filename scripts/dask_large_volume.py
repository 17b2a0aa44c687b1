"""A volume larger than a worker's memory, convolved in chunks on a dask LocalCluster.

    python scripts/dask_large_volume.py                    # 640³ float32 (1 GiB), 1 and 2 workers
    python scripts/dask_large_volume.py --size 384 --workers 2 --memory-limit 300MiB

For each worker count it starts a ``LocalCluster`` of worker *processes*, each
with one thread and a memory limit smaller than the input volume, then:

1. checks a small volume end to end (forward, grad_input, grad_weight, grad_bias
   on the cluster against the single-machine kernel on the whole array);
2. runs the large one: the input is generated block by block on the workers
   (``dask.array.random``; it never exists anywhere in one piece), the forward
   output is reduced to its sum and sum of squares, and the gradients of
   ``Σ gy · conv(x, w, b)`` for a random ``gy`` are computed — ``grad_input``
   reduced to its sum of squares, ``grad_weight`` and ``grad_bias`` by the tree
   reduction — one streaming pass each;
3. spot-checks the large run: a window of the forward output straddling chunk
   corners against the single-machine kernel on that window of the input, and
   ``grad_bias`` against a plain dask sum of ``gy``;

and prints the wall time, throughput and each worker's peak memory, and, to read
the speed-up against, how many times one process's throughput N CPU-bound NumPy
processes reach together on this machine.  Kernels are compiled once, up front,
into a cache directory the workers share.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dask.array as da  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

import symconv  # noqa: E402
import symconv.dask as sd  # noqa: E402
from symconv import ConvSpec  # noqa: E402


def _busy(_=None) -> float:
    """A fixed CPU-bound NumPy workload; returns its wall time."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(12):
        rng.standard_normal(2_000_000, dtype=np.float32).sum()
    return time.perf_counter() - start


def machine_scaling(processes: int) -> float:
    """How many times one process's throughput ``processes`` processes reach here together
    (2.0 on two idle cores; less when the cores are shared or busy)."""
    import multiprocessing
    if processes == 1:
        return 1.0
    alone = min(_busy() for _ in range(2))
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_busy, range(processes))  # warm-up
        together = max(pool.map(_busy, range(processes)))
    return processes * alone / together


def peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def small_check(client: Client, cache_dir: str) -> float:
    """The cluster's results for a 40³ volume against the single-machine kernel."""
    rng = np.random.default_rng(0)
    spec = ConvSpec((1, 2, 40, 40, 40), (3, 2, 3, 3, 3), stride=2, padding=1, dtype="float64")
    x = rng.standard_normal(spec.input_shape)
    w = rng.standard_normal(spec.weight_shape)
    b = rng.standard_normal(3)
    gy = rng.standard_normal(spec.output_shape)
    xd = da.from_array(x, chunks=(1, 2, 16, 16, 16))
    y = sd.conv(xd, w, b, stride=2, padding=1, cache_dir=cache_dir)
    grads = sd.conv_backward(xd, w, gy, stride=2, padding=1, cache_dir=cache_dir)
    got = client.compute([y, *grads], sync=True)
    kernel = symconv.compile_conv(spec, cache_dir=cache_dir)
    expected = (kernel.forward(x, w, b), *kernel.backward(x, w, gy))
    return max(float(np.abs(g - e).max() / max(1.0, np.abs(e).max()))
               for g, e in zip(got, expected))


def run(workers: int, args, cache_dir: str) -> dict:
    size, chunk, c_out = args.size, args.chunk, args.channels_out
    shape = (1, 1, size, size, size)
    volume = math.prod(shape) * 4
    kwargs = dict(stride=1, padding=1)
    spec = ConvSpec(shape, (c_out, 1, 3, 3, 3), **kwargs)
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(spec.weight_shape) / math.sqrt(27)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      memory_limit=args.memory_limit, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(workers)
        limit = min(info["memory_limit"] for info in client.scheduler_info()["workers"].values())
        error = small_check(client, cache_dir)

        x = da.random.default_rng(2).standard_normal(shape, chunks=(1, 1, chunk, chunk, chunk),
                                                     dtype=np.float32)
        chunked = sd.chunking(shape, spec.weight_shape, bias=True, dtype="float32", chunks=x.chunks,
                       cache_dir=cache_dir, **kwargs)  # compiles every block kernel here, once
        gy = da.random.default_rng(3).standard_normal(spec.output_shape,
                                                      chunks=chunked.output_chunks, dtype=np.float32)
        y = chunked.forward(x, w, b)
        gx, gw, gb = chunked.backward(x, w, gy)
        # One pass per result, each streaming block by block: the input and grad_output are
        # regenerated for each pass rather than held between passes (a graph that needs x for
        # both forward and grad_weight would keep every block of x until both are done).
        passes = {"forward": [y.sum(dtype=np.float64), (y * y).sum(dtype=np.float64)],
                  "grad_input": [(gx * gx).sum(dtype=np.float64)],
                  "grad_weight+bias": [gw, gb]}
        seconds, results = {}, {}
        for name, wanted in passes.items():
            start = time.perf_counter()
            results[name] = client.compute(wanted, sync=True)
            seconds[name] = time.perf_counter() - start
        (y_sum, y_sq), (gx_sq,), (gw, gb) = results.values()

        # spot checks: a forward window across chunk corners, grad_bias against a plain sum
        a, n = chunk - 5, 12
        # (arrays gathered from workers can be unaligned views of a message buffer: copy)
        window = np.array(x[:, :, a:a + n, a:a + n, a:a + n].compute())
        single = symconv.compile_conv(ConvSpec(window.shape, spec.weight_shape),
                                      cache_dir=cache_dir)
        expected = single.forward(window, w, b)
        got = y[:, :, a + 1:a + n - 1, a + 1:a + n - 1, a + 1:a + n - 1].compute()
        window_error = float(np.abs(got - expected).max() / np.abs(expected).max())
        gb_plain = gy.astype(np.float64).sum(axis=(0, 2, 3, 4)).compute()
        gb_error = float(np.abs(gb - gb_plain).max() / np.abs(gb_plain).max())
        peaks = client.run(peak_rss)
        blocks = math.prod(len(p.chunks) for p in chunked.chunkings)
        kernels = len(chunked.block_shapes())
    flops = 3 * spec.flops  # forward, grad_input, grad_weight
    total = sum(seconds.values())
    return dict(workers=workers, seconds=total, passes=seconds, volume=volume, limit=limit,
                blocks=blocks, kernels=kernels, gflops=flops / total / 1e9, small_error=error,
                window_error=window_error, gb_error=gb_error, peak=max(peaks.values()),
                y_mean=y_sum / math.prod(spec.output_shape), gx_sq=gx_sq, gw_norm=float(
                    np.linalg.norm(gw)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=640, help="edge of the cube (default 640)")
    parser.add_argument("--chunk", type=int, default=128, help="edge of a chunk (default 128)")
    parser.add_argument("--channels-out", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--memory-limit", default="400MiB", help="per worker (default 400MiB)")
    parser.add_argument("--cache-dir", default=None, help="kernel cache shared with the workers")
    args = parser.parse_args()
    cache_dir = args.cache_dir or os.environ.get("SYMCONV_CACHE_DIR") or \
        tempfile.mkdtemp(prefix="symconv-dask-")
    print(f"volume {args.size}³ float32 = {args.size ** 3 * 4 / 2 ** 30:.2f} GiB in "
          f"{args.chunk}³ chunks; conv 3×3×3, 1 -> {args.channels_out} channels, padding 1; "
          f"worker memory limit {args.memory_limit}; kernel cache {cache_dir}", flush=True)
    rows = []
    for workers in args.workers:
        result = run(workers, args, cache_dir)
        rows.append(result)
        passes = ", ".join(f"{name} {t:.1f} s" for name, t in result["passes"].items())
        print(f"\n{workers} worker(s): {result['seconds']:.1f} s ({passes}; "
              f"{result['gflops']:.1f} GFLOP/s), {result['blocks']} blocks, "
              f"{result['kernels']} block kernels", flush=True)
        print(f"  volume {result['volume'] / 2 ** 20:.0f} MiB vs worker memory limit "
              f"{result['limit'] / 2 ** 20:.0f} MiB; peak worker RSS "
              f"{result['peak'] / 2 ** 20:.0f} MiB")
        print(f"  small volume vs single-machine kernel: max rel. error "
              f"{result['small_error']:.1e}; large run: forward window vs single-machine "
              f"kernel {result['window_error']:.1e}, grad_bias vs plain sum "
              f"{result['gb_error']:.1e}")
        print(f"  mean(y) {result['y_mean']:.5f}  |grad_input|² {result['gx_sq']:.6e}  "
              f"|grad_weight| {result['gw_norm']:.6e}")
    if len(rows) > 1:
        base = rows[0]["seconds"]
        print("\nworkers  seconds  speed-up  (this machine, N busy NumPy processes: throughput)")
        for row in rows:
            print(f"{row['workers']:>7}  {row['seconds']:7.1f}  {base / row['seconds']:8.2f}x  "
                  f"{machine_scaling(row['workers']):.2f}x")
    ok = all(r["small_error"] < 1e-12 and r["window_error"] < 1e-5 and r["gb_error"] < 1e-4
             for r in rows)
    print("\nall checks passed" if ok else "\nCHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
