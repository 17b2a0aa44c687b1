"""IR -> C: one function per index sum, each piece of its output by the plan its schedule
chose, and one translation unit per instruction set."""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping, Sequence

from ..errors import IRError
from ..symbolic.ir import SumFunction, index_range
from ..symbolic.printing import to_text
from . import schedule
from .c import (C_TYPES, PRELUDE, CFunction, CSource, Writer, c_namespace,
                emit_finite_scan, emit_scalar_piece, parallel)
from .isa import SIMD_PRELUDE, Simd
from .channels import (BATCH_PREFIX, SharedPanels, emit_channel_lanes, emit_channel_phases,
                       emit_shared_panels, release_shared_panels)
from .vector import close_stage, emit_output_lanes, emit_reduction_lanes, open_stage

def emit_function(function: SumFunction, dtype: str, isa: str | None = None,
                  prefix: str = "symconv_", choice: str | None = None) -> tuple[str, CFunction]:
    """C text of one index sum as ``void <prefix><name>(inputs..., output, threads)``.

    The output is computed piece by piece (see codegen.schedule), each piece by its plan;
    with ``isa`` ("avx2" or "avx512") the vector plans use that instruction set, and with
    ``choice`` each piece takes that plan (schedule.CHOICES; a tuner's pick) where it fits.
    Every output element is computed by one thread in a fixed order, so results do not depend on
    the number of threads.  Names are moved into their own C namespace first (c_namespace).
    A function over a run-time batch is its item sum plus a loop over the batch that maps
    (:func:`emit_batch_map`) or sums (:func:`emit_batch_sum`) it."""
    name = function.name
    missing = {a.name for a in function.sum.inputs} - {a.name for a in function.args}
    if missing:
        raise IRError(f"{name}: reads {sorted(missing)} which are not among its arguments")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise IRError(f"function name {name!r} is not a C identifier")
    ctype = C_TYPES[dtype]
    symbol = f"{prefix}{name}"
    fn = (named := c_namespace(function)).sum
    params = [_batch_params(named, ctype), "int sc_threads"]
    batch = function.batch
    out = Writer()
    formula = to_text(function.sum, batch=batch).replace("*/", "* /")
    out.line("/*")
    for text in formula.splitlines():
        out.line(f" * {text}")
    out.line(" */")
    vector = Simd(isa, dtype) if isa else None
    arrangement = arrange(fn, vector, choice)
    if batch is None:
        out.open(f"void {symbol}({', '.join(params)})")
        emit_pieces(out, fn, arrangement, dtype, vector)
        out.close()
        declaration = f"void {symbol}({', '.join(plain_params(named, ctype))}, int sc_threads);"
        return "\n".join(out.lines) + "\n", CFunction(name, symbol, function.args,
                                                      function.sum.output, declaration,
                                                      arrangement)
    item = f"sc_item_{symbol}"
    shared = SharedPanels(frozenset(f"a_{a}" for a in batch.arrays), ctype)
    params.append(f"{ctype} *const *sc_panels")

    def copy(suffix: str = "", arranged: schedule.Arrangement = arrangement,
             threads_from_caller: bool = False, accumulate: bool = False) -> None:
        """The item, or a copy of it named ``item + suffix``, written with those Writer
        flags."""
        out.threads_from_caller, out.accumulate = threads_from_caller, accumulate
        out.open(f"static void {item}{suffix}({', '.join(params)})")
        emit_pieces(out, fn, arranged, dtype, vector, shared)
        out.close()
        out.threads_from_caller = out.accumulate = False
    copy()
    item_work = arrangement.work
    item_threaded = out.threaded
    maps = batch.maps(function.sum.output.name)
    runs = schedule.batch_plan(fn, arrangement, maps, *_unit(vector), choice,
                               _transposes(vector))
    threaded_item = adding_item = staged_item = whole = None
    if runs.summed == "threaded":
        # a copy of the item whose parallel loops run when the caller asks for threads
        threaded_item = f"{item}_threads"
        copy("_threads", threads_from_caller=True)
    elif runs.summed == "whole":
        # the items, through the scratch array, where the whole batch's panels cannot be had
        def whole() -> None:
            out.batched = {a.name: math.prod(a.shape) for a in named.args
                           if a.name in shared.batched}
            emit_pieces(out, fn, arrangement, dtype, vector)
            out.batched = {}
    elif runs.summed == "adding":
        adding_item = f"{item}_add"
        copy("_add", accumulate=True)
    if runs.staged is not None:
        staged_item = f"{item}_staged"          # for the batches that need it: emit_batch_map
        copy("_staged", runs.staged)
    if maps:
        emit_batch_map(out, symbol, item, named, shared, item_work, item_threaded, staged_item)
    else:
        emit_batch_sum(out, symbol, item, named, shared, item_work, threaded_item,
                       adding_item, whole)
    plain = plain_params(named, ctype) + ([] if maps else [f"{ctype} *sc_scratch"])
    declaration = f"void {symbol}({', '.join(plain)}, int64_t sc_batch, int sc_threads);"
    return "\n".join(out.lines) + "\n", CFunction(name, symbol, function.args,
                                                  function.sum.output, declaration, arrangement,
                                                  runs)


