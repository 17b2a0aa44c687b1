"""Vector code for the channel-lane plan of codegen.schedule, an implicit GEMM.

Per call (over a run-time batch, once for all its items: see SharedPanels), the read
that uses the lane index (a convolution's weight) is packed into aligned panels:
``panel[lane block][its loops...][lane]``, times the nest's constant.  A register block is
``rows`` consecutive positions x ``vectors`` vectors of lanes; at each step of the
summation loops it loads the vectors once and broadcasts one scalar per row from every
other read, ``rows x vectors`` FMAs for ``vectors`` loads and ``rows`` broadcasts.
Positions where a bound, a guard or a zero-padded read depends on the row take guarded
blocks (a scalar test per row); the interior takes blocks with no test.  The block is
stored through a small tile, transposed into the output's order.  If the panels cannot be
allocated, or a packed value is not finite, the piece runs its plain loop nest instead
(see _emit_fallback).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import sympy

from ..symbolic.affine import c_order_strides, ceil_div, integer_form, linear_parts
from ..symbolic.ir import IndexSum, index_range
from ..symbolic.lowering import LoopNest, nest_box
from . import schedule
from .c import (C_TYPES, BodyPrinter, CopyPart, Writer, bound_text, c_affine, c_nonnegative,
                condition_text, emit_copy, emit_finite_scan, emit_scalar_piece, flat_offset,
                moved_last_strides, output_offset, parallel, prefetch_line)
from .isa import Simd
from .schedule import copy_name, extent, in_range_exprs
from .vector import block_runs, depends, interior, number_text, over_lanes


@dataclass(frozen=True)
class _Nest:
    """One nest of the piece as the block reads it: the packed read (if any) and the loops
    its panel runs over, the broadcast reads, and the conditions that depend on the row
    index (``row_exprs``: each ``>= 0``) or not (``hoisted``: by loop depth)."""

    number: int
    nest: LoopNest
    packed: sympy.Indexed | None
    constant: sympy.Expr
    dims: tuple[sympy.Idx, ...]
    broadcast: tuple[sympy.Indexed, ...]
    hoisted: dict[int, tuple[sympy.Expr, ...]]
    row_exprs: tuple[sympy.Expr, ...]
    tag: str = ""

    @property
    def panel(self) -> str:
        """Its panel's C name (``tag`` tells apart the panels of pieces in one scope)."""
        return f"sc_panel{self.tag}{self.number}"

    @property
    def per_lane(self) -> bool:
        """A term of one packed value per lane (a bias): added as the tile is stored, not in
        the register block, where GCC hoisted its vectors out of the block loops and kept
        them live through the products, spilling the panel's (2d-56's forward 26.7 -> 16.7
        ms)."""
        return not self.nest.loops and self.packed is not None and not self.broadcast and \
            not self.nest.guards and not self.hoisted and not self.row_exprs

    def panel_size(self, span: int) -> int:
        """Elements of one lane block's panel."""
        return math.prod(extent(d) for d in self.dims) * span

    def panel_offset(self, span: int) -> sympy.Expr:
        """Where the panel's vectors for the current loop values start, in a lane block."""
        offset, stride = sympy.Integer(0), span
        for d in reversed(self.dims):
            offset += (d - index_range(d)[0]) * stride
            stride *= extent(d)
        return sympy.expand(offset)


def _nests(piece: schedule.Piece, chosen: schedule.ChannelLanes, tag: str = "") -> list[_Nest]:
    lane, block = chosen.lane, chosen.block
    found = []
    for number, nest in enumerate(chosen.nests):
        constant, reads = schedule.factors(nest.body)
        packed = next((r for r in reads if any(depends(p, lane) for p in r.indices)), None)
        broadcast = tuple(r for r in reads if r is not packed)
        if packed is not None:     # indices of one value (schedule._packable) take it
            loops = {loop.index for loop in nest.loops}
            packed = packed.xreplace({u: index_range(u)[0] for u in piece.indices
                                      if u not in loops and u != lane and extent(u) == 1})
        dims = tuple(loop.index for loop in nest.loops
                     if packed is not None and any(depends(p, loop.index)
                                                   for p in packed.indices))
        depth_of = {loop.index: d for d, loop in enumerate(nest.loops, start=1)}
        box = nest_box(nest, piece.indices)
        hoisted: dict[int, list] = {}
        row_exprs = [g.expr for g in nest.guards if depends(g.expr, block)]
        for read in broadcast:
            if str(read.base.label) not in _padded(nest, chosen):
                continue
            for expr in in_range_exprs(read, box):
                if schedule.padding_bound(expr, nest):
                    continue
                if depends(expr, block):
                    row_exprs.append(expr)
                else:
                    level = max((depth_of.get(s, 0) for s in expr.free_symbols), default=0)
                    hoisted.setdefault(level, []).append(expr)
        for loop in nest.loops:
            row_exprs += [b.den * loop.index - b.num for b in loop.lower if depends(b.num, block)]
            row_exprs += [b.num - b.den * loop.index for b in loop.upper if depends(b.num, block)]
        found.append(_Nest(number, nest, packed, constant, dims, broadcast,
                           {k: tuple(v) for k, v in hoisted.items()}, tuple(row_exprs), tag))
    return found


def _padded(nest: LoopNest, chosen: schedule.ChannelLanes) -> tuple[str, ...]:
    """The arrays a nest reads as zero outside their shape that the block must test: not
    those read from a copy with a zero halo."""
    haloed = {c.array for c in chosen.copies if c.halo}
    return tuple(a for a in nest.zero_outside if a not in haloed)


@dataclass(frozen=True)
class _Emission:
    """One piece's emission, what every routine below reads: where the C goes, the sum, the
    piece, its plan, the vector instruction set and the plan's nests as blocks read them."""

    out: Writer
    fn: IndexSum
    piece: schedule.Piece
    chosen: schedule.ChannelLanes
    simd: Simd
    nests: tuple[_Nest, ...]

    @property
    def span(self) -> int:
        """Lanes per register block (and per panel row)."""
        return self.chosen.vectors * self.simd.width

    @property
    def lane_blocks(self) -> int:
        return ceil_div(extent(self.chosen.lane), self.span)

    @property
    def ctype(self) -> str:
        return C_TYPES[self.simd.dtype]


BATCH_PREFIX = "sc_batch_"   # a whole batch's array, in a function that sums over it itself


@dataclass
class SharedPanels:
    """The panels every item of a run-time batch reads alike: packed reads of no array the
    items split (a convolution's weight and bias), packed once by the batch function
    (:func:`emit_shared_panels`) and passed to each item as ``sc_panels[k]``.  Packed by each
    item, resnet-14's 2.4 MB weight was allocated and packed again for every item of the
    batch (its batch-open forward took 1.38x the fixed-batch one's time)."""

    batched: frozenset[str]
    ctype: str
    packs: list[tuple[str, int, tuple[str, ...]]] = field(default_factory=list)

    def index(self, name: str, elements: int, lines: tuple[str, ...]) -> int:
        """The slot of the panel ``name`` of ``elements`` packed by ``lines`` of C; the same
        pack in another copy of the item (threaded, staged) shares its slot."""
        pack = (name, elements, lines)
        if pack not in self.packs:
            self.packs.append(pack)
        return self.packs.index(pack)


