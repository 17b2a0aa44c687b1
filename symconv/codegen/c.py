"""Scalar C: names, printers for index expressions, bounds and bodies, loop nests, OpenMP.

Each output element is computed by its own gather: the free indices are the
outer loops, each term adds its loop nest into a register accumulator, and
the element is written once.  Loop bounds are the lowered ``max(ceil)`` /
``min(floor)`` expressions, evaluated with floor division that is correct
for negative numerators; strided loops start on their residue.  The text is
deterministic: the same sums give byte-identical C.
"""

from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import sympy
from sympy.codegen.ast import float32, float64, real
from sympy.printing.c import C99CodePrinter

from ..symbolic.affine import c_order_strides, integer_form, linear_parts
from ..symbolic.ir import Array, IndexSum, SumFunction, accesses, index_range
from ..symbolic.lowering import Bound, Condition, LoopNest, nest_box, value_range
from . import schedule

C_TYPES = {"float32": "float", "float64": "double"}

def header(name: str) -> str:
    """The text of a C header shipped next to this module (``sc_*.h``); the emitter pastes
    it at the top of every translation unit, so a generated file compiles on its own."""
    return importlib.resources.files(__package__).joinpath(name).read_text()


PRELUDE = header("sc_scalar.h")

@dataclass(frozen=True)
class CFunction:
    """A generated C function: ``symbol(inputs..., output)``, all arrays of one dtype, with
    the schedule it was emitted from (each piece of the output and the plan that runs it,
    and the loops they share)."""

    name: str
    symbol: str
    inputs: tuple[Array, ...]
    output: Array
    declaration: str
    arrangement: schedule.Arrangement = field(default_factory=schedule.Arrangement)
    batch_plan: schedule.BatchPlan | None = None     # over a run-time batch: how it runs


@dataclass(frozen=True)
class CSource:
    """A translation unit: its text, the functions it defines, and its prelude (the headers
    every unit of its instruction set starts with, whole inside ``text``: the build
    precompiles it once, see package.build.Preludes)."""

    text: str
    functions: tuple[CFunction, ...]
    prelude: str = ""

    @property
    def cdef(self) -> str:
        """Declarations for cffi."""
        return "\n".join(f.declaration for f in self.functions) + "\n"


def c_namespace(function: SumFunction) -> SumFunction:
    """The function with every name it got from its definition moved into a C namespace of
    its own: arrays become ``a_<name>`` and indices ``i_<name>``, while every name the
    generator adds starts with ``sc_``.  So no array or index name a user picks can meet a
    generated name, a C keyword or a library symbol."""
    fn = function.sum
    arrays = {a.name: Array(f"a_{a.name}", a.shape)
              for a in (*function.args, *fn.inputs, fn.output)}
    mapping: dict = {}
    for term in fn.terms:
        for access in accesses(term.body):
            mapping[access.base] = arrays[str(access.base.label)].base
        for idx in term.body.atoms(sympy.Idx) | set(term.indices):
            mapping[idx] = sympy.Idx(f"i_{idx.label}", (idx.lower, idx.upper))
    mapping.update({idx: sympy.Idx(f"i_{idx.label}", (idx.lower, idx.upper))
                    for idx in fn.indices})
    terms = tuple(replace(term.substituted(mapping),
                          indices=tuple(mapping[i] for i in term.indices),
                          zero_outside=tuple(arrays[name].name for name in term.zero_outside))
                  for term in fn.terms)
    renamed = IndexSum(arrays[fn.output.name], tuple(mapping[i] for i in fn.indices), terms)
    return SumFunction(function.name, renamed, tuple(arrays[a.name] for a in function.args))


def c_affine(expr) -> str:
    """An integer-valued affine expression; a quotient is exact, so C's division is right."""
    num, den = integer_form(expr)
    text = _linear_text(num)
    return text if den == 1 else f"({text}) / {den}"


def c_nonnegative(exprs, at: dict | None = None) -> list[str]:
    """C tests ``expr >= 0`` of affine expressions, each at the values ``at`` (if given)."""
    return [f"({c_affine(sympy.expand(e.xreplace(at)) if at else e)}) >= 0" for e in exprs]


def _linear_text(expr) -> str:
    """C for an affine expression with integer coefficients (see _terms_text)."""
    return _terms_text(*linear_parts(expr))


