"""Tuning: time a spec's candidate plans on this machine and keep the fastest.

The schedule picks each piece's plan by rules (codegen.schedule.plan).  A tuner
asks it which other plans each function could run (schedule.CHOICES: another
plan kind, or fewer vectors per register block), compiles every candidate side
by side into one throw-away extension for the instruction set this machine
runs, runs them in turn on the same random data, checks that each agrees with
the default, and keeps a choice only where it beats the default clearly.  The
result, with every timing, is what a package's manifest records under
``tuning``; the compiler re-emits that variant's C with the choices.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import InternalError
from .kernel import Function, KernelFunction, best_variant, default_threads, load_extension
from .package import build
from .package.targets import SOURCE

DEFAULT = "default"     # the candidate that is the schedule's own plan
MIN_GAIN = 0.05         # a choice must beat the default by this share (timings move by ~2%)
ROUNDS = (3, 25)        # fewest and most rounds of timing, each runs every candidate once
ROUND_SECONDS = 0.3     # ... and the time the rounds take together, where ROUNDS allows
TUNE_BATCH = 2          # the batch a batch-open op is timed at


@dataclass(frozen=True)
class Tuning:
    """A tuner's result: the variant it timed (its target), the threads each call ran on,
    per function the plan choice kept (functions that keep their default are absent), and
    per function each candidate's best time in seconds."""

    target: str
    threads: int
    choices: dict[str, str]
    seconds: dict[str, dict[str, float]]

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "threads": self.threads, "choices": dict(self.choices),
                "seconds": {f: {c: float(f"{t:.4g}") for c, t in entries.items()}
                            for f, entries in self.seconds.items()}}


def candidates(compiled) -> dict[str, list[str]]:
    """Per function of ``compiled`` (a compiler.Compilation: that module imports this one),
    the plans a tuner times: the default, then each choice that changes its schedule for
    the instruction set this machine runs."""
    from .codegen.emit import plan_options

    isa = best_variant(compiled.variants).isa
    return {f.name: [DEFAULT, *plan_options(f, compiled.op.dtype, isa)]
            for f in compiled.functions}


def tune(compiled, config: Mapping[str, Any],
         threads: int | None = None) -> Tuning:
    """Time every candidate plan of each of a compilation's functions on this machine (with
    ``threads`` threads, default the kernels' default) and keep the fastest; see the
    module docstring.  Raises InternalError if a candidate disagrees with the default."""
    if config["sanitize"]:
        raise ValueError("tuning times the kernels: build it without '+sanitize' (timings "
                         "under AddressSanitizer say nothing about the plain build)")
    variant = best_variant(compiled.variants)
    threads = threads or default_threads()
    options = candidates(compiled)
    timed = {name: names for name, names in options.items() if len(names) > 1}
    if not timed:
        return Tuning(variant.target, threads, {}, {})
    with tempfile.TemporaryDirectory(prefix="symconv-tune-") as directory:
        functions = _build(compiled, timed, variant, config, Path(directory))
        seconds = {name: _timed(name, entries, compiled.op.dtype, threads)
                   for name, entries in functions.items()}
    choices = {}
    for name, times in seconds.items():
        best = min(times, key=times.get)
        if best != DEFAULT and times[best] < (1 - MIN_GAIN) * times[DEFAULT]:
            choices[name] = best
    return Tuning(variant.target, threads, choices, seconds)


def _build(compiled, timed: Mapping[str, list[str]], variant, config,
           directory: Path) -> dict[str, dict[str, Function]]:
    """Compile every candidate into one extension in ``directory``: per function, each
    candidate's loaded Function (its symbol prefixed by the candidate's number)."""
    from .codegen.emit import emit_unit

    op = compiled.op
    entries, prefixes = [], {}
    by_name = {f.name: f for f in compiled.functions}
    for name, choices in timed.items():
        for choice in choices:
            prefix = prefixes.setdefault((name, choice), f"sc_tune{len(prefixes)}_")
            entries.append((by_name[name], prefix, None if choice == DEFAULT else choice))
    source = emit_unit(entries, op.dtype, op.description, variant.isa)
    digest = hashlib.sha256(source.text.encode()).hexdigest()[:16]
    module = f"_symconv_tune_{digest}"
    (directory / SOURCE).write_text(source.text)
    single = {**config, "variants": [replace(variant, source=SOURCE).to_json()]}
    preludes = build.Preludes({variant.target: source.prelude})
    extension = load_extension(build.compile_extension(directory, module, source.cdef, single,
                                                       preludes), module)
    manifest = compiled.manifest()
    shapes = {name: tuple(entry["shape"]) for name, entry in manifest["arrays"].items()}
    signatures = {name: KernelFunction.from_json(name, manifest["functions"][name])
                  for name in timed}
    return {name: {choice: Function(signatures[name], shapes, op.dtype, extension,
                                    prefixes[name, choice]) for choice in choices}
            for name, choices in timed.items()}


def _timed(name: str, functions: Mapping[str, Function], dtype: str,
           threads: int) -> dict[str, float]:
    """Each candidate's best time over rounds that run every candidate once, in turn (so a
    change in the machine's load reaches them all alike), after checking each one's result
    against the default's."""
    rng = np.random.default_rng(0)
    first = functions[DEFAULT]
    arrays = [rng.standard_normal(_concrete(first.shapes[a])).astype(dtype) for a in first.args]
    batch = TUNE_BATCH if first.needs_batch else None
    outputs = {choice: f(*arrays, threads=threads, batch=batch)
               for choice, f in functions.items()}
    reference = outputs[DEFAULT]
    tolerance = (1e-4 if np.dtype(dtype) == np.float32 else 1e-10) * \
        max(1.0, float(np.abs(reference).max(initial=0.0)))
    for choice, result in outputs.items():
        if not np.allclose(result, reference, rtol=0, atol=tolerance):
            raise InternalError(f"tuning {name}: the plan {choice!r} computes other values than "
                                f"the default plan (largest difference "
                                f"{float(np.abs(result - reference).max()):.3g}). This is a bug "
                                f"in symconv; please report it with the spec.")
    best = dict.fromkeys(functions, math.inf)
    spent, rounds = 0.0, 0
    while rounds < ROUNDS[0] or (spent < ROUND_SECONDS and rounds < ROUNDS[1]):
        for choice, f in functions.items():
            start = time.perf_counter()
            f(*arrays, out=outputs[choice], threads=threads, batch=batch)
            elapsed = time.perf_counter() - start
            best[choice] = min(best[choice], elapsed)
            spent += elapsed
        rounds += 1
    return best


def _concrete(shape) -> tuple[int, ...]:
    """An array shape with its run-time batch axis (None) at TUNE_BATCH."""
    return tuple(TUNE_BATCH if d is None else int(d) for d in shape)