def emit_channel_lanes(out: Writer, fn: IndexSum, piece: schedule.Piece,
                       chosen: schedule.ChannelLanes, simd: Simd,
                       shared: SharedPanels | None = None) -> None:
    """Pack the panels (or take the ``shared`` ones), then every output block by the plan
    (see the module text)."""
    e = _Emission(out, fn, piece, chosen, simd, tuple(_nests(piece, chosen)))
    if chosen.chunking is not None:
        _emit_chunked(e)
        return
    own, given = _panels(e, shared)
    buffers = [(n.panel, f"{e.lane_blocks * n.panel_size(e.span)}") for n in own] + \
        _copy_buffers(e)
    _allocate(e, buffers, given)
    if own or any(c.ring is None for c in chosen.copies):
        out.open("if (!sc_bad)")
        for n in own:
            _emit_pack(e, n)
        _emit_copies(e)
        out.close()
    out.open("if (!sc_bad)")
    _emit_blocks(e)
    out.close()
    _emit_fallback(e)
    _release(e, buffers)


def emit_channel_phases(out: Writer, fn: IndexSum, arrangement: schedule.Arrangement,
                        simd: Simd, shared: SharedPanels | None = None) -> None:
    """Stride phases that all run channel lanes, inside the loops they share (the
    arrangement's, see schedule.shared_loops): every phase's panels packed first, then for
    each value of the loops each phase's lane blocks and register blocks in turn, so that
    the phases fill the output's lines (every other element each) while they are in cache.
    Where a panel cannot be allocated or holds a value that is not finite, the plain nest
    of the whole sum runs instead (see _emit_fallback)."""
    plans, loops = arrangement.plans, arrangement.shared
    emissions = [_Emission(out, fn, piece, chosen, simd, tuple(_nests(piece, chosen, f"{k}_")))
                 for k, (piece, chosen) in enumerate(plans)]
    out.open()
    owns, buffers, given = [], [], []
    for e in emissions:
        own, names = _panels(e, shared)
        owns.append(own)
        buffers += [(n.panel, f"{e.lane_blocks * n.panel_size(e.span)}") for n in own]
        given += names
    task_copy = plans[0][1].task_copy
    if task_copy is not None:
        buffers.append((_task_copies(task_copy), _per_thread(math.prod(task_copy.shape))))
    _allocate(emissions[0], buffers, given)
    if buffers:
        out.open("if (!sc_bad)")
        for e, own in zip(emissions, owns):
            for n in own:
                _emit_pack(e, n)
        out.close()
    out.open("if (!sc_bad)")
    parallel(out, arrangement.split)
    for index in loops:
        out.open("for (int64_t {0} = {1}; {0} <= {2}; ++{0})".format(*_full_range(index)))
    if task_copy is not None:
        _emit_task_copy(emissions[0], task_copy)
    for e in emissions:
        out.open()
        out.line(f"/* {schedule.describe(e.piece, e.chosen).replace('*/', '* /')} */")
        rest = [i for i in e.piece.indices
                if i not in (e.chosen.lane, e.chosen.block, *loops)]
        _emit_lane_blocks(e, [_full_range(i) for i in rest], inside=True)
        out.close()
    for _ in loops:
        out.close()
    out.close()
    out.open("if (sc_bad)")
    emit_scalar_piece(out, fn, schedule.whole_piece(fn), simd.dtype)
    out.close()
    _release(emissions[0], buffers)
    out.close()


def _task_copies(copy: schedule.TaskCopy) -> str:
    """The C name of every thread's copy of its task's part of an array."""
    return f"sc_tasks_{copy.array}"


def _emit_task_copy(e: _Emission, copy: schedule.TaskCopy) -> None:
    """The part of the array the task reads into this thread's copy (see
    schedule.TaskCopy), a row of its last axis at a time; rows past the array's edges,
    which no phase's bounds let it read, are left out."""
    out, simd = e.out, e.simd
    shape = _shapes(e)[copy.array]
    size = math.prod(copy.shape)
    out.line(f"{e.ctype} *const {copy_name(copy.array)} = {_task_copies(copy)} + "
             f"(size_t)omp_get_thread_num() * {size};")
    out.open()
    *outer, (_, first, count) = copy.axes
    tests = []
    for a, (index, low, number) in enumerate(outer):
        out.open(f"for (int64_t sc_t{a} = 0; sc_t{a} < {number}; ++sc_t{a})")
        at = f"{index.label} + {low} + sc_t{a}" if index is not None else f"{low} + sc_t{a}"
        out.line(f"const int64_t sc_x{a} = {at};")
        if index is not None:
            tests.append(f"sc_x{a} >= 0 && sc_x{a} < {shape[a]}")
    if tests:
        out.open(f"if ({' && '.join(tests)})")
    source = " + ".join(f"{stride}*sc_x{a}"
                        for a, stride in enumerate(c_order_strides(shape)[:-1]))
    target = " + ".join(f"{stride}*sc_t{a}"
                        for a, stride in enumerate(c_order_strides(copy.shape)[:-1]))
    out.line(f"const {e.ctype} *const sc_from = {copy.array} + {source} + {first};")
    out.line(f"{e.ctype} *const sc_to = {copy_name(copy.array)} + {target};")
    whole = count // simd.width * simd.width
    out.line("#pragma GCC unroll 4")
    out.open(f"for (int64_t sc_e = 0; sc_e < {whole}; sc_e += {simd.width})")
    out.line(simd.store("sc_to + sc_e", simd.load("sc_from + sc_e", 1, None), None))
    out.close()
    if whole < count:
        out.line(f"for (int64_t sc_e = {whole}; sc_e < {count}; ++sc_e) "
                 "sc_to[sc_e] = sc_from[sc_e];")
    if tests:
        out.close()
    for _ in outer:
        out.close()
    out.close()


def _panels(e: _Emission, shared: SharedPanels | None) -> tuple[list[_Nest], list[str]]:
    """The nests whose panels the piece packs itself, and the names of the panels it takes
    from the batch function's ``shared`` ones (declared here)."""
    packed = [n for n in e.nests if n.packed is not None]
    given = [n for n in packed
             if shared is not None and str(n.packed.base.label) not in shared.batched]
    for n in given:
        slot = shared.index(n.panel, e.lane_blocks * n.panel_size(e.span), _pack_lines(e, n))
        e.out.line(f"{e.ctype} *const {n.panel} = sc_panels[{slot}];")
    return [n for n in packed if n not in given], [n.panel for n in given]


def _pack_lines(e: _Emission, n: _Nest) -> tuple[str, ...]:
    """The C of :func:`_emit_pack` for a function of its own (the batch function)."""
    alone = Writer()
    _emit_pack(replace(e, out=alone), n)
    return tuple(alone.lines)


def emit_shared_panels(out: Writer, shared: SharedPanels) -> None:
    """Allocate and pack every shared panel into ``sc_panels``; a panel that cannot be
    allocated, or that holds a value that is not finite, is passed as NULL, and the items run
    their plain nests instead (see _emit_fallback)."""
    ctype = shared.ctype
    out.line(f"{ctype} *sc_panels[{len(shared.packs)}];")
    for slot, (name, elements, lines) in enumerate(shared.packs):
        out.open()
        out.line(f"{ctype} *const {name} = sc_alloc({elements} * sizeof({ctype}));")
        out.line(f"int sc_bad = !{name};")
        out.open("if (!sc_bad)")
        for text in lines:
            out.line(text)
        out.close()
        out.open("if (sc_bad)")
        out.line(f"sc_free({name});")
        out.close()
        out.line(f"sc_panels[{slot}] = sc_bad ? 0 : {name};")
        out.close()


def release_shared_panels(out: Writer, shared: SharedPanels) -> None:
    """Free every shared panel once the items have run (sc_free ignores NULL)."""
    out.line(f"for (int sc_k = 0; sc_k < {len(shared.packs)}; ++sc_k) sc_free(sc_panels[sc_k]);")


