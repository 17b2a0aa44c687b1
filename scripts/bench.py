"""Benchmark symconv's kernels against PyTorch (NCHW and channels_last) in one process.

    python scripts/bench.py                      # the whole suite, 1 and 2 threads
    python scripts/bench.py --cases 2d-56 --threads 1 --repeat 5 --json out.json
    python scripts/bench.py --avx2               # AVX2 symconv against AVX2-only torch
    python scripts/bench.py --tune               # every kernel tuned on this machine first

For every case it times forward, grad_input and grad_weight(+bias) — each the
median of repeated runs after a warm-up, every kernel of a pass run in turn (in a
shuffled order) so that all see the same load — for symconv (into reused ``out=`` buffers, and into fresh
arrays) and for torch, and prints times, GFLOP/s, the
percentage of this machine's FMA peak (measured here by a small C loop), the
ratio (torch in its faster layout)/symconv per pass and for the sum, and the compile time of each
case.  ``best%`` and ``by best`` are the % of peak and the ratio from each kernel's best time
instead of its median: the peak is a best time too, and on a shared machine load comes in
stretches that slow dense kernels by up to 1.9x, so the medians carry the machine's load
as well as the kernel's speed.  The 4-D case has no torch layer: its baseline is NumPy im2col + matmul.
A pass's workspace (``work MiB``) is the growth of the process's peak RSS during one call
beyond the arrays it returns, the C heap trimmed first.

Every case also runs symconv's channels_last kernel (``layout="channels_last"``: input
and output arrays (N, *spatial, C), what torch's channels_last memory holds): the
``sc NHWC`` columns, its % of peak and its ratio against the same torch time.

Every case also runs through a batch-open package (the same spec with its
batch left to run time, ``input_shape=(None, ...)``: what the graph and the
bindings compile): the ``open`` column, and ``open/fixed``, its time over the
fixed-batch package's.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import symconv
from symconv import ConvSpec
from symconv.package import build, targets
from symconv.kernel import best_variant

PASSES = ("forward", "grad_input", "grad_weight")


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    c_in: int
    c_out: int
    spatial: tuple[int, ...]
    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1

    @property
    def spec(self) -> ConvSpec:
        rank = len(self.spatial)
        return ConvSpec((self.n, self.c_in, *self.spatial),
                        (self.c_out, self.c_in // self.groups, *(self.kernel,) * rank),
                        stride=self.stride, padding=self.padding, dilation=self.dilation,
                        groups=self.groups, bias=True, dtype="float32")


CASES = [
    Case("1d-tiny", 1, 1, 1, (64,), 3, padding=1),
    Case("2d-tiny", 1, 3, 8, (16, 16), 3, padding=1),
    Case("3d-tiny", 1, 2, 4, (8, 8, 8), 3, padding=1),
    Case("2d-56", 8, 64, 64, (56, 56), 3, padding=1),
    Case("2d-32-s2", 8, 32, 64, (32, 32), 3, stride=2, padding=1),
    Case("2d-depthwise", 8, 64, 64, (32, 32), 3, padding=1, groups=64),
    Case("2d-pointwise", 8, 256, 64, (28, 28), 1),
    Case("3d-32", 2, 16, 32, (32, 32, 32), 3, padding=1),
    Case("3d-64-s2", 1, 8, 16, (64, 64, 64), 3, stride=2, padding=1),
    Case("3d-32-d2", 2, 16, 32, (32, 32, 32), 3, padding=2, dilation=2),
    Case("1d-audio", 4, 64, 64, (16000,), 9, padding=4),
    Case("4d-16", 1, 4, 8, (16, 16, 16, 16), 3, padding=1),
    # layers of real networks
    Case("resnet-14", 8, 256, 256, (14, 14), 3, padding=1),
    Case("stem-7x7-s2", 2, 3, 64, (224, 224), 7, stride=2, padding=3),
    Case("mbv2-dw-s2", 8, 144, 144, (56, 56), 3, stride=2, padding=1, groups=144),
    Case("mbv2-project", 8, 144, 24, (28, 28), 1),
    Case("unet3d-48", 1, 32, 32, (48, 48, 48), 3, padding=1),
    Case("wav2vec-k3-s2", 2, 512, 512, (4000,), 3, stride=2, padding=1),
]

FMA_PEAK_C = """
typedef float v8 __attribute__((vector_size(VECTOR_BYTES)));
float fma_loop(long iterations) {
    v8 b = {0};
    b += 1.0001f;
    v8 c = b * 1e-7f;
    v8 a0 = b, a1 = b + 1, a2 = b + 2, a3 = b + 3, a4 = b + 4, a5 = b + 5, a6 = b + 6,
       a7 = b + 7, a8 = b + 8, a9 = b + 9, a10 = b + 10, a11 = b + 11;
    for (long i = 0; i < iterations; ++i) {
        a0 = a0 * b + c; a1 = a1 * b + c; a2 = a2 * b + c; a3 = a3 * b + c;
        a4 = a4 * b + c; a5 = a5 * b + c; a6 = a6 * b + c; a7 = a7 * b + c;
        a8 = a8 * b + c; a9 = a9 * b + c; a10 = a10 * b + c; a11 = a11 * b + c;
        /* opaque to the optimiser: every chain is really computed */
        __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5),
                         "+v"(a6), "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11));
    }
    v8 s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
    return s[0] + s[7];
}
"""


PEAK_RUNS = 9


def measure_fma_peak(threads: int, target: str | None) -> float:
    """GFLOP/s of 12 independent chains of float FMAs per thread, with the vectors symconv
    uses on ``target`` (256-bit AVX2, or 512-bit where the target has AVX-512): the best of
    PEAK_RUNS runs (on a shared machine the best of three read 3-7% under what the dense
    kernels then reached)."""
    import importlib.util
    directory = Path(tempfile.mkdtemp(prefix="symconv-peak-"))
    variant = best_variant(targets.variants(target))      # the code this machine runs
    width = 64 if variant.isa == "avx512" else 32
    (directory / targets.SOURCE).write_text(FMA_PEAK_C.replace("VECTOR_BYTES", str(width)))
    config = build.build_config(variant.target)
    config = {**config, "flags": [*config["flags"], "-ffp-contract=fast"]}
    path = build.compile_extension(directory, "_fma_peak", "float fma_loop(long iterations);",
                                   config)
    spec = importlib.util.spec_from_file_location("_fma_peak", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    iterations = 20_000_000
    module.lib.fma_loop(1000)
    best = 0.0
    for _ in range(PEAK_RUNS):
        workers = [threading.Thread(target=module.lib.fma_loop, args=(iterations,))
                   for _ in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        seconds = time.perf_counter() - start
        best = max(best, threads * iterations * 12 * (width // 4) * 2 / seconds / 1e9)
    return best


WARM_SECONDS = 0.01


def timed_together(fns: dict, repeat: int) -> dict:
    """Median seconds of each function (``name``) and its best time (``name_best``), all
    run in turn ``repeat`` times after a warm-up:
    every one sees the same machine (on a shared one, load drifts between separate timings
    by up to 50%, and a ratio of two timings taken apart drifts with it).  Each round runs
    them in another order (seeded), so that none always follows the same one; a function
    whose warm-up took under WARM_SECONDS runs once more, untimed, just before each timed
    call: the caches then hold its own code and arrays, not the previous function's (a
    tiny layer's first call after torch's took 1.3x its time)."""
    samples: dict = {name: [] for name in fns}
    quick = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        quick[name] = time.perf_counter() - start < WARM_SECONDS
    order = random.Random(0)
    for _ in range(repeat):
        names = list(fns)
        order.shuffle(names)
        for name in names:
            fn = fns[name]
            if quick[name]:
                fn()
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {**{name: statistics.median(times) for name, times in samples.items()},
            **{f"{name}_best": min(times) for name, times in samples.items()}}


def _trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim), so that what
    a pass allocates shows in the RSS instead of reusing pages an earlier case freed."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def workspace_mib(fn, calls: int = 3) -> float:
    """MiB by which the process's peak RSS grows during a call beyond the arrays the call
    returns: the pass's workspace (copies, packed panels, tiles; Linux; NaN elsewhere).  The
    least of ``calls`` calls: a pass needs the same each time, and whatever else the process
    touches meanwhile only adds."""
    def hwm() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024
        return math.nan

    def once() -> float:
        _trim_heap()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = hwm()
        result = fn()
        results = result if isinstance(result, tuple) else (result,)
        returned = sum(a.nbytes for a in results if isinstance(a, np.ndarray)) / 2**20
        return max(hwm() - before - returned, 0.0)
    try:
        return min(once() for _ in range(calls))
    except OSError:
        return math.nan


def symconv_passes(kernel, spec, arrays, threads: int, fresh: bool):
    x, w, b, gy = arrays
    outs = {name: np.empty(shape, np.float32) for name, shape in
            (("forward", spec.array_shape("output")), ("grad_input", spec.array_shape("input")),
             ("grad_weight", spec.weight_shape), ("grad_bias", spec.bias_shape))}

    def out(name):
        return None if fresh else outs[name]
    return {
        "forward": lambda: kernel.forward(x, w, b, out=out("forward"), threads=threads),
        "grad_input": lambda: kernel.grad_input(w, gy, out=out("grad_input"), threads=threads),
        "grad_weight": lambda: (kernel.grad_weight(x, gy, out=out("grad_weight"), threads=threads),
                                kernel.grad_bias(gy, out=out("grad_bias"), threads=threads)),
    }


def torch_passes(torch, spec, arrays, channels_last: bool):
    x, w, b, gy = (torch.from_numpy(a) for a in arrays)
    rank = spec.rank
    if channels_last:
        fmt = torch.channels_last if rank == 2 else torch.channels_last_3d
        x, w, gy = (t.contiguous(memory_format=fmt) for t in (x, w, gy))
    conv = getattr(torch.nn.functional, f"conv{rank}d")
    pad = [lo for lo, _ in spec.padding]
    args = dict(stride=list(spec.stride), padding=pad, dilation=list(spec.dilation),
                groups=spec.groups)

    def backward(mask):
        return torch.ops.aten.convolution_backward(
            gy, x, w, [w.shape[0]], list(spec.stride), pad, list(spec.dilation), False,
            [0] * rank, spec.groups, mask)
    return {
        "forward": lambda: conv(x, w, b, **args),
        "grad_input": lambda: backward([True, False, False]),
        "grad_weight": lambda: backward([False, True, True]),
    }


def im2col_passes(spec, arrays):
    """NumPy baseline for ranks torch lacks: unfold the padded input, then one matmul."""
    x, w, b, gy = arrays
    rank = spec.rank
    kernel, out = spec.kernel_size, spec.output_shape[2:]
    n, c_out = spec.output_shape[:2]

    def unfold(x):
        xp = np.pad(x, [(0, 0), (0, 0), *spec.padding])
        cols = [xp[(slice(None), slice(None),
                    *(slice(d * t, d * t + s * (o - 1) + 1, s)
                      for t, s, d, o in zip(tap, spec.stride, spec.dilation, out)))]
                for tap in itertools.product(*(range(k) for k in kernel))]
        return np.stack(cols, axis=2).reshape(n, -1, math.prod(out))   # (n, c*k, positions)

    wm = w.reshape(c_out, -1)

    def forward():
        return (wm @ unfold(x)).reshape(spec.output_shape) + b.reshape(1, -1, *(1,) * rank)

    def grad_input():
        cols = (wm.T @ gy.reshape(n, c_out, -1)).reshape(n, spec.input_shape[1],
                                                         math.prod(kernel), *out)
        gxp = np.zeros([n, spec.input_shape[1], *(s + lo + hi for s, (lo, hi) in
                                                   zip(spec.input_shape[2:], spec.padding))],
                       np.float32)
        for t, tap in enumerate(itertools.product(*(range(k) for k in kernel))):
            window = tuple(slice(d * k, d * k + s * (o - 1) + 1, s)
                           for k, s, d, o in zip(tap, spec.stride, spec.dilation, out))
            gxp[(slice(None), slice(None), *window)] += cols[:, :, t]
        return gxp

    def grad_weight():
        g = gy.reshape(n, c_out, -1)
        return np.einsum("nop,nkp->ok", g, unfold(x)), gy.sum(axis=(0, *range(2, gy.ndim)))
    return {"forward": forward, "grad_input": grad_input, "grad_weight": grad_weight}


def run_case(case: Case, threads_list, repeat: int, torch, cache_dir: str, peaks,
             target: str | None, tune: bool = False) -> dict:
    spec = case.spec
    start = time.perf_counter()
    kernel = symconv.compile_conv(spec, cache_dir=cache_dir, target=target, tune=tune)
    compile_seconds = time.perf_counter() - start
    open_kernel = symconv.compile_conv(spec.with_batch(None), cache_dir=cache_dir, target=target,
                                       tune=tune)
    last_spec = replace(spec, layout="channels_last")
    last_kernel = symconv.compile_conv(last_spec, cache_dir=cache_dir, target=target, tune=tune)
    rng = np.random.default_rng(0)
    arrays = (rng.standard_normal(spec.input_shape, np.float32),
              rng.standard_normal(spec.weight_shape, np.float32),
              rng.standard_normal(spec.bias_shape, np.float32),
              rng.standard_normal(spec.output_shape, np.float32))
    result = {"case": case.name, "spec": spec.describe(), "flops": spec.flops,
              "compile_seconds": compile_seconds, "threads": {}}
    for threads in threads_list:
        row = {}
        if torch is not None:
            torch.set_num_threads(threads)
        baselines = {}
        if spec.rank <= 3 and torch is not None:
            baselines["torch"] = torch_passes(torch, spec, arrays, channels_last=False)
            if spec.rank in (2, 3):
                baselines["torch_cl"] = torch_passes(torch, spec, arrays, channels_last=True)
        else:
            baselines["numpy_im2col"] = im2col_passes(spec, arrays)
        mine = symconv_passes(kernel, spec, arrays, threads, fresh=False)
        fresh = symconv_passes(kernel, spec, arrays, threads, fresh=True)
        opened = symconv_passes(open_kernel, spec, arrays, threads, fresh=False)
        x, w, b, gy = arrays
        moved = (np.ascontiguousarray(np.moveaxis(x, 1, -1)), w, b,
                 np.ascontiguousarray(np.moveaxis(gy, 1, -1)))
        channels_last = symconv_passes(last_kernel, last_spec, moved, threads, fresh=False)
        for name in PASSES:
            runs = {"symconv": mine[name], "symconv_open": opened[name],
                    "symconv_fresh": fresh[name], "symconv_cl": channels_last[name],
                    **{label: passes[name] for label, passes in baselines.items()}}
            with _torch_grad(torch, enabled=False):
                entry = timed_together(runs, repeat)
            entry["symconv_work_mib"] = workspace_mib(fresh[name])
            row[name] = entry
        row["sum"] = {k: sum(row[p][k] for p in PASSES) for k in row["forward"]
                      if not k.endswith("_mib")}
        for name, entry in row.items():
            passes = 3 if name == "sum" else 1
            entry["gflops"] = passes * spec.flops / entry["symconv"] / 1e9
            for suffix, key in (("", "symconv"), ("_best", "symconv_best"),
                                ("_cl", "symconv_cl")):
                entry[f"peak_percent{suffix}"] = \
                    100 * passes * spec.flops / entry[key] / 1e9 / peaks[threads]
        result["threads"][threads] = row
    return result


class _torch_grad:
    def __init__(self, torch, enabled: bool):
        self.context = torch.set_grad_enabled(enabled) if torch is not None else None

    def __enter__(self):
        return self.context.__enter__() if self.context else None

    def __exit__(self, *exc):
        return self.context.__exit__(*exc) if self.context else None


def print_case(result: dict) -> None:
    print(f"\n{result['case']}: {result['spec']}  (compile {result['compile_seconds']:.2f} s)")
    for threads, row in result["threads"].items():
        baseline = "torch" if "torch" in row["forward"] else "numpy_im2col"
        print(f"  {threads} thread(s)   {'symconv':>9} {'fresh':>9} {baseline:>12} "
              f"{'torch_cl':>9} {'GFLOP/s':>8} {'%peak':>6} {'best%':>6} {'ratio':>6} "
              f"{'by best':>7} {'work MiB':>8} "
              f"{'open':>9} {'open/fixed':>10} {'sc NHWC':>9} {'%peak':>6} {'ratio':>6}")
        for name in (*PASSES, "sum"):
            e = row[name]
            cl = f"{e['torch_cl'] * 1e3:8.3f}m" if "torch_cl" in e else f"{'-':>9}"
            mib = f"{e['symconv_work_mib']:8.1f}" if "symconv_work_mib" in e else f"{'':8}"
            print(f"  {name:>12}  {e['symconv'] * 1e3:8.3f}m {e['symconv_fresh'] * 1e3:8.3f}m "
                  f"{e[baseline] * 1e3:11.3f}m {cl} {e['gflops']:8.1f} {e['peak_percent']:6.1f} "
                  f"{e['peak_percent_best']:6.1f} {fastest(e, baseline) / e['symconv']:6.2f} "
                  f"{fastest(e, baseline, '_best') / e['symconv_best']:7.2f} {mib} "
                  f"{e['symconv_open'] * 1e3:8.3f}m "
                  f"{e['symconv_open'] / e['symconv']:10.3f} {e['symconv_cl'] * 1e3:8.3f}m "
                  f"{e['peak_percent_cl']:6.1f} {fastest(e, baseline) / e['symconv_cl']:6.2f}")


def geomean(values) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def fastest(entry: dict, baseline: str, statistic: str = "") -> float:
    """The baseline's time in its faster layout (torch: NCHW or channels_last): its median,
    or with ``statistic="_best"`` its best time."""
    own = entry[baseline + statistic]
    return min(own, entry.get("torch_cl" + statistic, own))


def run_avx2_child() -> None:
    """This script again, with ``--target x86-64-v3``, in a process whose torch (oneDNN and
    ATen) may use AVX2 at most: the variables must be set before torch is imported."""
    argv = [a for a in sys.argv[1:] if a != "--avx2"]
    if "--target" in argv:
        del argv[argv.index("--target"):argv.index("--target") + 2]
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    print("symconv x86-64-v3 against torch with ONEDNN_MAX_CPU_ISA=AVX2 "
          "ATEN_CPU_CAPABILITY=avx2", flush=True)
    raise SystemExit(subprocess.call([sys.executable, __file__, *argv,
                                      "--target", "x86-64-v3"], env=env))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", default="bench.json")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--target", default=None, help="symconv build target (default: "
                        "AVX-512 and AVX2 code, the best run; 'x86-64-v3' for AVX2 alone)")
    parser.add_argument("--avx2", action="store_true", help="symconv's AVX2 variant against "
                        "torch restricted to AVX2, in a child process (what AVX2-only "
                        "machines see)")
    parser.add_argument("--tune", action="store_true", help="compile every kernel with "
                        "tune=True (candidate plans timed here; compile times include it)")
    args = parser.parse_args()
    if args.avx2:
        run_avx2_child()
        return
    try:
        import torch
    except ImportError:
        torch = None
        print("torch is not installed: only the NumPy baseline is measured")
    threads_list = [int(t) for t in args.threads.split(",")]
    peaks = {t: measure_fma_peak(t, args.target) for t in threads_list}
    isa = targets.vector_isa(args.target) or "plain C"
    for t, peak in peaks.items():
        print(f"measured FMA peak ({isa}), {t} thread(s): {peak:.1f} GFLOP/s float32")
    wanted = [c for c in CASES if not args.cases or any(s in c.name for s in args.cases.split(","))]
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="symconv-bench-")
    results = []
    for case in wanted:
        result = run_case(case, threads_list, args.repeat, torch, cache_dir, peaks, args.target,
                          args.tune)
        print_case(result)
        results.append(result)
    summary = {}
    for t in threads_list:
        ratios, ratios_cl, ratios_best = [], [], []
        for r in results:
            row = r["threads"][t]["sum"]
            baseline = "torch" if "torch" in row else "numpy_im2col"
            ratios.append(fastest(row, baseline) / row["symconv"])
            ratios_cl.append(fastest(row, baseline) / row["symconv_cl"])
            ratios_best.append(fastest(row, baseline, "_best") / row["symconv_best"])
        opened = [r["threads"][t]["sum"]["symconv_open"] / r["threads"][t]["sum"]["symconv"]
                  for r in results]
        summary[t] = {"geomean_ratio": geomean(ratios), "geomean_ratio_cl": geomean(ratios_cl),
                      "min_ratio": min(ratios), "geomean_ratio_best": geomean(ratios_best),
                      "open_over_fixed_geomean": geomean(opened),
                      "open_over_fixed_worst": max(opened)}
        print(f"\n{t} thread(s): geometric mean of sum ratios {summary[t]['geomean_ratio']:.2f}, "
              f"worst {summary[t]['min_ratio']:.2f} (channels_last symconv: "
              f"{summary[t]['geomean_ratio_cl']:.2f}; by best times: "
              f"{summary[t]['geomean_ratio_best']:.2f}); batch-open / fixed time: geometric mean "
              f"{summary[t]['open_over_fixed_geomean']:.3f}, worst "
              f"{summary[t]['open_over_fixed_worst']:.3f}")
    Path(args.json).write_text(json.dumps({"peaks": peaks, "cases": results, "summary": summary,
                                           "cpu_count": os.cpu_count()}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
