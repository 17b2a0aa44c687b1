"""The symconv command: demo, compile, explain, gradcheck, list.

Specs come from flags (``--input 2,3,16,16,16 --weight 8,3,3,3,3 --stride 2
--padding 1``; ``--transpose`` for a transposed convolution; ``--expr TEXT
--shape X=2,3,9 ...`` for a user-defined index sum; ``--gradient grad_input``
for one derived gradient as an op of its own, whose gradients are then second
derivatives) or from JSON/TOML files (``--spec FILE``, several allowed; a file
holds one spec, a list of specs, or ``{"specs": [...]}``; an entry's ``kind``
picks the spec type, default conv).
Bad arguments print one line and exit with status 2.

``compile`` of several specs shows a progress bar on stderr when stderr is a
terminal (``--progress``/``--no-progress`` force it on or off); every command
takes ``-v``/``--verbose`` to log each pipeline stage with its time.
``explain --html FILE`` writes the formula report (``symconv.report``),
``--bench`` adds the compiled kernel's timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ._version import __version__
from .errors import IRError
from .package.targets import split_target
from .kernel import Kernel, PackageError, best_variant
from .progress import Progress, configure as configure_logging, log
from .spec import (BATCH, LAYOUTS, PADDING_MODES, ConvSpec, ConvTransposeSpec, ExprSpec,
                   GradientSpec, spec_from_dict)

DEMO_SPEC = dict(input_shape=(2, 3, 16, 16, 16), weight_shape=(8, 3, 3, 3, 3), stride=2,
                 padding=1)


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _input_shape(text: str) -> tuple[int | None, ...]:
    """An input shape whose batch may be N: known only at run time (``N,3,32,32``)."""
    first, _, rest = text.partition(",")
    if first.strip() == BATCH:
        return (None, *_ints(rest))
    return _ints(text)


def _int_or_ints(text: str):
    values = _ints(text)
    return values[0] if len(values) == 1 else values


def _padding(text: str):
    """'1', '1,2', '1:2,0:1' (lo:hi per dim), 'same' or 'valid'."""
    if text in ("same", "valid"):
        return text
    try:
        if ":" in text:
            return tuple(tuple(int(v) for v in part.split(":")) if ":" in part else int(part)
                         for part in text.split(","))
        return _int_or_ints(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected 'same', 'valid', ints or lo:hi pairs, got "
                                         f"{text!r}") from None


def _named_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, dims = text.partition("=")
    if not name or not dims:
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,..., got {text!r}")
    first, _, rest = dims.partition(",")
    if first.strip().isidentifier():       # a named first extent: known only at run time
        return name.strip(), (first.strip(), *(_ints(rest) if rest else ()))
    return name.strip(), _ints(dims)


def _add_spec_flags(parser: argparse.ArgumentParser, files: bool = True) -> None:
    group = parser.add_argument_group("the convolution (PyTorch layout)")
    group.add_argument("--input", type=_input_shape, metavar="N,C,D1,...",
                       help="input shape; a batch of N (the letter) is left to run time")
    group.add_argument("--weight", type=_ints, metavar="O,C/G,K1,...", help="weight shape")
    group.add_argument("--stride", type=_int_or_ints, default=1, metavar="S")
    group.add_argument("--padding", type=_padding, default=0, metavar="P",
                       help="int, per-dim ints, lo:hi pairs, 'same' or 'valid'")
    group.add_argument("--dilation", type=_int_or_ints, default=1, metavar="D")
    group.add_argument("--groups", type=int, default=1)
    group.add_argument("--no-bias", dest="bias", action="store_false", help="no bias term")
    group.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    group.add_argument("--padding-mode", choices=PADDING_MODES, default="zeros")
    group.add_argument("--layout", choices=LAYOUTS, default="channels_first",
                       help="channels_last: input and output arrays are (N, D1, ..., C), torch's "
                       "channels_last memory (shapes above stay channels first)")
    group.add_argument("--transpose", action="store_true", help="a transposed convolution "
                       "(weight C_in,C_out/G,K1,...)")
    group.add_argument("--output-padding", type=_int_or_ints, default=0, metavar="OP",
                       help="extra output size of a transposed convolution")
    other = parser.add_argument_group("other index sums")
    other.add_argument("--expr", metavar="TEXT", help="a user-defined op, e.g. "
                       "'Y[n, i] = sum(W[k] * X[n, i + k], (k, 0, 2))'")
    other.add_argument("--shape", action="append", default=[], type=_named_shape,
                       metavar="NAME=D1,D2,...", help="an array's shape for --expr (repeatable; "
                       "inputs in call order, the output optional)")
    other.add_argument("--zero-outside", action="append", default=[], metavar="NAME",
                       help="an --expr array that reads 0 outside its shape (repeatable)")
    other.add_argument("--gradient", metavar="grad_NAME", help="the spec's gradient function "
                       "as an op of its own: its derivations are second derivatives")
    if files:
        group.add_argument("--spec", action="append", default=[], metavar="FILE",
                           help="JSON or TOML spec file (repeatable); replaces the flags above")


def _read_spec_file(path: str) -> list[dict[str, Any]]:
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as error:
        raise UsageError(f"cannot read spec file {path}: {error.strerror}") from None
    try:
        if file.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as error:
        raise UsageError(f"spec file {path} is not valid {file.suffix[1:] or 'JSON'}: {error}") \
            from None
    if isinstance(data, dict) and "specs" in data:
        data = data["specs"]
    entries = data if isinstance(data, list) else [data]
    if not entries or not all(isinstance(e, dict) for e in entries):
        raise UsageError(f"spec file {path}: expected a spec table, a list of them, or 'specs'")
    return entries


def _check_flag_combinations(args: argparse.Namespace, from_files: bool) -> None:
    """Refuse flags that the chosen way of describing the op would silently ignore."""
    conv_flags = [flag for flag, given in (("--input", args.input is not None),
                                           ("--weight", args.weight is not None),
                                           ("--transpose", args.transpose)) if given]
    expr_flags = [flag for flag, given in (("--shape", bool(args.shape)),
                                           ("--zero-outside", bool(args.zero_outside))) if given]
    if from_files and (conv_flags or expr_flags or args.expr is not None):
        raise UsageError("--spec replaces the shape flags; give one or the other")
    if args.expr is not None and conv_flags:
        raise UsageError(f"--expr cannot be combined with {', '.join(conv_flags)}")
    if args.expr is None and expr_flags:
        raise UsageError(f"only --expr takes {', '.join(expr_flags)}")
    if args.output_padding != 0 and not args.transpose:
        raise UsageError("--output-padding only applies to --transpose")
    if args.transpose and args.padding_mode != "zeros":
        raise UsageError("a transposed convolution pads with zeros only (--padding-mode)")
    if args.transpose and args.layout != "channels_first":
        raise UsageError("a transposed convolution takes channels-first arrays only (--layout)")


def _specs(args: argparse.Namespace) -> list:
    """The specs the arguments describe (files, --expr, or the convolution flags), each
    wrapped as a gradient op when --gradient is given."""
    entries = [e for path in getattr(args, "spec", []) for e in _read_spec_file(path)]
    _check_flag_combinations(args, bool(entries))
    try:
        if entries:
            specs = [spec_from_dict(entry) for entry in entries]
        elif args.expr is not None:
            specs = [ExprSpec(args.expr, dict(args.shape), dtype=args.dtype,
                              zero_outside=tuple(args.zero_outside))]
        elif args.input is None or args.weight is None:
            raise UsageError("give --input and --weight shapes (or --expr TEXT, or --spec FILE)")
        elif args.transpose:
            specs = [ConvTransposeSpec(args.input, args.weight, stride=args.stride,
                                       padding=args.padding, output_padding=args.output_padding,
                                       dilation=args.dilation, groups=args.groups,
                                       bias=args.bias, dtype=args.dtype)]
        else:
            specs = [ConvSpec(args.input, args.weight, stride=args.stride, padding=args.padding,
                              dilation=args.dilation, groups=args.groups, bias=args.bias,
                              dtype=args.dtype, padding_mode=args.padding_mode,
                              layout=args.layout)]
        if args.gradient:
            specs = [GradientSpec(spec, args.gradient) for spec in specs]
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    return specs


def _print_formulas(compilation, latex: bool, scatter: bool, out, plans: bool = False) -> None:
    """Each function's formula; with ``plans``, then how the C this machine runs computes
    each piece of its output (the schedule's plans)."""
    from .codegen.schedule import describe, describe_batch, describe_shared
    schedules = compilation.arrangements if plans else {}
    batches = compilation.batch_plans if plans else {}
    for name, entry in compilation.formulas().items():
        print(f"\n== {name} ==", file=out)
        if scatter and "scatter" in entry:
            print("chain rule (scatter form):", file=out)
            print(entry["scatter_latex" if latex else "scatter"], file=out)
            print("solved over the integers (gather form):", file=out)
        print(entry["latex"] if latex else entry["text"], file=out)
        arrangement = schedules.get(name)
        if arrangement is None:
            continue
        for piece, plan in arrangement.plans:
            print(f"schedule: {describe(piece, plan)}", file=out)
        shared = describe_shared(arrangement)
        if shared:
            print(f"schedule: {shared}", file=out)
        if name in batches:
            print(f"schedule: {describe_batch(batches[name])}", file=out)


def _log_compile(spec, kernel: Kernel, seconds: float, hit: bool) -> None:
    """--verbose: each stage of one compile with its time (a hit only loads)."""
    if hit:
        log.info("%s: cache hit, loaded in %.3f s", spec.slug, seconds)
        return
    timings = kernel.record.extra.get("timings", {})
    names = {"define": "define (index sum)", "derive": "derive (gradients)",
             "codegen": "codegen (C)", "compile_c": "C compiler + cffi"}
    staged = 0.0
    for key, label in names.items():
        if key in timings:
            staged += timings[key]
            log.info("%s: %s %.3f s", spec.slug, label, timings[key])
    log.info("%s: imports, packaging and load %.3f s", spec.slug, max(seconds - staged, 0.0))
    log.info("%s: total %.3f s -> %s", spec.slug, seconds, kernel.path)


def _compile(spec, cache_dir, target: str | None = None,
             tune: bool = False) -> tuple[Kernel, float]:
    """compile_op, timed, with its stages logged under --verbose."""
    from .compiler import KERNELS
    result = KERNELS.load(spec, cache_dir, target, tune)
    _log_compile(spec, result.kernel, result.seconds, hit=result.cached)
    return result.kernel, result.seconds


def cmd_compile(args, out) -> int:
    specs = _specs(args)
    with Progress(len(specs), "compiling", enabled=args.progress) as bar:
        for spec in specs:
            bar.set_note(spec.slug)
            kernel, seconds = _compile(spec, args.out, args.target, args.tune)
            bar.write(f"{kernel.path}  ({seconds:.2f} s)  {spec.describe()}", file=out)
            for line in _tuning_lines(kernel.manifest.get("tuning")):
                bar.write(line, file=out)
            bar.advance()
    return 0


def _tuning_lines(tuning) -> list[str]:
    """What a tuned package's manifest records: per function, each candidate's time and
    the plan kept."""
    if tuning is None:
        return []
    lines = [f"  tuned on {tuning['target']} with {tuning['threads']} thread(s):"]
    for name, times in tuning["seconds"].items():
        order = sorted(times, key=lambda choice: (choice != "default", choice))
        timed = ", ".join(f"{choice} {times[choice] * 1e3:.3g} ms" for choice in order)
        lines.append(f"    {name}: {timed} -> {tuning['choices'].get(name, 'default')}")
    if not tuning["seconds"]:
        lines.append("    no function has a plan other than its default here")
    return lines


def _log_timings(spec, timings) -> None:
    for name, seconds in timings.items():
        log.info("%s: %s %.3f s", spec.slug, name, seconds)


def _print_bench(spec, args, out) -> None:
    from .report import benchmark
    kernel, _ = _compile(spec, args.cache_dir, args.target)
    print(f"\n== benchmark ({kernel.variant.target}) ==", file=out)
    for t in benchmark(kernel, spec, repeat=args.repeat, threads=args.threads):
        print(f"{t.function:>26}: median {t.median * 1e3:9.3f} ms  best {t.best * 1e3:9.3f} ms  "
              f"{t.gflops:8.2f} GFLOP/s  ({t.runs} runs)", file=out)


def _write_report(args, out) -> int:
    try:
        import matplotlib  # noqa: F401  (the report's typesetter)

        from . import report
    except ImportError as error:
        raise RuntimeError(f"--html needs matplotlib and Pygments ({error}): "
                           f"pip install 'symconv[report]'") from None
    specs = _specs(args)
    with Progress(len(specs), "report", enabled=args.progress) as bar:
        path = report.write(args.html, specs, bench=args.bench, cache_dir=args.cache_dir,
                            target=args.target, repeat=args.repeat, threads=args.threads,
                            progress=lambda spec: bar.advance(spec.slug), steps=args.steps)
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1024:.0f} KB, {len(specs)} spec{'s' * (len(specs) != 1)})",
          file=out)
    return 0