def _allocate(e: _Emission, buffers: list[tuple[str, str]], given: Sequence[str] = ()) -> None:
    """Each (name, elements) buffer from sc_alloc; ``sc_bad`` set if any is missing, or if
    any ``given`` panel is NULL."""
    for name, size in buffers:
        e.out.line(f"{e.ctype} *const {name} = sc_alloc({size} * sizeof({e.ctype}));")
    names = [*given, *(name for name, _ in buffers)]
    e.out.line(f"int sc_bad = !({' && '.join(names)});" if names else "int sc_bad = 0;")


def _release(e: _Emission, buffers: list[tuple[str, str]]) -> None:
    for name, _ in buffers:
        e.out.line(f"sc_free({name});")


def _shapes(e: _Emission) -> dict[str, list[int]]:
    return {str(r.base.label): [int(d) for d in r.base.shape]
            for n in e.nests for r in n.broadcast}


def _copy_buffers(e: _Emission) -> list[tuple[str, str]]:
    """(name, elements) of the copies the plan makes: whole, or a ring per thread."""
    shapes = _shapes(e)
    return [(copy_name(c.array), f"{math.prod(c.shape(shapes[c.array]))}")
            if c.ring is None else (_rings(c), _per_thread(_ring_size(e, c)))
            for c in e.chosen.copies]


def _per_thread(elements: int) -> str:
    """C for a buffer of ``elements`` for each thread of the call (one where unthreaded)."""
    return f"(size_t)(sc_threads > 1 ? sc_threads : 1) * {elements}"


def _rings(copy: schedule.Copy) -> str:
    """The C name of every thread's ring of a copy (see schedule.Ring)."""
    return f"sc_rings_{copy.array}"


def _ring_size(e: _Emission, copy: schedule.Copy) -> int:
    """Elements of one thread's ring."""
    return copy.ring.rows * math.prod(copy.row_shape(_shapes(e)[copy.array]))


def _emit_copies(e: _Emission) -> None:
    """The whole copies (the rings fill as their tasks run, see _emit_window)."""
    shapes = _shapes(e)
    for copy in e.chosen.copies:
        if copy.ring is None:
            emit_copy(e.out, copy, shapes[copy.array], e.simd.transpose)




def _emit_fallback(e: _Emission) -> None:
    """The plain loop nest where the plan cannot run (``sc_bad``): no memory for its panels,
    or a packed value that is NaN or infinite.  The plan skips products with the zeros
    outside a padded array and with reads outside a loop's bounds; 0·∞ and 0·NaN are NaN,
    so those products count where a packed value is not finite, and the plain nest, which
    computes the sum as defined, runs instead.  Over a whole batch (Writer.batched), the
    batch function runs its items instead (``sc_failed``, see emit.emit_batch_sum)."""
    if e.out.batched:
        e.out.line("sc_failed |= sc_bad;")
        return
    e.out.open("if (sc_bad)")
    emit_scalar_piece(e.out, e.fn, e.piece, e.simd.dtype)
    e.out.close()


def _emit_pack(e: _Emission, n: _Nest) -> None:
    """panel[lane block][dims...][lane] = constant x the read (0 past the last lane), on
    threads over lane blocks and the first loop (a 256-channel 3x3 weight is 2.4 MB)."""
    out, lane, span, lane_blocks = e.out, e.chosen.lane, e.span, e.lane_blocks
    over = [("sc_lb", lane_blocks)] + [(str(d.label), extent(d)) for d in n.dims[:1]]
    parallel(out, schedule.move_split(over, lane_blocks * n.panel_size(span)),
             " reduction(|:sc_bad)")
    out.open(f"for (int64_t sc_lb = 0; sc_lb < {lane_blocks}; ++sc_lb)")
    for d in n.dims:
        lo, hi = index_range(d)
        out.open(f"for (int64_t {d.label} = {lo}; {d.label} <= {hi}; ++{d.label})")
    out.open(f"for (int64_t sc_l = 0; sc_l < {span}; ++sc_l)")
    out.line(f"const int64_t {lane.label} = sc_lb * {span} + sc_l;")
    _pack_element(e, n, n.panel,
                  f"sc_lb * {n.panel_size(span)} + {c_affine(n.panel_offset(span))} + sc_l")
    for _ in (*n.dims, None, None):
        out.close()


def _pack_element(e: _Emission, n: _Nest, panel: str, at: str) -> None:
    """``panel[at]`` = the constant x the packed read at the current lane (0 past the last
    lane); ``sc_bad`` is set if it is not finite (see _emit_fallback)."""
    out, lane = e.out, e.chosen.lane
    value = BodyPrinter(e.simd.dtype).doprint(n.constant * n.packed)
    out.line(f"const {e.ctype} sc_v = {lane.label} <= {index_range(lane)[1]} ? "
             f"{value} : 0;")
    out.line(f"{panel}[{at}] = sc_v;")
    out.line("sc_bad |= !isfinite(sc_v);")


def _emit_blocks(e: _Emission) -> None:
    """Every register block of the piece, on threads over lane blocks and outer indices (or
    over the window's tasks, see _emit_window)."""
    out, piece, chosen = e.out, e.piece, e.chosen
    if chosen.window is not None:
        _emit_window(e)
        return
    outer = [i for i in piece.indices if i not in (chosen.lane, chosen.block)]
    parallel(out, chosen.split)
    _emit_lane_blocks(e, [_full_range(i) for i in outer], inside=chosen.lanes_inside)


def _full_range(index) -> tuple[str, str, str]:
    lo, hi = index_range(index)
    return str(index.label), str(lo), str(hi)


def _emit_lane_blocks(e: _Emission, loops: Sequence[tuple[str, str, str]],
                      starts: tuple[str, str] | None = None, inside: bool = False) -> None:
    """For each lane block, for the (variable, first, last) ``loops`` in order (or
    ``inside`` them), every register block along the block index (with ``starts``, C for a
    first and a last position: the blocks that start between them)."""
    out, chosen, span = e.out, e.chosen, e.span
    block = chosen.block
    lane_blocks = f"for (int64_t sc_lb = 0; sc_lb < {e.lane_blocks}; ++sc_lb)"
    if not inside:
        out.open(lane_blocks)
    for var, first, last in loops:
        out.open(f"for (int64_t {var} = {first}; {var} <= {last}; ++{var})")
    if inside:
        out.open(lane_blocks)
    for n in e.nests:
        if n.packed is not None:
            out.line(f"const {e.ctype} *const sc_p{n.number} = "
                     f"{n.panel} + sc_lb * {n.panel_size(span)};")
    tested = [replace(n, zero_outside=_padded(n, chosen)) for n in chosen.nests]
    inside = interior(tested, e.piece.indices, block)
    for first, count, rows, guarded in block_runs(extent(block), chosen.rows, inside):
        start, last = f"{first}", f"{first + (count - 1) * rows}"
        if starts is not None:
            start = f"sc_max({first}, {first} + sc_ceildiv({starts[0]} - {first}, {rows}) * {rows})"
            last = f"sc_min({last}, {starts[1]})"
        out.open(f"for (int64_t {block.label} = {start}; {block.label} <= {last}; "
                 f"{block.label} += {rows})")
        _emit_block(e, rows, guarded)
        out.close()
    for _ in (*loops, None):
        out.close()


