"""The pipeline: definition -> derivation -> C -> package -> Kernel.

``lower(op)`` runs the symbolic stages and keeps every intermediate in a
:class:`Compilation` (this is what ``symconv explain`` shows);
``compile_conv(spec)`` adds the cached build and returns a loaded Kernel.

The symbolic stages (define, derive, codegen) import SymPy, so they are
imported inside ``lower`` only: a cache hit loads a package without SymPy.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import build
from .kernel import Kernel, PackageError, best_variant
from .spec import ConvSpec

if TYPE_CHECKING:  # only for annotations; importing them pulls in SymPy
    from .codegen import CSource
    from .define import OpDefinition
    from .derive import Derivation
    from .ir import Array, IndexSum


@dataclass
class Compilation:
    """Every intermediate of one op's pipeline, kept for inspection."""

    op: "OpDefinition"
    derivations: dict[str, "Derivation"]
    functions: list[tuple[str, "IndexSum", tuple["Array", ...]]]
    variants: list[dict[str, Any]]        # build.variants(target): the instruction sets
    sources: dict[str, "CSource"]         # the C of each variant, by its target name
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def source(self) -> "CSource":
        """The C this machine would run (see kernel.best_variant)."""
        return self.sources[best_variant(self.variants)["target"]]

    @property
    def cdef(self) -> str:
        """Declarations of every variant's functions, for cffi."""
        return "".join(source.cdef for source in self.sources.values())

    def formulas(self) -> dict[str, dict[str, str]]:
        """Per function: the gather-form sum as text and LaTeX, and for gradients the
        chain rule's scatter form it was derived from."""
        from .ir import to_latex, to_text
        formulas = {}
        for name, fn, _ in self.functions:
            entry = {"text": to_text(fn), "latex": to_latex(fn)}
            if name in self.derivations:
                scatter = self.derivations[name].scatter
                entry["scatter"] = to_text(scatter)
                entry["scatter_latex"] = to_latex(scatter)
            formulas[name] = entry
        return formulas

    def manifest(self) -> dict[str, Any]:
        """The op's part of a package manifest (build.py adds the rest)."""
        op = self.op
        functions = {name: {"args": [a.name for a in args], "output": fn.output.name}
                     for name, fn, args in self.functions}
        read_by_gradients = {a for name, entry in functions.items() if name != "forward"
                             for a in entry["args"]}
        cotangent = self.cotangent_name
        shapes = dict(op.shapes)
        shapes[cotangent] = shapes[op.forward.output.name]
        for name in op.differentiable:
            shapes[f"grad_{name}"] = shapes[name]
        return {
            "kind": op.kind,
            "description": op.description,
            "key": op.key,
            "dtype": op.dtype,
            "inputs": [a.name for a in op.inputs],
            "output": op.forward.output.name,
            "differentiable": list(op.differentiable),
            "backward_args": [a.name for a in op.inputs if a.name in read_by_gradients]
                             + [cotangent],
            "arrays": {name: {"shape": list(shape)} for name, shape in shapes.items()},
            "functions": functions,
            "formulas": self.formulas(),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            **op.details,
        }

    @property
    def cotangent_name(self) -> str:
        return f"grad_{self.op.forward.output.name}"


def lower(op: "OpDefinition", target: str | None = None) -> Compilation:
    """Derive every gradient of an op and emit its C (no build), once for each instruction
    set a package for ``target`` holds (see build.variants)."""
    from . import codegen, derive, ir

    timings = {}
    start = time.perf_counter()
    forward = op.forward
    cotangent = ir.Array(f"grad_{forward.output.name}", forward.output.shape)
    derivations = {f"grad_{a.name}": derive.vjp(forward, a, cotangent)
                   for a in op.inputs if a.name in op.differentiable}
    timings["derive"] = time.perf_counter() - start

    start = time.perf_counter()
    functions = [("forward", forward, tuple(op.inputs))]
    for name, derivation in derivations.items():
        read = {a.name for a in derivation.gather.inputs}
        args = tuple(a for a in (*op.inputs, cotangent) if a.name in read)
        functions.append((name, derivation.gather, args))
    variants = build.variants(target)
    sources = {v["target"]: codegen.emit(functions, op.dtype, op.description, isa=v["isa"],
                                         prefix=v["prefix"])
               for v in variants}
    timings["codegen"] = time.perf_counter() - start
    return Compilation(op, derivations, functions, variants, sources, timings)


def explain(spec, target: str | None = None) -> Compilation:
    """The full derivation of a spec's op and its C for ``target``, without building it."""
    from . import define

    start = time.perf_counter()
    op = define.definition(spec)
    elapsed = time.perf_counter() - start
    compilation = lower(op, target)
    compilation.timings = {"define": elapsed, **compilation.timings}
    return compilation


_loaded: dict[Path, Kernel] = {}


def compile_op(spec, cache_dir: str | os.PathLike | None = None,
               target: str | None = None) -> Kernel:
    """Compile (or fetch from the cache) the kernels of a spec's op and load them.

    ``spec`` is any spec symconv defines (ConvSpec, AvgPoolSpec).  ``cache_dir``
    defaults to ``$SYMCONV_CACHE_DIR`` or ``~/.cache/symconv``; ``target`` to
    AVX-512 and AVX2 code, the best run, where the CPU has AVX2 (see build.default_target).  The package
    name is known from the spec alone, so a cache hit runs no symbolic stage.
    """
    config = build.build_config(target)
    root = Path(cache_dir) if cache_dir is not None else build.default_cache_dir()
    path = (root / build.package_name(spec.slug, spec.key, config)).resolve()
    if path in _loaded:
        return _loaded[path]
    try:
        kernel = Kernel(path)
    except PackageError:
        def write(staging: Path) -> None:
            compilation = explain(spec, target)
            sources = {name: source.text for name, source in compilation.sources.items()}
            build.write_package(staging, path.name, sources, compilation.cdef,
                                compilation.manifest(), config)
        kernel = Kernel(build.publish(root, path.name, write))
    _loaded[path] = kernel
    return kernel


def compile_conv(spec: ConvSpec, cache_dir: str | os.PathLike | None = None,
                 target: str | None = None) -> Kernel:
    """Compile one convolution: ``compile_op`` for a ConvSpec."""
    if not isinstance(spec, ConvSpec):
        raise TypeError(f"compile_conv takes a ConvSpec, got {type(spec).__name__}")
    return compile_op(spec, cache_dir, target)
