"""Memory safety: kernels built with AddressSanitizer and UBSan, run on fuzz cases.

The build mode is the target modifier ``+sanitize`` (``x86-64+sanitize``,
``x86-64-v3+sanitize``, ...).  The kernels run in a child Python with the
sanitizer runtimes preloaded (tests/sanitize.py); any report fails the test
with the sanitizer's output and the case that was running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fuzzing
import sanitize
from cases import CASES, REGRESSIONS, make_spec
from symconv import ConvSpec, PackageError
from symconv.package import build, targets

CASES_RUN = int(os.environ.get("SYMCONV_SANITIZE_CASES", "15"))


def _have_runtime() -> bool:
    try:
        build.sanitizer_runtime()
    except build.BuildError:
        return False
    return True


# On a developer machine without the runtimes these tests skip; in CI they must run.
pytestmark = pytest.mark.skipif(not _have_runtime() and not os.environ.get("CI"),
                                reason="the compiler has no sanitizer runtime")


def test_sanitize_is_a_target_modifier():
    plain, sanitized = build.build_config("x86-64-v3"), build.build_config("x86-64-v3+sanitize")
    assert not plain["sanitize"] and sanitized["sanitize"]
    assert sanitized["target"] == "x86-64-v3+sanitize"
    assert {"-fsanitize=address,undefined", "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=all"} <= set(sanitized["flags"])
    assert sanitized["cpu_features"] == plain["cpu_features"]
    assert targets.vector_isa("x86-64-v4+sanitize") == targets.vector_isa("x86-64-v4") == "avx512"
    spec = ConvSpec((1, 1, 5), (1, 1, 3))
    assert build.package_name(spec.slug, spec.key, plain) != \
        build.package_name(spec.slug, spec.key, sanitized)
    assert build.build_config("+sanitize")["target"] == f"{targets.default_target()}+sanitize"
    for bad in ("x86-64+asan", "x86-64+sanitize+sanitize", "pentium4+sanitize"):
        with pytest.raises(ValueError, match="unknown target"):
            build.build_config(bad)


def test_sanitized_package_refuses_to_load_in_a_plain_process(tmp_path):
    """Loading one here would make the sanitizer runtime abort the process; instead a clear
    PackageError says how to run it, and the cache keeps the (intact) package."""
    from symconv import compiler
    spec = ConvSpec((1, 2, 6), (2, 2, 3), padding=1)
    with pytest.raises(PackageError, match="built with AddressSanitizer.*LD_PRELOAD"):
        compiler.compile_conv(spec, cache_dir=tmp_path, target="x86-64+sanitize")
    (package,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    stamp = (package / "manifest.json").stat().st_mtime_ns
    with pytest.raises(PackageError, match="AddressSanitizer"):
        compiler.compile_conv(spec, cache_dir=tmp_path, target="x86-64+sanitize")
    assert (package / "manifest.json").stat().st_mtime_ns == stamp      # not rebuilt
    assert build.is_valid(package)


PLANTED = r"""
#include <stdint.h>
void write_past_end(double *out, int64_t n) { for (int64_t i = 0; i <= n; ++i) out[i] = 1.0; }
void read_before_start(const float *in, float *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = in[i - 1];
}
int64_t overflow(int64_t a) { return a * 4; }
"""


@pytest.mark.parametrize("call, report", [
    ("lib.write_past_end(ffi.from_buffer('double[]', np.zeros(5)), 5)", "heap-buffer-overflow"),
    ("lib.read_before_start(ffi.from_buffer('float[]', np.ones(6, np.float32)), "
     "ffi.from_buffer('float[]', np.zeros(6, np.float32)), 6)", "heap-buffer-overflow"),
    ("print(lib.overflow(2**62))", "signed integer overflow"),
])
def test_the_sanitizer_run_catches_planted_errors(tmp_path, call, report):
    """The harness is not vacuous: out-of-bounds accesses on NumPy buffers and signed overflow
    in a library built the way sanitized packages are abort the child with a report."""
    (tmp_path / targets.SOURCE).write_text(PLANTED)
    cdef = ("void write_past_end(double *out, int64_t n);\n"
            "void read_before_start(const float *in, float *out, int64_t n);\n"
            "int64_t overflow(int64_t a);")
    path = build.compile_extension(tmp_path, "_planted", cdef,
                                   build.build_config("x86-64+sanitize"))
    code = textwrap.dedent(f"""
        import importlib.util, numpy as np
        spec = importlib.util.spec_from_file_location("_planted", {str(path)!r})
        module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
        ffi, lib = module.ffi, module.lib
        {call}
        print("no report")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=sanitize.runtime_env(), timeout=120)
    assert result.returncode in (sanitize.EXIT_ASAN, sanitize.EXIT_UBSAN), result.stdout
    assert report in result.stderr and "no report" not in result.stdout