def cmd_explain(args, out) -> int:
    from .compiler import compilation as compile_symbolic
    if args.html:
        return _write_report(args, out)
    for spec in _specs(args):
        compilation = compile_symbolic(spec, args.target)
        _log_timings(spec, compilation.timings)
        print(spec.describe(), file=out)
        _print_formulas(compilation, args.latex, args.scatter, out, plans=True)
        if args.steps:
            from .explain import steps_text
            print("\n" + steps_text(compilation, latex=args.latex), file=out)
        if args.c:
            variant = best_variant(compilation.variants).target
            print(f"\n== C ({variant}, the variant this machine runs) ==", file=out)
            print(compilation.source.text, file=out)
        if args.bench:
            _print_bench(spec, args, out)
    return 0


def _in_float64(spec):
    """The same spec in float64 (for finite differences)."""
    if isinstance(spec, GradientSpec):
        return GradientSpec(_in_float64(spec.parent), spec.function)
    return type(spec).from_dict({**spec.to_dict(), "dtype": "float64"})


def _run_gradcheck(spec, args, out) -> bool:
    from .check import check_kernel
    kernel, _ = _compile(_in_float64(spec), args.cache_dir)
    results = check_kernel(kernel, seed=args.seed)
    for result in results:
        print(result, file=out)
    return all(r.passed for r in results)


