"""Vector code for the lane plans of codegen.schedule: output lanes (vectors along an output
row, register blocks of rows x vectors) and reduction lanes (partial sums in lanes, reduced
once per output element)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import sympy

from ..symbolic.affine import c_order_strides, ceil_div, integer_form, linear_parts
from ..symbolic.ir import IndexSum, accesses, index_range
from ..symbolic.lowering import Bound, LoopNest, nest_box, value_range
from . import schedule
from .schedule import in_range_exprs
from .c import (C_TYPES, Writer, bound_text, c_affine, c_nonnegative, condition_text, emit_copy,
                fold, omp_parallel, output_offset, parallel, prefetch_line, threads)
from .isa import Simd

def depends(expr, symbol) -> bool:
    """Whether ``symbol`` appears in ``expr``."""
    return symbol in sympy.sympify(expr).free_symbols


class _Reads:
    """The accesses of one nest: constant factor, and per access its offset and flags."""

    def __init__(self, nest: LoopNest):
        self.constant, reads = schedule.factors(nest.body)
        self.items = []
        for access in reads:
            strides = c_order_strides([int(n) for n in access.base.shape])
            offset = sympy.expand(sum(stride * integer_form(p)[0]
                                      for stride, p in zip(strides, access.indices)))
            self.items.append((access, offset, str(access.base.label) in nest.zero_outside))


def _padded_mask(simd: "Simd", exprs, lane, lane_value, replace, base: str) -> str:
    """``base`` narrowed to the lanes where every ``expr >= 0``: lane-dependent ones as vector
    compares, the others as one scalar test."""
    vector, scalar = [], []
    for expr in exprs:
        local = sympy.expand(expr.xreplace(replace))
        if depends(expr, lane):
            vector.append(_lane_condition(simd, local, lane, lane_value))
        else:
            scalar += c_nonnegative([local])
    masks = [base] + vector
    if scalar:
        masks.append(simd.from_bool(" && ".join(scalar)))
    return _and_all(simd, masks)


@dataclass(frozen=True)
class _BlockShape:
    """One shape of output-lane block: rows x vectors accumulators, masked at the edges;
    ``tail``: some of its lanes lie past the lane index's range (the last run's), so its
    lanes are masked by that too, not only by the reads' padding."""

    rows: int
    vectors: int
    masked: bool
    tail: bool = True


@dataclass(frozen=True)
class _Block:
    """One output-lane register block being written: the Writer, the piece and its plan,
    the vector unit, the block's shape, and the C names of its accumulators (rows x
    vectors), rows (``sc_row<r>``) and first lanes (``sc_lane<q>``); ``guarded``: the rows
    test the padded reads' conditions that depend on them (not in the rows' interior);
    ``window``: the plan's window loop, unrolled inside the block (None where its rows are
    clamped at the end of the range: each loads its own)."""

    out: Writer
    piece: schedule.Piece
    chosen: schedule.OutputLanes
    simd: Simd
    shape: _BlockShape
    accs: list
    row_vars: list
    lane_at: list
    guarded: bool = True
    window: sympy.Idx | None = None


