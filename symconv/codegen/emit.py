"""IR -> C: one function per index sum, each piece of its output by the plan its schedule
chose, and one translation unit per instruction set."""

from __future__ import annotations

import math
import re
from typing import Sequence

from ..errors import IRError
from ..symbolic.ir import SumFunction
from ..symbolic.printing import to_text
from . import schedule
from .c import (C_TYPES, PARALLEL_WORK, PRELUDE, CFunction, CSource, Writer, c_namespace,
                emit_scalar_piece, work)
from .isa import SIMD_PRELUDE, Simd
from .vector import emit_output_lanes, emit_reduction_lanes

def emit_function(function: SumFunction, dtype: str, isa: str | None = None,
                  prefix: str = "symconv_") -> tuple[str, CFunction]:
    """C text of one index sum as ``void <prefix><name>(inputs..., output, threads)``.

    The output is computed piece by piece (see codegen.schedule), each piece by its plan;
    with ``isa`` ("avx2" or "avx512") the vector plans use that instruction set.  Every
    output element is computed by one thread in a fixed order, so results do not depend on
    the number of threads.  Names are moved into their own C namespace first (c_namespace).
    A function over a run-time batch is its item sum plus a loop over the batch
    (:func:`emit_batch_loop`)."""
    name = function.name
    missing = {a.name for a in function.sum.inputs} - {a.name for a in function.args}
    if missing:
        raise IRError(f"{name}: reads {sorted(missing)} which are not among its arguments")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise IRError(f"function name {name!r} is not a C identifier")
    ctype = C_TYPES[dtype]
    symbol = f"{prefix}{name}"
    fn, inputs = (named := c_namespace(function)).sum, named.args
    params = [f"const {ctype} *restrict {a.name}" for a in inputs] + \
             [f"{ctype} *restrict {fn.output.name}", "int sc_threads"]
    batch = function.batch
    maps = batch is not None and batch.maps(function.sum.output.name)
    out = Writer(threads_from_caller=batch is not None and not maps)
    formula = to_text(function.sum, batch=batch).replace("*/", "* /")
    out.line("/*")
    for text in formula.splitlines():
        out.line(f" * {text}")
    out.line(" */")
    item = f"sc_item_{symbol}"
    out.open(f"static void {item}({', '.join(params)})" if batch else
             f"void {symbol}({', '.join(params)})")
    vector = Simd(isa, dtype) if isa else None
    plans = []
    for piece in schedule.pieces(fn):
        chosen = schedule.plan(piece, vector.width if vector else None,
                               vector.registers if vector else 0)
        plans.append((piece, chosen))
        out.open()
        out.line(f"/* {schedule.describe(piece, chosen).replace('*/', '* /')} */")
        if isinstance(chosen, schedule.OutputLanes):
            emit_output_lanes(out, fn, piece, chosen, vector)
        elif isinstance(chosen, schedule.ReductionLanes):
            emit_reduction_lanes(out, fn, piece, chosen, vector)
        else:
            emit_scalar_piece(out, fn, piece, dtype)
        out.close()
    out.close()
    plain = [f"const {ctype} *{a.name}" for a in inputs] + [f"{ctype} *{fn.output.name}"]
    if batch is not None:
        batched = {f"a_{a}" for a in batch.arrays}
        emit_batch_loop(out, symbol, item, named, batched, ctype,
                        sum(work(p.nests, p.indices) for p, _ in plans), out.threaded)
        plain += [] if maps else [f"{ctype} *sc_scratch"]
        plain.append("int64_t sc_batch")
    declaration = f"void {symbol}({', '.join(plain + ['int sc_threads'])});"
    return "\n".join(out.lines) + "\n", CFunction(name, symbol, function.args,
                                                  function.sum.output, declaration, tuple(plans))