def plain_params(function: SumFunction, ctype: str) -> list[str]:
    """The array parameters of a function's declaration for cffi (no ``restrict``)."""
    return [f"const {ctype} *{a.name}" for a in function.args] + \
        [f"{ctype} *{function.sum.output.name}"]


def _unit(vector: Simd | None) -> tuple[int | None, int]:
    """The vector width and register count the schedule plans for (None, 0: plain C)."""
    return (vector.width, vector.registers) if vector else (None, 0)


def _transposes(vector: Simd | None) -> bool:
    """Whether copies move their channels by the prelude's register transposes."""
    return vector is not None and vector.transpose is not None


def arrange(fn, vector: Simd | None, choice: str | None = None) -> schedule.Arrangement:
    """The schedule of a sum for this instruction set (``choice`` where it fits)."""
    return schedule.arrange(fn, *_unit(vector), choice, _transposes(vector))


def emit_pieces(out: Writer, fn, arrangement: schedule.Arrangement, dtype: str,
                vector: Simd | None, panels: SharedPanels | None = None) -> None:
    """Every piece of a sum's output by its plan in ``arrangement``; pieces that share outer
    loops run inside one set of them.  In the item of a run-time batch, the panels the
    items read alike are ``panels`` (see channels.SharedPanels)."""
    plans, shared = list(arrangement.plans), arrangement.shared
    if shared and isinstance(plans[0][1], schedule.ChannelLanes):
        emit_channel_phases(out, fn, arrangement, vector, panels)
        return
    finite = sorted({a for _, c in plans if isinstance(c, schedule.OutputLanes)
                     for a in c.finite})
    if finite:
        _open_finite_check(out, fn, finite, dtype)
    stage = plans[0][1].stage if shared else None     # else each piece stages its own
    if shared:
        parallel(out, arrangement.split)
        for idx in shared:
            lo, hi = index_range(idx)
            out.open(f"for (int64_t {idx.label} = {lo}; {idx.label} <= {hi}; ++{idx.label})")
    if stage:
        open_stage(out, stage, vector)
    for piece, chosen in plans:
        out.open()
        out.line(f"/* {schedule.describe(piece, chosen).replace('*/', '* /')} */")
        if isinstance(chosen, schedule.ChannelLanes):
            emit_channel_lanes(out, fn, piece, chosen, vector, panels)
        elif isinstance(chosen, schedule.OutputLanes):
            emit_output_lanes(out, fn, piece, chosen, vector, shared)
        elif isinstance(chosen, schedule.ReductionLanes):
            emit_reduction_lanes(out, fn, piece, chosen, vector)
        else:
            emit_scalar_piece(out, fn, piece, dtype)
        out.close()
    if stage:
        close_stage(out, fn, plans[0][0], stage, vector)
    for _ in shared:
        out.close()
    if finite:
        _close_finite_check(out, fn, dtype)


def _open_finite_check(out: Writer, fn, arrays: Sequence[str], dtype: str) -> None:
    """Scan the arrays some output-lane plans need finite (schedule.OutputLanes.finite), and
    open the branch where they are: the plans run there."""
    bases = {a.name: a.base for a in fn.inputs}
    out.open()
    out.line("int sc_bad = 0;")
    for name in arrays:
        emit_finite_scan(out, bases[name], dtype)
    out.open("if (!sc_bad)")


def _close_finite_check(out: Writer, fn, dtype: str) -> None:
    """Close the plans' branch; where an array holds NaN or infinity, the plain nests of
    the whole sum (one piece, not a stride's phases: less C to compile for a branch that
    rarely runs) compute it as defined."""
    out.close()
    out.open("else")
    emit_scalar_piece(out, fn, schedule.whole_piece(fn), dtype)
    out.close()
    out.close()