def cmd_gradcheck(args, out) -> int:
    ok = True
    for spec in _specs(args):
        print(f"{spec.describe()} (checked in float64)", file=out)
        ok &= _run_gradcheck(spec, args, out)
    return 0 if ok else 1


def cmd_demo(args, out) -> int:
    from .compiler import compilation as compile_symbolic
    spec = ConvSpec(**DEMO_SPEC)
    print(f"symconv demo: {spec.describe()}", file=out)
    start = time.perf_counter()
    compilation = compile_symbolic(spec)
    _log_timings(spec, compilation.timings)
    print(f"\n[1/3] derived the gradients and emitted C in {time.perf_counter() - start:.2f} s",
          file=out)
    _print_formulas(compilation, latex=False, scatter=True, out=out)
    kernel, seconds = _compile(spec, args.cache_dir)
    print(f"\n[2/3] compiled and loaded in {seconds:.2f} s: {kernel.path}",
          file=out)
    print("\n[3/3] gradients against central finite differences (float64 build):", file=out)
    ok = _run_gradcheck(spec, args, out)
    print("\nall gradients agree" if ok else "\nGRADIENT CHECK FAILED", file=out)
    return 0 if ok else 1


def cmd_list(args, out) -> int:
    root = Path(args.directory)
    if not root.is_dir():
        default = " (the default; name one: symconv list DIR)" \
            if args.directory == "generated" else ""
        raise UsageError(f"no such directory: {root}{default}")
    found = 0
    for path in sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()):
        try:
            kernel = Kernel(path)
            print(f"{path.name}\n    {kernel.record.description}", file=out)
        except PackageError as error:
            print(f"{path.name}\n    unusable: {error}", file=out)
        found += 1
    if not found:
        print(f"no symconv packages in {root}", file=out)
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _target(text: str) -> str:
    try:
        split_target(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _add_target_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", type=_target, default=None,
                        help="instruction sets to build for, best first: x86-64-v4, x86-64-v3, "
                             "x86-64, native or generic, joined by commas (default: "
                             "x86-64-v4,x86-64-v3 where the CPU has AVX2; the loader runs the "
                             "best the CPU has)")