def _fuzz_cases():
    targets = fuzzing.available_targets()
    found = []
    for seed in range(CASES_RUN):   # round robin over the targets, every plan and padding mode
        case = fuzzing.case_from_seed(7000 + seed, (targets[seed % len(targets)],))
        found.append((f"fuzz seed {7000 + seed}", case))
    for param in REGRESSIONS:
        for target in targets:
            found.append((f"regression {param.id} on {target}",
                          fuzzing.Case(make_spec(param.values[0]), target, 0)))
    for param in CASES:
        if param.id in ("2d-stride2-pad1", "3d-groups-mixed", "1d-depthwise-f64",
                        "2d-mixed-stride-dil-asym"):
            found.append((f"case {param.id} on {targets[-1]}",
                          fuzzing.Case(make_spec(param.values[0]), targets[-1], 1, True)))
    # large enough that every function runs on OpenMP threads
    threaded = ConvSpec((2, 8, 24, 25), (8, 8, 3, 3), padding=1)
    # channels that fill AVX2 and AVX-512 vectors (the channel-lane plans), a partial lane
    # block, guarded edges, a stride, a chunked weight gradient
    channels = ConvSpec((1, 16, 9, 11), (24, 16, 3, 3), padding=1, stride=(1, 2))
    # copies with a zero halo and the channels innermost, moved by register transposes (64
    # output channels make enough products to pay for them): the forward's input and, with
    # AVX2, the input gradient's grad_output, read instead of bounding the taps
    halo = ConvSpec((1, 16, 10, 12), (64, 16, 3, 3), padding=1)
    # stride phases inside shared loops, reading grad_output from a copy of each task's rows
    # (36 planes 1 KiB apart crowd L1 sets), the row before the first left out
    task_copy = ConvSpec((1, 16, 32, 32), (36, 16, 4, 4), stride=2, padding=1)
    # output lanes: stride phases sharing the loops around their blocks of channel rows
    # (AVX-512: all 8 channels in a block), and a stem's 7 vectors of rows in two blocks
    phases = ConvSpec((1, 8, 6, 6, 64), (8, 8, 3, 3, 3), stride=2, padding=1)
    stem = ConvSpec((1, 3, 12, 224), (8, 3, 7, 7), stride=2, padding=3)
    for target in targets:
        found.append((f"threaded on {target}", fuzzing.Case(threaded, target, 3)))
        found.append((f"channel lanes on {target}", fuzzing.Case(channels, target, 4, True)))
        if target != "x86-64":
            found.append((f"halo copies on {target}", fuzzing.Case(halo, target, 5, True)))
            found.append((f"task copies on {target}", fuzzing.Case(task_copy, target, 6)))
            found.append((f"output-lane phases on {target}", fuzzing.Case(phases, target, 7)))
            found.append((f"stem rows on {target}", fuzzing.Case(stem, target, 8)))
    return found


def test_fuzz_cases_under_address_and_undefined_behaviour_sanitizers(cache_dir):
    """Forward and every gradient of each case, built sanitized on every target, in exact
    allocations and in guard regions: no sanitizer report, and results match the oracle.
    The cases cover every plan of the schedule (channel lanes, whole and chunked, with
    copies that have a zero halo and the channels innermost; output lanes, reduction lanes,
    scalar) in each vector instruction set."""
    cases = _fuzz_cases()
    jobs = sanitize.build_cases(cases, cache_dir / "sanitized")
    report = sanitize.run_jobs(jobs, timeout=900)
    problems = "\n\n".join(f"{label}:\n{message}" for label, message in report.failures)
    assert not report.failures, problems
    assert len(report.passed) == len(cases)
    assert report.calls >= 2 * 3 * len(cases)
    plans = set()
    for job in jobs:
        source = (Path(job["path"]) / targets.SOURCE).read_text()
        isa = "avx512" if "__m512" in source else "avx2" if "__m256" in source else "c"
        plans |= {(isa, plan) for plan in ("implicit GEMM", "summation steps at a time",
                                           "vector lanes along", "partial sums in lanes",
                                           "scalar loops", "omp parallel", "zero halo",
                                           "innermost", "sc_tasks_") if plan in source}
        plans |= {(isa, "output lanes") for line in source.splitlines()
                  if "vector lanes along" in line and "implicit GEMM" not in line}
    expected = {("c", "scalar loops"), ("c", "omp parallel")}
    for isa in {"x86-64-v3": "avx2", "x86-64-v4": "avx512"}.values():
        if any(job["target"] == {"avx2": "x86-64-v3", "avx512": "x86-64-v4"}[isa]
               for job in jobs):
            expected |= {(isa, "output lanes"), (isa, "partial sums in lanes"),
                         (isa, "implicit GEMM"), (isa, "summation steps at a time"),
                         (isa, "omp parallel"), (isa, "zero halo"), (isa, "innermost"),
                         (isa, "sc_tasks_")}
    assert expected <= plans, sorted(expected - plans)


def test_ring_copies_skip_rows_past_the_edge_of_their_array(tmp_path, monkeypatch):
    """A stride-2 3-D input gradient whose odd phases read grad_output rows j and j + 1:
    made to copy grad_output into per-thread rings a row of the phase index at a time (a
    copy share and a window budget no default gives this layer), the last phase row's
    second row lies past the array.  The ring copies only the rows that exist (it read one
    row past the array's end before); the kernels still match the oracle.  (Phases that
    share their loops drop such copies, schedule.run_together: here each runs alone, as the
    phases of a layer whose phase rows differ in number do.)"""
    from symconv.codegen import schedule
    from symconv.compiler import compilation
    if "x86-64-v3" not in fuzzing.available_targets():
        pytest.skip("needs AVX2")
    monkeypatch.setattr(schedule, "MAX_COPY_SHARE", 4.0)
    monkeypatch.setattr(schedule, "WINDOW_ELEMENTS", 3000)
    monkeypatch.setattr(schedule, "run_together", lambda plans: plans)
    spec = ConvSpec((1, 8, 16, 16, 16), (16, 8, 3, 3, 3), stride=2, padding=1)
    odd = compilation(spec, "x86-64-v3").plans["grad_input"][-1][1]
    (copy,) = odd.copies
    assert str(odd.window.index) == "sc_i_j0_phase" and copy.ring.span == 2
    jobs = sanitize.build_cases([("ring rows", fuzzing.Case(spec, "x86-64-v3", 9))],
                                tmp_path, workers=1)
    report = sanitize.run_jobs(jobs, timeout=300)
    assert not report.failures, report.failures
    assert report.passed == ["ring rows"]