def _item_call(item: str, function: SumFunction, shared: SharedPanels, n: str, target: str,
               threads: str) -> str:
    """A call of an item function on item ``n``: every batched array advanced by its item
    size (the size of the item sum's array), and the shared panels."""
    pointers = [f"{a.name} + {n} * {math.prod(a.shape)}" if a.name in shared.batched and
                n != "0" else a.name for a in function.args]
    panels = "sc_panels" if shared.packs else "0"
    return f"{item}({', '.join(pointers)}, {target}, {threads}, {panels});"


def _item_type(function: SumFunction, ctype: str) -> str:
    """The parameter types of an item function, for a pointer to one."""
    return ", ".join([f"const {ctype} *" for _ in function.args] +
                     [f"{ctype} *", "int", f"{ctype} *const *"])


def _batch_params(function: SumFunction, ctype: str, prefix: str = "",
                  prefixed: frozenset[str] = frozenset()) -> str:
    """The parameters of a function's definition, the ``prefixed`` arrays' names with
    ``prefix``."""
    return ", ".join([f"const {ctype} *restrict {prefix if a.name in prefixed else ''}{a.name}"
                      for a in function.args] + [f"{ctype} *restrict {function.sum.output.name}"])


def emit_batch_map(out: Writer, symbol: str, item: str, function: SumFunction,
                   shared: SharedPanels, item_work: int, item_threaded: bool,
                   staged_item: str | None = None) -> None:
    """``symbol``: the item function over a batch of ``sc_batch`` items, its output too
    advanced item by item, after packing the panels the items share.  Threads run across
    items once the batch is work enough, unless the item threads itself (``item_threaded``)
    and the items would share the threads unevenly; no OpenMP region is entered when the
    batch runs on one thread.  Each element is computed by one thread, so no thread count
    changes a result.  A ``staged_item`` runs instead where the batch's output reaches
    schedule.STREAM_ELEMENTS."""
    output, ctype = function.sum.output, shared.ctype
    out.open(f"void {symbol}({_batch_params(function, ctype)}, int64_t sc_batch, "
             f"int sc_threads)")
    if staged_item is not None:
        out.line(f"void (*const sc_run)({_item_type(function, ctype)}) = sc_batch * "
                 f"{math.prod(output.shape)} >= {schedule.STREAM_ELEMENTS} ? {staged_item} : "
                 f"{item};")
        item = "sc_run"
    if shared.packs:
        out.open("if (sc_batch <= 0)")
        out.line("return;")
        out.close()
        emit_shared_panels(out, shared)
    target = f"{output.name} + sc_n * {math.prod(output.shape)}"
    across = f"sc_threads > 1 && sc_batch * {item_work} >= {schedule.PARALLEL_WORK}"
    if item_threaded:
        across += " && (sc_batch % sc_threads == 0 || sc_batch >= 4 * sc_threads)"
    out.open(f"if ({across})")
    out.line("#pragma omp parallel for schedule(dynamic, 1) num_threads(sc_threads)")
    out.open("for (int64_t sc_n = 0; sc_n < sc_batch; ++sc_n)")
    out.line(_item_call(item, function, shared, "sc_n", target, "1"))
    out.close()
    out.close()
    out.open("else")
    out.open("for (int64_t sc_n = 0; sc_n < sc_batch; ++sc_n)")
    out.line(_item_call(item, function, shared, "sc_n", target, "sc_threads"))
    out.close()
    out.close()
    if shared.packs:
        release_shared_panels(out, shared)
    out.close()


