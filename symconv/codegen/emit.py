"""IR -> C: one function per index sum, each piece of its output by the plan its schedule
chose, and one translation unit per instruction set."""

from __future__ import annotations

import re
from typing import Sequence

from ..errors import IRError
from ..symbolic.ir import SumFunction
from ..symbolic.printing import to_text
from . import schedule
from .c import C_TYPES, PRELUDE, CFunction, CSource, Writer, c_namespace, emit_scalar_piece
from .isa import SIMD_PRELUDE, Simd
from .vector import emit_output_lanes, emit_reduction_lanes

def emit_function(function: SumFunction, dtype: str, isa: str | None = None,
                  prefix: str = "symconv_") -> tuple[str, CFunction]:
    """C text of one index sum as ``void <prefix><name>(inputs..., output, threads)``.

    The output is computed piece by piece (see codegen.schedule), each piece by its plan;
    with ``isa`` ("avx2" or "avx512") the vector plans use that instruction set.  Every
    output element is computed by one thread in a fixed order, so results do not depend on
    the number of threads.  Names are moved into their own C namespace first (c_namespace)."""
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
    plain = [f"const {ctype} *{a.name}" for a in inputs] + [f"{ctype} *{fn.output.name}",
                                                            "int sc_threads"]
    out = Writer()
    formula = to_text(function.sum).replace("*/", "* /")
    out.line("/*")
    for text in formula.splitlines():
        out.line(f" * {text}")
    out.line(" */")
    out.open(f"void {symbol}({', '.join(params)})")
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
    declaration = f"void {symbol}({', '.join(plain)});"
    return "\n".join(out.lines) + "\n", CFunction(name, symbol, function.args,
                                                  function.sum.output, declaration, tuple(plans))


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