def interior(nests, indices, lane) -> tuple[int, int]:
    """The values of ``lane`` (a free index) for which every condition depending on it (loop
    bounds, guards, padded reads) holds for all values of every other index: there, blocks
    need no masks or tests."""
    low, high = 0, index_range(lane)[1]
    for nest in nests:
        box = nest_box(nest, indices)
        exprs = []
        for loop in nest.loops:
            exprs += [b.den * _ceil_const(loop.lower[0]) - b.num
                      for b in loop.lower[1:] if depends(b.num, lane)]
            exprs += [b.num - b.den * (int(loop.upper[0].num) // loop.upper[0].den)
                      for b in loop.upper[1:] if depends(b.num, lane)]
        exprs += [g.expr for g in nest.guards if depends(g.expr, lane)]
        for access, _, padded in _Reads(nest).items:
            if padded:
                exprs += [e for e in in_range_exprs(access, box) if depends(e, lane)]
        for expr in exprs:
            num, _ = integer_form(expr)
            coefficients, _ = linear_parts(num)
            a = int(coefficients[lane])
            rest_low = value_range(sympy.expand(num - a * lane), box)[0]
            if a > 0:
                low = max(low, -(rest_low // a))
            else:
                high = min(high, rest_low // -a)
    return low, high


def block_runs(extent: int, rows: int,
                inside: tuple[int, int]) -> list[tuple[int, int, int, bool]]:
    """Cover positions 0..extent-1 exactly with runs (start, count, rows, guarded) of equal
    blocks: a guarded part below the interior, the interior unguarded, a guarded part above.
    An edge part takes at least MIN_GEMM_ROWS positions (from the interior): a one-row
    block keeps too few accumulators busy to hide the FMA latency.  Each part is cut into
    blocks of nearly equal size, at most ``rows``."""
    low, high = inside
    edge = min(schedule.MIN_GEMM_ROWS, rows)
    low = max(low, min(edge, extent)) if low > 0 else 0
    high = min(high, extent - 1 - edge) if high < extent - 1 else extent - 1
    parts = [(0, extent, True)] if low > high else \
        [(0, low, True), (low, high + 1, False), (high + 1, extent, True)]
    runs = []
    for start, stop, guarded in parts:
        length = stop - start
        if length <= 0:
            continue
        blocks = ceil_div(length, rows)
        small, larger = divmod(length, blocks)    # ``larger`` blocks of small + 1
        if larger:
            runs.append((start, larger, small + 1, guarded))
        if blocks - larger:
            runs.append((start + larger * (small + 1), blocks - larger, small, guarded))
    return runs


def _lane_runs(extent: int, width: int, wide: int, interior,
               merged: bool = False) -> list[tuple[int, int, int, bool]]:
    """Cover lanes 0..extent-1 with runs (start, count, vectors, masked) of equal blocks, in
    order: masked vectors before the interior, wide unmasked blocks inside it, single unmasked
    vectors where a wide block no longer fits, masked vectors after it; or, ``merged``,
    where every vector would be masked and one wide block holds them all (a 16-lane row
    with taps over both edges), that one masked block: its rows x vectors accumulators hide
    the FMA latency that a single vector's rows do not.  Only where the masked products
    fuse (OutputLanes.finite): blended, a 14-wide depthwise input gradient's merged block
    took 1.27x as long (GCC spilled).  Computed in closed form: the cost does not grow
    with the extent."""
    low, high = interior
    runs: list[tuple[int, int, int, bool]] = []

    def add(start: int, count: int, vectors: int, masked: bool) -> int:
        if count > 0:
            if runs and runs[-1][2:] == (vectors, masked):     # continues the last run
                first, before = runs[-1][:2]
                runs[-1] = (first, before + count, vectors, masked)
            else:
                runs.append((start, count, vectors, masked))
        return start + max(count, 0) * vectors * width

    def inside(start: int, size: int) -> int:      # blocks of size lanes from start
        return min((high + 1 - start) // size, ceil_div(extent - start, size))

    start = add(0, min(ceil_div(max(low, 0), width), ceil_div(extent, width)), 1, True)
    if wide > 1:
        start = add(start, inside(start, wide * width), wide, False)
    start = add(start, inside(start, width), 1, False)
    add(start, ceil_div(extent - start, width), 1, True)
    vectors = ceil_div(extent, width)
    if merged and 1 < vectors <= wide and all(masked for *_, masked in runs):
        return [(0, 1, vectors, True)]
    return runs


def emit_output_lanes(out: Writer, fn: IndexSum, piece: schedule.Piece,
                       chosen: schedule.OutputLanes, simd: Simd,
                       bound: Sequence[sympy.Idx] = ()) -> None:
    """Blocks of consecutive outputs along the lane index, cut once for all rows: wide
    register blocks (rows x vectors) inside the interior, single vectors with more rows
    where a wide block does not fit, masked single vectors at the edges.  Masked lanes read
    zeros past an array's edge (padding, and the lanes past the end, which are not stored);
    only lanes outside a loop's bounds are blended out of the sums.  The indices ``bound``
    are looped over (and threaded) by the caller."""
    lane, block = chosen.lane, chosen.block
    lane_name = str(lane.label)
    outer = [i for i in piece.indices if i not in (lane, block) and i not in bound]
    block_extent = index_range(block)[1] + 1 if block is not None else 1
    single_rows = schedule.balanced(block_extent, (simd.registers - 4) // 2) \
        if block is not None else 1
    block_shapes = {(chosen.vectors, False): _BlockShape(chosen.rows, chosen.vectors, False),
                (1, False): _BlockShape(single_rows, 1, False),
                (1, True): _BlockShape(single_rows, 1, True)}
    runs = _lane_runs(index_range(lane)[1] + 1, simd.width, chosen.vectors,
                      interior(chosen.nests, piece.indices, chosen.lane), bool(chosen.finite))

    if chosen.copies:
        out.open()
        _emit_lane_copies(out, fn, chosen.copies, C_TYPES[simd.dtype])
    if not bound:
        parallel(out, chosen.split)
    for idx in outer:
        lo, hi = index_range(idx)
        out.open(f"for (int64_t {idx.label} = {lo}; "
                 f"{idx.label} <= {hi}; ++{idx.label})")
    stage = chosen.stage if not bound else None     # shared loops: the caller's stage
    if stage:
        open_stage(out, stage, simd)
    for first, count, vectors, masked in runs:
        block_shape = replace(block_shapes.get((vectors, masked)) or
                              _BlockShape(chosen.rows, vectors, masked),
                              tail=first + count * vectors * simd.width > index_range(lane)[1] + 1)
        step = block_shape.vectors * simd.width
        last = first + (count - 1) * step
        out.open(f"for (int64_t {lane_name} = {first}; {lane_name} <= {last}; "
                 f"{lane_name} += {step})")
        if block is None:
            _output_lane_block(out, fn, piece, chosen, simd, block_shape)
        elif not _rows_tested(piece, chosen):
            out.open(f"for (int64_t {block.label} = 0; {block.label} < {block_extent}; "
                     f"{block.label} += {block_shape.rows})")
            _output_lane_block(out, fn, piece, chosen, simd, block_shape)
            out.close()
        else:
            inside = interior(chosen.nests, piece.indices, block)
            for start, times, rows, guarded in block_runs(block_extent, block_shape.rows, inside):
                out.open(f"for (int64_t {block.label} = {start}; {block.label} <= "
                         f"{start + (times - 1) * rows}; {block.label} += {rows})")
                _output_lane_block(out, fn, piece, chosen, simd,
                                   replace(block_shape, rows=rows), guarded, exact=True)
                out.close()
        out.close()
    if stage:
        close_stage(out, fn, piece, stage, simd)
    for _ in outer:
        out.close()
    if chosen.copies:
        out.close()


def open_stage(out: Writer, stage: schedule.Stage, simd: Simd) -> None:
    """Open a task's stage: the buffer, on the thread's stack, its blocks store into."""
    out.open()
    out.line(f"{C_TYPES[simd.dtype]} sc_stage[{stage.elements}] __attribute__((aligned(64)));")


def close_stage(out: Writer, fn: IndexSum, piece: schedule.Piece, stage: schedule.Stage,
                simd: Simd) -> None:
    """Stream a task's stage to its place in the output, and close it."""
    start = c_affine(output_offset(fn, piece, slice(stage.dims)))
    out.line(f"sc_stream_{simd.sfx}({fn.output.name} + {start}, sc_stage, {stage.elements});")
    out.close()


def _emit_lane_copies(out: Writer, fn: IndexSum, copies, ctype: str) -> None:
    """Declare and fill the small copies an output-lane plan reads (schedule.MAX_LANE_COPY
    elements at most: on the stack, nothing to allocate or free)."""
    shapes = {str(r.base.label): [int(d) for d in r.base.shape]
              for term in fn.terms for r in accesses(term.body)}
    for copy in copies:
        shape = shapes[copy.array]
        out.line(f"{ctype} {schedule.copy_name(copy.array)}[{math.prod(shape)}];")
        emit_copy(out, copy, shape)


def _ceil_const(bound: Bound) -> int:
    return ceil_div(int(bound.num), bound.den)


def over_lanes(bounds, lane, block, span: int, is_lower: bool) -> list[Bound]:
    """Each lane-dependent bound relaxed to hold for the lanes lane .. lane + span - 1 of a
    block: a lower bound at the lane where it is least, an upper one where it is greatest.
    So a loop whose range moves with the lane runs over the union of the lanes' ranges (one
    or two values where a stride is large), not over the index's whole range."""
    relaxed = []
    for b in bounds:
        if not depends(b.num, lane) or (block is not None and depends(b.num, block)):
            continue
        slope = linear_parts(b.num)[0][lane]
        at = lane if (slope >= 0) == is_lower else lane + span - 1
        relaxed.append(Bound(sympy.expand(b.num.xreplace({lane: at})), b.den))
    return relaxed


def _rows_tested(piece: schedule.Piece, chosen: schedule.OutputLanes) -> bool:
    """Whether a zero-padded read tests a condition on the block's rows that the lanes do
    not decide (a depthwise layer's rows at the top and bottom edges): the blocks inside
    the rows' interior then run without the tests."""
    for nest in chosen.nests:
        box = nest_box(nest, piece.indices)
        for access, _, padded in _Reads(nest).items:
            if padded and any(depends(e, chosen.block) and not depends(e, chosen.lane)
                              for e in in_range_exprs(access, box)):
                return True
    return False


def _output_lane_block(out, fn, piece, chosen, simd, block_shape: _BlockShape,
                       guarded: bool = True, exact: bool = False) -> None:
    """One register block at the current lane and row; ``exact``: its rows all lie inside
    the block index's range (a run of blocks that covers it exactly), none clamped."""
    lane, block = chosen.lane, chosen.block
    rows, vectors, masked = block_shape.rows, block_shape.vectors, block_shape.masked
    width, ctype = simd.width, C_TYPES[simd.dtype]
    lane_name, lane_hi = str(lane.label), index_range(lane)[1]
    accs = [[f"sc_a{r}_{q}" for q in range(vectors)] for r in range(rows)]
    out.line(f"{simd.vec} " + ", ".join(f"{a} = {simd.zero()}" for row in accs for a in row) + ";")
    row_vars = []
    partial_rows = block is not None and not exact and (index_range(block)[1] + 1) % rows != 0
    if block is not None:
        block_hi = index_range(block)[1]
        for r in range(rows):
            value = f"sc_min({block.label} + {r}, {block_hi})" if partial_rows else \
                f"{block.label} + {r}"
            out.line(f"const int64_t sc_row{r} = {value};")
            row_vars.append(sympy.Symbol(f"sc_row{r}"))
    lane_at = [sympy.Symbol(f"sc_lane{q}") for q in range(vectors)]
    for q in range(vectors):
        out.line(f"const int64_t sc_lane{q} = {lane_name} + {q * width};")
    past_end = masked and block_shape.tail      # lanes past the range: stored under sc_valid
    if past_end:
        for q in range(vectors):
            out.line(f"const {simd.mask} sc_valid{q} = "
                     f"{simd.nonnegative(f'{lane_hi} - sc_lane{q}', -1)};")

    b = _Block(out, piece, chosen, simd, block_shape, accs, row_vars, lane_at, guarded,
               None if partial_rows else chosen.window)
    for number, nest in enumerate(chosen.nests):
        reads = _Reads(nest)
        box = nest_box(nest, piece.indices)
        opened = 0
        scalar_guards = [g for g in nest.guards if not depends(g.expr, lane)]
        lane_guards = [g for g in nest.guards if depends(g.expr, lane)]
        if scalar_guards:
            out.open(f"if ({' && '.join(f'({condition_text(g)})' for g in scalar_guards)})")
            opened += 1
        out.open()
        opened += 1
        # masks (edge path only): domain = lanes inside the bounds so far (blended);
        # loads[a] = lanes that may read access a (valid, in the domain, inside padding)
        domain: list[str] | None = None
        lane_padding = {a: [e for e in in_range_exprs(access, box) if depends(e, lane)]
                        for a, (access, _, padded) in enumerate(reads.items) if padded}
        loads: dict[int, list[str]] = {}
        nest_loops = _NestLoops(nest, number, reads, lane_padding, lane, block,
                                vectors * width)
        if masked:
            if lane_guards:
                domain = []
                for q in range(vectors):
                    name = f"sc_d{number}_0_{q}"
                    conds = [_lane_condition(simd, g.expr, lane, lane_at[q]) for g in lane_guards]
                    out.line(f"const {simd.mask} {name} = {_and_all(simd, conds)};")
                    domain.append(name)
            _define_load_masks(b, nest_loops, domain, loads, 0, False, frozenset())

        def body(domain, loads):
            _accumulate_output_lanes(b, reads, loads if masked else None, domain, box)
        _emit_lane_loops(b, nest_loops, 1, domain, loads, frozenset(), body)
        for _ in range(opened):
            out.close()

    # store the block (into the task's stage from its first element on, if it has one)
    stage = chosen.stage
    offset = output_offset(fn, piece, slice(stage.dims if stage else 0, None))
    target = "sc_stage" if stage else fn.output.name
    out_stride = int(linear_parts(offset)[0].get(lane, 0))
    for r in range(rows):
        row_offset = offset.xreplace({block: row_vars[r]}) if block is not None else offset
        if partial_rows:
            out.open(f"if ({block.label} + {r} <= {index_range(block)[1]})")
        for q in range(vectors):
            at = c_affine(row_offset.xreplace({lane: lane_at[q]}))
            pointer = f"{target} + {at}"
            mask = f"sc_valid{q}" if past_end else None
            if out_stride == 1:
                out.line(simd.store(pointer, accs[r][q], mask))
            elif simd.wide:
                out.line(simd.scatter(pointer, out_stride, accs[r][q], mask))
            else:
                out.open()
                out.line(f"{ctype} sc_t[{width}];")
                out.line(simd.store("sc_t", accs[r][q], None))
                limit = f"sc_l <= {lane_hi} - sc_lane{q}" if past_end else None
                loop = f"for (int sc_l = 0; sc_l < {width}; ++sc_l)"
                out.line(f"{loop} {{ if ({limit}) {target}[{at} + {out_stride}*sc_l] = "
                         f"sc_t[sc_l]; }}" if limit else
                         f"{loop} {target}[{at} + {out_stride}*sc_l] = sc_t[sc_l];")
                out.close()
        if partial_rows:
            out.close()


class _NestLoops:
    """The loops of one nest in an output-lane block, and where a masked block may split one
    of them into edge / interior / edge bands: the innermost loop whose index moves a
    zero-padded read's in-range conditions (coefficient ±1).  In the interior band every lane
    of the block reads inside the array, so the read's mask is hoisted out of the loop."""

    def __init__(self, nest: LoopNest, number: int, reads: _Reads, lane_padding, lane, block,
                 span: int):
        self.loops, self.number, self.reads = nest.loops, number, reads
        self.lane_padding, self.lane, self.block, self.span = lane_padding, lane, block, span
        self.depth_of = {loop.index: d for d, loop in enumerate(nest.loops, start=1)}
        self.split_depth, self.trusted = 0, frozenset()
        for depth in range(len(self.loops), 0, -1):
            v = self.loops[depth - 1].index
            trusted = frozenset(e for exprs in lane_padding.values() for e in exprs
                                if abs(linear_parts(e)[0].get(v, 0)) == 1 and
                                (block is None or not depends(e, block)) and
                                self._level(e) == depth)
            if trusted:
                self.split_depth, self.trusted = depth, trusted
                break

    def _level(self, expr) -> int:
        return max((self.depth_of.get(s, 0) for s in sympy.sympify(expr).free_symbols),
                   default=0)

    def band(self, lane_start) -> tuple[list[Bound], list[Bound]]:
        """Bounds on the split loop's index where every trusted condition holds for all the
        block's lanes, ``lane_start`` .. ``lane_start + span - 1``."""
        v = self.loops[self.split_depth - 1].index
        lows, highs = [], []
        for e in sorted(self.trusted, key=sympy.default_sort_key):
            coefficients, _ = linear_parts(e)
            rest = sympy.expand(e - coefficients[v] * v)
            slope = coefficients.get(self.lane, 0)
            worst = lane_start if slope >= 0 else lane_start + self.span - 1
            rest = sympy.expand(rest.xreplace({self.lane: worst}))
            if coefficients[v] > 0:         # v + rest >= 0
                lows.append(Bound(-rest, 1))
            else:                           # rest - v >= 0
                highs.append(Bound(rest, 1))
        return lows, highs


def _emit_lane_loops(b: _Block, loops: _NestLoops, depth: int, domain, loads, trusted,
                     body) -> None:
    """The loops of a nest from ``depth`` inwards, then ``body(domain, loads)``; a masked block
    splits its split loop into bands (see _NestLoops)."""
    out, simd, lane_at, masked = b.out, b.simd, b.lane_at, b.shape.masked
    if depth > len(loops.loops) or \
            (depth == len(loops.loops) and loops.loops[-1].index == b.window):
        body(domain, loads)     # the window loop runs unrolled in the body
        return
    loop, lane = loops.loops[depth - 1], loops.lane
    var = str(loop.index.label)
    keep_low = [b for b in loop.lower if not depends(b.num, lane)]
    keep_high = [b for b in loop.upper if not depends(b.num, lane)]
    if masked:      # the masks decide per lane; the loop covers the block's lanes
        keep_low += over_lanes(loop.lower, lane, loops.block, loops.span, True)
        keep_high += over_lanes(loop.upper, lane, loops.block, loops.span, False)
    bands = [(keep_low, keep_high, trusted)]
    if masked and depth == loops.split_depth:
        lows, highs = loops.band(lane_at[0])
        start, stop = f"sc_band{loops.number}_lo", f"sc_band{loops.number}_hi"
        out.line(f"const int64_t {start} = {bound_text([*keep_low, *lows], True)};")
        out.line(f"const int64_t {stop} = {bound_text([*keep_high, *highs], False)};")
        start, stop = sympy.Symbol(start), sympy.Symbol(stop)
        bands = [([Bound(start, 1)], [Bound(stop, 1)], trusted | loops.trusted)]
        if lows:        # the edge below the interior, then the one above it
            bands.insert(0, (keep_low, [*keep_high, Bound(start - 1, 1)], trusted))
        if highs:
            bands.append(([*keep_low, Bound(start, 1), Bound(stop + 1, 1)], keep_high, trusted))
    for low, high, band_trusted in bands:
        out.open(f"for (int64_t {var} = {bound_text(low, True)}; {var} <= "
                 f"{bound_text(high, False)}; ++{var})")
        opened = 1
        band_domain, band_loads = domain, dict(loads)
        if masked:
            lane_bounds = [(b, True) for b in loop.lower if depends(b.num, lane)] + \
                          [(b, False) for b in loop.upper if depends(b.num, lane)]
            if lane_bounds:
                band_domain = []
                for q in range(len(lane_at)):
                    conds = [domain[q]] if domain else []
                    for bound, is_lower in lane_bounds:
                        expr = bound.den * loop.index - bound.num if is_lower else \
                            bound.num - bound.den * loop.index
                        conds.append(_lane_condition(simd, expr, lane, lane_at[q]))
                    name = f"sc_d{loops.number}_{depth}_{q}"
                    out.line(f"const {simd.mask} {name} = {_and_all(simd, conds)};")
                    band_domain.append(name)
                out.open(f"if ({' || '.join(simd.any(m) for m in band_domain)})")
                opened += 1
            _define_load_masks(b, loops, band_domain, band_loads, depth, bool(lane_bounds),
                               band_trusted)
        _emit_lane_loops(b, loops, depth + 1, band_domain, band_loads, band_trusted, body)
        for _ in range(opened):
            out.close()


def _define_load_masks(b: _Block, loops: _NestLoops, domain, loads, depth: int,
                       domain_changed: bool, trusted) -> None:
    """(Re)define, at this loop depth, the masks of the vector reads that change here: lanes
    that exist, lie in the domain, and read inside a zero-padded array.  A read's mask is
    defined at the depth of the innermost loop its padding conditions use, and again where
    the domain narrows below that; ``trusted`` conditions hold here and are left out."""
    out, simd, lane, lane_padding = b.out, b.simd, b.chosen.lane, loops.lane_padding
    for a, (access, offset, padded) in enumerate(loops.reads.items):
        if not depends(offset, lane):
            continue
        exprs = lane_padding.get(a, [])
        symbols = set().union(set(), *(sympy.sympify(e).free_symbols for e in exprs))
        level = max((loops.depth_of[v] for v in symbols if v in loops.depth_of), default=0)
        if not (depth == level or (domain_changed and depth > level)):
            continue
        names = []
        for q, lane_at in enumerate(b.lane_at):
            conds = [f"sc_valid{q}"] * b.shape.tail + ([domain[q]] if domain else []) + \
                    [_lane_condition(simd, e, lane, lane_at) for e in exprs
                     if e not in trusted]
            if not conds:       # every lane reads: an unmasked load (AVX2's masked ones
                names.append(None)          # cost 2-3x as much on Zen 4)
                continue
            name = f"sc_l{loops.number}_{a}_{depth}_{q}"
            out.line(f"const {simd.mask} {name} = {_and_all(simd, conds)};")
            names.append(name)
        loads[a] = names


def _lane_condition(simd: Simd, expr, lane, lane_symbol) -> str:
    """Mask of lanes where ``expr >= 0``, the lane index running lane_symbol + 0, 1, ..."""
    coefficients, _ = linear_parts(expr)
    step = int(coefficients.get(lane, 0))
    base = c_affine(sympy.expand(sympy.sympify(expr).xreplace({lane: lane_symbol})))
    return simd.nonnegative(base, step)


def _and_all(simd: Simd, masks: list[str]) -> str:
    text = masks[0]
    for m in masks[1:]:
        text = simd.both(text, m)
    return text


def _accumulate_output_lanes(b: _Block, reads: _Reads, loads, domain, box) -> None:
    """Load each read once per row or per vector and add the products into the block."""
    if b.window is not None and any(depends(offset, b.window) for _, offset, _ in reads.items):
        _accumulate_window(b, reads, loads, domain, box)
        return
    out, simd, accs, row_vars, lane_at = b.out, b.simd, b.accs, b.row_vars, b.lane_at
    lane, block, rows, vectors = b.chosen.lane, b.chosen.block, b.shape.rows, b.shape.vectors
    ctype = C_TYPES[simd.dtype]
    per_row: list[list[str]] = [[] for _ in range(rows)]   # factor vectors per row
    per_vector: list[list[str]] = [[] for _ in range(vectors)]
    per_cell = [[[] for _ in range(vectors)] for _ in range(rows)]
    shared: list[str] = []
    zeroed: set[str] = set()      # vectors loaded under a mask: +0 outside it (the domain's)
    finite: set[str] = set()      # broadcasts of arrays checked finite (OutputLanes.finite)
    skips: list[list[str]] = [[] for _ in range(rows)]    # per row: tests to add at all
    constant = reads.constant      # folded into the first broadcast read, if there is one
    for number, (access, offset, padded) in enumerate(reads.items):
        name = str(access.base.label)
        stride = int(linear_parts(offset)[0].get(lane, 0))
        scalar_checks = _scalar_checks(b, access, padded, box)
        if name in b.chosen.bounded:      # the rows' tap bounds: a row outside adds nothing
            for r in range(rows):     # (its load still reads zero: nothing outside is read)
                skips[r] += c_nonnegative([e for e in scalar_checks if depends(e, block)],
                                   {block: row_vars[r]})
        if stride == 0:
            targets = range(rows) if block is not None and depends(offset, block) else [None]
            for r in targets:
                at = offset.xreplace({block: row_vars[r]}) if r is not None else offset
                replace = {block: row_vars[r]} if r is not None else {}
                load = f"{name}[{c_affine(at)}]"
                if scalar_checks:
                    test = " && ".join(c_nonnegative(scalar_checks, replace))
                    load = f"(({test}) ? {load} : 0)"
                if constant != 1:
                    load = f"{number_text(constant, ctype)}*{load}"
                vector = f"sc_v{number}_{r if r is not None else 'x'}"
                out.line(f"const {simd.vec} {vector} = {simd.set1(load)};")
                if name in b.chosen.finite:
                    finite.add(vector)
                (per_row[r] if r is not None else shared).append(vector)
            constant = sympy.Integer(1)
        else:
            # a read that depends on the rows loads its vectors per row (schedule: rows along
            # an index the lane reads use, a depthwise layer's channels)
            rowed = block is not None and depends(offset, block)
            _emit_prefetch(b, name, offset.xreplace({block: row_vars[0]} if rowed else {}))
            for r in range(rows) if rowed else [None]:
                here = {block: row_vars[r]} if r is not None else {}
                test = " && ".join(c_nonnegative(scalar_checks, here))
                for q in range(vectors):
                    at = c_affine(offset.xreplace({**here, lane: lane_at[q]}))
                    mask = loads[number][q] if loads is not None else None
                    load = simd.load(f"{name} + {at}", stride, mask)
                    if test:
                        load = f"({test}) ? {load} : {simd.zero()}"
                    vector = f"sc_w{number}_{q}" + (f"_{r}" if r is not None else "")
                    out.line(f"const {simd.vec} {vector} = {load};")
                    if mask is not None:
                        zeroed.add(vector)
                    (per_cell[r][q] if r is not None else per_vector[q]).append(vector)
    scale = None
    if constant != 1:
        scale = "sc_scale"
        out.line(f"const {simd.vec} sc_scale = {simd.set1(number_text(constant, ctype))};")
    for r in range(rows):
        for q in range(vectors):
            factors = shared + per_row[r] + per_vector[q] + per_cell[r][q] + \
                ([scale] if scale else [])
            acc = accs[r][q]
            fused = len(factors) == 2 and factors[0] in finite and factors[1] in zeroed
            total = simd.accumulate(acc, factors, domain[q] if domain else None, fused)
            if skips[r]:
                total = f"({' && '.join(skips[r])}) ? {total} : {acc}"
            out.line(f"{acc} = {total};")


def _emit_prefetch(b: _Block, name: str, offset: sympy.Expr) -> None:
    """Where the plan's Prefetch takes array ``name``: a prefetch of where its read at
    ``offset`` (the first vector's) will read at the next value of the Prefetch's index."""
    prefetch = b.chosen.prefetch
    if prefetch is not None and name in prefetch.arrays:
        ahead = offset.xreplace({b.chosen.lane: b.lane_at[0],
                                 prefetch.index: prefetch.index + 1})
        b.out.line(prefetch_line(name, c_affine(sympy.expand(ahead))))


def _accumulate_window(b: _Block, reads: _Reads, loads, domain, box) -> None:
    """The products of the window loop (schedule.OutputLanes.window), unrolled: each row the
    block reads is loaded once and added into the rows it meets at each tap, ``t``
    ascending for each row, the loop's order; the other reads are broadcast once per tap.  A row
    outside a padded read loads zeros, or, in a ``bounded`` array, adds nothing."""
    out, simd, accs, lane_at = b.out, b.simd, b.accs, b.lane_at
    lane, block, window, rows = b.chosen.lane, b.chosen.block, b.window, b.shape.rows
    ctype = C_TYPES[simd.dtype]
    loop = next(loop for n in b.chosen.nests for loop in n.loops if loop.index == window)
    first, taps = int(loop.lower[0].num), int(loop.upper[0].num) - int(loop.lower[0].num) + 1
    weights: list[list[str]] = [[] for _ in range(taps)]
    moving = None
    for number, (access, offset, padded) in enumerate(reads.items):
        checks = _scalar_checks(b, access, padded, box)
        if depends(offset, lane):
            moving = (number, access, offset, checks)
            continue
        for t in range(taps) if depends(offset, window) else [None]:
            here = {window: first + t} if t is not None else {}
            load = f"{access.base.label}[{c_affine(sympy.expand(offset.xreplace(here)))}]"
            if checks:
                load = f"(({' && '.join(c_nonnegative(checks, here))}) ? {load} : 0)"
            vector = f"sc_v{number}_{t if t is not None else 'x'}"
            out.line(f"const {simd.vec} {vector} = {simd.set1(load)};")
            for k in range(taps) if t is None else [t]:
                weights[k].append(vector)
    if reads.constant != 1:
        out.line(f"const {simd.vec} sc_scale = "
                 f"{simd.set1(number_text(reads.constant, ctype))};")
        for k in range(taps):
            weights[k].append("sc_scale")
    number, access, offset, checks = moving
    steps = linear_parts(offset)[0]
    stride = int(steps.get(lane, 0))
    bounded = str(access.base.label) in b.chosen.bounded
    # line w of the moving read, counted in taps from row 0's first tap; a row is `apart`
    # taps from the next (2 in a stride-2 forward, 2*i0 + k0). The taps run down the lines
    # (i0 + k0: row r meets tap t at w = apart*r + t) or up them (j0 - k0: at
    # w = apart*r + taps - 1 - t, and the lines go from the last)
    apart = int(steps[block] // steps[window])
    reverse, apart = apart < 0, abs(apart)
    lines = apart * (rows - 1) + taps
    for w in reversed(range(lines)) if reverse else range(lines):
        here = {window: first + taps - 1 - w if reverse else first + w, block: block}
        tests = c_nonnegative(checks, here)
        skip = bounded and tests
        if skip:        # the definition has no product here: the row adds nothing
            out.open(f"if ({' && '.join(tests)})")
        for q in range(b.shape.vectors):
            at = c_affine(sympy.expand(offset.xreplace({**here, lane: lane_at[q]})))
            load = simd.load(f"{access.base.label} + {at}", stride,
                             loads[number][q] if loads is not None else None)
            if tests and not skip:
                load = f"({' && '.join(tests)}) ? {load} : {simd.zero()}"
            vector = f"sc_w{number}_{q}_{w}"
            out.line(f"const {simd.vec} {vector} = {load};")
            for t in range(taps):
                r, off = divmod(w - (taps - 1 - t if reverse else t), apart)
                if not off and 0 <= r < rows:
                    acc = accs[r][q]
                    total = simd.accumulate(acc, weights[t] + [vector],
                                            domain[q] if domain else None)
                    out.line(f"{acc} = {total};")
        if skip:
            out.close()


def _scalar_checks(b: _Block, access, padded: bool, box) -> list:
    """The index conditions of a zero-padded read that do not depend on the lane (one test
    each, not a mask), those on the rows only where the block is guarded."""
    if not padded:
        return []
    return [e for e in in_range_exprs(access, box) if not depends(e, b.chosen.lane)
            and (b.guarded or not depends(e, b.chosen.block))]


def number_text(value, ctype: str) -> str:
    suffix = "f" if ctype == "float" else ""
    if value.is_Integer:
        return f"(({ctype}){int(value)})"
    return f"(({ctype})({float(value)!r}{suffix}))"


def emit_reduction_lanes(out: Writer, fn: IndexSum, piece: schedule.Piece,
                          chosen: schedule.ReductionLanes, simd: Simd) -> None:
    """Per output block, lane-wise partial sums along the innermost loop, added up once at
    the end; vectors that could read outside a zero-padded array or past the loop's end are
    masked, the others take the plain path."""
    (nest,) = piece.nests
    reads = _Reads(nest)
    lane = chosen.lane
    width, ctype = simd.width, C_TYPES[simd.dtype]
    blocks = list(chosen.blocks)
    block_indices = [u for u, _ in blocks]
    outer = [i for i in piece.indices if i not in block_indices]
    chunks = _reduction_chunks(nest, width)
    threaded = threads(out, chosen.split)
    if threaded:
        omp_parallel(out, "parallel")
    out.open()
    out.open(f"for (int64_t sc_chunk = 0; sc_chunk < {chunks.count}; ++sc_chunk)")
    out.line(f"const int64_t sc_r0 = (sc_chunk / {chunks.segments}) * {chunks.rows}, "
             f"sc_r1 = sc_min(sc_r0 + {chunks.rows}, {chunks.total_rows});")
    out.line(f"const int64_t sc_s0 = {chunks.lane_lo} + (sc_chunk % {chunks.segments}) * "
             f"{chunks.segment}, sc_s1 = sc_s0 + {chunks.segment - 1};")
    if threaded:
        split = chosen.split
        out.line(f"#pragma omp for{f' collapse({split.loops})' if split.loops > 1 else ''} "
                 f"schedule(dynamic, {split.grain})")
    for idx in outer:
        lo, hi = index_range(idx)
        out.open(f"for (int64_t {idx.label} = {lo}; "
                 f"{idx.label} <= {hi}; ++{idx.label})")
    for u, rows in blocks:
        out.open(f"for (int64_t {u.label} = 0; {u.label} <= "
                 f"{index_range(u)[1]}; {u.label} += {rows})")
    row_vars = {}
    for u, rows in blocks:
        row_vars[u] = []
        for r in range(rows):
            name = f"sc_row_{u.label}_{r}"    # apart from sc_a<r>..., whatever the index's name
            out.line(f"const int64_t {name} = sc_min({u.label} + {r}, {index_range(u)[1]});")
            row_vars[u].append(sympy.Symbol(name))
    combos = _product_rows(blocks)
    accs = {combo: "sc_a" + "_".join(map(str, combo)) for combo in combos}
    out.line(f"{simd.vec} " + ", ".join(f"{a} = {simd.zero()}" for a in accs.values()) + ";")
    opened = 0
    if nest.guards:
        out.open(f"if ({' && '.join(f'({condition_text(g)})' for g in nest.guards)})")
        opened += 1
    # rows in runs along the innermost row index: the indices are divided out of sc_r once
    # per run, and within it the index and the base pointers just step
    out.open("for (int64_t sc_r = sc_r0; sc_r < sc_r1; )")
    opened += 1
    radix, stepping = 1, None
    for loop in reversed(nest.loops[:-1]):
        var = str(loop.index.label)
        low, high = chunks.ranges[loop.index]
        value = f"{low} + (sc_r / {radix}) % {high - low + 1}"
        if stepping is None:
            stepping = loop.index
            out.line(f"int64_t {var} = {value};")
            out.line(f"const int64_t sc_run = sc_min(sc_r1 - sc_r, {high + 1} - {var});")
        else:
            out.line(f"const int64_t {var} = {value};")
        radix *= high - low + 1
    # one base pointer per read and block row: the loads below only add lane offsets
    steps = []
    for number, (access, offset, _) in enumerate(reads.items):
        mine = [u for u in block_indices if depends(offset, u)]
        for key, rows in _row_combos(mine, row_vars):
            at = sympy.expand(offset.xreplace(rows).xreplace({lane: 0}))
            pointer = f"sc_b{number}_{key}"
            out.line(f"const {ctype} *restrict {pointer} = {access.base.label} + {c_affine(at)};")
            step = int(linear_parts(at)[0].get(stepping, 0)) if stepping is not None else 0
            if step:
                steps.append(f"{pointer} += {step};")
    if stepping is not None:
        steps.append(f"++{stepping.label};")
    out.open("for (int64_t sc_k = 0; sc_k < sc_run; ++sc_k)" if stepping is not None else "")
    opened += 1
    last = nest.loops[-1]
    lane_name = str(lane.label)
    out.line(f"const int64_t sc_lo = sc_max({bound_text(last.lower, True)}, sc_s0), sc_hi = "
             f"sc_min({bound_text(last.upper, False)}, sc_s1);")
    # the lane range in which every zero-padded read stays inside its array
    lows, highs, always = ["sc_lo"], ["sc_hi"], []
    box = nest_box(nest, piece.indices)
    for access, offset, padded in reads.items:
        if not padded:
            continue
        for expr in in_range_exprs(access, box):
            coefficients, _ = linear_parts(expr)
            c = int(coefficients.get(lane, 0))
            rows = [u for u in block_indices if u in coefficients]
            # every row of the block must read inside: its first and last rows bound it
            corners = [{}]
            for u in rows:
                corners = [{**c, u: row_vars[u][r]} for c in corners for r in (0, -1)]
            for edge in corners:
                rest = c_affine(sympy.expand((expr - c * lane).xreplace(edge)))
                if c > 0:
                    lows.append(f"sc_ceildiv(-({rest}), {c})")
                elif c < 0:
                    highs.append(f"sc_floordiv({rest}, {-c})")
                else:
                    always.append(f"({rest}) >= 0")
    out.line(f"const int64_t sc_flo = {fold(lows, 'sc_max')}, sc_fhi = "
             f"{fold(highs, 'sc_min')};")
    # vectors start at sc_lo + W·k: masked ones before sc_first, plain ones up to sc_last
    # (when a padded read is never inside, no vector is plain: sc_first lies past every lane,
    # and W·sc_first must not overflow)
    inside = " && ".join(always) if always else "1"
    out.line(f"const int64_t sc_first = ({inside}) ? sc_max(0, sc_ceildiv(sc_flo - sc_lo, "
             f"{width})) : INT64_MAX / {2 * width};")
    out.line(f"const int64_t sc_last = sc_floordiv(sc_fhi - {width - 1} - sc_lo, {width});")
    # vectors 0 .. sc_count-1: masked before sc_a, plain from sc_a to sc_b-1, masked after
    out.line(f"const int64_t sc_count = (sc_hi - sc_lo + {width}) / {width};")
    sums = _Sums(out, reads, chosen, simd, accs, row_vars, box)
    out.line("const int64_t sc_a = sc_min(sc_first, sc_count), "
             "sc_b = sc_max(sc_a, sc_min(sc_last + 1, sc_count));")
    for first, last, plain in (("0", "sc_a", False), ("sc_a", "sc_b", True),
                               ("sc_b", "sc_count", False)):
        out.open(f"for (int64_t sc_v = {first}; sc_v < {last}; ++sc_v)")
        out.line(f"const int64_t {lane_name} = sc_lo + {width} * sc_v;")
        if plain:
            _accumulate_reduction(sums, None)
        else:
            out.line(f"const {simd.mask} sc_valid = "
                     f"{simd.nonnegative(f'sc_hi - {lane_name}', -1)};")
            _accumulate_reduction(sums, "sc_valid")
        out.close()
    for line in steps:
        out.line(line)
    out.close()    # one row
    out.line("sc_r += sc_run;" if stepping is not None else "++sc_r;")
    for _ in range(opened - 1):
        out.close()
    offset = output_offset(fn, piece)
    for combo, acc in accs.items():
        conds = [f"{u.label} + {r} <= {index_range(u)[1]}" for (u, _), r in zip(blocks, combo)]
        at = offset.xreplace({u: row_vars[u][r] for (u, _), r in zip(blocks, combo)})
        element = f"{fn.output.name}[{c_affine(at)}]"
        store = (f"{element} = {simd.hsum(acc)};" if chunks.count == 1 else
                 f"{{ if (sc_chunk == 0) {element} = {simd.hsum(acc)}; "
                 f"else {element} += {simd.hsum(acc)}; }}")
        out.line(f"if ({' && '.join(conds)}) {store}")
    for _ in (*outer, *blocks):
        out.close()
    out.close()   # chunks
    out.close()   # parallel region


CHUNK_ELEMENTS = 2048   # summed elements per chunk and task: what each block reads stays in cache


@dataclass(frozen=True)
class _Chunks:
    """The reduction split into ``count`` chunks summed in order: ``rows`` consecutive values
    of the flattened outer loops times one ``segment`` of the lane loop."""

    ranges: dict
    total_rows: int
    rows: int
    lane_lo: int
    segment: int
    segments: int

    @property
    def count(self) -> int:
        return ceil_div(self.total_rows, self.rows) * self.segments


def _reduction_chunks(nest: LoopNest, width: int) -> _Chunks:
    """Chunks of the summation so that one chunk's data, for all blocks, fits in cache.  Each
    output element adds its chunk sums in chunk order: the thread count cannot change it."""
    ranges = {}
    for loop in nest.loops[:-1]:
        low = max(_ceil_const(b) for b in loop.lower if b.num.is_Integer)
        high = min(int(b.num) // b.den for b in loop.upper if b.num.is_Integer)
        ranges[loop.index] = (low, high)
    total_rows = math.prod(high - low + 1 for low, high in ranges.values())
    lane = nest.loops[-1]
    lane_lo, lane_hi = _ceil_const(lane.lower[0]), int(lane.upper[0].num) // lane.upper[0].den
    extent = lane_hi - lane_lo + 1
    if extent >= CHUNK_ELEMENTS:
        segment = ceil_div(CHUNK_ELEMENTS, width) * width
        return _Chunks(ranges, total_rows, 1, lane_lo, segment, ceil_div(extent, segment))
    rows = max(1, CHUNK_ELEMENTS // extent)
    return _Chunks(ranges, total_rows, rows, lane_lo, extent, 1)


def _row_combos(mine, row_vars) -> list[tuple[str, dict]]:
    """Each combination of the rows of the blocks ``mine`` (those a read depends on): its
    suffix in C names ('x' for none) and the rows' values."""
    combos: list[tuple[tuple, dict]] = [((), {})]
    for u in mine:
        combos = [(key + (r,), {**rows, u: var}) for key, rows in combos
                  for r, var in enumerate(row_vars[u])]
    return [("_".join(map(str, key)) or "x", rows) for key, rows in combos]


def _product_rows(blocks):
    combos = [()]
    for _, rows in blocks:
        combos = [c + (r,) for c in combos for r in range(rows)]
    return combos


@dataclass(frozen=True)
class _Sums:
    """One reduction-lane block being written: the Writer, the nest's reads, the plan, the
    vector unit, the C names of its partial sums (by row combination) and rows, and the
    box of the free indices."""

    out: Writer
    reads: _Reads
    chosen: schedule.ReductionLanes
    simd: Simd
    accs: dict
    row_vars: dict
    box: dict


def _accumulate_reduction(sums: _Sums, mask: str | None) -> None:
    """Load each read once per block row (the lanes under ``mask``, None: all) and add the
    products into the partial sums."""
    out, reads, chosen, simd = sums.out, sums.reads, sums.chosen, sums.simd
    accs, row_vars, box = sums.accs, sums.row_vars, sums.box
    lane = chosen.lane
    blocks = [u for u, _ in chosen.blocks]
    ctype = C_TYPES[simd.dtype]
    loaded = []   # per read: {row-combo-key: vector name}
    for number, (access, offset, padded) in enumerate(reads.items):
        stride = int(linear_parts(offset)[0].get(lane, 0))
        mine = [u for u in blocks if depends(offset, u)]
        names = {}
        for key, rows in _row_combos(mine, row_vars):
            at, local = offset.xreplace(rows), access.xreplace(rows)
            vector = f"sc_v{number}_{key}"
            name = str(access.base.label)
            if stride == 0:
                load = f"{name}[{c_affine(at)}]"
                if padded:
                    checks = [f"(uint64_t)({c_affine(p)}) < {int(n)}u"
                              for p, n in zip(local.indices, access.base.shape)]
                    load = f"({' && '.join(checks)} ? {load} : 0)"
                out.line(f"const {simd.vec} {vector} = {simd.set1(load)};")
            else:
                m = mask
                if mask is not None and padded:
                    m = _padded_mask(simd, in_range_exprs(access, box), lane, lane, rows, mask)
                base = f"sc_b{number}_{key}"
                pointer = f"{base} + {lane}" if stride == 1 else f"{base} + {stride}*{lane}"
                out.line(f"const {simd.vec} {vector} = {simd.load(pointer, stride, m)};")
            names[key] = vector
        loaded.append((mine, names))
    scale = None
    if reads.constant != 1:
        scale = "sc_scale"
        out.line(f"const {simd.vec} sc_scale = {simd.set1(number_text(reads.constant, ctype))};")
    for combo, acc in accs.items():
        rows = dict(zip(blocks, combo))
        factors = [names["_".join(str(rows[u]) for u in mine) or "x"] for mine, names in loaded]
        if scale:
            factors.append(scale)
        out.line(f"{acc} = {simd.accumulate(acc, factors, mask)};")