def emit_batch_sum(out: Writer, symbol: str, item: str, function: SumFunction,
                   shared: SharedPanels, item_work: int, threaded_item: str | None = None,
                   adding_item: str | None = None,
                   whole: Callable[[], None] | None = None) -> None:
    """``symbol``: the sum of the item function over a batch of ``sc_batch`` items, added in
    order after packing the panels the items share: item 0 into the output, each next one
    by ``adding_item``, which adds its sums to the output itself, or else through
    ``sc_scratch`` (an array of the output's size), added after it.  A small item runs as
    its copy ``threaded_item``, which threads inside itself, once the whole batch is work
    enough.  With ``whole`` (which emits the pieces over every item at once, see
    schedule.sums_batch_itself), the items run only where it could not (``sc_failed``).
    The order of the sum does not depend on the thread count."""
    output, ctype = function.sum.output, shared.ctype
    size = math.prod(output.shape)
    params = _batch_params(function, ctype)
    if whole is not None:
        params = _batch_params(function, ctype, BATCH_PREFIX, shared.batched)
    out.open(f"void {symbol}({params}, {ctype} *restrict sc_scratch, int64_t sc_batch, "
             f"int sc_threads)")
    out.open("if (sc_batch == 0)")
    out.line(f"for (int64_t sc_e = 0; sc_e < {size}; ++sc_e) {output.name}[sc_e] = 0;")
    out.line("return;")
    out.close()
    if whole is not None:
        out.line("int sc_failed = 0;")
        whole()
        out.open("if (sc_failed)")
        for a in function.args:
            if a.name in shared.batched:
                out.line(f"const {ctype} *const {a.name} = {BATCH_PREFIX}{a.name};")
    first = later = item
    if adding_item is not None:
        later = adding_item
    elif threaded_item is not None:
        first = later = "sc_run"
        out.line(f"void (*const sc_run)({_item_type(function, ctype)}) = sc_threads > 1 && "
                 f"sc_batch * {item_work} >= {schedule.PARALLEL_WORK} ? {threaded_item} : {item};")
    if shared.packs:
        emit_shared_panels(out, shared)
    out.line(_item_call(first, function, shared, "0", output.name, "sc_threads"))
    out.open("for (int64_t sc_n = 1; sc_n < sc_batch; ++sc_n)")
    if adding_item is not None:
        out.line(_item_call(later, function, shared, "sc_n", output.name, "sc_threads"))
    else:
        out.line(_item_call(later, function, shared, "sc_n", "sc_scratch", "sc_threads"))
        out.line(f"for (int64_t sc_e = 0; sc_e < {size}; ++sc_e) "
                 f"{output.name}[sc_e] += sc_scratch[sc_e];")
    out.close()
    if shared.packs:
        release_shared_panels(out, shared)
    if whole is not None:
        out.close()
    out.close()


def plan_options(function: SumFunction, dtype: str, isa: str | None) -> list[str]:
    """The plan choices that change some piece of a function's schedule for ``isa`` (in
    schedule.CHOICES order): the candidates a tuner compiles beside the default."""
    if isa is None:
        return []
    vector = Simd(isa, dtype)
    fn = c_namespace(function).sum
    found = set()
    for piece in schedule.pieces(fn):
        found.update(schedule.options(piece, vector.width, vector.registers,
                                      _transposes(vector)))
    defaults = [(piece, schedule.plan(piece, vector.width, vector.registers,
                                      transposes=_transposes(vector)))
                for piece in schedule.pieces(fn)]
    found.update(schedule.stage_options(defaults, fn.output.shape))
    return [c for c in schedule.CHOICES if c in found]


def emit(functions: Sequence[SumFunction], dtype: str, title: str, isa: str | None = None,
         prefix: str = "symconv_", choices: Mapping[str, str] | None = None) -> CSource:
    """One C translation unit holding every function of an op, named ``<prefix><name>``;
    ``isa`` ("avx2", "avx512" or None for plain C) picks the vector instructions and
    ``choices`` (function name -> plan choice) a tuner's plans."""
    choices = choices or {}
    return emit_unit([(f, prefix, choices.get(f.name)) for f in functions], dtype, title, isa)


def emit_unit(entries: Sequence[tuple[SumFunction, str, str | None]], dtype: str, title: str,
              isa: str | None = None) -> CSource:
    """One C translation unit of (function, symbol prefix, plan choice) entries: an op's
    functions, or a tuner's candidates (one function under several prefixes)."""
    if dtype not in C_TYPES:
        raise IRError(f"unsupported dtype {dtype!r}; expected one of {sorted(C_TYPES)}")
    if isa not in (None, *SIMD_PRELUDE):
        raise IRError(f"unknown vector instruction set {isa!r}")
    prelude = PRELUDE + SIMD_PRELUDE[isa] if isa else PRELUDE
    parts = [f"/* symconv: {title.replace('*/', '* /')} */\n", prelude]
    declared = []
    for function, prefix, choice in entries:
        text, emitted = emit_function(function, dtype, isa, prefix, choice)
        parts += ["\n", text]
        declared.append(emitted)
    return CSource("".join(parts), tuple(declared), prelude)