def _add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: only when stderr is a terminal)")


def build_parser() -> argparse.ArgumentParser:
    from .package.build import default_cache_dir
    parser = _Parser(prog="symconv", description="N-D convolutions compiled from SymPy index "
                     "sums, with symbolically derived gradients.")
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log each pipeline stage with its time (on stderr)")
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="log each pipeline stage with its time (on stderr)")
    parser.add_argument("--version", action="version", version=f"symconv {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser("demo", parents=[verbose], help="derive, compile and "
                               "gradient-check a default 3-D convolution")
    demo.add_argument("--cache-dir", default=None, help=f"default {default_cache_dir()}")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=cmd_demo)

    compile_ = commands.add_parser("compile", parents=[verbose],
                                   help="build kernel packages ahead of time")
    _add_spec_flags(compile_)
    compile_.add_argument("--out", default="generated", help="directory for the packages "
                          "(default: generated)")
    _add_target_flag(compile_)
    compile_.add_argument("--tune", action="store_true",
                          help="time each function's candidate plans on this machine and build "
                          "the fastest (recorded in the manifest; later compiles of the spec "
                          "load the tuned package)")
    _add_progress_flag(compile_)
    compile_.set_defaults(run=cmd_compile)

    explain = commands.add_parser("explain", parents=[verbose],
                                  help="print the forward sum and derived gradients")
    _add_spec_flags(explain)
    explain.add_argument("--latex", action="store_true", help="LaTeX instead of text")
    explain.add_argument("--c", action="store_true", help="also print the generated C")
    explain.add_argument("--scatter", action="store_true",
                         help="also print each gradient's chain-rule (scatter) form")
    explain.add_argument("--steps", action="store_true",
                         help="also print every step of each gradient's derivation, from the "
                         "chain rule to the compiled loops, each with the formula after it "
                         "(in the page too, with --html)")
    report = explain.add_argument_group("report and benchmark")
    report.add_argument("--html", metavar="FILE", default=None,
                        help="write a self-contained HTML page with the typeset formulas and the "
                        "highlighted C (needs matplotlib and Pygments)")
    report.add_argument("--bench", action="store_true",
                        help="compile the kernel and time every function (in the page with --html)")
    report.add_argument("--repeat", type=_positive, default=20, metavar="N",
                        help="timed runs per function for --bench (default 20)")
    report.add_argument("--threads", type=_positive, default=None, metavar="T",
                        help="threads per kernel call for --bench (default: all cores)")
    report.add_argument("--cache-dir", default=None, help="kernel cache for --bench")
    _add_target_flag(explain)
    _add_progress_flag(explain)
    explain.set_defaults(run=cmd_explain)

    check = commands.add_parser("gradcheck", parents=[verbose], help="check a spec's gradients "
                                "by finite differences (float64)")
    _add_spec_flags(check)
    check.add_argument("--cache-dir", default=None)
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(run=cmd_gradcheck)

    list_ = commands.add_parser("list", parents=[verbose],
                                help="list the packages in a directory")
    list_.add_argument("directory", nargs="?", default="generated",
                       help="a directory of packages (default: generated, where compile writes)")
    list_.set_defaults(run=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None, out=None) -> int:
    out = out or sys.stdout
    try:
        args = build_parser().parse_args(argv)
        configure_logging(args.verbose)
        if args.command is None:
            raise UsageError("symconv: choose a command: demo, compile, explain, gradcheck, list "
                             "(symconv --help)")
        return args.run(args, out)
    except (UsageError, IRError) as error:  # IRError: the user's expression or gradient name
        print(f"{error}" if str(error).startswith("symconv") else f"symconv: {error}",
              file=sys.stderr)
        return 2
    except (PackageError, RuntimeError) as error:  # BuildError is a RuntimeError
        print(f"symconv: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