def _emit_window(e: _Emission) -> None:
    """The blocks by tasks of schedule.Window: each task takes its thread's rings, marks
    them empty, and runs its chunk of the window index, copying rows as they are needed
    (``lanes_inside``) or all of the chunk's first (over the block index: as one range)."""
    out, piece, chosen, window = e.out, e.piece, e.chosen, e.chosen.window
    outer = [i for i in piece.indices if i not in (chosen.lane, chosen.block)]
    rest = [_full_range(i) for i in outer[len(window.slab) + 1:]]
    lo, hi = index_range(window.index)
    chunks = ceil_div(extent(window.index), window.chunk)
    threaded = parallel(out, chosen.split)
    for u in window.slab:
        out.open("for (int64_t {0} = {1}; {0} <= {2}; ++{0})".format(*_full_range(u)))
    out.open(f"for (int64_t sc_wc = 0; sc_wc < {chunks}; ++sc_wc)")
    worker = "(size_t)omp_get_thread_num()" if threaded else "0"
    out.line(f"const int64_t sc_w0 = {lo} + sc_wc * {window.chunk}, "
             f"sc_w1 = sc_min(sc_w0 + {window.chunk - 1}, {hi});")
    ringed = [c for c in chosen.copies if c.ring is not None]
    for c in ringed:
        out.line(f"{e.ctype} *const {_ring(c)} = {_rings(c)} + {worker} * {_ring_size(e, c)};")
        if c.ring.ranged:
            _emit_ring_range(e, c)
        else:
            out.line(f"int64_t sc_held_{c.array}[{c.ring.rows}];")
            out.line(f"for (int64_t sc_s = 0; sc_s < {c.ring.rows}; ++sc_s) "
                     f"sc_held_{c.array}[sc_s] = -1;")
    w = str(window.index.label)
    if window.index == chosen.block:
        _emit_lane_blocks(e, rest, ("sc_w0", "sc_w1"))
    else:
        out.open(f"for (int64_t {w} = sc_w0; {w} <= sc_w1; ++{w})")
        for c in ringed:
            _emit_ring_rows(e, c)
        if window.lanes_inside:
            _emit_lane_blocks(e, rest)
            out.close()
        else:
            out.close()
            _emit_lane_blocks(e, [(w, "sc_w0", "sc_w1"), *rest])
    for _ in (*window.slab, None):
        out.close()


def _ring(copy: schedule.Copy) -> str:
    """The C name of the current task's ring of a copy."""
    return f"sc_ring_{copy.array}"


def _slab_rows(e: _Emission, copy: schedule.Copy) -> dict[int, str]:
    """Each axis before a ring's (but the moved one) at the task's slab position, as C."""
    shape = _shapes(e)[copy.array]
    read = next(r for n in e.nests for r in n.broadcast if str(r.base.label) == copy.array)
    halo = copy.halo or ((0, 0),) * len(shape)
    return {a: f"{c_affine(sympy.expand(read.indices[a] + halo[a][0]))}"
            for a in range(copy.ring.axis) if a != copy.axis}


def _emit_ring_range(e: _Emission, copy: schedule.Copy) -> None:
    """Copy a block window's rows, the task's first ``sc_lo_<array>`` on, all at once."""
    ring, shape = copy.ring, _shapes(e)[copy.array]
    first, stop = f"sc_lo_{copy.array}", f"sc_hi_{copy.array}"
    e.out.line(f"const int64_t {first} = sc_max({ring.step} * sc_w0 + {ring.low}, 0), "
               f"{stop} = sc_min({ring.step} * sc_w0 + {ring.low} + {ring.rows}, "
               f"{copy.shape(shape)[ring.axis]});")
    e.out.open()
    emit_copy(e.out, copy, shape, e.simd.transpose,
              CopyPart(_slab_rows(e, copy), _ring(copy), (first, stop)))
    e.out.close()


def _emit_ring_rows(e: _Emission, copy: schedule.Copy) -> None:
    """Copy into the ring the rows the window index's current value reads that it does not
    hold yet: those of the copy (a tap's row past the array's edge is a row no bound lets
    the products read)."""
    out, ring = e.out, copy.ring
    shape = _shapes(e)[copy.array]
    row = {**_slab_rows(e, copy), ring.axis: "sc_row"}
    first = c_affine(ring.step * e.chosen.window.index + ring.low)
    out.open(f"for (int64_t sc_row = sc_max({first}, 0); "
             f"sc_row < sc_min({first} + {ring.span}, {copy.shape(shape)[ring.axis]}); ++sc_row)")
    out.line(f"const int64_t sc_slot = sc_row % {ring.rows};")
    out.open(f"if (sc_held_{copy.array}[sc_slot] != sc_row)")
    out.line(f"sc_held_{copy.array}[sc_slot] = sc_row;")
    out.line(f"{e.ctype} *const sc_dst = {_ring(copy)} + sc_slot * "
             f"{math.prod(copy.row_shape(shape))};")
    emit_copy(out, copy, shape, e.simd.transpose, CopyPart(row, "sc_dst"))
    out.close()
    out.close()


def _emit_block(e: _Emission, rows: int, guarded: bool) -> None:
    """One register block: rows ``block`` .. ``block + rows - 1`` x the lane block
    ``sc_lb``; ``guarded``: each row tests the conditions that depend on it."""
    out, simd, span = e.out, e.simd, e.span
    block, vectors = e.chosen.block, e.chosen.vectors
    accs = [[f"sc_a{r}_{v}" for v in range(vectors)] for r in range(rows)]
    out.open()
    out.line(f"{simd.vec} " + ", ".join(f"{a} = {simd.zero()}" for row in accs for a in row)
             + ";")
    for n in e.nests:
        if n.per_lane:
            continue
        opened = 0
        guards = [g for g in n.nest.guards if not depends(g.expr, block)]
        tests = [condition_text(g) for g in guards] + \
            c_nonnegative(n.hoisted.get(0, ()))
        if tests:
            out.open(f"if ({' && '.join(f'({t})' for t in tests)})")
            opened += 1
        low, high = [], []
        for loop in n.nest.loops:
            low.append([b for b in loop.lower if not depends(b.num, block)])
            high.append([b for b in loop.upper if not depends(b.num, block)])
            if guarded:
                low[-1] += over_lanes(loop.lower, block, None, rows, True)
                high[-1] += over_lanes(loop.upper, block, None, rows, False)
        fused = _fused_steps(e, n, low, high, guarded)
        for depth, loop in enumerate(n.nest.loops, start=1):
            var = str(loop.index.label)
            start, stop = bound_text(low[depth - 1], True), bound_text(high[depth - 1], False)
            if fused and depth == len(n.nest.loops) - 1:
                out.open()          # the outer index at its first value, the inner over both
                out.line(f"const int64_t {var} = {start};")
                opened += 1
                continue
            if fused and depth == len(n.nest.loops):
                stop = str(low[depth - 1][0].num + fused - 1)
            if depth == len(n.nest.loops):
                # unrolled, GCC shares broadcasts between steps and runs out of registers
                out.line("#pragma GCC unroll 1")
            out.open(f"for (int64_t {var} = {start}; {var} <= {stop}; ++{var})")
            opened += 1
            if n.hoisted.get(depth):
                out.open(f"if ({' && '.join(c_nonnegative(n.hoisted[depth]))})")
                opened += 1
        _emit_products(e, n, accs, rows, guarded, c_affine(n.panel_offset(span)))
        for _ in range(opened):
            out.close()
    added = [n for n in e.nests if n.per_lane]
    if e.chosen.transposed and simd.transpose is not None:     # (doubles: element stores)
        _emit_transposed_store(e, accs, added)
    elif _lanes_adjacent(e) and not out.accumulate:
        _emit_vector_store(e, accs, added)
    else:
        out.line(f"{e.ctype} sc_tile[{rows * span}] __attribute__((aligned(64)));")
        for r in range(rows):
            for v in range(vectors):
                out.line(simd.store(f"sc_tile + {r * span + v * simd.width}", accs[r][v], None))
        _emit_tile_store(e, rows, "sc_tile", added)
    out.close()


