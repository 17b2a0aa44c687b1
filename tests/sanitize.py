"""Running fuzz cases on kernels built with AddressSanitizer and UBSan.

A sanitized package (target ``<isa>+sanitize``) is built in the calling
process, then loaded in a child Python started with the sanitizer runtimes
preloaded (LD_PRELOAD): the runtime must come first in a process, so it cannot
be loaded into the test process itself.  The child runs ``fuzzing.check_case``
on every case twice: with inputs and outputs in allocations of exactly their
size (ASan's red zones border them, so a read or write past either end is
reported) and in NaN guard regions (which also catch what ASan does not
instrument: masked and gathered vector loads, masked stores).  Any report
aborts the child (``-fno-sanitize-recover=all``, ``halt_on_error=1``); the
parent names the case that was running and goes on with the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXIT_ASAN, EXIT_UBSAN = 86, 87
ASAN_OPTIONS = ("detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:"
                "detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1")
UBSAN_OPTIONS = "halt_on_error=1:print_stacktrace=1:exitcode=87"


def runtime_env() -> dict[str, str]:
    """The environment of a child that can load sanitized packages."""
    from symconv.package import build
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(build.sanitizer_runtime())
    env["ASAN_OPTIONS"] = ASAN_OPTIONS
    env["UBSAN_OPTIONS"] = UBSAN_OPTIONS
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@dataclass
class Report:
    passed: list = field(default_factory=list)
    failures: list = field(default_factory=list)      # (label, message)
    calls: int = 0


def _job(label, case) -> dict:
    return {"label": label, "spec": {"kind": case.spec.KIND, **case.spec.to_dict()},
            "target": case.target, "seed": case.seed, "special": case.special,
            "open_batch": case.open_batch}


def _build_jobs(jobs: list[dict], cache_dir) -> list[dict]:
    from symconv import PackageError
    from symconv.package import build
    from symconv.spec import spec_from_dict
    from symconv.compiler import compile_conv
    for job in jobs:
        spec, target = spec_from_dict(job["spec"]), f"{job['target']}+sanitize"
        if job["open_batch"]:
            spec = spec.with_batch(None)
        try:
            compile_conv(spec, cache_dir=cache_dir, target=target)
        except PackageError as error:      # built, but it loads only under the runtime
            if "AddressSanitizer" not in str(error):
                raise
        job["path"] = str(Path(cache_dir).resolve() / build.package_name(
            spec.slug, spec.key, build.build_config(target)))
    return jobs


def build_cases(cases, cache_dir, workers: int | None = None) -> list[dict]:
    """Build each (label, Case) sanitized, in ``workers`` processes (default: one per core,
    at most 4); the jobs for ``run_jobs``."""
    jobs = [_job(label, case) for label, case in cases]
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), 4, len(jobs)))
    parts = [jobs[i::workers] for i in range(workers)]
    helpers = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for part in parts[1:]:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump({"jobs": part, "cache_dir": str(cache_dir)}, handle)
        helpers.append((handle.name, subprocess.Popen(
            [sys.executable, "-c", "import sanitize; sanitize.build_child()", handle.name],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)))
    built = _build_jobs(parts[0], cache_dir)
    for name, helper in helpers:
        stdout, stderr = helper.communicate()
        os.unlink(name)
        if helper.returncode != 0:
            raise RuntimeError(f"building sanitized kernels failed:\n{stderr[-4000:]}")
        built += json.loads(stdout)
    order = {job["label"]: n for n, job in enumerate(jobs)}
    return sorted(built, key=lambda job: order[job["label"]])


def build_child() -> None:
    """In a helper process: build the jobs of the file named by argv[1], print them."""
    task = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(_build_jobs(task["jobs"], task["cache_dir"])))


def run_jobs(jobs: list[dict], timeout: float = 600) -> Report:
    """Run the jobs in sanitized children; a child that aborts is restarted after the case
    it was running, which is reported with the sanitizer's output."""
    report = Report()
    remaining = list(jobs)
    env = runtime_env()
    while remaining:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(remaining, handle)
        try:
            result = subprocess.run([sys.executable, "-c", "import sanitize; sanitize.child()",
                                     handle.name], capture_output=True, text=True, env=env,
                                    timeout=timeout)
        finally:
            os.unlink(handle.name)
        done = set()
        running = None
        for line in result.stdout.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "START":
                running = rest
            elif kind == "OK":
                label, calls = rest.rsplit(" ", 1)
                report.passed.append(label)
                report.calls += int(calls)
                done.add(label)
                running = None
            elif kind == "MISMATCH":
                label, _, message = rest.partition(" :: ")
                report.failures.append((label, message))
                done.add(label)
                running = None
        if result.returncode != 0:
            what = {EXIT_ASAN: "AddressSanitizer", EXIT_UBSAN: "UndefinedBehaviorSanitizer"}.get(
                result.returncode, f"exit status {result.returncode}")
            label = running if running is not None else "(before the first case)"
            report.failures.append((label, f"{what} report:\n{result.stderr[-6000:]}"))
            done.add(label)
            if running is None:
                break
        remaining = [j for j in remaining if j["label"] not in done]
        if result.returncode == 0 and remaining:     # the child stopped early without a report
            report.failures += [(j["label"], "not run") for j in remaining]
            break
    return report


def run_cases(cases, cache_dir, timeout: float = 600) -> Report:
    """Build and run (label, Case) pairs sanitized."""
    return run_jobs(build_cases(cases, cache_dir), timeout)


def child() -> None:
    """In the sanitized child: run each job, printing START/OK/MISMATCH lines."""
    import numpy as np  # noqa: F401  (loaded before the first kernel, like in a user process)

    import fuzzing
    import symconv
    from symconv.spec import spec_from_dict
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for job in jobs:
        print("START", job["label"], flush=True)
        case = fuzzing.Case(spec_from_dict(job["spec"]), job["target"], job["seed"],
                            job["special"], job["open_batch"])
        kernel = symconv.load(job["path"])
        try:
            calls = fuzzing.check_case(kernel, case, exact=True, torch_too=False)
            calls += fuzzing.check_case(kernel, case, exact=False, torch_too=False)
        except AssertionError as error:
            print("MISMATCH", job["label"], "::", str(error).replace("\n", " "), flush=True)
            continue
        print("OK", job["label"], calls, flush=True)