def _terms_text(coefficients: Mapping, constant) -> str:
    """C for ``Σ coefficient·index + constant`` with integer coefficients: its terms by
    index name, the constant last, or first where the terms start negative (``1 - i``).
    Printed directly: SymPy's printer took most of the codegen time."""
    terms = sorted((_index_name(index), int(c)) for index, c in coefficients.items() if c)
    if constant or not terms:
        at = 0 if terms and terms[0][1] < 0 < constant else len(terms)
        terms.insert(at, ("", int(constant)))
    text = ""
    for name, c in terms:
        magnitude = (f"{abs(c)}*{name}" if abs(c) != 1 else name) if name else str(abs(c))
        sign = "-" if c < 0 else "+"
        text = (f"{text} {sign} {magnitude}" if text else
                f"-{magnitude}" if c < 0 else magnitude)
    return text


def _index_name(index) -> str:
    """An index's C name; a Symbol's name read directly (its printer is slow)."""
    label = index.label if isinstance(index, sympy.Idx) else index
    return label.name if isinstance(label, sympy.Symbol) else str(label)


def prefetch_line(array: str, offset: str, write: bool = False) -> str:
    """A prefetch hint for ``array[offset]`` (for writing, with ``write``): an address past
    the array's end does not fault."""
    return f"__builtin_prefetch(&{array}[{offset}]{', 1' if write else ''});"


def flat_offset(access: sympy.Indexed, last: int | None = None) -> str:
    """C-order offset of an access, its integer parts folded into one affine expression;
    with ``last``, the offset in a copy of the array with that axis moved innermost."""
    shape = [int(s) for s in access.base.shape]
    strides = moved_last_strides(shape, last) if last is not None else c_order_strides(shape)
    whole: dict = {}        # the integer parts, summed as integers (SymPy's sums were slow)
    constant, quotients = 0, []
    for stride, position in zip(strides, access.indices):
        num, den = integer_form(position)
        if den == 1:
            coefficients, offset = linear_parts(num)
            for index, c in coefficients.items():
                whole[index] = whole.get(index, 0) + stride * int(c)
            constant += stride * int(offset)
        else:
            quotients.append(f"{stride}*({c_affine(position)})" if stride != 1 else
                             c_affine(position))
    empty = constant == 0 and not any(whole.values())
    parts = [] if empty and quotients else [_terms_text(whole, constant)]
    return " + ".join(parts + quotients)


def moved_last_strides(shape: Sequence[int], axis: int) -> tuple[int, ...]:
    """Element strides of an array of ``shape`` stored with ``axis`` innermost, the other
    axes in order (channels first to channels last when ``axis`` is 1)."""
    order = [a for a in range(len(shape)) if a != axis] + [axis]
    moved = c_order_strides([shape[a] for a in order])
    return tuple(moved[order.index(a)] for a in range(len(shape)))


def outside_checks(access: sympy.Indexed, box) -> list[str]:
    """C conditions keeping each index of an access inside its extent, for the indices that
    can leave it somewhere in the box."""
    checks = []
    for position, extent in zip(access.indices, access.base.shape):
        low, high = value_range(position, box)
        if low < 0 or high > int(extent) - 1:
            index = c_affine(position)
            checks.append(f"(uint64_t)({index}) < {int(extent)}u")
    return checks


class BodyPrinter(C99CodePrinter):
    """Array reads as flat loads (zero-padded arrays guarded); small powers as products."""

    def __init__(self, dtype: str, padded: dict | None = None):
        super().__init__({"type_aliases": {real: float32 if dtype == "float32" else float64},
                          "math_macros": {}})     # M_PI and friends are not C99
        self.padded = padded or {}

    def _print_NumberSymbol(self, expr):
        return self._print(sympy.Float(expr.evalf(20), 20))

    _print_Pi = _print_Exp1 = _print_EulerGamma = _print_GoldenRatio = _print_Catalan = \
        _print_NumberSymbol

    def _print_Heaviside(self, expr):
        x = self._print(expr.args[0])
        at_zero = self._print(expr.args[1] if len(expr.args) > 1 else sympy.S.Half)
        return f"(({x}) > 0 ? 1 : ({x}) < 0 ? 0 : {at_zero})"

    def _print_Idx(self, expr):
        return str(expr.label)

    def _print_Indexed(self, expr):
        load = f"{expr.base.label}[{flat_offset(expr)}]"
        checks = self.padded.get(expr)
        return f"({' && '.join(checks)} ? {load} : 0)" if checks else load

    def _print_Pow(self, expr):
        base, exponent = expr.args
        if exponent.is_Integer and 2 <= int(exponent) <= 4:
            factor = self.parenthesize(base, sympy.printing.precedence.PRECEDENCE["Mul"])
            return "(" + "*".join([factor] * int(exponent)) + ")"
        return super()._print_Pow(expr)


