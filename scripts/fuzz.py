#!/usr/bin/env python
"""Differential fuzzing for as long as asked: random convolutions, every build target, against
the NumPy oracle (and PyTorch for ranks 1-3).

    python scripts/fuzz.py --minutes 20            # seeds 0, 1, 2, ... until time is up
    python scripts/fuzz.py --start 5000 --cases 200
    python scripts/fuzz.py --seed 1234             # reproduce one case (its seed is printed)
    python scripts/fuzz.py --sanitize --minutes 5  # kernels built with ASan+UBSan here, run
                                                   # in a child under the sanitizer runtime
    python scripts/fuzz.py --ops --cases 2000      # random user ops (tests/op_fuzzing.py)
                                                   # against PyTorch autograd
    python scripts/fuzz.py --choices --minutes 10  # every plan a tuner may pick, each built
                                                   # into its own package, against the oracle

Each case prints one line: its seed, the target and the spec.  A failure prints the
mismatch and the command that reproduces it; the run goes on and the exit status is 1.
The same generator drives the Hypothesis suite in tests/test_property.py.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import fuzzing  # noqa: E402
import op_fuzzing  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long")
    parser.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    parser.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seed", type=int, action="append", default=[],
                        help="run exactly this seed (repeatable)")
    parser.add_argument("--target", action="append", choices=fuzzing.ALL_TARGETS, default=[],
                        help="only these targets (default: every one this CPU runs)")
    parser.add_argument("--max-rank", type=int, default=4)
    parser.add_argument("--wide", action="store_true",
                        help="4-24 channels per group, rank 1-2: the channel-lane plans")
    parser.add_argument("--sanitize", action="store_true",
                        help="build with -fsanitize=address,undefined and run under its runtime")
    parser.add_argument("--cache-dir", default=None, help="kernel cache (default: a fresh one)")
    parser.add_argument("--quiet", action="store_true", help="print failures and totals only")
    parser.add_argument("--ops", action="store_true",
                        help="fuzz user ops written as text instead of convolutions")
    parser.add_argument("--choices", action="store_true",
                        help="also build and check each case with every plan choice a tuner "
                        "may pick (schedule.CHOICES), one package per choice")
    args = parser.parse_args(argv)
    if args.minutes is None and args.cases is None and not args.seed:
        args.minutes = 1.0
    targets = tuple(args.target) or fuzzing.available_targets()
    unknown = set(targets) - set(fuzzing.available_targets())
    if unknown:
        parser.error(f"this CPU cannot run target(s) {', '.join(sorted(unknown))}")
    if args.sanitize:
        return sanitized(args, argv if argv is not None else sys.argv[1:])
    if args.ops:
        return user_ops(args, targets)

    from symconv import compiler
    cache = args.cache_dir or tempfile.mkdtemp(prefix="symconv-fuzz-")
    started, ran, calls, failed = time.monotonic(), 0, 0, []
    for seed, case in _cases(args, targets):
        try:
            kernel = compiler.compile_conv(case.kernel_spec, cache_dir=cache, target=case.target)
            calls += fuzzing.check_case(kernel, case)
            if args.choices:
                calls += _check_choices(case)
        except Exception as error:  # noqa: BLE001 - every failure is reported, then the run goes on
            failed.append(seed)
            _report(seed, case, error, f"--seed {seed}"
                    f"{''.join(f' --target {t}' for t in args.target)}"
                    f"{f' --max-rank {args.max_rank}' if args.max_rank != 4 else ''}"
                    f"{' --wide' if args.wide else ''}{' --choices' if args.choices else ''}")
        ran += 1
    minutes = (time.monotonic() - started) / 60
    print(f"{ran} cases ({calls} kernel functions checked) in {minutes:.1f} min; "
          f"{len(failed)} failed{': seeds ' + ' '.join(map(str, failed)) if failed else ''}")
    return 1 if failed else 0


def _check_choices(case) -> int:
    """Build the case once per plan choice that changes one of its functions (that choice
    for every function, where it fits), each into a package of its own, and check each
    against the oracle like the default; returns the function calls checked."""
    from symconv import compiler, tune
    from symconv.kernel import Kernel, best_variant
    from symconv.package import build

    compiled = compiler.compilation(case.kernel_spec, case.target)
    variant = best_variant(compiled.variants)
    choices = sorted({c for names in tune.candidates(compiled).values() for c in names[1:]})
    config = build.build_config(case.target)
    checked = 0
    for choice in choices:
        compiled.apply(tune.Tuning(variant.target, 1, {f.name: choice for f in compiled.functions},
                                   {}))
        with tempfile.TemporaryDirectory(prefix="symconv-fuzz-choice-") as directory:
            path = Path(directory) / f"choice_{choice.replace('-', '_')}"
            path.mkdir()
            build.write_package(path, path.name,
                                {name: source.text for name, source in compiled.sources.items()},
                                compiled.cdef, compiled.manifest(), config)
            try:
                checked += fuzzing.check_case(Kernel(path, variant.target), case)
            except AssertionError as error:
                raise AssertionError(f"plan choice {choice!r}: {error}") from None
    return checked


def user_ops(args, targets) -> int:
    """Random user ops from the grammar fuzzer, each on a target drawn from its seed."""
    cache = args.cache_dir or tempfile.mkdtemp(prefix="symconv-fuzz-ops-")
    started, ran, failed = time.monotonic(), 0, []
    for seed in _seeds(args):
        case = op_fuzzing.op_case_from_seed(seed)
        target = targets[seed % len(targets)]
        if not args.quiet:
            print(f"seed {seed} ({target}): {case.describe()}", flush=True)
        try:
            op_fuzzing.check_op_case(case, cache, target)
        except Exception as error:  # noqa: BLE001 - every failure is reported, then the run goes on
            failed.append(seed)
            _report(seed, case, error, f"--ops --seed {seed}")
        ran += 1
    minutes = (time.monotonic() - started) / 60
    print(f"{ran} user ops in {minutes:.1f} min; {len(failed)} failed"
          f"{': seeds ' + ' '.join(map(str, failed)) if failed else ''}")
    return 1 if failed else 0


def _report(seed, case, error, arguments: str) -> None:
    print(f"FAILED seed {seed}: {case.describe()}\n"
          f"{''.join(traceback.format_exception_only(type(error), error)).strip()}\n"
          f"reproduce: python scripts/fuzz.py {arguments}", flush=True)


def _seeds(args):
    """The asked seeds, until the time or the case count is up."""
    seeds = args.seed or itertools.count(args.start)
    deadline = time.monotonic() + 60 * args.minutes if args.minutes is not None else None
    for ran, seed in enumerate(seeds):
        if (deadline is not None and time.monotonic() > deadline) or \
                (args.cases is not None and ran >= args.cases):
            return
        yield seed


def _cases(args, targets):
    """(seed, case) for the asked seeds, until the time or the case count is up."""
    for seed in _seeds(args):
        case = fuzzing.case_from_seed(seed, targets, args.max_rank, args.wide)
        if not args.quiet:
            print(f"seed {seed}: {case.describe()}", flush=True)
        yield seed, case


def sanitized(args, argv) -> int:
    """Build each case with the sanitizer in this process, run it in a child under the
    sanitizer runtime (see tests/sanitize.py)."""
    import sanitize
    cache = args.cache_dir or tempfile.mkdtemp(prefix="symconv-fuzz-asan-")
    targets = tuple(args.target) or fuzzing.available_targets()
    started, ran, failed = time.monotonic(), 0, []
    batch = []

    def flush():
        nonlocal batch
        if batch:
            report = sanitize.run_cases(batch, cache, timeout=1800)
            for seed, problem in report.failures:
                failed.append(seed)
                print(f"FAILED seed {seed} (sanitized):\n{problem}\nreproduce: python "
                      f"scripts/fuzz.py --sanitize --seed {seed}", flush=True)
        batch = []

    for seed, case in _cases(args, targets):
        batch.append((str(seed), case))
        ran += 1
        if len(batch) == 20:
            flush()
    flush()
    minutes = (time.monotonic() - started) / 60
    print(f"{ran} sanitized cases in {minutes:.1f} min; {len(failed)} failed"
          f"{': seeds ' + ' '.join(map(str, failed)) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