def _emit_products(e: _Emission, n: _Nest, accs, rows: int, guarded: bool, at: str) -> None:
    """The innermost step: the panel's vectors (from ``sc_p<nest> + at``), one broadcast per
    row, the products added."""
    out, chosen, simd, ctype = e.out, e.chosen, e.simd, e.ctype
    block, vectors, width = chosen.block, chosen.vectors, simd.width
    weights = []
    if n.packed is not None:
        for v in range(vectors):
            name = f"sc_w{n.number}_{v}"
            load = simd.load(f"sc_p{n.number} + {at} + {v * width}", 1, None)
            out.line(f"const {simd.vec} {name} = {load};")
            weights.append(name)
    tested = guarded and bool(n.row_exprs)
    if not n.broadcast and not tested:
        for r in range(rows):
            for v in range(vectors):
                out.line(f"{accs[r][v]} = {simd.add(accs[r][v], weights[v])};")
        return
    copies = {c.array: c for c in chosen.copies}
    per_row = tested or any(depends(p, block) for read in n.broadcast for p in read.indices)
    _emit_prefetches(e, n)
    for r in range(rows):
        # each row's broadcast just before its products: the block's live registers stay
        # its accumulators, the panel's vectors and one broadcast
        if per_row or r == 0:
            here = {block: block + r}
            factors = [_read_text(read.xreplace(here), copies, chosen.task_copy)
                       for read in n.broadcast]
            if n.packed is None and n.constant != 1:
                factors.append(number_text(n.constant, ctype))
            value = "*".join(factors) if factors else f"(({ctype})1)"
            if tested:
                conds = c_nonnegative(n.row_exprs, here)
                value = f"(({' && '.join(conds)}) ? {value} : 0)"
            out.line(f"const {simd.vec} sc_s{n.number}_{r} = {simd.set1(value)};")
        scalar = f"sc_s{n.number}_{r if per_row else 0}"
        for v in range(vectors):
            acc = accs[r][v]
            out.line(f"{acc} = "
                     f"{simd.fma(scalar, weights[v], acc) if weights else simd.add(acc, scalar)};")


def _emit_prefetches(e: _Emission, n: _Nest) -> None:
    """The plan's Prefetch: where the nest's broadcast reads of its arrays will read at the
    next value of its index (a hint: an address past an array's end does not fault)."""
    prefetch = e.chosen.prefetch
    if prefetch is None:
        return
    following = {prefetch.index: prefetch.index + 1}
    for read in dict.fromkeys(n.broadcast):
        if str(read.base.label) in prefetch.arrays:
            ahead = read.xreplace(following)
            e.out.line(prefetch_line(str(ahead.base.label), flat_offset(ahead)))


def _emit_output_prefetch(e: _Emission, offset: sympy.Expr) -> None:
    """Where the plan's Prefetch takes the output: in a lane's store, a prefetch for
    writing of its first element at the next value of the Prefetch's index."""
    prefetch = e.chosen.prefetch
    if prefetch is not None and prefetch.output:
        ahead = sympy.expand(offset.xreplace({prefetch.index: prefetch.index + 1}))
        e.out.line(prefetch_line(e.fn.output.name, c_affine(ahead), write=True))


def _read_text(read: sympy.Indexed, copies: dict[str, schedule.Copy],
               task_copy: schedule.TaskCopy | None = None) -> str:
    """A broadcast read, from its copy if the plan made one (see _read_place)."""
    access, last, slot, _ = _read_place(read, copies, task_copy)
    return f"{access.base.label}[{slot}{flat_offset(access, last)}]"


def _read_place(read: sympy.Indexed, copies: dict[str, schedule.Copy],
                task_copy: schedule.TaskCopy | None = None):
    """Where a broadcast read reads: (the access in the array it reads, the axis that array
    holds innermost (None: C order), C for the start of a ring's slot ("" but in a ring),
    the position the slot depends on (0 but in a ring)).  The array is the read's own, its
    copy if the plan made one, its ring's row if the copy is a ring, the thread's copy of
    the task's part if a task copy."""
    name = str(read.base.label)
    if task_copy is not None and task_copy.array == name:
        return schedule.in_task_copy(read, task_copy), None, "", 0
    copy = copies.get(name)
    if copy is None:
        return read, None, "", 0
    shape = [int(d) for d in read.base.shape]
    at = [p + (copy.halo[a][0] if copy.halo else 0) for a, p in enumerate(read.indices)]
    if copy.ring is None:
        moved = sympy.IndexedBase(copy_name(name), shape=copy.shape(shape))[tuple(at)]
        return moved, copy.axis, "", 0
    ring, row_shape = copy.ring, copy.row_shape(shape)
    in_row = sympy.IndexedBase(_ring(copy), shape=row_shape)[
        tuple(0 if a <= ring.axis and a != copy.axis else p for a, p in enumerate(at))]
    position = sympy.expand(at[ring.axis])
    slot = f"({c_affine(position)} - sc_lo_{name})" if ring.ranged else \
        f"(({c_affine(position)}) % {ring.rows})"
    return in_row, copy.axis, f"{slot} * {math.prod(row_shape)} + ", position


def _steps(e: _Emission, n: _Nest, indices) -> list[dict] | None:
    """The element step of each address the products of a nest read (its panel's, each
    broadcast's) along each of ``indices``; None where an address is not affine in them
    (a quotient, a ring slot that moves with them)."""
    found = [{i: n.panel_offset(e.span).coeff(i) for i in indices}] if n.packed is not None \
        else []
    copies = {c.array: c for c in e.chosen.copies}
    for read in n.broadcast:
        access, last, _, position = _read_place(read, copies, e.chosen.task_copy)
        if any(depends(position, i) for i in indices):
            return None
        shape = [int(d) for d in access.base.shape]
        strides = moved_last_strides(shape, last) if last is not None else \
            c_order_strides(shape)
        steps = dict.fromkeys(indices, 0)
        for stride, place in zip(strides, access.indices):
            num, den = integer_form(place)
            if den != 1 and any(depends(place, i) for i in indices):
                return None
            for i in indices:
                steps[i] += stride * linear_parts(num)[0].get(i, 0)
        found.append(steps)
    return found


def _fused_steps(e: _Emission, n: _Nest, low, high, guarded: bool) -> int | None:
    """The steps of the one loop over the inner index that a nest's two innermost loops
    (their bounds as the block runs them: ``low``, ``high``; ``guarded``: its rows test
    their conditions) print as; None where they stay two.  They fuse where both run over
    constant ranges with no test on them inside, and every address the products read steps
    across the outer index exactly as far as across the whole inner range, so that the one
    loop reads the same addresses in the same order, the same sums (4d-16's forward, 4
    channels inside 3 taps: 8.3 -> 6.9 ms at 1 thread; a short inner loop paid its exit and
    its address arithmetic again at every tap)."""
    loops = n.nest.loops
    depth = len(loops)
    if depth < 2 or n.hoisted.get(depth - 1) or n.hoisted.get(depth):
        return None
    if any(len(bounds) != 1 or not bounds[0].num.is_Integer or bounds[0].den != 1
           for bounds in (*low[-2:], *high[-2:])):
        return None
    outer, inner = loops[-2].index, loops[-1].index
    if guarded and any(depends(x, i) for x in n.row_exprs for i in (outer, inner)):
        return None
    outer_count, count = (int(h[0].num) - int(lo[0].num) + 1
                          for lo, h in zip(low[-2:], high[-2:]))
    steps = _steps(e, n, (outer, inner))
    if steps is None or any(s[outer] != s[inner] * count for s in steps):
        return None
    return outer_count * count