def fold(parts: list[str], name: str) -> str:
    text = parts[0]
    for part in parts[1:]:
        text = f"{name}({text}, {part})"
    return text


def bound_text(bounds: Sequence[Bound], is_lower: bool) -> str:
    parts = []
    for b in bounds:
        num = c_affine(b.num)
        if b.den == 1:
            parts.append(num)
        else:
            parts.append(f"sc_{'ceildiv' if is_lower else 'floordiv'}({num}, {b.den})")
    return fold(parts, "sc_max" if is_lower else "sc_min")


def condition_text(condition: Condition) -> str:
    expr = c_affine(condition.expr)
    if condition.modulus == 0:
        return f"{expr} >= 0"
    return f"sc_mod({expr}, {condition.modulus}) == 0"


class Writer:
    """Indented C text.  ``threads_from_caller``: the function being written leaves the choice
    of threads to its caller (the item of a sum over a run-time batch, whose work is known
    only then), so every parallel loop is written, taken only when ``sc_threads > 1``.
    ``accumulate``: the function adds each output element's sum to the element instead of
    storing it (the items after the first of a sum over a run-time batch).  ``batched``:
    the function sums over a run-time batch of ``sc_batch`` items itself, these arrays
    (name -> elements per item) holding every item's (see channels._emit_chunked).
    ``threaded`` says whether any parallel region was written."""

    def __init__(self, threads_from_caller: bool = False):
        self.lines: list[str] = []
        self.depth = 0
        self.threads_from_caller = threads_from_caller
        self.accumulate = False
        self.batched: dict[str, int] = {}
        self.threaded = False          # a parallel region has been written

    @property
    def store(self) -> str:
        """The C operator that writes an output element: ``+=`` where the function
        accumulates, ``=`` otherwise."""
        return "+=" if self.accumulate else "="

    def line(self, text: str = "") -> None:
        self.lines.append("    " * self.depth + text if text else "")

    def open(self, text: str = "") -> None:
        self.line(f"{text} {{" if text else "{")
        self.depth += 1

    def close(self) -> None:
        self.depth -= 1
        self.line("}")


def _emit_nest(out: Writer, nest: LoopNest, body: str) -> None:
    opened = 0
    if nest.guards:
        out.open(f"if ({' && '.join(f'({condition_text(g)})' for g in nest.guards)})")
        opened += 1
    for loop in nest.loops:
        var = str(loop.index.label)
        low, high = bound_text(loop.lower, True), bound_text(loop.upper, False)
        if loop.step == 1:
            out.open(f"for (int64_t {var} = {low}; {var} <= {high}; ++{var})")
        else:
            out.open()  # a scope for the first value on the lattice
            out.line(f"const int64_t sc_lo_{var} = {low};")
            out.line(f"const int64_t sc_start_{var} = sc_lo_{var} + "
                     f"sc_mod({c_affine(loop.residue)} - sc_lo_{var}, {loop.step});")
            out.open(f"for (int64_t {var} = sc_start_{var}; {var} <= {high}; {var} += {loop.step})")
            opened += 1
        opened += 1
        if loop.checks:
            out.open(f"if ({' && '.join(f'({condition_text(c)})' for c in loop.checks)})")
            opened += 1
    out.line(f"sc_acc += {body};")
    for _ in range(opened):
        out.close()


def threads(out: Writer, split: schedule.Split) -> bool:
    """Whether the loops of ``split`` run on threads: where their work pays for them, or
    where the caller chooses (Writer.threads_from_caller)."""
    return (split.threaded or out.threads_from_caller) and split.loops > 0


def omp_parallel(out: Writer, directive: str) -> None:
    """``#pragma omp <directive>`` on ``sc_threads`` threads (see Writer)."""
    out.threaded = True
    out.line(f"#pragma omp {directive} num_threads(sc_threads)"
             + (" if(sc_threads > 1)" if out.threads_from_caller else ""))


def parallel(out: Writer, split: schedule.Split, clauses: str = "") -> bool:
    """A parallel loop over ``split``'s loops (the next ones written), with ``clauses``, if
    they run on threads (see threads); whether they do."""
    if not threads(out, split):
        return False
    omp_parallel(out, f"parallel for collapse({split.loops}) schedule(dynamic, {split.grain})"
                      f"{clauses}")
    return True


def output_offset(fn: IndexSum, piece: schedule.Piece, axes: slice = slice(None)) -> sympy.Expr:
    """C-order offset of the output element a piece computes, in the piece's indices: the
    part its ``axes`` make."""
    strides = c_order_strides(fn.output.shape)
    return sympy.expand(sum(stride * p for stride, p in
                            list(zip(strides, piece.position))[axes]))


