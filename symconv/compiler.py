"""The driver: definition -> derivation -> schedule and C -> package -> Kernel.

``compilation(spec)`` runs the symbolic stages and keeps every intermediate in a
:class:`Compilation` (what ``symconv explain`` shows); ``compile_op(spec)``
adds the cached build and returns a loaded Kernel.  Every kernel this process
loads is kept in one cache, :data:`KERNELS`, that the graph, the framework
bindings and Dask share.

The symbolic stages (define, derive, codegen) import SymPy, so they are
imported inside ``compilation`` only: a cache hit loads a package without SymPy.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GeneratedCodeError, InternalError
from .kernel import Kernel, KernelFunction, PackageError, Variant, best_variant, vjp_table
from .package import build, targets
from .package.targets import variants as target_variants
from .spec import SPECS

SPEC_TYPES = tuple(SPECS.values())

if TYPE_CHECKING:  # only for annotations; importing them pulls in SymPy
    from .codegen.c import CSource
    from .codegen.schedule import Arrangement, BatchPlan
    from .symbolic.define import OpDefinition
    from .symbolic.derive import Derivation
    from .symbolic.ir import SumFunction
    from .tune import Tuning


@dataclass
class Compilation:
    """Every intermediate of one op's pipeline, kept for inspection: the definition, each
    gradient's derivation, the functions compiled, and per instruction-set variant the C
    with the schedule it was emitted from.  :class:`Build` says whether a kernel needed
    one."""

    op: "OpDefinition"
    derivations: dict[str, "Derivation"]
    functions: list["SumFunction"]
    variants: list[Variant]               # the instruction sets, best first
    sources: dict[str, "CSource"]         # the C of each variant, by its target name
    timings: dict[str, float] = field(default_factory=dict)
    tuning: "Tuning | None" = None        # the tuner's choices, applied to sources

    def apply(self, tuning: "Tuning") -> None:
        """Re-emit the C of the variant ``tuning`` timed with its plan choices (none: its C
        stays as the defaults emitted it)."""
        from .codegen.emit import emit
        if tuning.choices:
            variant = next(v for v in self.variants if v.target == tuning.target)
            self.sources[variant.target] = emit(self.functions, self.op.dtype,
                                                self.op.description, variant.isa,
                                                variant.prefix, tuning.choices)
        self.tuning = tuning

    @property
    def source(self) -> "CSource":
        """The C this machine would run (see kernel.best_variant)."""
        return self.sources[best_variant(self.variants).target]

    @property
    def arrangements(self) -> dict[str, Arrangement]:
        """Per function, the schedule of the C this machine would run."""
        return {f.name: f.arrangement for f in self.source.functions}

    @property
    def batch_plans(self) -> dict[str, BatchPlan]:
        """Per function over a run-time batch, how the C this machine would run covers it."""
        return {f.name: f.batch_plan for f in self.source.functions if f.batch_plan}

    @property
    def plans(self) -> dict[str, list]:
        """Per function, the (piece, plan) list of the C this machine would run."""
        return {name: list(a.plans) for name, a in self.arrangements.items()}

    @property
    def cdef(self) -> str:
        """Declarations of every variant's functions, for cffi."""
        return "".join(source.cdef for source in self.sources.values())

    def formulas(self) -> dict[str, dict[str, str]]:
        """Per function: the gather-form sum as text and LaTeX, and for gradients the
        chain rule's scatter form it was derived from."""
        from .symbolic.printing import to_latex, to_text
        formulas = {}
        for function in self.functions:
            batch = function.batch
            entry = {"text": to_text(function.sum, batch=batch),
                     "latex": to_latex(function.sum, batch=batch)}
            if function.name in self.derivations:
                scatter = self.derivations[function.name].scatter
                entry["scatter"] = to_text(scatter, batch=batch)
                entry["scatter_latex"] = to_latex(scatter, batch=batch)
            formulas[function.name] = entry
        return formulas

    def manifest(self) -> dict[str, Any]:
        """The op's part of a package manifest (build.write_package adds the rest)."""
        op = self.op
        signatures = [KernelFunction(f.name, tuple(a.name for a in f.args), f.sum.output.name)
                      for f in self.functions]
        read_by_gradients = {a for s in signatures if s.name != "forward" for a in s.args}
        cotangent = self.cotangent_name
        shapes = dict(op.shapes)
        shapes[cotangent] = shapes[op.forward.output.name]
        for name in op.differentiable:
            shapes[f"grad_{name}"] = shapes[name]
        contents = self.contents(shapes)
        return {
            "kind": op.kind,
            "description": op.description,
            "key": op.key,
            "dtype": op.dtype,
            "inputs": [a.name for a in op.inputs],
            "arguments": list(op.arguments),
            "output": op.forward.output.name,
            "differentiable": list(op.differentiable),
            "backward_args": [a.name for a in op.inputs if a.name in read_by_gradients]
                             + [cotangent],
            "arrays": {name: {"shape": list(shape)} for name, shape in shapes.items()},
            "functions": {s.name: s.to_json() for s in signatures},
            "vjp": {function: {a: entry.to_json() for a, entry in entries.items()}
                    for function, entries in vjp_table({s.name: s for s in signatures},
                                                       op.differentiable, contents).items()},
            "canonical_order": list(contents["forward"][1]),
            "formulas": self.formulas(),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            **({"tuning": self.tuning.to_json()} if self.tuning else {}),
            **({"batch": {"extent": op.batch.extent, "index": op.batch.index}}
               if op.batch else {}),
            **op.details,
        }

    def contents(self, shapes: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Per function, a digest of what it computes with its arrays named by position, and
        the order of its arguments those positions follow: a gradient function's digest is
        the identity of its derived package (GradientSpec.content)."""
        from .symbolic.lowering import canonical_text
        digests = {}
        for function in self.functions:
            text, order = canonical_text(function)
            public = [shapes[function.args[k].name] for k in order] + \
                [shapes[function.sum.output.name]]
            text = f"{text}|{public}|{self.op.dtype}"
            digests[function.name] = (hashlib.sha256(text.encode()).hexdigest(), order)
        return digests

    @property
    def cotangent_name(self) -> str:
        return f"grad_{self.op.forward.output.name}"


def derive_and_emit(op: "OpDefinition", target: str | None = None) -> Compilation:
    """Derive every gradient of an op and emit its C (no build), once for each instruction
    set a package for ``target`` holds (see package.targets.variants)."""
    from .codegen import emit
    from .symbolic import clear_caches, derive, ir
    from .symbolic.define.gradient import gradient_batched

    clear_caches()          # the last compile's remembered expressions
    timings = {}
    start = time.perf_counter()
    forward = op.forward
    cotangent = ir.Array(f"grad_{forward.output.name}", forward.output.shape)
    derivations = {f"grad_{a.name}": derive.vjp(forward, a, cotangent)
                   for a in op.inputs if a.name in op.differentiable}
    timings["derive"] = time.perf_counter() - start

    start = time.perf_counter()
    batch = op.batch and op.batch.with_arrays(gradient_batched(op))
    functions = [ir.SumFunction("forward", forward, tuple(op.inputs), batch)]
    for name, derivation in derivations.items():
        read = {a.name for a in derivation.gather.inputs}
        args = tuple(a for a in (*op.inputs, cotangent) if a.name in read)
        functions.append(ir.SumFunction(name, derivation.gather, args, batch))
    variants = target_variants(target)
    sources = {v.target: emit(functions, op.dtype, op.description, isa=v.isa, prefix=v.prefix)
               for v in variants}
    timings["codegen"] = time.perf_counter() - start
    return Compilation(op, derivations, functions, variants, sources, timings)


def compilation(spec, target: str | None = None, tune: bool = False) -> Compilation:
    """The full derivation of a spec's op and its C for ``target``, without building it;
    with ``tune``, the C of the variant this machine runs uses the plans that ran fastest
    here (see symconv.tune; that builds and times candidates)."""
    from .symbolic.define import definition

    start = time.perf_counter()
    op = definition(spec)
    elapsed = time.perf_counter() - start
    compiled = derive_and_emit(op, target)
    compiled.timings = {"define": elapsed, **compiled.timings}
    if tune:
        from .tune import tune as tuned
        start = time.perf_counter()
        compiled.apply(tuned(compiled, build.build_config(target)))
        compiled.timings["tune"] = time.perf_counter() - start
    return compiled


@dataclass
class Build:
    """What getting one spec's kernel did: the loaded kernel, and the Compilation when the
    package was built now (None when it came from the cache), with the time it took."""

    kernel: Kernel
    compilation: Compilation | None
    seconds: float

    @property
    def cached(self) -> bool:
        return self.compilation is None


class KernelCache:
    """The kernels this process has loaded, keyed by the spec's key, the cache directory, the
    target, the C compiler and whether they were asked to be tuned; shared by
    ``compile_op``, the graph, the framework bindings and Dask.  A hit costs a dictionary
    look-up; a miss loads the package, building it first if needed."""

    def __init__(self) -> None:
        self._kernels: dict[tuple, Kernel] = {}
        self._lock = threading.Lock()
        self.generation = 0          # counts clear(): a holder of a kernel knows it is stale

    def __len__(self) -> int:
        return len(self._kernels)

    def _key(self, spec, cache_dir, target, tune) -> tuple:
        if not isinstance(tune, bool):
            raise TypeError(f"tune must be True or False, got {tune!r}")
        root = os.fspath(cache_dir) if cache_dir is not None else os.environ.get(build.CACHE_ENV)
        target = target if target is not None else os.environ.get(targets.TARGET_ENV)
        return spec.key, root and os.path.abspath(root), target, build.c_compiler(), tune

    def get(self, spec, cache_dir: str | os.PathLike | None = None,
            target: str | None = None, tune: bool = False) -> Kernel:
        kernel = self._kernels.get(self._key(spec, cache_dir, target, tune))
        return kernel if kernel is not None else self.load(spec, cache_dir, target, tune).kernel

    def load(self, spec, cache_dir: str | os.PathLike | None = None,
             target: str | None = None, tune: bool = False) -> Build:
        """Load (building first if needed) and remember a spec's kernel, saying how."""
        key = self._key(spec, cache_dir, target, tune)
        with self._lock:
            start = time.perf_counter()
            kernel = self._kernels.get(key)
            compilation = None
            if kernel is None:
                kernel, compilation = _load_or_build(spec, cache_dir, target, tune)
                self._kernels[key] = kernel
            return Build(kernel, compilation, time.perf_counter() - start)

    def clear(self) -> None:
        with self._lock:
            self._kernels.clear()
            self.generation += 1


KERNELS = KernelCache()


def _load_or_build(spec, cache_dir, target, tune: bool) -> tuple[Kernel, Compilation | None]:
    """The package of a spec under ``cache_dir``, loaded; built first if it is not there
    (then with its Compilation).  A tuned package of the spec, where one was built, is
    preferred to the plain one; ``tune`` builds one if there is none.  The package names
    are known from the spec alone, so a cache hit runs no symbolic stage."""
    config = build.build_config(target)
    root = Path(cache_dir) if cache_dir is not None else build.default_cache_dir()
    tuned = (root / build.package_name(f"{spec.slug}_tuned", spec.key,
                                       {**config, "tuned": True})).resolve()
    plain = (root / build.package_name(spec.slug, spec.key, config)).resolve()
    for path in (tuned,) if tune else (tuned, plain):
        try:
            return Kernel(path), None
        except PackageError:
            pass        # not built yet, or broken: (re)build it below
    path = tuned if tune else plain
    built = []

    def write(staging: Path) -> None:
        compiled = compilation(spec, target, tune)
        sources = {name: source.text for name, source in compiled.sources.items()}
        try:
            build.write_package(staging, path.name, sources, compiled.cdef,
                                compiled.manifest(), config, build.Preludes(
                                    {name: s.prelude for name, s in compiled.sources.items()}))
        except GeneratedCodeError as error:
            raise InternalError(_bug_report(root / "bug-reports" / path.name, spec, sources,
                                            error)) from None
        built.append(compiled)
    kernel = Kernel(build.publish(root, path.name, write))
    return kernel, (built[0] if built else None)


def _bug_report(directory: Path, spec, sources: dict[str, str], error: Exception) -> str:
    """Keep what a developer needs to reproduce a compile failure of generated C, and say so."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spec.json").write_text(json.dumps({"kind": spec.KIND, **spec.to_dict()},
                                                    indent=1) + "\n")
    (directory / "compiler.txt").write_text(f"{error}\n")
    for name, text in sources.items():
        (directory / f"kernels-{name}.c").write_text(text)
    return (f"symconv generated C that the compiler refused, for {spec.describe()}. This is a "
            f"bug in symconv, not in your input: please report it to the symconv developers "
            f"with the files in {directory} (the spec, the C and the compiler's output).")


def compile_op(spec, cache_dir: str | os.PathLike | None = None,
               target: str | None = None, tune: bool = False) -> Kernel:
    """Compile (or fetch from the cache) the kernels of a spec's op and load them.

    ``spec`` is any spec symconv defines (ConvSpec, ConvTransposeSpec, AvgPoolSpec,
    ExprSpec, GradientSpec).  ``cache_dir`` defaults to ``$SYMCONV_CACHE_DIR`` or
    ``~/.cache/symconv``; ``target`` to AVX-512 and AVX2 code, the best run, where the CPU
    has AVX2 (see package.targets.default_target).  ``tune=True`` times candidate plans on
    this machine and builds a package of the fastest (symconv.tune; its choices and timings
    are in the manifest's ``tuning``); once built, every later compile of the spec, tuned or
    not, loads it.
    """
    return KERNELS.get(spec, cache_dir, target, tune)


def compile_conv(spec, cache_dir: str | os.PathLike | None = None,
                 target: str | None = None, tune: bool = False) -> Kernel:
    """``compile_op`` under the name the README introduces first: every spec kind
    (ConvSpec, ConvTransposeSpec, AvgPoolSpec, ExprSpec, GradientSpec) is accepted."""
    if not isinstance(spec, SPEC_TYPES):
        names = ", ".join(t.__name__ for t in SPEC_TYPES)
        raise TypeError(f"compile_conv takes a spec ({names}), got {type(spec).__name__}")
    return compile_op(spec, cache_dir, target, tune)