def _emit_tile_store(e: _Emission, rows: int, tile: str, added: Sequence[_Nest] = ()) -> None:
    """Rows ``block`` .. ``block + rows - 1`` from ``tile`` (a row of lanes after another)
    to the output (added to it, where the Writer accumulates): lanes to their channels,
    rows to their positions, each plus the ``added`` terms' values for its lane."""
    out, fn, lane, block, span = e.out, e.fn, e.chosen.lane, e.chosen.block, e.span
    out.line(f"const int64_t sc_lanes = sc_min({span}, {extent(lane)} - sc_lb * {span});")
    out.open("for (int64_t sc_l = 0; sc_l < sc_lanes; ++sc_l)")
    out.line(f"const int64_t {lane.label} = sc_lb * {span} + sc_l;")
    offset = output_offset(fn, e.piece)
    _emit_output_prefetch(e, offset)
    terms = "".join(f" + sc_p{n.number}[sc_l]" for n in added)
    for r in range(rows):
        at = c_affine(sympy.expand(offset.xreplace({block: block + r})))
        out.line(f"{fn.output.name}[{at}] {out.store} ({tile})[{r * span} + sc_l]{terms};")
    out.close()


def _lanes_adjacent(e: _Emission) -> bool:
    """Whether the lanes are neighbours in the output (a channels-last output's channels)."""
    coefficients, _ = linear_parts(output_offset(e.fn, e.piece))
    return coefficients.get(e.chosen.lane, 0) == 1


def _emit_vector_store(e: _Emission, accs, added: Sequence[_Nest]) -> None:
    """The block to the output a vector at a time, where its lanes are neighbours there: no
    tile between (through one, GCC spilled the accumulators of channels-last input
    gradients to the stack: 2d-56's 61 ms against its forward's 24), lanes past the last
    masked, each plus the ``added`` terms' values for its lanes."""
    out, simd, fn, span = e.out, e.simd, e.fn, e.span
    lane, block, width = e.chosen.lane, e.chosen.block, simd.width
    offset = output_offset(fn, e.piece)
    masks = [None] * len(accs[0])
    if extent(lane) % span:
        for v in range(len(accs[0])):
            masks[v] = f"sc_valid{v}"
            last = f"{extent(lane) - 1} - sc_lb * {span} - {v * width}"
            out.line(f"const {simd.mask} sc_valid{v} = {simd.nonnegative(last, -1)};")
    for r, row in enumerate(accs):
        at = c_affine(sympy.expand(offset.xreplace({lane: 0, block: block + r})))
        for v, acc in enumerate(row):
            value = acc
            for n in added:
                value = simd.add(value, simd.load(f"sc_p{n.number} + {v * width}", 1, None))
            out.line(simd.store(f"{fn.output.name} + {at} + sc_lb * {span} + {v * width}",
                                value, masks[v]))


def _emit_transposed_store(e: _Emission, accs, added: Sequence[_Nest]) -> None:
    """The block to the output by lanes (ChannelLanes.transposed): its rows, padded with
    zeros to whole vectors, go through the prelude's width x width transposes into a tile
    of one line of positions per lane; each lane then stores its positions (masked past the
    block's rows), plus the ``added`` terms' values for its lane."""
    out, simd, fn, span, rows = e.out, e.simd, e.fn, e.span, len(accs)
    lane, block, vectors = e.chosen.lane, e.chosen.block, e.chosen.vectors
    transpose, width = simd.transpose
    groups = ceil_div(rows, width)
    padded = groups * width           # positions per lane in the transposed tile
    out.line(f"{e.ctype} sc_tile[{padded * span}] __attribute__((aligned(64)));")
    out.line(f"{e.ctype} sc_lines[{padded * span}] __attribute__((aligned(64)));")
    for r in range(padded):
        for v in range(vectors):
            value = accs[r][v] if r < rows else simd.zero()
            out.line(simd.store(f"sc_tile + {r * span + v * width}", value, None))
    for g in range(groups):
        for v in range(vectors):
            out.line(f"{transpose}(sc_tile + {g * width * span + v * width}, {span}, "
                     f"sc_lines + {v * width * padded + g * width}, {padded});")
    out.line(f"const int64_t sc_lanes = sc_min({span}, {extent(lane)} - sc_lb * {span});")
    out.open("for (int64_t sc_l = 0; sc_l < sc_lanes; ++sc_l)")
    out.line(f"const int64_t {lane.label} = sc_lb * {span} + sc_l;")
    terms = " + ".join(f"sc_p{n.number}[sc_l]" for n in added)
    if terms:
        out.line(f"const {simd.vec} sc_add = {simd.set1(terms)};")
    offset = output_offset(fn, e.piece)
    _emit_output_prefetch(e, offset)
    for g in range(groups):
        value = simd.load(f"sc_lines + sc_l * {padded} + {g * width}", 1, None)
        if terms:
            value = simd.add(value, "sc_add")
        at = c_affine(sympy.expand(offset.xreplace({block: block + g * width})))
        out.line(simd.store_first(f"{fn.output.name} + {at}", value, rows - g * width))
    out.close()