def emit_finite_scan(out: Writer, array: sympy.IndexedBase, dtype: str,
                     constant: sympy.Expr = sympy.Integer(1)) -> None:
    """Set ``sc_bad`` (declared by the caller) if some value of ``array``, times
    ``constant``, is NaN or infinite; the scan stops at the first."""
    value = BodyPrinter(dtype).doprint(constant * sympy.Symbol("sc_x"))
    out.open(f"for (int64_t sc_e = 0; !sc_bad && sc_e < {math.prod(array.shape)}; ++sc_e)")
    out.line(f"const {C_TYPES[dtype]} sc_x = {array.label}[sc_e];")
    out.line(f"sc_bad |= !isfinite({value});")
    out.close()


def emit_scalar_piece(out: Writer, fn: IndexSum, piece: schedule.Piece, dtype: str) -> None:
    """The plain nest: one accumulator per output element, terms added in order."""
    parallel(out, schedule.task_split(piece, schedule.Scalar(), None))
    for idx in piece.indices:
        var = str(idx.label)
        lo, hi = index_range(idx)
        out.open(f"for (int64_t {var} = {lo}; {var} <= {hi}; ++{var})")
    out.line(f"{C_TYPES[dtype]} sc_acc = 0;")
    for nest in piece.nests:
        box = nest_box(nest, piece.indices)
        padded = {a: outside_checks(a, box) for a in accesses(nest.body)
                  if str(a.base.label) in nest.zero_outside}
        _emit_nest(out, nest, BodyPrinter(dtype, padded).doprint(nest.body))
    out.line(f"{fn.output.name}[{c_affine(output_offset(fn, piece))}] {out.store} sc_acc;")
    for _ in piece.indices:
        out.close()


@dataclass(frozen=True)
class CopyPart:
    """The part of a copy :func:`emit_copy` fills on the calling thread: one row of a ring
    (schedule.Ring), ``row`` giving the position in the copy (C) of each axis before the
    row's, stored at ``target``; with ``span`` (the C names of a first and a past-the-last
    position of the last axis), the rows of those positions, each at its offset from the
    first."""

    row: dict[int, str]
    target: str
    span: tuple[str, str] | None = None


def emit_copy(out: Writer, copy: schedule.Copy, shape: list[int],
              transpose: tuple[str, int] | None = None, part: CopyPart | None = None) -> None:
    """Fill a copy (schedule.Copy) in one pass, or ``part`` of it: each element the
    array's, or zero in the halo.  With an axis moved, the last axis goes in tiles of
    COPY_TILE, the moved axis inside a tile: each read then is a run of neighbours along
    the array's last axis, not one element per channel plane (planes 4 KiB apart crowd one
    L1 set).  With ``transpose`` (a vector prelude's (function, width): sc_transpose16_ps
    moves a width x width block), the rows inside the array move their channels in such
    blocks instead (see _emit_transposed_rows)."""
    name = part.target if part else schedule.copy_name(copy.array)
    row = part.row if part else {}
    span = part.span if part else None
    padded = copy.row_shape(shape) if row else copy.shape(shape)
    halo = copy.halo or [(0, 0)] * len(shape)
    last = len(shape) - 1
    first, stop = span or ("0", str(copy.shape(shape)[last]))
    for a, position in row.items():
        out.line(f"const int64_t sc_x{a} = {position};")
    order = [a for a in range(len(shape)) if a != copy.axis and a not in row]
    tiled = copy.axis is not None
    if tiled:
        order = order[:-1]
    loops = min(2, len(order))
    if not row:
        parallel(out, schedule.move_split([(f"sc_x{a}", padded[a]) for a in order[:loops]],
                                          math.prod(padded)))
    for a in order:
        start, end = (first, stop) if a == last else (0, padded[a])
        out.open(f"for (int64_t sc_x{a} = {start}; sc_x{a} < {end}; ++sc_x{a})")
    place = sympy.IndexedBase(name, shape=padded)[
        tuple(sympy.Integer(0) if a in row else
              sympy.Symbol(f"sc_x{a}") - (sympy.Symbol(first) if span and a == last else 0)
              for a in range(len(shape)))]
    source = sympy.IndexedBase(copy.array, shape=shape)[
        tuple(sympy.Symbol(f"sc_x{a}") - halo[a][0] for a in range(len(shape)))]
    inside = {a: f"sc_x{a} >= {lo} && sc_x{a} < {lo + shape[a]}"
              for a, (lo, hi) in enumerate(halo) if lo or hi or (a == copy.axis and copy.lead)}
    value = f"{copy.array}[{flat_offset(source)}]"
    if inside:
        value = f"({' && '.join(inside.values())}) ? {value} : 0"
    element = f"{name}[{flat_offset(place, copy.axis)}] = {value};"
    if tiled and transpose is not None and copy.axis != last and halo[copy.axis] == (0, 0):
        _emit_transposed_rows(out, copy, shape, padded, name, place, source, element,
                              [inside[a] for a in (*row, *order) if a in inside and a != last],
                              transpose, (first, stop))
    elif tiled:
        out.open(f"for (int64_t sc_t = {first}; sc_t < {stop}; sc_t += {COPY_TILE})")
        out.open(f"for (int64_t sc_x{copy.axis} = 0; sc_x{copy.axis} < {padded[copy.axis]}; "
                 f"++sc_x{copy.axis})")
        out.open(f"for (int64_t sc_x{last} = sc_t; sc_x{last} < sc_min(sc_t + {COPY_TILE}, "
                 f"{stop}); ++sc_x{last})")
        out.line(element)
        for _ in range(3):
            out.close()
    else:
        out.line(element)
    for _ in order:
        out.close()