def emit_batch_loop(out: Writer, symbol: str, item: str, function: SumFunction,
                    batched: set[str], ctype: str, item_work: int, item_threaded: bool) -> None:
    """``symbol``: the item function ``item`` over a batch of ``sc_batch`` items, each array in
    ``batched`` advanced by its item size.  A map over the batch threads across items once
    the batch is work enough, unless the item threads itself (``item_threaded``) and the
    items would share the threads unevenly; a sum over the batch adds its items in order
    (item 0 into the output, each next one through ``sc_scratch``, an array of the output's
    size), threading inside each item once the whole batch is work enough.  Either way every
    element is computed in an order no thread count changes."""
    arrays = (*function.args, function.sum.output)
    output = function.sum.output.name
    size = {a.name: math.prod(a.shape) for a in arrays}

    def call(n: str, target: str, threads: str) -> str:
        pointers = [f"{a.name} + {n} * {size[a.name]}" if a.name in batched and n != "0"
                    else a.name for a in function.args]
        return f"{item}({', '.join(pointers)}, {target}, {threads});"

    params = [f"const {ctype} *restrict {a.name}" for a in function.args] + \
             [f"{ctype} *restrict {output}"]
    if output in batched:
        out.open(f"void {symbol}({', '.join(params)}, int64_t sc_batch, int sc_threads)")
        target = f"{output} + sc_n * {size[output]}"
        across = f"sc_threads > 1 && sc_batch * {item_work} >= {PARALLEL_WORK}"
        if item_threaded:      # threads across items where they share out evenly enough
            across += " && (sc_batch % sc_threads == 0 || sc_batch >= 4 * sc_threads)"
        out.open(f"if ({across})")
        out.line("#pragma omp parallel for schedule(dynamic, 1) num_threads(sc_threads)")
        out.open("for (int64_t sc_n = 0; sc_n < sc_batch; ++sc_n)")
        out.line(call("sc_n", target, "1"))
        out.close()
        out.close()
        out.open("else")
        out.open("for (int64_t sc_n = 0; sc_n < sc_batch; ++sc_n)")
        out.line(call("sc_n", target, "sc_threads"))
        out.close()
        out.close()
        out.close()
        return
    out.open(f"void {symbol}({', '.join(params)}, {ctype} *restrict sc_scratch, "
             f"int64_t sc_batch, int sc_threads)")
    out.open("if (sc_batch == 0)")
    out.line(f"for (int64_t sc_e = 0; sc_e < {size[output]}; ++sc_e) {output}[sc_e] = 0;")
    out.line("return;")
    out.close()
    out.line(f"const int sc_inner = sc_batch * {item_work} >= {PARALLEL_WORK} ? sc_threads : 1;")
    out.line(call("0", output, "sc_inner"))
    out.open("for (int64_t sc_n = 1; sc_n < sc_batch; ++sc_n)")
    out.line(call("sc_n", "sc_scratch", "sc_inner"))
    out.line(f"for (int64_t sc_e = 0; sc_e < {size[output]}; ++sc_e) "
             f"{output}[sc_e] += sc_scratch[sc_e];")
    out.close()
    out.close()


def emit(functions: Sequence[SumFunction], dtype: str,
         title: str, isa: str | None = None, prefix: str = "symconv_") -> CSource:
    """One C translation unit holding every function of an op, named ``<prefix><name>``;
    ``isa`` ("avx2", "avx512" or None for plain C) picks the vector instructions."""
    if dtype not in C_TYPES:
        raise IRError(f"unsupported dtype {dtype!r}; expected one of {sorted(C_TYPES)}")
    if isa not in (None, *SIMD_PRELUDE):
        raise IRError(f"unknown vector instruction set {isa!r}")
    parts = [f"/* symconv: {title.replace('*/', '* /')} */\n", PRELUDE]
    if isa:
        parts.append(SIMD_PRELUDE[isa])
    declared = []
    for function in functions:
        text, emitted = emit_function(function, dtype, isa, prefix)
        parts += ["\n", text]
        declared.append(emitted)
    return CSource("".join(parts), tuple(declared))