def _emit_chunked(e: _Emission) -> None:
    """The chunked form (schedule.Chunking): per task (a lane block x a group of rows x a
    part of the chunks), for each chunk of its part in order, pack the chunk's panel, then
    add every register block's products over the chunk into the task's tile.  With one part
    the tile goes to the output at the end of the task; with several, each task has a tile
    of its own, and a second pass adds each lane block and group's tiles in part order and
    stores the sum.  Where Chunking.lanes > 1, a task takes that many lane blocks, and each
    chunk runs them in turn, each into its own tile (the sums in the same order).  Each
    thread has its own panel (and tiles, with one part), allocated up front."""
    out, piece, chosen, (n,) = e.out, e.piece, e.chosen, e.nests
    lane, block, chunking = chosen.lane, chosen.block, chosen.chunking
    ctype, lane_blocks, parts, lanes = e.ctype, e.lane_blocks, chunking.parts, chunking.lanes
    outer, inner = n.nest.loops[:-1], n.nest.loops[-1]
    total_rows = math.prod(extent(loop.index) for loop in outer)
    segments = ceil_div(extent(inner.index), chunking.segment)
    chunks = ceil_div(total_rows, chunking.rows) * segments
    others = [i for i in piece.indices if i not in (lane, block)]
    tile_size = math.prod(extent(i) for i in others) * chunking.group * e.span
    panel_size = chunking.rows * chunking.segment * e.span
    per_thread = panel_size + (lanes * tile_size if parts == 1 else 0)
    groups = ceil_div(extent(block), chunking.group)
    copies = _copy_buffers(e)
    buffers = [("sc_work", _per_thread(per_thread))] + \
        ([("sc_tiles", f"{lane_blocks * groups * parts * tile_size}")] if parts > 1 else []) + \
        copies
    _allocate(e, buffers)
    if copies:
        out.open("if (!sc_bad)")
        _emit_copies(e)
        out.close()
    if out.accumulate:
        _emit_finite_scan(e, n)
    out.open("if (!sc_bad)")
    threaded = parallel(out, chosen.split, " reduction(|:sc_bad)")
    if lanes > 1:
        out.open(f"for (int64_t sc_ls = 0; sc_ls < {ceil_div(lane_blocks, lanes)}; ++sc_ls)")
        each_lane_block = (f"for (int64_t sc_lb = sc_ls * {lanes}; "
                           f"sc_lb < sc_min(sc_ls * {lanes} + {lanes}, {lane_blocks}); ++sc_lb)")
    else:
        out.open(f"for (int64_t sc_lb = 0; sc_lb < {lane_blocks}; ++sc_lb)")
        each_lane_block = None
    out.open(f"for (int64_t sc_g = 0; sc_g < {groups}; ++sc_g)")
    worker = "(size_t)omp_get_thread_num()" if threaded else "0"
    every = f"sc_batch * {chunks}" if out.batched else f"{chunks}"
    if parts == 1:
        tiles = f"sc_work + {worker} * {per_thread}"
        tile = tiles if lanes == 1 else f"{tiles} + (sc_lb - sc_ls * {lanes}) * {tile_size}"
        panel = f"{tiles} + {lanes * tile_size}"
        first, last = "0", every
    else:
        out.open(f"for (int64_t sc_part = 0; sc_part < {parts}; ++sc_part)")
        tile = f"sc_tiles + ((sc_lb * {groups} + sc_g) * {parts} + sc_part) * {tile_size}"
        panel = f"sc_work + {worker} * {per_thread}"
        first, last = (f"sc_part * ({every}) / {parts}", f"(sc_part + 1) * ({every}) / {parts}")
    out.line(f"{ctype} *const sc_p{n.number} = {panel};")
    group_rows = (f"const int64_t sc_b0 = sc_g * {chunking.group}, "
                  f"sc_b1 = sc_min(sc_b0 + {chunking.group}, {extent(block)});")
    out.line(group_rows)
    declare = f"{ctype} *const sc_tile = {tile};"
    if not each_lane_block:
        out.line(declare)
    with _task_lane_blocks(out, each_lane_block, declare):
        out.line(f"for (int64_t sc_e = 0; sc_e < {tile_size}; ++sc_e) sc_tile[sc_e] = 0;")
    out.open(f"for (int64_t sc_chunk = {first}; sc_chunk < {last}; ++sc_chunk)")
    chunk = "sc_chunk"
    if out.batched:     # the item's arrays, under the names the item's code reads
        chunk = f"(sc_chunk % {chunks})"
        out.line(f"const int64_t sc_n = sc_chunk / {chunks};")
        for name, size in out.batched.items():
            out.line(f"const {ctype} *restrict const {name} = {BATCH_PREFIX}{name} + "
                     f"sc_n * {size};")
    out.line(f"const int64_t sc_r0 = ({chunk} / {segments}) * {chunking.rows}, "
             f"sc_r1 = sc_min(sc_r0 + {chunking.rows}, {total_rows});")
    lo, hi = index_range(inner.index)
    out.line(f"const int64_t sc_s0 = {lo} + ({chunk} % {segments}) * {chunking.segment}, "
             f"sc_s1 = sc_min(sc_s0 + {chunking.segment - 1}, {hi});")
    with _task_lane_blocks(out, each_lane_block, declare):
        tile_at = _emit_chunk_products(e, outer, inner, others)
    out.close()    # chunks
    if parts == 1:
        with _task_lane_blocks(out, each_lane_block, declare):
            _emit_chunked_store(e, others, tile_at)
    else:
        out.close()    # parts
    out.close()    # groups
    out.close()    # lane blocks
    out.close()    # if (!sc_bad)
    if parts > 1:
        out.open("if (!sc_bad)")
        # over every lane block and group, without the parts
        parallel(out, replace(chosen.split, over=(("lane block", lane_blocks),
                                                  chosen.split.over[1])))
        out.open(f"for (int64_t sc_lb = 0; sc_lb < {lane_blocks}; ++sc_lb)")
        out.open(f"for (int64_t sc_g = 0; sc_g < {groups}; ++sc_g)")
        out.line(f"{ctype} *const sc_tile = sc_tiles + (sc_lb * {groups} + sc_g) * "
                 f"{parts * tile_size};")
        out.line(group_rows)
        out.line(f"for (int64_t sc_part = 1; sc_part < {parts}; ++sc_part)")
        out.line(f"    for (int64_t sc_e = 0; sc_e < {tile_size}; ++sc_e) "
                 f"sc_tile[sc_e] += sc_tile[sc_part * {tile_size} + sc_e];")
        _emit_chunked_store(e, others, tile_at)
        out.close()
        out.close()
        out.close()
    _emit_fallback(e)
    _release(e, buffers)


@contextlib.contextmanager
def _task_lane_blocks(out: Writer, each_lane_block: str | None, declare: str):
    """Where a chunked task has several lane blocks, what is written inside runs in the loop
    over them (``each_lane_block``), ``declare`` (its tile) first; else it runs once."""
    if each_lane_block:
        out.open(each_lane_block)
        out.line(declare)
    yield
    if each_lane_block:
        out.close()


def _emit_chunk_products(e: _Emission, outer, inner, others) -> str:
    """One lane block's work on a chunk: pack its panel, then add every register block of
    the task's rows over the chunk into ``sc_tile``; C for a row's place in the tile."""
    out, chosen, (n,) = e.out, e.chosen, e.nests
    block, chunking, rows = chosen.block, chosen.chunking, chosen.rows
    panel_at = f"((sc_r - sc_r0) * {chunking.segment} + {inner.index.label} - sc_s0) * {e.span}"
    _emit_chunk_pack(e, outer, inner, panel_at)
    for idx in others:
        lo_, hi_ = index_range(idx)
        out.open(f"for (int64_t {idx.label} = {lo_}; {idx.label} <= {hi_}; ++{idx.label})")
    tests = [condition_text(g) for g in n.nest.guards] + \
        c_nonnegative(n.hoisted.get(0, ()))
    if tests:
        out.open(f"if ({' && '.join(f'({t})' for t in tests)})")
    other_at = sympy.Integer(0)
    stride = 1
    for idx in reversed(others):
        other_at += (idx - index_range(idx)[0]) * stride
        stride *= extent(idx)
    tile_at = (f"(({c_affine(sympy.expand(other_at))}) * {chunking.group} + {block.label} - "
               f"sc_b0) * {e.span}")
    out.line(f"int64_t {block.label} = sc_b0;")
    if extent(block) % chunking.group and ceil_div(extent(block), chunking.group) > 1:
        # the last group is shorter than the others: blocks of ``rows``, then the rest
        out.open(f"for (; {block.label} + {rows} <= sc_b1; {block.label} += {rows})")
        _emit_chunk_block(e, rows, tile_at, panel_at)
        out.close()
        rest = extent(block) % rows
        if rest:
            out.open(f"if ({block.label} < sc_b1)")
            _emit_chunk_block(e, rest, tile_at, panel_at)
            out.close()
    else:
        # every group alike: nearly equal blocks (32 rows: 6+6+5+5+5+5, not 6x5+2, whose
        # four accumulators leave the FMA units half idle; unet3d-48's weight gradient,
        # AVX2, 1 thread: 0.85-0.94x the time, best of 15)
        alike = min(extent(block), chunking.group)
        for _, count, size, _ in block_runs(alike, rows, (0, alike - 1)):
            out.open(f"for (int64_t sc_k = 0; sc_k < {count}; ++sc_k, {block.label} += {size})")
            _emit_chunk_block(e, size, tile_at, panel_at)
            out.close()
    if tests:
        out.close()
    for _ in others:
        out.close()
    return tile_at