def _emit_transposed_rows(out: Writer, copy: schedule.Copy, shape, padded, name: str,
                          place, source, element: str, row_inside: list[str],
                          transpose: tuple[str, int], span: tuple[str, str]) -> None:
    """One row of a copy with its channels (axis ``copy.axis``) moved innermost, its
    positions ``span`` (C: first, past the last): where the row lies inside the array, its
    positions inside in blocks of ``width`` positions x ``width`` channels, each block
    transposed in registers, a group of channels' blocks along the row one after another
    (the channels past the last whole group, and the lead, element by element); the halo's
    positions, and rows outside, one position at a time, all channels innermost.  Block by
    block along the row, every group in turn (each block then reading all the channels'
    rows at once), 2d-56's forward took 1.06x the time and 1d-audio's 1.10x (AVX-512, 1
    and 2 threads; 3-D layers' short rows, the same)."""
    function, width = transpose
    axis, last = copy.axis, len(shape) - 1
    low, size = copy.halo[last][0] if copy.halo else 0, shape[last]
    whole = shape[axis] // width * width
    channel, position = sympy.Symbol(f"sc_x{axis}"), sympy.Symbol(f"sc_x{last}")
    at = {channel: sympy.Symbol("sc_c"), position: sympy.Symbol("sc_v")}
    src = flat_offset(source.xreplace(at))
    dst = flat_offset(place.xreplace(at), axis)
    src_stride = c_order_strides(shape)[axis]
    dst_stride = moved_last_strides(padded, axis)[last]

    def columns(first: str, stop: str, channels_from: int = 0) -> None:
        out.open(f"for (int64_t sc_x{last} = {first}; sc_x{last} < {stop}; ++sc_x{last})")
        out.open(f"for (int64_t sc_x{axis} = {channels_from}; sc_x{axis} < {padded[axis]}; "
                 f"++sc_x{axis})")
        out.line(element)
        out.close()
        out.close()

    first, stop = span
    out.line(f"int64_t sc_w = {first};")
    out.open(f"if ({' && '.join(f'({c})' for c in row_inside)})" if row_inside else "")
    halo_stop = _extreme_text("sc_min", str(low), stop)
    columns("sc_w", halo_stop)
    out.line(f"sc_w = {_extreme_text('sc_max', 'sc_w', halo_stop)};")
    inside = _extreme_text("sc_min", str(low + size), stop)
    out.line(f"const int64_t sc_blocks = sc_w + sc_max(0, {inside} - sc_w) / {width} * {width};")
    # a channel group's blocks one after another: each of its channels read as one run
    out.open(f"for (int64_t sc_c = 0; sc_c < {whole}; sc_c += {width})")
    out.line(f"for (int64_t sc_v = sc_w; sc_v < sc_blocks; sc_v += {width}) "
             f"{function}({copy.array} + {src}, {src_stride}, {name} + {dst}, {dst_stride});")
    out.close()
    if whole < padded[axis]:
        columns("sc_w", "sc_blocks", whole)
    out.line("sc_w = sc_blocks;")
    out.close()
    columns("sc_w", stop)


def _extreme_text(name: str, a: str, b: str) -> str:
    """C for ``name`` (sc_min or sc_max) of two integers, folded where both are numbers."""
    if a.lstrip("-").isdigit() and b.lstrip("-").isdigit():
        return str((min if name == "sc_min" else max)(int(a), int(b)))
    return fold([a, b], name)


COPY_TILE = 16     # elements of the last axis per tile of a copy: a 64-byte line of float32