def _emit_finite_scan(e: _Emission, n: _Nest) -> None:
    """``sc_bad`` set, before any task runs, if a value of the packed array is not finite,
    where the item adds its sums to the output (Writer.accumulate): a chunk's pack finds
    one only after other tasks have added their tiles, which the plain nest could not take
    back."""
    emit_finite_scan(e.out, n.packed.base, e.simd.dtype, n.constant)


def _emit_chunk_pack(e: _Emission, outer, inner, panel_at: str) -> None:
    """Pack the chunk's panel: for each row of the outer loops, the inner loop's steps with
    the lanes innermost, or in tiles of Chunking.pack_tile steps, each lane's innermost;
    where Chunking.transposed, whole vectors of lanes first, by transposes."""
    out, (n,), span, tile = e.out, e.nests, e.span, e.chosen.chunking.pack_tile
    step = inner.index.label
    out.open("for (int64_t sc_r = sc_r0; sc_r < sc_r1; ++sc_r)")
    _decode_rows(out, outer)
    if e.chosen.chunking.transposed and e.simd.transpose is not None:
        _emit_transposed_pack(e, inner, panel_at)
        out.close()
        return
    if tile:
        out.open(f"for (int64_t sc_t = sc_s0; sc_t <= sc_s1; sc_t += {tile})")
    else:
        out.open(f"for (int64_t {step} = sc_s0; {step} <= sc_s1; ++{step})")
    out.open(f"for (int64_t sc_l = 0; sc_l < {span}; ++sc_l)")
    out.line(f"const int64_t {e.chosen.lane.label} = sc_lb * {span} + sc_l;")
    if tile:
        out.open(f"for (int64_t {step} = sc_t; {step} <= sc_min(sc_t + {tile - 1}, sc_s1); "
                 f"++{step})")
    _pack_element(e, n, f"sc_p{n.number}", f"{panel_at} + sc_l")
    for _ in range(3 + bool(tile)):
        out.close()


def _emit_transposed_pack(e: _Emission, inner, panel_at: str) -> None:
    """One row of the chunk's panel (Chunking.transposed): each whole vector of lanes a
    vector's width of steps at a time by the prelude's transposes, then the steps left
    over and the lanes past the last whole vector element by element; ``sc_bad`` is set
    if a value is not finite (x * 0 is NaN only then: the row's products sum to NaN)."""
    out, simd, (n,), span = e.out, e.simd, e.nests, e.span
    lane, segment = e.chosen.lane, e.chosen.chunking.segment
    transpose, width = simd.transpose
    step = inner.index.label
    lane_stride = schedule.flat_coefficients(n.packed)[lane]
    out.line(f"const int64_t sc_whole = sc_min({span}, {extent(lane)} - sc_lb * {span}) / "
             f"{width} * {width};")
    out.line(f"const int64_t sc_tiled = sc_s0 + (sc_s1 - sc_s0 + 1) / {width} * {width};")
    out.open(f"for (int64_t {step} = sc_s0; {step} < sc_tiled; {step} += {width})")
    out.open(f"for (int64_t sc_l = 0; sc_l < sc_whole; sc_l += {width})")
    out.line(f"const int64_t {lane.label} = sc_lb * {span} + sc_l;")
    out.line(f"{transpose}(&{n.packed.base.label}[{flat_offset(n.packed)}], {lane_stride}, "
             f"sc_p{n.number} + {panel_at} + sc_l, {span});")
    out.close()
    out.close()
    out.open(f"for (int64_t {step} = sc_s0; {step} <= sc_s1; ++{step})")
    out.open(f"for (int64_t sc_l = {step} < sc_tiled ? sc_whole : 0; sc_l < {span}; ++sc_l)")
    out.line(f"const int64_t {lane.label} = sc_lb * {span} + sc_l;")
    _pack_element(e, n, f"sc_p{n.number}", f"{panel_at} + sc_l")
    out.close()
    out.close()
    row = f"sc_p{n.number} + (sc_r - sc_r0) * {segment * span}"
    out.line(f"{simd.vec} sc_nan = {simd.zero()};")
    out.open(f"for (int64_t sc_e = 0; sc_e < (sc_s1 - sc_s0 + 1) * {span}; sc_e += {width})")
    out.line(f"sc_nan = {simd.fma(simd.load(f'{row} + sc_e', 1, None), simd.zero(), 'sc_nan')};")
    out.close()
    out.line(f"sc_bad |= !isfinite({simd.hsum('sc_nan')});")


def _emit_chunked_store(e: _Emission, others, tile_at: str) -> None:
    """A task's tile (rows sc_b0..sc_b1 of its lane block) to the output."""
    out, block = e.out, e.chosen.block
    for idx in others:
        lo, hi = index_range(idx)
        out.open(f"for (int64_t {idx.label} = {lo}; {idx.label} <= {hi}; ++{idx.label})")
    out.open(f"for (int64_t {block.label} = sc_b0; {block.label} < sc_b1; ++{block.label})")
    _emit_tile_store(e, 1, f"sc_tile + {tile_at}")
    out.close()
    for _ in others:
        out.close()


def _decode_rows(out: Writer, outer) -> None:
    """The outer loops' values at flattened row ``sc_r`` (the last loop fastest)."""
    radix = 1
    for loop in reversed(outer):
        lo, _ = index_range(loop.index)
        out.line(f"const int64_t {loop.index.label} = {lo} + (sc_r / {radix}) % "
                 f"{extent(loop.index)};")
        radix *= extent(loop.index)


def _emit_chunk_block(e: _Emission, rows: int, tile_at: str, panel_at: str) -> None:
    """One register block over the chunk's rows: accumulators from the tile and back."""
    out, simd, (n,) = e.out, e.simd, e.nests
    vectors, width = e.chosen.vectors, simd.width
    accs = [[f"sc_a{r}_{v}" for v in range(vectors)] for r in range(rows)]
    out.open()
    for r in range(rows):
        for v in range(vectors):
            load = simd.load(f"sc_tile + {tile_at} + {(r * vectors + v) * width}", 1, None)
            out.line(f"{simd.vec} {accs[r][v]} = {load};")
    outer, inner = n.nest.loops[:-1], n.nest.loops[-1]
    out.open("for (int64_t sc_r = sc_r0; sc_r < sc_r1; ++sc_r)")
    _decode_rows(out, outer)
    tests = []
    for depth, loop in enumerate(outer, start=1):
        if len(loop.lower) > 1 or len(loop.upper) > 1:
            var = loop.index.label
            tests.append(f"{var} >= {bound_text(loop.lower, True)} && "
                         f"{var} <= {bound_text(loop.upper, False)}")
        tests += c_nonnegative(n.hoisted.get(depth, ()))
    if tests:
        out.open(f"if ({' && '.join(f'({t})' for t in tests)})")
    var = inner.index.label
    out.line("#pragma GCC unroll 1")
    out.open(f"for (int64_t {var} = sc_max(sc_s0, {bound_text(inner.lower, True)}); "
             f"{var} <= sc_min(sc_s1, {bound_text(inner.upper, False)}); ++{var})")
    innermost = n.hoisted.get(len(n.nest.loops), ())
    if innermost:
        out.open(f"if ({' && '.join(c_nonnegative(innermost))})")
    _emit_products(e, n, accs, rows, False, panel_at)
    if innermost:
        out.close()
    out.close()
    if tests:
        out.close()
    out.close()
    for r in range(rows):
        for v in range(vectors):
            out.line(simd.store(f"sc_tile + {tile_at} + {(r * vectors + v) * width}",
                                accs[r][v], None))
    out.close()
