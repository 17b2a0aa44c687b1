"""Schedules: how each index sum runs on a CPU.

A derived sum says *what* each output element is; a schedule says *how* to
compute them quickly.  Two steps, both plain rewrites of the IR:

1. **Pieces.**  Where loop bounds, steps or indices divide a free index by a
   constant (the stride of a gradient), the output is split into phases
   ``j = m·j' + r``, one piece per residue ``r``.  In each phase the
   divisions become exact, congruences fix a constant residue (the loop then
   runs on ``u = m·u' + R`` with unit step) and a loop confined to a band
   ``g(j') + c1 <= u <= g(j') + c2`` is shifted to ``u = g(j') + t`` so its
   range is constant.  No loop tests divisibility and no quotient remains.

2. **Plans.**  Each piece gets one of four plans, chosen from its access
   patterns (the first of PLAN_KINDS that fits; in a tuned package, the one of
   CHOICES the tuner timed fastest, where it fits — see symconv.tune):

   * :class:`ChannelLanes` — an implicit GEMM: lanes along a free index that
     one read per term uses (a convolution's channels), that read packed per
     call into aligned panels, every other read broadcast one scalar per
     register-block row (forward and input gradients of a convolution; with
     the summation packed chunk by chunk, its weight gradient);
   * :class:`OutputLanes` — vector lanes run along the last output index
     (consecutive outputs); a second output index is register-blocked so
     that every vector load is reused by several rows of broadcasts
     (forward and input gradients of a convolution);
   * :class:`ReductionLanes` — lanes run along the innermost summation
     index and up to two output indices are register-blocked, each lane
     keeping a partial sum that is added up in a fixed order at the end
     (weight and bias gradients);
   * :class:`Scalar` — the plain loop nest, for everything else.

Every plan computes each output element completely, in one thread, in an
order that does not depend on the thread count: results are bit-identical
for any number of threads.  Which loops the threads split, into how many
tasks, is the plan's too (:class:`Split`).  This module knows nothing about
convolution.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Sequence

import sympy

from ..symbolic.affine import (ceil_div, linear_parts, integer_form, normalize_congruence,
                               normalize_constraint, solve_congruence, substitute)
from ..symbolic.ir import IndexSum, Term, accesses, index_range
from ..symbolic.lowering import Bound, LoopNest, lower, nest_box, value_range

MAX_PHASES = 64       # pieces per sum; beyond this the plain nest is used
MAX_MODULUS = 16      # phases per index


@dataclass(frozen=True)
class Piece:
    """The output elements ``out[position]`` for ``indices`` in their ranges, and the loop
    nests whose sum each of them is."""

    indices: tuple[sympy.Idx, ...]
    position: tuple[sympy.Expr, ...]
    nests: tuple[LoopNest, ...]
    note: str = ""


@dataclass(frozen=True)
class Scalar:
    """The loop nest as it is.  ``split``, in every plan: how it goes to threads (see
    task_split; None inside loops its arrangement shares, or before arrange)."""

    split: Split | None = None


@dataclass(frozen=True)
class OutputLanes:
    """Lanes along ``lane`` (a piece index), ``rows`` values of ``block`` per register block,
    ``vectors`` vectors of lanes per block; ``nests`` are the piece's nests with the loops
    that decide which lanes read inside a zero-padded array moved outermost, so their lane
    masks are computed once for all inner iterations.  ``copies`` are small arrays the nests
read from a copy with the lane's axis innermost (filled before the blocks run).  ``bounded``
    arrays are read as zero outside in place of loop bounds on the rows (their taps): a row
    outside skips the product, where a zero would make NaN of a non-finite other factor.
    A ``window`` is the innermost loop of a nest whose one vector read moves with the rows
    and it alike (a depthwise layer's taps down the rows): the block loads each of the
    ``rows + taps - 1`` rows it reads once and adds it into every row that reads it, instead
    of each row loading its own for every tap.  A ``stage`` holds each task's output in L1
    until the task has written all of it (see Stage).  ``finite`` arrays are checked for
    NaN and infinity before the blocks run (where one holds any, the plain nests run
    instead): see _finite_factors.  A ``prefetch`` fetches the next task's rows of the
    vector reads ahead (see Prefetch)."""

    lane: sympy.Idx
    block: sympy.Idx | None
    rows: int
    vectors: int
    nests: tuple[LoopNest, ...] = ()
    copies: tuple["Copy", ...] = ()
    bounded: tuple[str, ...] = ()
    window: sympy.Idx | None = None
    stage: "Stage | None" = None
    finite: tuple[str, ...] = ()
    split: Split | None = None
    prefetch: Prefetch | None = None


@dataclass(frozen=True)
class Stage:
    """A task's output staged in L1 and streamed out.  The task fixes the output's first
    ``dims`` axes, so it writes the ``elements`` after them, one contiguous run; its blocks
    store into a per-thread buffer that size, which then goes to memory by non-temporal
    stores: no line of the output is read for ownership first, and none evicts the inputs.
    For outputs too large to stay in cache between calls; a stride-2 input gradient's
    phases (every other element each) fill the stage between them."""

    dims: int
    elements: int


@dataclass(frozen=True)
class ReductionLanes:
    """Lanes along the innermost loop ``lane``; ``blocks`` are (piece index, rows) pairs
    register-blocked around it (at most two)."""

    lane: sympy.Idx
    blocks: tuple[tuple[sympy.Idx, int], ...]
    split: Split | None = None


@dataclass(frozen=True)
class ChannelLanes:
    """An implicit GEMM.  Lanes along ``lane``, a free index that only one read per nest
    uses (the output channels of a convolution: the weight); that read is packed once per
    call into panels of ``vectors`` vectors, the lane innermost, so each is one aligned
    load.  A register block holds ``rows`` consecutive values of ``block`` (output
    positions) x ``vectors`` vectors; every other read is one scalar broadcast per row, so
    a stride or a dilation only changes which scalar is broadcast.  ``transposed``: the
    block's rows are neighbours in the output and its lanes are not (a channels-first
    output's positions and channels), so the block goes to the output through register
    transposes, a vector store per lane, not an element store per row and lane.  A
    ``window`` makes the copies a few rows at a time per thread (see Window).
    ``lanes_inside``: each task (one value of the outer indices) runs every lane block in
    turn, so the rows its broadcast reads use stay in cache for all of them; otherwise a
    task is one lane block's, whose panel stays in cache (see _lanes_inside).  A
    ``prefetch`` fetches the next task's broadcast rows ahead (see Prefetch)."""

    lane: sympy.Idx
    block: sympy.Idx
    rows: int
    vectors: int
    nests: tuple[LoopNest, ...] = ()
    chunking: Chunking | None = None
    copies: tuple[Copy, ...] = ()
    transposed: bool = False
    window: Window | None = None
    lanes_inside: bool = False
    task_copy: TaskCopy | None = None
    split: Split | None = None
    prefetch: Prefetch | None = None


@dataclass(frozen=True)
class Prefetch:
    """At each summation step, a prefetch of where each of ``arrays``' reads (a channel-lane
    plan's broadcasts, an output-lane plan's vectors) will read at the next value of
    ``index``, the loop around the register blocks: the next task's rows; with ``output``
    (channel lanes), as each lane stores its part of a block, a prefetch for writing of
    where it will store at the next value.  For rows read in place whose every summation
    step lands on another cache line, and lanes a line or more apart in the output (see
    _prefetched): streams the hardware prefetcher does not follow."""

    index: sympy.Idx
    arrays: tuple[str, ...]
    output: bool = False


@dataclass(frozen=True)
class TaskCopy:
    """The part of a broadcast array that one task of stride phases run together reads
    (see run_together), copied per thread at the start of the task, where the array's
    planes crowd one L1 set and L2 set: along each axis ``(index, low, count)``, the
    positions ``index + low`` .. ``+ count - 1`` (``index`` one of the shared loops), or
    ``low`` .. on (``index`` None).  (Its own planes cannot crowd a set: lines of one L1
    set lie 4 KiB apart, so more than 8 in one would span over 32 KiB, and the copy holds
    at most TASK_COPY_ELEMENTS.)"""

    array: str
    axes: tuple[tuple[sympy.Idx | None, int, int], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(count for _, _, count in self.axes)


@dataclass(frozen=True)
class Copy:
    """A broadcast array a channel-lane plan reads from a copy made once per call: ``axis``
    (if not None) moved innermost, so consecutive steps of the innermost loop read
    neighbouring elements; each axis widened by ``halo`` (zeros before, zeros after), so
    the reads need no test for the zero padding and no block is guarded for it; ``lead``
    unused elements after the moved axis's, where without them a block's rows would lie a
    multiple of 4 KiB apart in the copy and crowd one L1 set (a stride-2 layer's rows over
    512 channels: 2 x 512 floats apart)."""

    array: str
    axis: int | None
    halo: tuple[tuple[int, int], ...] | None
    lead: int = 0
    ring: Ring | None = None

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The copy's shape (axes in the array's order) for an array of ``shape``."""
        halo = self.halo or [(0, 0)] * len(shape)
        return tuple(int(d) + lo + hi + (self.lead if a == self.axis else 0)
                     for a, (d, (lo, hi)) in enumerate(zip(shape, halo)))

    def row_shape(self, shape: Sequence[int], axis: int | None = None) -> tuple[int, ...]:
        """The shape of one row of a ring (see Ring) along ``axis`` (the copy's ring's by
        default): the copy's, with extent 1 on that axis and on every axis before it but the
        moved one."""
        axis = self.ring.axis if axis is None else axis
        return tuple(1 if a <= axis and a != self.axis else d
                     for a, d in enumerate(self.shape(shape)))


@dataclass(frozen=True)
class Ring:
    """A copy held a few rows at a time, per thread (see Window): a row is the copy's part
    at one position of ``axis`` (and of the slab axes before it, a convolution's batch
    index); the window index ``w`` reads the rows ``step*w + low`` .. ``+ span - 1``
    (positions in the copy, halo included), kept in ``rows`` slots, row ``r`` in slot
    ``r % rows``; or, ``ranged`` (a window over the block index, whose axis is the last),
    the task's rows in order from its first, copied all at once."""

    axis: int
    step: int
    low: int
    span: int
    rows: int
    ranged: bool = False


@dataclass(frozen=True)
class Window:
    """Copies made a window at a time instead of whole, so a plan's workspace stays within
    WINDOW_ELEMENTS per thread: a task is one value of each ``slab`` index and ``chunk``
    consecutive values of ``index`` (an outer output index: a 3-D layer's first spatial
    one; or the block index: the blocks that start in the chunk).  ``lanes_inside``: the
    rings hold fewer rows than a chunk reads, so the task runs the values in order,
    copying at each the rows it reads that the rings do not hold yet, then running every
    lane block; otherwise the task copies the chunk's rows first, then runs each lane block
    over the whole chunk (its panel stays in cache)."""

    index: sympy.Idx
    slab: tuple[sympy.Idx, ...]
    chunk: int
    lanes_inside: bool


def copy_name(array: str) -> str:
    """The C name of a plan's copy of ``array``."""
    return f"sc_copy_{array}"


@dataclass(frozen=True)
class Chunking:
    """A channel-lane plan's summation packed chunk by chunk (a single nest whose loops form a
    box): ``rows`` consecutive values of its outer loops, flattened, times ``segment`` values
    of its innermost loop per chunk, summed in chunk order into a tile per task; a task is
    one lane block, ``group`` consecutive values of the block index and one of ``parts``
    consecutive runs of the chunks, whose tiles are then added in order.  Where the packed
    read's lanes crowd one L1 set and its innermost loop's steps are neighbours, a chunk is
    packed ``pack_tile`` steps at a time, each lane's steps innermost (0: lanes innermost).
    ``transposed``: the packed read's steps are neighbours and its lanes are not (a
    channels-first grad_output), so whole vectors of lanes are packed by the register
    transposes, a vector's width of steps at a time (the rest as by ``pack_tile``).
    ``lanes``: lane blocks per task, each chunk running them in turn, each into a tile of
    its own, where the broadcast rows' steps lie apart (see _lane_set)."""

    rows: int
    segment: int
    group: int
    parts: int = 1
    pack_tile: int = 0
    transposed: bool = False
    lanes: int = 1


Plan = Scalar | OutputLanes | ReductionLanes | ChannelLanes

PLAN_KINDS = (ChannelLanes, OutputLanes, ReductionLanes)
"""The vector plans in the order they are tried: the first that fits a piece runs it."""

STAGE_CHOICES = ("staged-output", "output-in-place")
CHOICES = ("channel-lanes", "channel-lanes-1v", "channel-lanes-3v", "channel-lanes-partial",
           "channel-lanes-reordered", "output-lanes", "reduction-lanes", *STAGE_CHOICES)
"""The plans a tuner may ask a piece for by name (see :func:`options`): each vector plan
kind, channel lanes with at most one vector per register block (more rows) or three,
channel lanes over fewer channels than fill the vectors (the fallback where no vector plan
fits, e.g. a 3-channel input's gradient in channels-last layout), channel lanes with
their lane blocks in the other place (ChannelLanes.lanes_inside); and for a function's
pieces together, their output staged or stored in place whatever its size (see
:func:`staged`: whether an output stays in cache depends on the machine)."""

KIND_CHOICE = {ChannelLanes: "channel-lanes", OutputLanes: "output-lanes",
               ReductionLanes: "reduction-lanes"}
"""The choice that names each plan kind's default maker."""


# --- pieces ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def pieces(fn: IndexSum) -> tuple[Piece, ...]:
    """The output split into phases, each with normalised loop nests (see the module text).
    Remembered: each instruction set's emission, the tuner's candidates and their options
    cut the same sums."""
    whole = whole_piece(fn)
    moduli = _phase_moduli(whole.nests, fn.indices)
    if not moduli or math.prod(moduli.values()) > MAX_PHASES:
        return (whole,)
    result = []
    split = [f for f in fn.indices if f in moduli]
    for residues in _product([range(moduli[f]) for f in split]):
        mapping, indices, empty = {}, [], False
        for f in fn.indices:
            if f not in moduli:
                indices.append(f)
                continue
            m, r = moduli[f], residues[split.index(f)]
            lo, hi = index_range(f)
            count = (hi - r) // m + 1 if r <= hi else 0
            if count <= 0:
                empty = True
                break
            phase = sympy.Idx(f"sc_{f.label}_phase", (0, count - 1))
            mapping[f] = m * phase + r
            indices.append(phase)
        if empty:
            continue
        nests = []
        for term in fn.terms:
            term = _unit_steps(term.substituted(mapping))
            if term is None:
                continue
            nest = lower(_shift_bands(term, indices), indices)
            if nest is not None:
                nests.append(nest)
        note = ", ".join(f"{f.label} = {sympy.sstr(e).replace('*', '·')}"
                         for f, e in mapping.items())
        result.append(Piece(tuple(indices), tuple(mapping.get(f, f) for f in fn.indices),
                            tuple(nests), note))
    return tuple(result)


def whole_piece(fn: IndexSum) -> Piece:
    """The whole output as one piece, its nests as lowered (a stride's phases not split
    out: their tests stay in the nests)."""
    nests = (lower(term, fn.indices) for term in fn.terms)
    return Piece(fn.indices, fn.indices, tuple(n for n in nests if n is not None))


def _product(ranges):
    combos = [()]
    for values in ranges:
        combos = [c + (v,) for c in combos for v in values]
    return combos


def _phase_moduli(nests: Sequence[LoopNest], free) -> dict[sympy.Idx, int]:
    """For each free index, the modulus whose phases make every division by it exact.

    Divisions that matter: quotient indices, loop residues and modular conditions
    depending on a free index, and the bounds of a loop confined to a band narrower
    than its own range (the stride phases of an input gradient).  A bound that only
    clips a loop at the edge of an array does not: lanes mask it instead.
    """
    found: dict[sympy.Idx, int] = {}

    def need(expr):
        """Phases of each free index that make ``expr`` move by whole numbers."""
        for f, c in linear_parts(expr)[0].items():
            if f in free and sympy.Rational(c).q > 1:
                found[f] = math.lcm(found.get(f, 1), int(sympy.Rational(c).q))

    for nest in nests:
        for loop in nest.loops:
            for low, high in _bands(loop):
                need(low.num / low.den)
                need(high.num / high.den)
            if loop.step > 1:
                need(loop.residue / loop.step)
            for check in loop.checks:
                need(check.expr / check.modulus)
        for guard in nest.guards:
            if guard.modulus:
                need(guard.expr / guard.modulus)
        for access in accesses(nest.body):
            for position in access.indices:
                need(position)
    if any(m > MAX_MODULUS for m in found.values()):
        return {}
    return found


def _bands(loop) -> list[tuple[Bound, Bound]]:
    """Pairs of bounds of a loop that confine it to a band narrower than its constant range:
    the band's ends move together with the free indices."""
    constant_width = int(loop.upper[0].num) // loop.upper[0].den - \
        ceil_div(int(loop.lower[0].num), loop.lower[0].den)
    pairs = []
    for low in loop.lower[1:]:
        for high in loop.upper[1:]:
            width = sympy.expand(high.num / high.den - low.num / low.den)
            if width.is_Number and width < constant_width:
                pairs.append((low, high))
    return pairs


def _unit_steps(term: Term) -> Term | None:
    """Congruences on a single summation index alone become a change of variable
    ``u = m·u' + R`` (unit step); None if a congruence can never hold."""
    indices = list(term.indices)
    body, constraints, congruences = term.body, list(term.constraints), []
    pending = [normalize_congruence(e, m) for e, m in term.congruences]
    while pending:
        expr, modulus = pending.pop(0)
        if modulus == 1:
            continue
        coefficients, constant = linear_parts(expr)
        if not coefficients:
            if int(constant) % modulus:
                return None
            continue
        if len(coefficients) != 1 or next(iter(coefficients)) not in indices:
            congruences.append((expr, modulus))
            continue
        (u, a), = coefficients.items()
        a, constant = int(a), int(constant)
        g, step, factor = solve_congruence(a, modulus)
        if constant % g:
            return None
        residue = (factor * (constant // g)) % step
        lo, hi = index_range(u)
        count_lo, count_hi = -((residue - lo) // step), (hi - residue) // step
        if count_lo > count_hi:
            return None
        new = sympy.Idx(str(u.label), (count_lo, count_hi))
        value = step * new + residue
        indices[indices.index(u)] = new
        body, constraints, congruences = substitute({u: value}, body, constraints, congruences)
        pending = [(sympy.expand(e.xreplace({u: value})), m) for e, m in pending]
    return Term(tuple(indices), body, tuple(constraints), tuple(congruences), term.zero_outside)


def _shift_bands(term: Term, free: Sequence[sympy.Idx]) -> Term:
    """Shift each summation index confined to a band narrower than its own range,
    ``g + c1 <= u <= g + c2`` with ``g`` affine in the free indices, to ``u = g + t``."""
    free = set(free)
    indices = list(term.indices)
    body, constraints = term.body, [normalize_constraint(c) for c in term.constraints]
    congruences = list(term.congruences)
    for position, u in enumerate(list(indices)):
        lows, highs = [], []
        for c in constraints:
            coefficients, constant = linear_parts(c)
            if abs(coefficients.get(u, 0)) != 1:
                continue
            rest = sympy.expand(c - coefficients[u] * u)
            if not set(linear_parts(rest)[0]) <= free:
                continue
            (lows if coefficients[u] == 1 else highs).append(rest)
        lo, hi = index_range(u)
        best = None
        for low in lows:           # u >= -low
            for high in highs:     # u <= high
                width = sympy.expand(high + low)
                if width.is_Integer and int(width) + 1 < hi - lo + 1 and \
                        (best is None or int(width) < best[0]):
                    best = (int(width), sympy.expand(-low))
        if best is None:
            continue
        start = best[1]
        shift = sympy.expand(start - linear_parts(start)[1])       # the free-index part
        offset = int(linear_parts(start)[1])
        new = sympy.Idx(str(u.label), (offset, offset + best[0]))
        value = shift + new
        indices[position] = new
        body, constraints, congruences = substitute({u: value}, body, constraints, congruences)
        constraints = [normalize_constraint(c) for c in constraints] + [value - lo, hi - value]
    return Term(tuple(indices), body, tuple(constraints), tuple(congruences), term.zero_outside)


# --- plans -----------------------------------------------------------------------------------------

def factors(body: sympy.Expr) -> tuple[sympy.Expr, list[sympy.Indexed]] | None:
    """``(constant, [accesses])`` when the body is a constant times a product of distinct
    array reads, each to the first power; None otherwise."""
    constant, reads = sympy.Integer(1), []
    for factor in sympy.Mul.make_args(body):
        if factor.is_Number:
            constant *= factor
        elif isinstance(factor, sympy.Indexed):
            reads.append(factor)
        else:
            return None
    return (constant, reads) if reads else None


def flat_coefficients(access: sympy.Indexed) -> dict[sympy.Expr, int] | None:
    """Coefficient of each index in the access's C-order element offset (None if an index
    is a quotient)."""
    shape = [int(s) for s in access.base.shape]
    total: dict[sympy.Expr, int] = {}
    for t, position in enumerate(access.indices):
        num, den = integer_form(position)
        if den != 1:
            return None
        stride = math.prod(shape[t + 1:])
        for v, c in linear_parts(num)[0].items():
            total[v] = total.get(v, 0) + int(c) * stride
    return {v: c for v, c in total.items() if c}


def _bound_symbols(nest: LoopNest) -> set:
    symbols = set()
    for loop in nest.loops:
        for bound in (*loop.lower, *loop.upper):
            symbols |= bound.num.free_symbols
        symbols |= sympy.sympify(loop.residue).free_symbols
        for check in loop.checks:
            symbols |= check.expr.free_symbols
    for guard in nest.guards:
        symbols |= guard.expr.free_symbols
    return symbols


def plan(piece: Piece, width: int | None, registers: int = 16,
         choice: str | None = None, transposes: bool = False) -> Plan:
    """The plan for a piece, for vectors of ``width`` lanes (None: no vector unit) and a
    register file of ``registers`` vectors (accumulators get all but four of them): the
    first of PLAN_KINDS that fits, or the plan named ``choice`` (one of CHOICES) where it
    fits (a tuned choice; elsewhere the default).  ``transposes``: copies move whole
    vectors of channels by in-register transposes (float32), which makes them cheaper."""
    if width is None or not piece.nests or not piece.indices:
        return Scalar()
    makers = _makers(piece, width, registers, transposes)
    if choice is not None and choice not in STAGE_CHOICES:
        if choice not in makers:
            raise ValueError(f"unknown plan choice {choice!r}; expected one of {CHOICES}")
        chosen = makers[choice]()
        if chosen is not None:
            return chosen
    return _first_fit(makers, piece, width, registers)


def _makers(piece: Piece, width: int, registers: int, transposes: bool = False) -> dict:
    """Each named plan's maker: a function returning the plan, or None where it does not fit
    (each runs at most once: the default and a choice may name the same one)."""
    budget = registers - 4

    def lanes(most_vectors=None, min_use=MIN_LANE_USE):
        return _channel_lanes(piece, width, registers, most_vectors, min_use, transposes)
    return {name: functools.cache(maker) for name, maker in {
        "channel-lanes": lambda: lanes(),
        "channel-lanes-1v": lambda: lanes(1),
        "channel-lanes-3v": lambda: lanes(3),
        "channel-lanes-partial": lambda: lanes(min_use=PARTIAL_LANE_USE),
        "channel-lanes-reordered": lambda: _reordered(lanes(), piece.indices, width),
        "output-lanes": lambda: _output_lanes(piece, width, budget),
        "reduction-lanes": lambda: _reduction_lanes(piece, width, budget)}.items()}


def _first_fit(makers, piece: Piece, width: int, registers: int) -> Plan:
    """The default plan: the first of PLAN_KINDS whose maker fits, else channel lanes over
    too few channels to fill a vector (still several products per instruction), else the
    plain nest.  With AVX-512's register file (the estimate's fit), chunked channel lanes
    give way to reduction lanes where :func:`cycles` estimates those cheaper (a weight
    gradient, a long summation); whole channel lanes to output lanes, whose reads do not
    move with the taps, where channel lanes would store their outputs lane by lane and
    leave many lanes empty (MIN_STORED_LANE_USE: a 1x1 layer's forward into 24 channels
    in channels-first layout).  Output lanes whose vectors are
    partly empty give way to channel lanes over as full a share of their lanes: in AVX2 the
    implicit GEMM's broadcast rows beat output lanes' tested, masked ones on the six
    channels-last layers of 4-6 channels tried (4d-16's input gradient 21.4 -> 6.3 ms, a
    2-D one over 4 input channels 0.93 -> 0.36 ms, a 16 -> 4 forward 0.48 -> 0.33 ms)."""
    for kind in PLAN_KINDS:
        chosen = makers[KIND_CHOICE[kind]]()
        if chosen is not None:
            break
    else:
        partial = makers["channel-lanes-partial"]() if ChannelLanes in PLAN_KINDS else None
        return partial or Scalar()
    if isinstance(chosen, OutputLanes) and lane_use(chosen.lane, width) < 1 and \
            ChannelLanes in PLAN_KINDS:
        partial = makers["channel-lanes-partial"]()
        if partial is not None and lane_use(partial.lane, width) >= lane_use(chosen.lane, width):
            return partial
    if isinstance(chosen, ChannelLanes) and registers >= COSTED_REGISTERS:
        if chosen.chunking is not None:
            other = makers["reduction-lanes"]() if ReductionLanes in PLAN_KINDS else None
            if other is not None and cycles(piece, other, width) < cycles(piece, chosen, width):
                return other
        else:
            used = lane_use(chosen.lane, chosen.vectors * width)
            if used < MIN_STORED_LANE_USE and OutputLanes in PLAN_KINDS and \
                    piece.position[-1] != chosen.lane:
                other = makers["output-lanes"]()
                if other is not None and not _shifted(piece, other.lane) and \
                        lane_use(other.lane, width) > used:
                    return other
    return chosen


# Output lanes replace whole channel lanes that store lane by lane only where those leave
# more than this share of their lanes empty.  With their rows and stores prefetched
# (Prefetch), channel lanes ran AVX-512's 1x1 input gradient 144 -> 24 (lanes 90% used) in
# 0.41-0.53x output lanes' time, 2d-32-s2's one-tap input-gradient phases (100%) in
# 0.79-0.82x, 2d-pointwise's forward (100%) in 0.78x; that 1x1 layer's forward (24
# channels: 75%) in 1.0-1.11x (interleaved A/B, warm and with caches emptied).
MIN_STORED_LANE_USE = 0.8


def lane_use(lane, width: int) -> float:
    """The share of the vectors' lanes along ``lane`` that hold its values."""
    return extent(lane) / (ceil_div(extent(lane), width) * width)


def _shifted(piece: Piece, lane) -> bool:
    """Whether a read along ``lane`` also moves with a summation index (a kernel tap): its
    vectors then start at every offset and cross lines, which :func:`cycles` leaves out."""
    for nest in piece.nests:
        loops = {loop.index for loop in nest.loops}
        for read in factors(nest.body)[1]:
            if any(lane in p.free_symbols and p.free_symbols & loops for p in read.indices):
                return True
    return False


def options(piece: Piece, width: int | None, registers: int = 16,
            transposes: bool = False) -> list[str]:
    """The choices that give this piece a plan other than its default (what a tuner tries)."""
    if width is None or not piece.nests or not piece.indices:
        return []
    makers = _makers(piece, width, registers, transposes)
    found, seen = [], [_first_fit(makers, piece, width, registers)]
    for name, maker in makers.items():
        chosen = maker()
        if chosen is not None and chosen not in seen:
            found.append(name)
            seen.append(chosen)
    return found


MAX_LANE_STRIDE = 4   # a lane stride beyond this reads one element per cache line: not a lane


def _reads(piece: Piece):
    """Per nest: (constant, accesses, their flat coefficients), or None if any nest cannot be
    vectorised (not a product of reads, quotient indices, strided or checked loops)."""
    found = []
    for nest in piece.nests:
        split = factors(nest.body)
        if split is None or any(loop.step > 1 or loop.checks for loop in nest.loops):
            return None
        coefficients = [flat_coefficients(a) for a in split[1]]
        if any(c is None for c in coefficients):
            return None
        found.append((split[0], split[1], coefficients))
    return found


def balanced(extent: int, most: int) -> int:
    """The block size, at most ``most``, that cuts 0..extent-1 into the fewest blocks of
    nearly equal size (64 rows in blocks of at most 14: 5 blocks of 13, not 14+14+14+14+8)."""
    blocks = ceil_div(extent, most)
    return ceil_div(extent, blocks)


def _output_lanes(piece: Piece, width: int, budget: int) -> OutputLanes | None:
    """Lanes along the last free index (of more than one value), else along the last other
    one that fits (channels last, a depthwise weight gradient's channels): every read steps
    through the lanes in short strides; along the last index, a small array that does not
    is read from a copy with the lane's axis innermost (a channels-last depthwise weight)."""
    reads = _reads(piece)
    if reads is None:
        return None
    order = [u for u in reversed(piece.indices) if extent(u) > 1]
    for lane in order:
        # only the last index's lanes read copies: elsewhere a copy would stand in for the
        # partial sums of a weight gradient (ReductionLanes), unmeasured
        copies, copied = _lane_copies(piece, reads, lane) if lane == order[0] else (), piece
        if copies:
            copied = replace(piece, nests=tuple(_read_copies(n, copies) for n in piece.nests))
        chosen = _output_lanes_along(copied, _reads(copied) if copies else reads, lane, width,
                                     budget)
        if chosen is not None:
            if extent(lane) <= chosen.vectors * width:
                # one block spans the lanes: every block meets the edges, and makes the
                # masks of the taps along the lanes (a 16-lane row's input gradient);
                # elsewhere the blocks inside keep the order (the stem's input gradient
                # took 1.29x as long with those taps outermost)
                chosen = replace(chosen, nests=tuple(_lane_conditions_outermost(n, lane, True)
                                                     for n in chosen.nests))
            # a window's products run their own accumulation (vector._accumulate_window)
            finite = _finite_factors(piece, chosen.nests, lane) if chosen.window is None \
                else ()
            return replace(chosen, copies=copies, finite=finite)
    return None


FINITE_SCAN_SHARE = 16    # an array checked finite has at most 1/16 as many values as products


def _finite_factors(piece: Piece, nests: Sequence[LoopNest], lane) -> tuple[str, ...]:
    """The arrays to check finite where a masked block's lanes leave a loop's bounds (an
    input gradient's taps past grad_output's edges): each nest whose bounds or guards move
    with the lane is a product of two reads, one along the lanes, loaded as zero in the
    lanes outside, and one broadcast.  With the broadcast array finite, 0 x it adds
    nothing, so the lanes outside need no blend: the products are single FMAs (AVX2 has no
    masked FMA; its blend made three operations of each, and AVX2 input gradients of
    16-lane rows ran at 40% of peak).  None where a nest is of another form or the arrays
    are too large to scan for their use."""
    names = set()
    for nest in nests:
        if not any(lane in _loop_bound_symbols(loop) for loop in nest.loops) and \
                not any(lane in g.expr.free_symbols for g in nest.guards):
            continue
        split = factors(nest.body)
        if split is None or split[0] != 1 or len(split[1]) != 2:
            return ()
        along = [r for r in split[1] if any(lane in sympy.sympify(p).free_symbols
                                            for p in r.indices)]
        if len(along) != 1:
            return ()
        (broadcast,) = set(split[1]) - set(along)
        names.add(str(broadcast.base.label))
    shapes = {str(r.base.label): r.base.shape for n in nests for r in accesses(n.body)}
    elements = sum(math.prod(int(d) for d in shapes[name]) for name in names)
    products = math.prod(extent(i) for i in piece.indices) * depth(nests)
    return tuple(sorted(names)) if elements * FINITE_SCAN_SHARE <= products else ()


MAX_LANE_COPY = 4096      # elements: an array this small is copied with its lane axis innermost


def _lane_copies(piece: Piece, reads, lane) -> tuple[Copy, ...]:
    """Copies of the arrays read across the lanes in strides too long to load, when each is
    small, not zero-padded, and has the lane alone (coefficient 1) in one axis."""
    axes = {}
    for nest, (_, read_list, coefficients) in zip(piece.nests, reads):
        for read, c in zip(read_list, coefficients):
            if c.get(lane, 0) <= MAX_LANE_STRIDE:
                continue
            name = str(read.base.label)
            uses = [a for a, p in enumerate(read.indices) if lane in sympy.sympify(p).free_symbols]
            if name in nest.zero_outside or len(uses) != 1 or \
                    linear_parts(read.indices[uses[0]])[0] != {lane: 1} or \
                    math.prod(int(d) for d in read.base.shape) > MAX_LANE_COPY or \
                    axes.setdefault(name, uses[0]) != uses[0]:
                return ()
    return tuple(Copy(name, axis, None) for name, axis in sorted(axes.items()))


def _read_copies(nest: LoopNest, copies: Sequence[Copy]) -> LoopNest:
    """The nest reading each copied array from its copy: the same element at the moved
    axis's place (the emitter declares and fills the copy, ``c.emit_copy``)."""
    moved = {c.array: c.axis for c in copies}
    swaps = {}
    for read in accesses(nest.body):
        axis = moved.get(str(read.base.label))
        if axis is None:
            continue
        order = [a for a in range(len(read.indices)) if a != axis] + [axis]
        base = sympy.IndexedBase(copy_name(str(read.base.label)),
                                 shape=tuple(read.base.shape[a] for a in order))
        swaps[read] = base[tuple(read.indices[a] for a in order)]
    return replace(nest, body=nest.body.xreplace(swaps))


LOADED_VECTORS = 4   # vectors per block of rows that load their own: 4 x 3 rows of accumulators
MIN_LOADED_ROWS = 3  # ... and the fewest such rows: a 3-tap kernel axis shares the other read
# registers a block of rows that broadcast holds at most: its accumulators and each vector's
# load (the stem's input gradient, rows of its 3 channels along 112 positions: 7 vectors,
# 28 registers, took 1.77x the time of 5 vectors on a Zen 4, 6 vectors 1.37x, 4 1.06x)
ROW_BLOCK_REGISTERS = 20
# rows of a block whose lanes span three vectors or more: the vectors take the registers
# (the unit-stride 3-D input gradient of 8 channels over rows of 64: 4 rows of 4 vectors ran
# in 0.71-0.76x the time of 8 rows of 2 on AVX-512, Zen 4)
WIDE_BLOCK_ROWS = 4


def _output_lanes_along(piece: Piece, reads, lane, width: int, budget: int,
                        unbounded: bool = False) -> OutputLanes | None:
    extent = index_range(lane)[1] + 1
    if 2 * extent < width:    # at least half the lanes of a vector used
        return None
    if any(not 0 <= c.get(lane, 0) <= MAX_LANE_STRIDE
           for _, _, coefficients in reads for c in coefficients):
        return None
    position = piece.position[piece.indices.index(lane)]
    if linear_parts(position)[0].get(lane, 0) < 1:
        return None
    in_bounds = set().union(*(_bound_symbols(n) for n in piece.nests))
    lane_padding = set().union(*(e.free_symbols for n in piece.nests
                                 for r in accesses(n.body) if str(r.base.label) in n.zero_outside
                                 for e in in_range_exprs(r) if lane in e.free_symbols))
    candidates, loaded = [], []
    for u in piece.indices:
        if u == lane or u in in_bounds:
            continue
        uses = [c for _, _, coefficients in reads for c in coefficients if u in c]
        if uses and all(lane not in c for c in uses):
            candidates.append(u)
        elif uses and u not in lane_padding and index_range(u)[1] + 1 >= MIN_LOADED_ROWS and \
                all(c.get(lane, 1) in (1, 2) and c.get(u, 0) <= 2 * extent * c.get(lane, 1)
                    for c in uses):
            loaded.append(u)      # rows that load their own vectors from neighbouring lines
    # rows that only broadcast share each vector load; without them, rows that load their
    # own vectors still give the block enough accumulators to hide the FMA latency
    vectors_max = ceil_div(extent, width)
    nests = tuple(_lane_conditions_outermost(n, lane) for n in piece.nests)
    long = [u for u in candidates if index_range(u)[1] + 1 >= MIN_GEMM_ROWS]
    if loaded and not long:   # a depthwise layer's output rows: own loads, shared weights
        block = loaded[-1]
        rows = balanced(index_range(block)[1] + 1, budget // min(vectors_max, LOADED_VECTORS))
        return OutputLanes(lane, block, rows, max(1, min(vectors_max, budget // rows)), nests,
                           window=_window(nests, lane, block))
    if not unbounded and all(index_range(u)[1] == 0 for u in candidates):
        # no rows share a load (a depthwise input gradient's channel is one value): rows
        # that bound the taps, read as zero padding, load their own instead
        for u in reversed(piece.indices):
            if u != lane and u in in_bounds and index_range(u)[1] + 1 >= MIN_LOADED_ROWS:
                padded = replace(piece, nests=tuple(_bounds_as_padding(n, u, lane)
                                                    for n in piece.nests))
                if u not in set().union(*(_bound_symbols(n) for n in padded.nests)):
                    chosen = _output_lanes_along(padded, _reads(padded), lane, width, budget,
                                                 unbounded=True)
                    if chosen is not None and chosen.block == u:
                        bounded = {a for m, n in zip(padded.nests, piece.nests)
                                   for a in set(m.zero_outside) - set(n.zero_outside)}
                        return replace(chosen, bounded=tuple(sorted(bounded)))
    block = max(long or candidates, key=lambda u: index_range(u)[1], default=None)
    if block is None:
        return OutputLanes(lane, None, 1, min(vectors_max, budget // 3), nests)
    # rows: half the registers for blocks of one or two vectors (AVX2: 6; a stride-2 3-D
    # input gradient's 8 channels in one block of AVX-512's took 0.88-0.92x the time of two
    # blocks of 4: 3d-64-s2, 1 and 2 threads, Zen 4), WIDE_BLOCK_ROWS for wider ones
    rows = balanced(index_range(block)[1] + 1,
                    budget // 2 if vectors_max <= 2 else WIDE_BLOCK_ROWS)
    vectors = min(vectors_max, budget // rows, ROW_BLOCK_REGISTERS // (rows + 1))
    return OutputLanes(lane, block, rows, max(1, vectors), nests)


def _window(nests: Sequence[LoopNest], lane, block) -> sympy.Idx | None:
    """The innermost loop of the one nest with loops, if its bounds are constants and it
    moves the one read that uses the lane only along with the rows (in the same axes, the
    rows' step a whole multiple of the loop's, one multiple for all: a depthwise forward's
    input row i0 + k0 - 1, its input gradient's j0 - k0 + 1, a stride-2 forward's
    2*i0 + k0 - 1), no lane condition and no guard; every other read uses neither the lane
    nor the rows (the weight)."""
    looped = [n for n in nests if n.loops]
    if len(looped) != 1:
        return None
    (nest,) = looped
    inner = nest.loops[-1]
    if len(inner.lower) != 1 or len(inner.upper) != 1 or inner.lower[0].den != 1 or \
            inner.upper[0].den != 1 or not inner.lower[0].num.is_Integer or \
            not inner.upper[0].num.is_Integer or \
            any(inner.index in g.expr.free_symbols for g in nest.guards):
        return None
    v, moving = inner.index, []
    for read in factors(nest.body)[1]:
        symbols = set().union(*(sympy.sympify(p).free_symbols for p in read.indices))
        if lane not in symbols and block not in symbols:
            continue
        if lane not in symbols or block not in symbols:
            return None
        ratios = set()
        for position in read.indices:
            steps = linear_parts(sympy.expand(position))[0]
            rows, taps = steps.get(block, 0), steps.get(v, 0)
            if lane in steps and v in steps or bool(rows) != bool(taps) or rows % (taps or 1):
                return None
            if taps:
                ratios.add(rows // taps)
        if len(ratios) != 1:
            return None
        moving.append(read)
    return v if len(moving) == 1 else None


MIN_LANE_USE = 0.75       # channel lanes: the share of the panel's lanes that are real channels
PARTIAL_LANE_USE = 1 / 8  # ... where no vector plan fits: at least 2 of AVX-512's 16 lanes
MIN_GEMM_DEPTH = 16       # channel lanes: products per output element that pay for the packing
MAX_GEMM_DEPTH = 1 << 14  # ... and at most this many: a panel is the size of a weight, no more
MIN_GEMM_ROWS = 4         # ... and rows per register block: fewer leave the loads the bottleneck
WHOLE_PANEL_BYTES = 1 << 20  # ... and a panel larger than this packed whole only if
WHOLE_PANEL_USES = 1024      # ... each of its values is used this often


def _channel_lanes(piece: Piece, width: int, registers: int, most_vectors: int | None = None,
                   min_use: float = MIN_LANE_USE,
                   transposes: bool = False) -> ChannelLanes | None:
    """Channel lanes when some free index is read by one array per nest (packed), by no
    other read (broadcast), by no bound or guard, and fills the vectors.  The register
    block's rows run along the last free index when the summation is short enough to pack
    whole (a convolution's forward and input gradient); along another free index the
    broadcast reads use, with the summation packed chunk by chunk, when it is not (its
    weight gradient, a sum over every position).  A block holds ``most_vectors`` vectors of
    lanes at most; by default two, or where the lanes fill exactly three (24 channels in
    AVX2, where two would leave the second block half empty) three whole, one chunked (its
    rows then up to 13, not 3).  Measured on a 1x1 layer 144 -> 24 at 28x28: forward
    0.72 -> 0.60 ms, weight gradient 1.08 -> 0.88 ms.  The lanes must fill ``min_use`` of
    their vectors (and a whole vector at the default share).  Of several such indices the
    lanes run along the longest, unless its panel would pass WHOLE_PANEL_BYTES: then along
    the shortest.  A wav2vec-style layer's input gradient over a run-time batch, the phase
    one tap reaches, packed 4 MB of grad_output with lanes along its 2000 positions; along
    its 512 input channels it packs the weight (AVX2, 1 thread: 130 -> 98 ms)."""
    reads = _reads(piece)
    if reads is None or len(piece.indices) < 2:
        return None
    in_bounds = set().union(*(_bound_symbols(n) for n in piece.nests))
    candidates = []
    fewest = width if min_use >= MIN_LANE_USE else 2     # lanes: a whole vector, or a pair
    for lane in piece.indices:
        if lane in in_bounds or extent(lane) < fewest or lane_use(lane, width) < min_use:
            continue
        used = any(lane in c for _, _, coefficients in reads for c in coefficients)
        if used and all(_packable(nest, read_list, coefficients, lane)
                        for nest, (_, read_list, coefficients) in zip(piece.nests, reads)):
            candidates.append(lane)
    if not candidates:
        return None
    steps = depth(piece.nests)
    lane = max(candidates, key=lambda u: index_range(u)[1])
    if 4 * extent(lane) * steps > WHOLE_PANEL_BYTES:   # the panel the fewer lanes make
        lane = min(candidates, key=extent)
    lane_vectors = ceil_div(extent(lane), width)
    vectors = min(most_vectors or (3 if lane_vectors == 3 else 2), lane_vectors)
    most_rows = (registers - vectors - 2) // vectors
    block = [u for u in piece.indices if u != lane][-1]   # channels last: the row before them
    if steps < MIN_GEMM_DEPTH:
        return None
    whole = None
    outputs = math.prod(extent(i) for i in piece.indices)
    if steps <= MAX_GEMM_DEPTH and extent(block) >= MIN_GEMM_ROWS and \
            not any(g.modulus and block in g.expr.free_symbols
                    for n in piece.nests for g in n.guards):
        nests = tuple(_longest_innermost(_padding_as_bounds(n, block, piece.indices), block)
                      for n in piece.nests)
        fmas = outputs // extent(lane) * lane_vectors * steps
        rows = min(most_rows, extent(block))
        transposed = width if transposes else 0
        copies = _copies(nests, piece.indices, lane, block, fmas, rows, transposed)
        unbounded = tuple(_bounds_as_padding(n, block, lane) for n in nests)
        # not for a stride's phases: each would copy the array again (measured 1.8x slower)
        if unbounded != nests and not piece.note:
            haloed = _copies(unbounded, piece.indices, lane, block, fmas, rows, transposed)
            added = {a for n, m in zip(nests, unbounded)
                     for a in set(m.zero_outside) - set(n.zero_outside)}
            if added <= {c.array for c in haloed if c.halo}:
                nests, copies = unbounded, haloed
        whole = _lanes_inside(_windowed(ChannelLanes(lane, block, rows, vectors, nests,
                                                     copies=copies,
                                                     transposed=piece.position[-1] == block),
                                        piece.indices, width), piece.indices, width)
        # a weight (packs less than it writes), or rows long enough to fill register blocks,
        # over a panel that stays in cache or that each element of is used often: a ResNet
        # layer at 14x14 with 256 channels has a weight larger than its output (each value
        # used 1568 times); a stem's weight gradient over one image packed its grad_output
        # whole, 3.2 MB each used 147 times (14.9 ms; chunked 10.9 at a batch of 2)
        if extent(lane) * steps <= outputs or extent(block) >= most_rows and \
                (4 * extent(lane) * steps <= WHOLE_PANEL_BYTES or
                 outputs // extent(lane) >= WHOLE_PANEL_USES):
            return whole
    # chunked, the panel is packed per chunk and reused by every row: the shorter lane
    # leaves the longer index to the rows (a 1x1 layer 144 -> 24: lanes along the 24)
    for shorter in sorted(candidates, key=extent):
        shorter_vectors = ceil_div(extent(shorter), width)
        vectors = min(most_vectors or (1 if shorter_vectors == 3 else 2), shorter_vectors)
        chunked = _chunked_channel_lanes(piece, reads, shorter, vectors, vectors * width,
                                         (registers - vectors - 2) // vectors)
        if chunked is not None:
            return chunked
    return whole


L1_SETS, L1_WAYS, LINE_BYTES = 64, 8, 64    # a typical 32 KiB 8-way L1 data cache
L2_SETS, L2_WAYS = 1024, 8                   # ... and 512 KiB 8-way L2 (Zen 3; Zen 4: 2048 sets)
L2_CROWDED_WIDTH = 8                         # the widest vectors _l2_groups splits rows for


SHORT_ROWS = 32      # rows this short spend a quarter of their blocks guarded at the edges
MAX_HALO_GROWTH = 2  # a copy's zeros may at most double its array
# A copy pays where its elements number at most this share of the plan's vector FMAs: it
# costs about 2.5 cycles an element (3d-64-s2's input, 2.2M elements: 1.5 ms of a 3.8 ms
# forward) and saves at most a fifth of the products' time (3d-32's input gradient, 0.044
# elements per FMA: 22.6 -> 18.4 ms).  Measured beyond it, the plans ran faster without:
# 3d-64-s2's forward (0.31) 3.75 -> 2.53 ms, 2d-32-s2's forward (0.12) 0.88 -> 0.71 ms and
# its input gradient, whose stride phases each copy the array (0.125-0.5), 0.94 -> 0.77 ms.
# Measured again once copies moved their channels by register transposes (3d-64-s2's 8
# channels fill none): 2d-32-s2's forward still ran faster without, 0.74 vs 0.79 ms.
MAX_COPY_SHARE = 0.08
# ... and where the copy moves whole vectors of channels by register transposes (AVX2
# float32: 8 channels or more), at a fraction of that cost.  3d-64-s2's forward (0.154; its
# 8 channel planes 1 MiB apart and the taps' rows 16 KiB apart crowd L1 and L2 sets) ran
# in 0.52-0.65x the time with the copy at 1 and 2 threads, a 1x1 layer 8 x 256 x 28² -> 64
# (0.125) in 0.84-0.98x; element by element, 2d-tiny's 3 channels (0.136) took 1.08x.
MAX_TRANSPOSED_COPY_SHARE = 0.2


def _copies(nests: Sequence[LoopNest], free, lane, block, fmas: int,
            rows: int, transposed: int = 0) -> tuple[Copy, ...]:
    """The broadcast arrays read from a copy (see Copy), each at most MAX_COPY_SHARE of
    the plan's ``fmas`` elements, or MAX_TRANSPOSED_COPY_SHARE where the copy moves its
    channels by transposes of ``transposed`` x ``transposed`` (0: none) and has at least
    that many.  A zero-padded array whose padding guards the edge blocks of rows of at
    most SHORT_ROWS (14 of a ResNet's 14x14 layer: 8 in guarded blocks) gets a halo, if
    every index is an integer affine expression.  The innermost loop's axis (the
    input channels) moves innermost when that loop's index runs along one axis, not the
    last, with unit coefficient, and the array is copied for its halo or the steps crowd
    one L1 set (``_crowded``): a convolution's channel planes of 32³ or 48³ elements are a
    multiple of 4 KiB apart, so every channel's line lands in one set and each step evicts
    a line the block reads again.  An array copied for that gets its halo too."""
    found = []
    for name, mine in _broadcast_reads(nests, lane).items():
        shape = [int(d) for d in mine[0][1].base.shape]
        halo = _halo(mine, free, shape)
        short = block in set().union(*(p.free_symbols for _, r in mine for p in r.indices)) \
            and extent(block) <= SHORT_ROWS
        axis = _moved_axis(mine, shape, bool(halo and short), block, rows)
        if axis is not None or (halo and short):
            lead = LINE_BYTES // 4 if axis is not None and \
                _rows_crowd_copy(mine, shape, halo, axis, block) else 0
            copy = Copy(name, axis, halo, lead)
            share = MAX_TRANSPOSED_COPY_SHARE if transposed and axis is not None and \
                shape[axis] >= transposed else MAX_COPY_SHARE
            if math.prod(copy.shape(shape)) <= share * fmas:
                found.append(copy)
    return tuple(found)


WINDOW_ELEMENTS = 1 << 18  # a plan's rings per thread hold at most this many: 1 MiB of float32
WINDOW_TASKS = 8           # tasks a window's chunks make at least, where the outer indices allow


def _windowed(chosen: ChannelLanes, indices, width: int) -> ChannelLanes:
    """``chosen`` with its copies held in rings a window at a time (see Window): over the
    first outer index whose rings fit WINDOW_ELEMENTS, the outer indices before it each a
    slab (an axis of its own in every copy); else over the block index, every outer index
    a slab (a 1-D layer: chunks of its positions).  As it is where none fits."""
    if not chosen.copies or chosen.chunking is not None:
        return chosen
    outer = [i for i in indices if i not in (chosen.lane, chosen.block)]
    lane_blocks = ceil_div(extent(chosen.lane), chosen.vectors * width)
    for at, index in enumerate((*outer, chosen.block)):
        slab = tuple(outer[:at])
        ranged = index == chosen.block
        found = [_ring_rows(copy, chosen, indices, slab, index) for copy in chosen.copies]
        if None in found:
            continue
        pieces_per_slab = ceil_div(WINDOW_TASKS, math.prod(extent(u) for u in slab))
        chunk = ceil_div(extent(index), min(pieces_per_slab, extent(index)))
        if ranged:    # the blocks starting in a chunk read every row of it: all must fit
            room = min((WINDOW_ELEMENTS // len(found) // plane - span) // step + 1
                       for _, step, _, span, plane in found)
            chunk = min(chunk, room)
            if chunk < chosen.rows:
                continue
        rings, planes = [], []
        for axis, step, low, span, plane in found:
            whole = (chunk - 1) * step + span
            fits = whole * plane * len(found) <= WINDOW_ELEMENTS
            rows = whole if fits and (lane_blocks > 1 or ranged) else span
            rings.append(Ring(axis, step, low, span, rows, ranged))
            planes.append(rows * plane)
        if sum(planes) > WINDOW_ELEMENTS:
            continue
        lanes_inside = any(r.rows < (chunk - 1) * r.step + r.span for r in rings)
        copies = tuple(replace(c, ring=r) for c, r in zip(chosen.copies, rings))
        return replace(chosen, copies=copies, window=Window(index, slab, chunk, lanes_inside))
    return chosen


# Lane blocks run inside a task where the broadcast arrays are too large to stay in cache
# from one lane block to the next (LANES_INSIDE_ELEMENTS or more), a task's rows of them fit
# ROWS_INSIDE_BYTES (they stay in L2 while every lane block reads them) and the panels
# PANELS_INSIDE_BYTES together (each lane block's comes back from L2 for the next task).
# Measured in AVX2, lane blocks outside -> inside: a 1x1 layer 8 x 256 x 28² -> 64 (its
# 6.4 MB input read from memory once per lane block, 4 times) 9.1 -> 3.7 ms at 1 thread;
# 2d-56's input gradient 31.8 -> 28.1 ms, 16.8 -> 13.2 ms at 2.  With arrays that stay in
# cache it lost: the same layer's input gradient (1.6 MB) 1.7 -> 2.2 ms at 2 threads, the
# stem's forward (1.2 MB) 3.75 -> 4.06 ms.
LANES_INSIDE_ELEMENTS = 1 << 20
ROWS_INSIDE_BYTES = 128 << 10
PANELS_INSIDE_BYTES = 256 << 10


def _lanes_inside(chosen: ChannelLanes, indices, width: int) -> ChannelLanes:
    """``chosen`` with its lane blocks inside its tasks (see ChannelLanes.lanes_inside) where
    it has the choice (:func:`_lane_order_open`) and its broadcast arrays, a task's rows of
    them and the panels pass the limits above (4-byte elements)."""
    if not _lane_order_open(chosen, indices, width):
        return chosen
    outer = [i for i in indices if i not in (chosen.lane, chosen.block)]
    broadcast = _broadcast_elements(chosen.nests, chosen.lane)
    rows = broadcast // math.prod(extent(i) for i in outer)
    panels = ceil_div(extent(chosen.lane), chosen.vectors * width) * chosen.vectors * width * \
        depth(chosen.nests)
    if broadcast < LANES_INSIDE_ELEMENTS or 4 * rows > ROWS_INSIDE_BYTES or \
            4 * panels > PANELS_INSIDE_BYTES:
        return chosen
    return replace(chosen, lanes_inside=True)


SHORT_STORE_BYTES = 2 * LINE_BYTES   # a lane's stores per task that the hardware won't follow


def prefetched(plans, shape: Sequence[int]) -> list:
    """A function's (piece, plan) list, each channel-lane and output-lane plan with the
    Prefetch _prefetched finds for it (``shape``: the output's); but a window's (whose
    tasks copy their rows, or load them once down the taps), a chunked one's (its tasks
    pack theirs), and a stride phase's, whose next task is often the other thread's:
    2d-32-s2's input gradient took 1.02-1.04x (AVX-512) and 1.15x (AVX2) the time at 2
    threads with its phases' next rows prefetched, 0.99-1.0x at 1."""
    def takes(piece: Piece, chosen: Plan) -> bool:
        chunked = isinstance(chosen, ChannelLanes) and chosen.chunking is not None
        return isinstance(chosen, (ChannelLanes, OutputLanes)) and not piece.note and \
            not chunked and chosen.window is None
    return [(p, _prefetched(c, _around_blocks(c, p.indices), p.position, shape))
            if takes(p, c) else (p, c) for p, c in plans]


def _prefetched(chosen: ChannelLanes | OutputLanes, around: sympy.Idx | None, position,
                shape: Sequence[int]) -> ChannelLanes | OutputLanes:
    """``chosen`` with a Prefetch of the arrays it reads in place (not from a copy), a
    scalar per step (channel lanes) or a vector (output lanes), whose reads move a cache
    line or more per step of their nest's innermost loop, and along ``around`` (the loop
    around the register blocks; None: there is none) to rows no summation index reaches:
    rows that only the next task reads.  Channel lanes prefetch their output (of
    ``shape``, at ``position``) too where each lane stores a few lines of its own per
    task (SHORT_STORE_BYTES).  A 1x1 layer over 8 x 256 x 28² channels-first images reads
    256 rows 3 KiB apart per block, a few lines of each a task; its input gradient stores
    32 such rows per block.  Prefetching the next task's rows took its forward from 3.3 to
    2.0 ms and its input gradient from 3.7 to 2.7 ms (AVX-512, 1 thread, caches emptied
    between calls); its output's lines too, the input gradient from 4.1 to 2.0 ms (that
    harness with the output dirty in memory, as in the bench).  The output lanes of a 1x1
    layer 144 -> 24 (28 positions a row): its forward from 1.13 to 0.55 ms, 0.60x at 2
    threads; prefetching its output rows as well took 1.1x that.  Where a tap reaches the
    next task's rows (3x3 layers, strided or not, without a copy), the task reads them
    itself: measured, the prefetch changed nothing there.  A stem's output rows (112
    positions, 7 lines a lane) the hardware follows: prefetched, its forward took 1.09x the
    time at 2 threads (the other thread's next rows)."""
    if around is None:
        return chosen
    copied = {name for c in chosen.copies for name in (c.array, copy_name(c.array))}
    if isinstance(chosen, ChannelLanes):
        if chosen.task_copy is not None:
            copied.add(chosen.task_copy.array)
        read = _broadcast_reads(chosen.nests, chosen.lane)
    else:
        read = _vector_reads(chosen.nests, chosen.lane)
    arrays = tuple(name for name, reads in read.items() if name not in copied and
                   all(_rows_ahead(nest, access, around) for nest, access in reads))
    output = isinstance(chosen, ChannelLanes) and _short_stores(chosen, around, position, shape)
    return replace(chosen, prefetch=Prefetch(around, arrays, output)
                   if arrays or output else None)


def _short_stores(chosen: ChannelLanes, around: sympy.Idx, position,
                  shape: Sequence[int]) -> bool:
    """Whether each lane of ``chosen`` stores its own lines of the output (of ``shape``, at
    ``position``), at most SHORT_STORE_BYTES of them per task, and the next task's
    elsewhere (along ``around``)."""
    stored = flat_coefficients(sympy.IndexedBase("out", shape=tuple(shape))[tuple(position)])
    return bool(stored and stored.get(around)) and \
        4 * abs(stored.get(chosen.lane, 0)) >= LINE_BYTES and \
        4 * extent(chosen.block) * abs(stored.get(chosen.block, 0)) <= SHORT_STORE_BYTES


def _rows_ahead(nest: LoopNest, read: sympy.Indexed, around: sympy.Idx) -> bool:
    """Whether ``read`` steps a cache line or more per step of the nest's innermost loop
    and moves with ``around`` along an axis no loop of the nest moves it along."""
    coefficients = flat_coefficients(read)
    if not nest.loops or not coefficients or not coefficients.get(around):
        return False
    summed = {loop.index for loop in nest.loops}
    return 4 * abs(coefficients.get(nest.loops[-1].index, 0)) >= LINE_BYTES and \
        not any(around in p.free_symbols and p.free_symbols & summed for p in read.indices)


def _around_blocks(chosen: ChannelLanes | OutputLanes, indices) -> sympy.Idx | None:
    """The innermost loop around a plan's register blocks with more than one value (see
    channels._emit_blocks, vector.emit_output_lanes): the last such free index but the
    lane and the block; None where there is none."""
    outer = [i for i in indices if i not in (chosen.lane, chosen.block) and extent(i) > 1]
    return outer[-1] if outer else None


def _lane_order_open(chosen: ChannelLanes, indices, width: int) -> bool:
    """Whether the lane blocks may run inside the tasks or outside: several of them, outer
    indices, and neither a window (which orders its own) nor chunks."""
    return ceil_div(extent(chosen.lane), chosen.vectors * width) > 1 and \
        chosen.window is None and chosen.chunking is None and \
        any(i not in (chosen.lane, chosen.block) for i in indices)


def _reordered(chosen: ChannelLanes | None, indices, width: int) -> ChannelLanes | None:
    """``chosen`` with its lane blocks in the other place, where it has the choice: which
    pays depends on the caches, so a tuner times both."""
    if chosen is None or not _lane_order_open(chosen, indices, width):
        return None
    return replace(chosen, lanes_inside=not chosen.lanes_inside)


def _ring_rows(copy: Copy, chosen: ChannelLanes, indices, slab, index):
    """(axis, step, low, span, elements per row) of a ring of ``copy`` over the window
    ``index`` (see Ring), or None: every read's axis before the ring's (but the moved one)
    a slab index alone, the ring's axis ``step*index`` plus loop indices only, the axes
    after it free of the slab and the window index.  Over the block index the ring's axis
    must be the last (its rows are then copied as a range) and a row of the block reads
    its own rows: the span covers a whole register block's."""
    reads = _broadcast_reads(chosen.nests, chosen.lane)[copy.array]
    shape = [int(d) for d in reads[0][1].base.shape]
    halo = copy.halo or ((0, 0),) * len(shape)
    found = set()
    for nest, read in reads:
        loops = {loop.index for loop in nest.loops}
        box = nest_box(nest, indices)
        along = [a for a, p in enumerate(read.indices) if index in sympy.sympify(p).free_symbols]
        if len(along) != 1:
            return None
        axis, position = along[0], sympy.expand(read.indices[along[0]])
        num, den = integer_form(position)
        step = linear_parts(num)[0].get(index, 0)
        rest = sympy.expand(position - step * index)
        if den != 1 or step < 1 or not rest.free_symbols <= loops or \
                (axis == len(shape) - 1) != (index == chosen.block):
            return None
        for a, p in enumerate(read.indices):
            used = sympy.sympify(p).free_symbols & {index, *slab}
            if a == axis or (a == copy.axis and not used):
                continue
            if a < axis and p not in slab or a > axis and used:
                return None
        low, high = (int(v) + halo[axis][0] for v in value_range(rest, box))
        found.add((axis, int(step), low, high))
    if len({(axis, step) for axis, step, _, _ in found}) != 1:
        return None
    axis, step = next(iter(found))[:2]
    low = min(f[2] for f in found)
    span = max(f[3] for f in found) - low + 1 + \
        (step * (chosen.rows - 1) if index == chosen.block else 0)
    return axis, step, low, span, math.prod(copy.row_shape(shape, axis))


def _rows_crowd_copy(reads, shape, halo, axis: int, block) -> bool:
    """Whether consecutive rows of ``block`` read elements of a copy with ``axis`` moved
    innermost that crowd one L1 set (see _crowded), for up to 16 rows."""
    extents = [d + lo + hi for d, (lo, hi) in zip(shape, halo or [(0, 0)] * len(shape))]
    order = [a for a in range(len(shape)) if a != axis] + [axis]
    for _, read in reads:
        for a, position in enumerate(read.indices):
            step = linear_parts(sympy.expand(position))[0].get(block, 0)
            after = order[order.index(a) + 1:]
            if step and _crowded(abs(step) * math.prod(extents[b] for b in after),
                                 min(extent(block), 16)):
                return True
    return False


def _broadcast_reads(nests: Sequence[LoopNest], lane) -> dict[str, list]:
    """Per array, the (nest, read) pairs of the reads that do not use the lane."""
    found: dict[str, list] = {}
    for nest in nests:
        for read in factors(nest.body)[1]:
            if not any(lane in p.free_symbols for p in read.indices):
                found.setdefault(str(read.base.label), []).append((nest, read))
    return found


def _vector_reads(nests: Sequence[LoopNest], lane) -> dict[str, list]:
    """Per array, the (nest, read) pairs of the reads that use the lane (an output-lane
    plan's vector loads; the other reads of _broadcast_reads)."""
    found: dict[str, list] = {}
    for nest in nests:
        for read in accesses(nest.body):
            if any(lane in p.free_symbols for p in read.indices):
                found.setdefault(str(read.base.label), []).append((nest, read))
    return found


def _broadcast_elements(nests: Sequence[LoopNest], lane) -> int:
    """Elements of the arrays the nests broadcast (see _broadcast_reads), each array once."""
    return sum(math.prod(int(d) for d in reads[0][1].base.shape)
               for reads in _broadcast_reads(nests, lane).values())


def _halo(reads, free, shape) -> tuple[tuple[int, int], ...] | None:
    """Zeros before and after each axis that cover every read of a zero-padded array, or
    None (not padded, a quotient index, or the copy more than MAX_HALO_GROWTH times the
    array)."""
    halo = [[0, 0] for _ in shape]
    for nest, read in reads:
        if str(read.base.label) not in nest.zero_outside:
            return None
        if any(integer_form(p)[1] != 1 for p in read.indices):
            return None
        box = nest_box(nest, free)
        for a, (position, size) in enumerate(zip(read.indices, shape)):
            low, high = value_range(position, box)
            halo[a] = [max(halo[a][0], -low), max(halo[a][1], high - (size - 1))]
    grown = math.prod(d + lo + hi for d, (lo, hi) in zip(shape, halo))
    if not any(map(any, halo)) or grown > MAX_HALO_GROWTH * math.prod(shape):
        return None
    return tuple(map(tuple, halo))


def _moved_axis(reads, shape, always: bool, block, rows: int) -> int | None:
    """The axis the innermost loop's steps run along in an array of ``shape``, if they crowd
    it, a register block of ``rows`` values of ``block`` reads more of it per pass than L1
    holds (:func:`_block_leaves_l1`, asked once), or the array is copied ``always``."""
    leaves = None
    for nest, read in reads:
        if not nest.loops:        # a phase of a stride where one tap is left: no steps
            continue
        inner = nest.loops[-1].index
        along = [a for a, p in enumerate(read.indices) if inner in p.free_symbols]
        if len(along) != 1 or along[0] == len(shape) - 1:
            continue
        num, den = integer_form(read.indices[along[0]])
        if den != 1 or linear_parts(num)[0].get(inner) != 1:
            continue
        if always or _crowded(math.prod(shape[along[0] + 1:]), extent(inner)):
            return along[0]
        if leaves is None:
            leaves = _block_leaves_l1(reads, block, rows)
        if leaves:
            return along[0]
    return None


L1_SHARE = 0.5   # of L1's lines a register block's broadcast reads may fill: the panel's share


def _block_leaves_l1(reads, block, rows: int) -> bool:
    """Whether one register block's pass over the summation (``rows`` values of ``block``,
    every step of each nest's loops) reads more lines of the array than L1_SHARE of L1
    holds, on average per set or in any one set: the panel streams through the same sets,
    so the next block, which reads mostly the same lines, would find them evicted.  Lines
    are counted for a block whose first row reads the last element of a line.  Measured in
    AVX2 at 1 thread, read from a copy with the channels innermost instead: a wav2vec-style
    input gradient, 512 channels 1999 positions apart (512 lines a pass), 152 -> 99 ms; a
    1-D layer's 64 channels 16000 apart with 9 taps (8 sets, 16 lines deep), input
    gradient 76.6 -> 66.3 ms, forward 80.0 -> 74.6 ms."""
    lines = set()
    for nest, read in reads:
        coefficients = flat_coefficients(read)
        if coefficients is None:
            return False
        offsets = {LINE_BYTES // 4 - 1}
        steps = [(coefficients.get(loop.index, 0), extent(loop.index)) for loop in nest.loops]
        for coefficient, count in (*steps, (coefficients.get(block, 0), rows)):
            offsets = {o + coefficient * k for o in offsets for k in range(count)}
        lines |= {4 * o // LINE_BYTES for o in offsets}
    per_set = Counter(line % L1_SETS for line in lines)
    return max(len(lines) / L1_SETS, *per_set.values()) > L1_SHARE * L1_WAYS


def _crowded(stride: int, steps: int, itemsize: int = 4, ways: int = L1_WAYS,
             sets: int = L1_SETS) -> bool:
    """Whether ``steps`` reads ``stride`` elements apart put more lines into one set of a
    cache of ``sets`` sets than its ``ways`` (by default L1; float32 sizes: a float64 stride
    is twice as many bytes, as crowded)."""
    step = stride * itemsize
    if not step or step % LINE_BYTES:
        return False
    used = sets // math.gcd(step // LINE_BYTES, sets)
    return ceil_div(steps, used) > ways


def depth(nests: Sequence[LoopNest]) -> int:
    """Products per output element: the steps of every nest's loops."""
    return sum(math.prod(extent(loop.index) for loop in nest.loops) for nest in nests)


def extent(index) -> int:
    """How many values an index takes."""
    lo, hi = index_range(index)
    return hi - lo + 1


GEMM_CHUNK = 512    # summation steps packed at a time: the chunk's panel stays in L1
MIN_CHUNK = 64      # ... and at least, where the broadcast reads crowd L2 (_chunk_steps)
GEMM_TASKS = 8      # at least this many parallel tasks, where the rows allow
PACK_TILE = 16      # steps a lane packs at a time where lanes crowd: a line of float32


def _chunked_channel_lanes(piece: Piece, reads, lane, vectors: int, span: int,
                           most_rows: int) -> ChannelLanes | None:
    """Channel lanes over a long summation: one nest whose loops form a box, cut into chunks
    of about GEMM_CHUNK steps packed one at a time; the rows run along the longest free
    index that only the broadcast reads use and no condition does."""
    if len(piece.nests) != 1:
        return None
    nest = piece.nests[0]
    loops = {loop.index for loop in nest.loops}
    if not nest.loops or any(_loop_bound_symbols(loop) & loops for loop in nest.loops):
        return None
    (_, read_list, coefficients), = reads
    packed = [c for c in coefficients if lane in c]
    if nest.loops[-1].index not in packed[0]:
        return None
    copies: tuple[Copy, ...] = ()
    options = _row_options(piece, nest, read_list, coefficients, lane, packed[0])
    if not options:
        # a zero-padded broadcast array read from a copy with a zero halo needs no test, so
        # the rows may run along a kernel axis (a 7x7 stem's weight gradient: 3 channels)
        copies = _halo_copies(piece, nest, read_list, lane)
        nest = replace(nest, zero_outside=tuple(a for a in nest.zero_outside
                                                if a not in {c.array for c in copies}))
        options = _row_options(piece, nest, read_list, coefficients, lane, packed[0])
    if not options:
        return None
    block = max(options, key=lambda u: (extent(u), piece.indices.index(u)))   # ties: inner
    rows = balanced(extent(block), most_rows)
    inner = extent(nest.loops[-1].index)
    steps = _chunk_steps(coefficients, packed[0], nest.loops[-1].index)
    segment = min(inner, steps)
    chunk_rows = max(1, steps // inner) if inner < steps else 1
    blocks = ceil_div(extent(block), rows)
    lane_blocks = ceil_div(extent(lane), span)
    # more tasks than lane blocks: the summation split into parts (each task's tile added up
    # in order after), else the rows into groups, each of which packs the same chunks again
    # (2d-56's weight gradient, three groups -> four parts: 21.2 -> 17.8 ms at 1 thread)
    chunks = ceil_div(math.prod(extent(loop.index) for loop in nest.loops[:-1]), chunk_rows) \
        * ceil_div(inner, segment)
    l2_groups = _l2_groups(coefficients, packed[0], block, span // vectors)
    lanes = _lane_set(steps, lane_blocks, _broadcast_elements([nest], lane))
    if lanes == 1:
        parts = max(1, min(ceil_div(GEMM_TASKS, lane_blocks), chunks))
        groups = min(blocks, max(ceil_div(GEMM_TASKS, lane_blocks * parts), l2_groups))
    else:
        # rows in groups whose tiles, one per lane block of the task, fit TILE_ELEMENTS;
        # the summation in parts only where that leaves too few tasks
        row_tile = lanes * span * math.prod(extent(u) for u in piece.indices
                                            if u not in (lane, block))
        most = max(rows, TILE_ELEMENTS // row_tile // rows * rows)
        groups = min(blocks, max(ceil_div(extent(block), most), l2_groups))
        sets = ceil_div(lane_blocks, lanes)
        parts = max(1, min(ceil_div(GEMM_TASKS, sets * groups), chunks))
    group = rows * ceil_div(blocks, groups)
    # lanes innermost, a 3-D layer's grad_output lanes (channel planes 128 KiB apart) all
    # fell in one L1 set: a quarter of 3d-32's weight gradient went to packing
    lane_stride = packed[0][lane]
    neighbours = packed[0].get(nest.loops[-1].index) == 1
    pack_tile = PACK_TILE if neighbours and _crowded(lane_stride, span) else 0
    read = next(r for r, c in zip(read_list, coefficients) if c is packed[0])
    transposed = neighbours and lane_stride != 1 and factors(nest.body)[0] == 1 and \
        str(read.base.label) not in nest.zero_outside
    chunking = Chunking(chunk_rows, segment, group, parts, pack_tile, transposed, lanes)
    return ChannelLanes(lane, block, rows, vectors,
                        (_padding_as_bounds(nest, block, piece.indices),), chunking, copies)


def _chunk_steps(coefficients, packed, index) -> int:
    """Summation steps per chunk: GEMM_CHUNK, halved (down to MIN_CHUNK) while a broadcast
    read's steps along ``index`` fill more than half the ways of the L2 sets they fall in:
    every register block reads the chunk's lines of it again, and crowded out, from L3.  A
    channels-last input of 512 channels at stride 2 (rows 4 KiB apart, in 16 sets) gets 64
    steps: wav2vec-k3-s2's channels-last weight gradient took 0.70-0.88x the time at 1
    thread, 0.70-0.79x at 2 (AVX2, Zen 3); resnet-14's (256 channels, 256 steps)
    0.90-0.93x."""
    steps = GEMM_CHUNK
    for coefficient in (c.get(index, 0) for c in coefficients if c is not packed):
        while steps > MIN_CHUNK and \
                _crowded(abs(coefficient), steps, ways=L2_WAYS // 2, sets=L2_SETS):
            steps //= 2
    return steps


LANE_SET = 8                # lane blocks a task runs chunk by chunk (see _lane_set) ...
TILE_ELEMENTS = 1 << 16     # ... their tiles at most: 256 KiB of float32 per thread


def _lane_set(steps: int, lane_blocks: int, broadcast_elements: int) -> int:
    """Lane blocks per task of a chunked plan (Chunking.lanes).  Where a broadcast read's
    steps crowd L2 (_chunk_steps cut the chunk) and its arrays are too large to stay in
    cache (LANES_INSIDE_ELEMENTS), each lane-block task read every chunk's rows from memory
    again, lines 1-4 KiB apart; LANE_SET lane blocks then share each chunk's rows while they
    are in L2.  AVX2, Zen 3, by median of 11 with the caches emptied before each call (as
    the bench's other kernels leave them), 1 and 2 threads: wav2vec-k3-s2's channels-last
    weight gradient (a 16 MB input, 32 lane blocks) 0.60-0.70x the time, 2d-pointwise's
    (6.4 MB) 0.52-0.82x; resnet-14's (1.6 MB, which L3 holds) ran 1.06-1.13x."""
    if steps >= GEMM_CHUNK or broadcast_elements < LANES_INSIDE_ELEMENTS:
        return 1
    return min(lane_blocks, LANE_SET)


def _l2_groups(coefficients, packed, block, width: int) -> int:
    """Groups of rows a chunked plan needs so that one group's broadcast rows do not crowd an
    L2 set: rows a multiple of L2_SETS lines apart (3-D channel planes of 32^3 floats, 128
    KiB) all fall in one set, and more of them than its ways are read from L3 again for every
    register block.  3d-32's weight gradient in AVX2 (Zen 3), 16 channels in one group ->
    two: 46 -> 86 GFLOP/s at 1 thread (32x32x24, planes 96 KiB apart in two sets, ran at 92
    in one).  Vectors of 8 lanes only: AVX-512's 16 lanes per broadcast ran the one group at
    87-92% of peak (Zen 4), and the cost model then prefers its reduction lanes unmeasured."""
    stride = max((abs(c.get(block, 0)) for c in coefficients if c is not packed), default=0)
    if width > L2_CROWDED_WIDTH or \
            not _crowded(stride, extent(block), ways=L2_WAYS, sets=L2_SETS):
        return 1
    return ceil_div(extent(block), L2_WAYS)


def _row_options(piece: Piece, nest: LoopNest, read_list, coefficients, lane, packed):
    """The free indices a chunked plan's rows may run along: not the lane, not read by the
    packed read, read by some other, in no condition, at least MIN_GEMM_ROWS long."""
    conditions = set(_bound_symbols(nest))
    for read in read_list:
        if str(read.base.label) in nest.zero_outside:
            for expr in in_range_exprs(read, nest_box(nest, piece.indices)):
                conditions |= expr.free_symbols
    return [u for u in piece.indices if u != lane and u not in packed
            and u not in conditions and any(u in c for c in coefficients)
            and extent(u) >= MIN_GEMM_ROWS]


def _halo_copies(piece: Piece, nest: LoopNest, read_list, lane) -> tuple[Copy, ...]:
    """A copy with a zero halo of each zero-padded array the lane does not index."""
    indexed = {str(r.base.label) for r in read_list
               if any(lane in p.free_symbols for p in r.indices)}
    copies = []
    for name, mine in _broadcast_reads([nest], lane).items():
        if name in nest.zero_outside and name not in indexed:
            halo = _halo(mine, piece.indices, [int(d) for d in mine[0][1].base.shape])
            if halo is not None:
                copies.append(Copy(name, None, halo))
    return tuple(copies)


def in_range_exprs(access: sympy.Indexed, box=None) -> list[sympy.Expr]:
    """Affine expressions, all >= 0 exactly when every index of the access is in range
    (with a box: only those that can fail somewhere in it)."""
    exprs = []
    for position, extent in zip(access.indices, access.base.shape):
        num = integer_form(position)[0]
        for expr in (num, int(extent) - 1 - num):
            if box is None or value_range(expr, box)[0] < 0:
                exprs.append(expr)
    return exprs


def _padding_as_bounds(nest: LoopNest, block, free) -> LoopNest:
    """Where a zero-padded read leaves its array because a loop index runs past an edge (the
    innermost loop of the condition; the condition not on the rows' index), that loop stops
    at the edge instead of testing each step: the products beyond it are zero."""
    depth_of = {loop.index: d for d, loop in enumerate(nest.loops)}
    box = nest_box(nest, free)
    added = {loop.index: ([], []) for loop in nest.loops}
    for read in accesses(nest.body):
        if str(read.base.label) not in nest.zero_outside:
            continue
        for expr in in_range_exprs(read, box):
            inner = [v for v in expr.free_symbols if v in depth_of]
            if block in expr.free_symbols or not inner:
                continue
            v = max(inner, key=depth_of.get)
            added[v][int(linear_parts(expr)[0][v]) < 0].append(_as_bound(expr, v))
    loops = tuple(replace(loop, lower=loop.lower + tuple(added[loop.index][0]),
                          upper=loop.upper + tuple(added[loop.index][1]))
                  for loop in nest.loops)
    return replace(nest, loops=loops)


def _bounds_as_padding(nest: LoopNest, block, lane) -> LoopNest:
    """The reverse of _padding_as_bounds for the loop bounds that depend on the rows' index:
    where such a bound only keeps a read inside its array along an axis the lanes do not
    run (an input gradient's taps stop at grad_output's edges), drop it and read the array
    as zero outside instead.  Channel lanes take this form only when the array is then
    copied with a zero halo, so that no row of a block needs a test; output lanes test the
    rows of the blocks at the edges only (vector.block_runs)."""
    sides = []
    for read in accesses(nest.body):
        if any(integer_form(p)[1] != 1 for p in read.indices):
            continue
        sides += [(expr, str(read.base.label)) for expr in in_range_exprs(read)
                  if lane not in expr.free_symbols]
    padded, loops = set(nest.zero_outside), []
    for loop in nest.loops:
        kept = []
        for bounds, sign in ((loop.lower, 1), (loop.upper, -1)):
            mine = [bounds[0]]
            for b in bounds[1:]:
                expr = sign * (b.den * loop.index - b.num)      # >= 0 inside the bound
                name = next((name for side, name in sides
                             if block in b.num.free_symbols and _same_side(expr, side,
                                                                          loop.index)), None)
                if name is None:
                    mine.append(b)
                else:
                    padded.add(name)
            kept.append(tuple(mine))
        loops.append(replace(loop, lower=kept[0], upper=kept[1]))
    if padded == set(nest.zero_outside):
        return nest
    return replace(nest, loops=tuple(loops),
                   zero_outside=tuple(nest.zero_outside) + tuple(sorted(padded - set(
                       nest.zero_outside))))


def _same_side(expr, side, index) -> bool:
    """Whether ``expr >= 0`` and ``side >= 0`` are one condition (a positive multiple)."""
    a, b = linear_parts(expr)[0].get(index, 0), linear_parts(side)[0].get(index, 0)
    return a * b > 0 and sympy.expand(expr * b - side * a) == 0


def _as_bound(expr, v) -> Bound:
    """``expr >= 0`` as a bound on ``v``: a lower one ``v >= ceil(-rest / a)`` for a positive
    coefficient ``a``, an upper one ``v <= floor(rest / -a)`` for a negative one."""
    a = int(linear_parts(expr)[0][v])
    rest = sympy.expand(expr - a * v)
    return Bound(-rest, a) if a > 0 else Bound(rest, -a)


def padding_bound(expr, nest: LoopNest) -> bool:
    """Whether ``expr >= 0`` is one of the nest's loop bounds (see _padding_as_bounds)."""
    for loop in nest.loops:
        a = linear_parts(expr)[0].get(loop.index, 0)
        if a and _as_bound(expr, loop.index) in (loop.lower if a > 0 else loop.upper):
            return True
    return False


def _longest_innermost(nest: LoopNest, block) -> LoopNest:
    """The nest with its longest loop moved innermost, if no other loop's bounds use it and its
    own use no loop or the block's rows: the register block's inner loop then runs long (a
    convolution's input channels, not its 3 taps), its loop overhead spread over more
    steps.  The summation order changes, not the sum."""
    indices = {loop.index for loop in nest.loops}
    movable = [loop for loop in nest.loops
               if not (_loop_bound_symbols(loop) & (indices | {block}))
               and not any(loop.index in _loop_bound_symbols(other) for other in nest.loops)]
    if not movable:
        return nest
    longest = max(movable, key=lambda loop: extent(loop.index))
    loops = tuple(loop for loop in nest.loops if loop is not longest) + (longest,)
    return replace(nest, loops=loops)


def _loop_bound_symbols(loop) -> set:
    return set().union(*(b.num.free_symbols for b in (*loop.lower, *loop.upper)))


def _packable(nest: LoopNest, read_list, coefficients, lane) -> bool:
    """Whether at most one read of a nest uses ``lane``, that read depends on nothing but the
    lane, the nest's loops and indices of one value (a 1x1 kernel's: the packing puts it
    in) and is not zero-padded, and no other read uses the lane."""
    loops = {loop.index for loop in nest.loops}
    users = [(read, c) for read, c in zip(read_list, coefficients) if lane in c]
    if len(users) > 1:
        return False
    if users:
        read, c = users[0]
        if any(extent(u) > 1 for u in set(c) - loops - {lane}) or \
                str(read.base.label) in nest.zero_outside:
            return False
    return True


def _lane_conditions_outermost(nest: LoopNest, lane, bounds: bool = False) -> LoopNest:
    """Move the loops that appear beside the lane index in a zero-padded read outermost, and
    with ``bounds`` those whose bounds move with the lane, where no bound forbids it: a
    masked block then makes their masks once for all inner steps.  The summation order
    changes, not the sum."""
    padded = [a for a in accesses(nest.body) if str(a.base.label) in nest.zero_outside]
    wanted = {loop.index for loop in nest.loops
              if bounds and lane in _loop_bound_symbols(loop)}
    for access in padded:
        for position in access.indices:
            symbols = sympy.sympify(position).free_symbols
            if lane in symbols:
                wanted |= symbols
    order = sorted(nest.loops, key=lambda loop: loop.index not in wanted)
    seen = set()
    for loop in order:
        used = set().union(*(b.num.free_symbols for b in (*loop.lower, *loop.upper)))
        if used & ({l.index for l in nest.loops} - seen - {loop.index}):
            return nest
        seen.add(loop.index)
    return LoopNest(nest.guards, tuple(order), nest.body, nest.zero_outside)


def _reduction_lanes(piece: Piece, width: int, budget: int) -> ReductionLanes | None:
    if len(piece.nests) != 1:
        return None
    nest = piece.nests[0]
    reads = _reads(piece)
    if not nest.loops or reads is None:
        return None
    lane = nest.loops[-1].index
    lo, hi = index_range(lane)
    (_, reads_, coefficients), = reads
    if any(len(loop.lower) > 1 or len(loop.upper) > 1 for loop in nest.loops[:-1]):
        return None    # the outer summation loops must be a box, to be cut into chunks
    if 2 * (hi - lo + 1) < width or any(not 0 <= c.get(lane, 0) <= MAX_LANE_STRIDE
                                  for c in coefficients):
        return None
    in_bounds = _bound_symbols(nest)
    blocks, taken, strided = [], set(), []
    # a block per read along an index no other read uses, where each read has one; else,
    # with 32 registers, both along the indices of one read (a depthwise weight gradient:
    # grad_output's other index, its channel, is one value; the input's taps down and
    # along the rows, each task all nine taps: mbv2-dw-s2 1.41 -> 0.85 ms at 1 thread,
    # where AVX2's 16 registers ran 2d-depthwise's 1.4x slower)
    by_read = sorted(zip(reads_, coefficients), key=lambda rc: -len(rc[1]))
    for _ in range(2 if budget >= 28 else 1):
        for read, c in by_read:
            options = [u for u in piece.indices if u in c and u not in in_bounds and
                       u not in taken and extent(u) > 1 and
                       not any(u in other for other in coefficients if other is not c)]
            if options and len(blocks) < 2:
                u = max(options, key=lambda v: index_range(v)[1])
                blocks.append(u)
                taken.add(u)
                strided.append(c.get(lane, 0) > 1)
    if not blocks:
        return None
    sizes = [index_range(u)[1] + 1 for u in blocks]
    side = 3 if budget < 16 else 4          # 3x3 fits 16 registers without spills, 4x4 32
    if len(blocks) == 1:
        rows = [balanced(sizes[0], 2 * side)]
    else:
        # a strided read costs two loads and a permute per vector: with 32 registers, its
        # vectors each feed 6 accumulators (4x6), the unit-stride operand's 4
        most = [side, side]
        if budget >= 28 and strided[0] != strided[1]:
            most[strided.index(False)] = side + 2
        rows = [balanced(size, m) for size, m in zip(sizes, most)]
    return ReductionLanes(lane, tuple(zip(blocks, rows)))


# --- a function's pieces together -----------------------------------------------------------------

@dataclass(frozen=True)
class Arrangement:
    """How a sum's output is computed: its pieces in order, each with the plan it runs
    (staged, run together: see arrange), and the outer loops they share, inside one set of
    which they run one after another, threaded by ``split`` (empty: each piece runs its own
    loops, threaded by its plan's split)."""

    plans: tuple[tuple[Piece, Plan], ...] = ()
    shared: tuple[sympy.Idx, ...] = ()
    split: Split | None = None

    @property
    def work(self) -> int:
        """Loop iterations of every piece together (see work)."""
        return sum(work(p.nests, p.indices) for p, _ in self.plans)


PARALLEL_WORK = 1 << 19  # loop iterations below which threads cost more than they save
# Dynamic-schedule chunks per parallel loop, about: enough that a thread left alone takes
# over the rest in sixteenths, few enough that each thread runs long stretches of
# neighbouring tasks, whose rows, lines and prefetches are each other's.  From 64 to 16, at
# 2 threads (interleaved A/B, AVX-512, results bit-identical): 2d-32-s2's input gradient
# 0.83-0.85x the time, 2d-pointwise's forward 0.82-0.84x, mbv2-project's forward 0.84-0.86x
# and input gradient 0.73-0.75x, mbv2-dw-s2's weight gradient 0.92x; the dense layers,
# with fewer tasks than 64, unchanged.
PARALLEL_GRAIN = 16
MOVE_COST = 8            # loop iterations an element moved into a panel or a copy costs, about


def work(nests: Sequence[LoopNest], indices: Sequence[sympy.Idx]) -> int:
    """Loop iterations of a piece, counting every loop over its full index range."""
    per_element = sum(math.prod(hi - lo + 1 for lo, hi in
                                (index_range(loop.index) for loop in nest.loops))
                      for nest in nests)
    return math.prod(hi - lo + 1 for lo, hi in map(index_range, indices)) * max(per_element, 1)


@dataclass(frozen=True)
class Split:
    """How a loop nest goes to threads: its outermost loops ``over`` ((name, extent) each,
    outermost first), collapsed into one range of tasks that threads take dynamically,
    ``grain`` at a time (about PARALLEL_GRAIN chunks: when another process holds a core, the
    other thread takes over the remaining chunks instead of waiting for it); ``threaded``:
    the nest's work pays for threads (PARALLEL_WORK), else it runs on the calling thread
    (unless the caller threads a run-time batch's item, see BatchPlan).  Which thread runs a
    task never changes a value."""

    over: tuple[tuple[str, int], ...]
    threaded: bool

    @property
    def loops(self) -> int:
        return len(self.over)

    @property
    def tasks(self) -> int:
        return math.prod(count for _, count in self.over)

    @property
    def grain(self) -> int:
        return max(1, self.tasks // PARALLEL_GRAIN)


def split(over: Sequence[tuple[str, int]], work: int) -> Split:
    """The Split of loops ``over`` whose nest takes ``work`` loop iterations."""
    return Split(tuple(over), work >= PARALLEL_WORK and len(over) > 0)


def loops_split(indices: Sequence[sympy.Idx], work: int) -> Split:
    """The Split over loops of these piece indices (a nest's outermost ones)."""
    return split([(str(i.label), extent(i)) for i in indices], work)


def move_split(over: Sequence[tuple[str, int]], elements: int) -> Split:
    """The Split of a pack or a copy of ``elements`` elements over its loops ``over``."""
    return split(over, MOVE_COST * elements)


def task_split(piece: Piece, chosen: Plan, width: int | None) -> Split:
    """How a piece's plan goes to threads where it runs its own loops: the tasks its
    emitter's outermost loops make.  Channel lanes: a lane block (of ``width``-lane vectors)
    times the other outer indices (or those alone, ``lanes_inside``); a window's slab and
    chunks; a chunked summation's lane blocks, groups of rows and parts.  Output lanes: the
    indices outside their blocks; reduction lanes: those and the blocks."""
    if isinstance(chosen, OutputLanes):
        return loops_split([i for i in piece.indices if i not in (chosen.lane, chosen.block)],
                           work(chosen.nests, piece.indices))
    total = work(piece.nests, piece.indices)
    if isinstance(chosen, ReductionLanes):
        blocked = dict(chosen.blocks)
        return split([(str(i.label), extent(i)) for i in piece.indices if i not in blocked] +
                     [(f"{u.label} block", ceil_div(index_range(u)[1] + 1, rows))
                      for u, rows in chosen.blocks], total)
    if not isinstance(chosen, ChannelLanes):
        return loops_split(piece.indices, total)
    lane_blocks = ("lane block", ceil_div(extent(chosen.lane), chosen.vectors * width))
    if chosen.chunking is not None:
        chunking = chosen.chunking
        if chunking.lanes > 1:
            lane_blocks = (f"set of {chunking.lanes} lane blocks",
                           ceil_div(lane_blocks[1], chunking.lanes))
        groups = (f"group of {chosen.block.label}", ceil_div(extent(chosen.block),
                                                              chunking.group))
        return split([lane_blocks, groups] + ([("part", chunking.parts)]
                                              if chunking.parts > 1 else []), total)
    if chosen.window is not None:
        window = chosen.window
        return split([(str(u.label), extent(u)) for u in window.slab] +
                     [(f"chunk of {window.index.label}",
                       ceil_div(extent(window.index), window.chunk))], total)
    outer = [(str(i.label), extent(i)) for i in piece.indices
             if i not in (chosen.lane, chosen.block)]
    return split(([] if chosen.lanes_inside else [lane_blocks]) + outer, total)


@dataclass(frozen=True)
class BatchPlan:
    """How a function over a run-time batch runs its item sum.  A map (``maps``: each item
    writes its own part of the output) runs its items side by side; ``staged`` is the
    arrangement of a copy of the item that stages its output, run where the batch makes the
    output too large for the cache (None: no such copy).  A sum over the batch runs
    ``summed``: "threaded" (an item too small to thread alone: a copy of it threading inside
    itself, run once the whole batch is work enough), "whole" (the chunks run over every
    item in turn, see sums_batch_itself), "adding" (each item after the first adds its sums
    into the output) or "scratch" (each item after the first through a scratch array, added
    after it)."""

    maps: bool
    summed: str = ""
    staged: Arrangement | None = None


def sums_batch_itself(plans) -> bool:
    """Whether a sum over a run-time batch can run its pieces over the whole batch in one
    call: every plan chunked channel lanes without copies, whose chunks then run over every
    item in turn, each task's tile summing the whole batch before it is stored once
    (resnet-14's weight gradient, against its items adding theirs: 23.5 -> 20.2 ms)."""
    return all(isinstance(c, ChannelLanes) and c.chunking is not None and not c.copies
               for _, c in plans)


def adds_into_output(chosen: Plan) -> bool:
    """Whether a plan's emitter can add its sums to the output instead of storing them."""
    return isinstance(chosen, Scalar) or \
        isinstance(chosen, ChannelLanes) and chosen.chunking is not None


def batch_plan(fn: IndexSum, arrangement: Arrangement, maps: bool, width: int | None,
               registers: int = 16, choice: str | None = None,
               transposes: bool = False) -> BatchPlan:
    """The BatchPlan of a function whose item sum ``fn`` runs by ``arrangement``."""
    plans = arrangement.plans
    if maps:
        # a large batch makes the output too large for the cache, which one item is not
        staged = choice is None and "staged-output" in stage_options(plans, fn.output.shape)
        return BatchPlan(True, staged=arrange(fn, width, registers, "staged-output",
                                              transposes)
                         if staged else None)
    if arrangement.work < PARALLEL_WORK:
        return BatchPlan(False, "threaded")
    if sums_batch_itself(plans):
        return BatchPlan(False, "whole")
    # adding: through a scratch array, resnet-14's 2.4 MB weight gradient was read and
    # written twice more per item
    return BatchPlan(False, "adding" if all(adds_into_output(c) for _, c in plans)
                     else "scratch")


def arrange(fn: IndexSum, width: int | None, registers: int = 16,
            choice: str | None = None, transposes: bool = False) -> Arrangement:
    """Every piece of ``fn``'s output with its plan (see plan; ``choice`` where it fits),
    the output staged where it pays (staged), the stride phases inside the loops they share
    (run_together), the rows prefetched where the hardware would not (prefetched), and how
    each goes to threads (Split): all a C printer needs to decide."""
    plans = staged([(piece, plan(piece, width, registers, choice, transposes))
                    for piece in pieces(fn)], fn.output.shape, choice)
    plans = prefetched(run_together(plans), fn.output.shape)
    shared = shared_loops(plans)
    if shared:
        together = Arrangement(tuple(plans), shared)
        return replace(together, split=loops_split(shared, together.work))
    return Arrangement(tuple((p, replace(c, split=task_split(p, c, width))) for p, c in plans))


def shared_loops(plans) -> tuple:
    """The leading indices over which every piece of a sum loops outside its register
    blocks, where the pieces are stride phases that all run output lanes or all run channel
    lanes (without copies): the phases then run one after another for each value of them.
    Run whole one after another, each phase brought every line of the output from memory
    again, each filling only every other element of it:
    - a stride-2 depthwise input gradient's four phases, output lanes (mbv2-dw-s2 in the
      bench, its arrays out of cache: 2.9 -> 1.6 ms at 1 thread);
    - a stride-2 3-D input gradient's eight phases, channel lanes (3d-64-s2, 8 channels,
      each phase reading the 2 MB output gradient again: 1.3-1.5x faster at 1 thread and
      1.3-1.8x at 2 on a loaded machine, even at 1 thread on a quiet one; its channels-last
      layout and the stem's 1.05-1.2x, 2d-32-s2's channels-last 0.98-1.1x; interleaved A/B);
    - the same gradient over AVX-512's output lanes (rows of the 8 channels in each register
      block) and the stem's input gradient (rows of its 3 channels): 0.79-0.93x the time at
      1 thread, 0.68-0.95x at 2, and the stem 0.91-0.98x (AVX2 0.85x, 0.74x) on a Zen 4.
    Channel lanes' lane blocks, and output lanes' blocks of rows where every phase blocks
    the same index, run inside the shared loops (ChannelLanes.lanes_inside)."""
    if len(plans) < 2:
        return ()
    if all(isinstance(c, OutputLanes) and not c.copies for _, c in plans):
        blocks = {c.block for _, c in plans}
        skipped = blocks if len(blocks) == 1 else set()
    elif all(_channel_lanes_alone(c) and c.lane == plans[0][1].lane for _, c in plans):
        skipped = {plans[0][1].lane}
    else:
        return ()
    shared = []
    own = [[i for i in p.indices if i not in skipped] for p, _ in plans]
    for column in zip(*own):
        if any(i != column[0] for i in column) or \
                any(column[0] in (c.lane, c.block) for _, c in plans):
            break
        shared.append(column[0])
    # too few tasks to thread (3d-64-s2's input gradient in output lanes, when it shared its
    # batch of 1 alone: at 2 threads 2.8 ms shared, 1.44 ms with each phase threading its own)
    if math.prod(extent(i) for i in shared) < GEMM_TASKS:
        return ()
    return tuple(shared)


def _channel_lanes_alone(chosen: Plan) -> bool:
    """A channel-lane plan that packs its panels and nothing else: no copies, no window of
    them, no chunks of the summation (what can run inside another piece's loops)."""
    return isinstance(chosen, ChannelLanes) and not chosen.copies and chosen.window is None \
        and chosen.chunking is None


def run_together(plans) -> list:
    """The plans of a sum's pieces as they run: channel-lane phases inside the loops they
    share (shared_loops) run their lane blocks inside them (ChannelLanes.lanes_inside).
    Phases that would share them but for the copies some read drop those copies first:
    a phase's copy only moves the channels innermost (no halo: the reads keep their
    bounds), against crowded L1 sets, and the shared loops keep the lines in cache anyway
    (2d-32-s2's input gradient, whose odd-odd phase copied grad_output: 1.03 -> 0.97 ms at
    1 thread, 0.74 -> 0.69 at 2).  Where an array's planes crowd a cache set, each task
    reads the part it needs from a copy instead (see _task_copy)."""
    bare = [(p, replace(c, copies=(), window=None))
            if isinstance(c, ChannelLanes) and c.chunking is None and
            all(k.halo is None for k in c.copies) else (p, c) for p, c in plans]
    shared = shared_loops(bare)
    if not shared or not isinstance(bare[0][1], ChannelLanes):
        return plans
    copy = _task_copy(bare, shared)
    return [(p, replace(c, lanes_inside=True, task_copy=copy)) for p, c in bare]


TASK_COPY_ELEMENTS = 4096   # a task's part of an array copied per task: 16 KiB of float32


def _task_copy(plans, shared) -> TaskCopy | None:
    """The copy per task (TaskCopy) of the broadcast array whose summation steps crowd one
    cache set in every phase.  A channels-first output gradient of 32³ positions has its
    channel planes 128 KiB apart: the 16 that each step of a 3d-64-s2 input gradient
    reads share one L1 set and one L2 set, so every block fetched them again; in the copy
    they lie 512 bytes apart (that pass 7.4 -> 5.0 ms at 1 thread, 3.9 -> 2.7 at 2;
    2d-32-s2's, 64 planes 1 KiB apart, 0.9-1.1x; interleaved A/B, best times).  None
    where a position along an axis is one shared index plus something other than loop
    offsets, or two shared indices, or the part exceeds TASK_COPY_ELEMENTS."""
    lane, names, reads = plans[0][1].lane, None, []
    for _, chosen in plans:
        mine = _broadcast_reads(chosen.nests, lane)
        crowded = {name for name, pairs in mine.items() if _steps_crowd(pairs)}
        names = crowded if names is None else names & crowded
        reads.append(mine)
    if len(names) != 1:
        return None
    (name,) = names
    pairs = [pair for mine in reads for pair in mine[name]]
    shape = [int(d) for d in pairs[0][1].base.shape]
    axes = []
    for a, size in enumerate(shape):
        found = {s for _, read in pairs for s in shared
                 if s in sympy.sympify(read.indices[a]).free_symbols}
        if not found:
            axes.append((None, 0, size))
            continue
        if len(found) > 1 or a == len(shape) - 1:      # (rows copy whole)
            return None
        (index,) = found
        ranges = []
        for nest, read in pairs:
            rest = sympy.expand(read.indices[a] - index)
            if not rest.free_symbols <= {loop.index for loop in nest.loops}:
                return None
            ranges.append(value_range(rest, nest_box(nest, ())))
        low = min(lo for lo, _ in ranges)
        axes.append((index, low, max(hi for _, hi in ranges) - low + 1))
    copy = TaskCopy(name, tuple(axes))
    return copy if math.prod(copy.shape) <= TASK_COPY_ELEMENTS else None


def in_task_copy(read: sympy.Indexed, copy: TaskCopy) -> sympy.Indexed:
    """``read`` as a read of the task's copy: positions from its axes' origins."""
    base = sympy.IndexedBase(copy_name(copy.array), shape=copy.shape)
    return base[tuple(sympy.expand(p - (index or 0) - low)
                      for p, (index, low, _) in zip(read.indices, copy.axes))]


def _steps_crowd(pairs) -> bool:
    """Whether the steps of a nest's loop read an array's elements a multiple of 4 KiB
    apart, more than one L1 set holds (see _crowded), in any of the (nest, read) pairs."""
    for nest, read in pairs:
        steps = flat_coefficients(read) or {}
        if any(_crowded(abs(steps.get(loop.index, 0)), extent(loop.index))
               for loop in nest.loops):
            return True
    return False


STAGE_ELEMENTS = 4096       # a task's output staged in L1 at most: 16 KiB of float32
STREAM_ELEMENTS = 3 << 20   # outputs this large (12 MiB of float32) are streamed out


def staged(plans, shape: Sequence[int], choice: str | None = None) -> list:
    """A function's (piece, plan) list with each task's output staged (see Stage) where the
    output has STREAM_ELEMENTS or more (or whatever its size, by the ``choice``
    "staged-output"; never, by "output-in-place"), every piece runs output lanes without
    copies, and the tasks (the shared loops of stride phases, or a lone piece's loops
    outside its blocks) fix the output's leading axes, leaving at most STAGE_ELEMENTS to
    each.  A
    stride-2 depthwise input gradient (mbv2-dw-s2: 8 x 144 x 56 x 56, its four phases each
    storing every other element of a plane) took 2.3 ms at 1 thread, 1.1 ms staged.  An
    output that stays in cache between calls loses by it: the same layer at a batch of 4
    (7.2 MB) went 0.39 -> 0.58 ms, a 2 MB stride-1 depthwise forward 0.11 -> 0.21 ms; so
    the threshold, about what a core can count on of a 32 MiB L3 shared with others."""
    large = math.prod(shape) >= STREAM_ELEMENTS
    if not (large or choice == "staged-output") or choice == "output-in-place" or \
            not all(isinstance(c, OutputLanes) and not c.copies for _, c in plans):
        return plans
    shared = shared_loops(plans)
    if len(plans) > 1 and not shared:
        return plans
    for piece, chosen in plans:
        task = shared or tuple(i for i in piece.indices if i not in (chosen.lane, chosen.block))
        if piece.indices[:len(task)] != task or piece.position[:len(task)] != task:
            return plans
    elements = math.prod(shape[len(task):])
    if elements > STAGE_ELEMENTS:
        return plans
    return [(p, replace(c, stage=Stage(len(task), elements))) for p, c in plans]


def stage_options(plans, shape: Sequence[int]) -> list[str]:
    """The choice that stages a function's output where its default does not, or stores it
    in place where the default stages it; none where the pieces cannot be staged."""
    default = staged(plans, shape)
    if default is not plans:
        return ["output-in-place"]
    return ["staged-output"] if staged(plans, shape, "staged-output") is not plans else []


# --- cost model --------------------------------------------------------------------------------
# Cycles per piece, in units of one vector FMA.  For the two plans of a long summation (a
# weight gradient): the FMAs (empty lanes included), one cycle per vector loaded or broadcast
# beside each, and what each plan adds (packing; the final lane sums).  Fitted to timings of
# the bench's weight gradients on an AMD Zen 4 (AVX-512, 32 registers), once chunked channel
# lanes packed each chunk once per lane block: the estimate picks reduction lanes for the
# 1x1 layer 144 -> 24 (0.53 vs 0.68 ms at 1 thread), channel lanes for the rest (1d-audio
# 45.5 vs 51.8 ms, unet3d-48 62.4 vs 69.1, 2d-pointwise 2.26 vs 2.65, the 3-D layers of
# 16 -> 32 channels 2% faster at 1 thread and 7-9% at 2).  For whole channel lanes against output
# lanes (forward, input gradient): the FMAs with their empty lanes and channel lanes' tile
# store; both reach 85-95% of peak on dense layers there, so the loads are left out.  With
# AVX2's 16 registers reduction lanes' 3x3 blocks ran 1.4-2.2x slower than channel lanes on
# the five layers tried, where this estimate called them even: it is used with
# COSTED_REGISTERS or more only.

COSTED_REGISTERS = 32
LOAD_CYCLES = 1.0         # per vector loaded or scalar broadcast, per FMA it feeds
STRIDED_LOAD = 6.0        # ... a stride-2 load: two loads and a permute, lines crossed
SPLIT_LOAD = 1.75         # ... a load shifted off the vectors: most cross a line
PACK_CYCLES = 1.0         # per element a chunked channel-lane plan packs (a scalar copy)
HSUM_CYCLES = 8.0         # per output: a reduction-lane tile added up across its lanes


def cycles(piece: Piece, chosen: Plan, width: int) -> float:
    """Estimated cycles of ``chosen`` on ``piece``, chunked channel lanes or reduction
    lanes (a single nest): the vector FMAs and the memory operations of the register
    blocks, plus the packing of channel lanes (each task packs its own chunks) or the final
    lane sums of reduction lanes."""
    chunked = isinstance(chosen, ChannelLanes) and chosen.chunking is not None
    if not chunked and not isinstance(chosen, ReductionLanes):
        raise TypeError(f"no cost estimate for {type(chosen).__name__}")
    (_, _, coefficients), = _reads(piece)
    outputs = math.prod(extent(u) for u in piece.indices)
    steps = depth(piece.nests)
    if chunked:
        span = chosen.vectors * width
        lane_blocks = ceil_div(extent(chosen.lane), span)
        fmas = outputs * steps / extent(chosen.lane) * lane_blocks * chosen.vectors
        per_fma = (chosen.vectors + chosen.rows) / (chosen.vectors * chosen.rows)
        tasks = ceil_div(extent(chosen.block), chosen.chunking.group)
        return fmas * (1 + LOAD_CYCLES * per_fma) + \
            PACK_CYCLES * steps * span * lane_blocks * tasks
    fmas = outputs * steps / extent(chosen.lane) * ceil_div(extent(chosen.lane), width)
    rows = dict(chosen.blocks)
    loads = sum(_load_cycles(c, chosen.lane, width) * math.prod(rows.get(u, 1) for u in c)
                for c in coefficients)
    per_fma = loads / math.prod(rows.values())
    return fmas * (1 + LOAD_CYCLES * per_fma) + HSUM_CYCLES * outputs


def _load_cycles(coefficients: dict, lane, width: int) -> float:
    """Cost of one vector load along ``lane`` of a read with these flat coefficients (1 a
    load): stride-2 lanes STRIDED_LOAD, lanes that another index shifts by other than whole
    vectors (a weight gradient's input, shifted by the tap) SPLIT_LOAD, as most such loads
    cross a line."""
    if coefficients.get(lane, 0) > 1:
        return STRIDED_LOAD
    if any(u != lane and c % width for u, c in coefficients.items()):
        return SPLIT_LOAD
    return 1.0


def describe(piece: Piece, chosen: Plan) -> str:
    """One line for the C comment above a piece (and explain): its plan, then its threads
    where it runs its own loops."""
    text = _describe_plan(piece, chosen)
    return text if chosen.split is None else f"{text}; {describe_split(chosen.split)}"


def describe_split(split: Split) -> str:
    """How a Split's loops go to threads, in words."""
    if not split.loops:
        return "one thread"
    tasks = " x ".join(_loop_count(name, count) for name, count in split.over)
    if not split.threaded:
        return f"one thread: too little work to split over {tasks}"
    return f"threads take {split.tasks} tasks ({tasks}) {split.grain} at a time"


def _loop_count(name: str, count: int) -> str:
    """'8 i_n', '1 lane block', '4 groups of i_c': a count of a Split's loop values (an
    index label, or a noun)."""
    if "_" in name and " " not in name:
        return f"{count} {name}"
    noun, of, rest = name.partition(" of ")
    return f"{_count(count, noun)}{of}{rest}"


def _describe_plan(piece: Piece, chosen: Plan) -> str:
    where = f"phase {piece.note}: " if piece.note else ""
    if isinstance(chosen, ChannelLanes):
        chunks = chosen.chunking
        packed = "" if chunks is None else \
            f" packed {chunks.rows * chunks.segment} summation steps at a time" + \
            (f", the summation in {chunks.parts} parts" if chunks.parts > 1 else "") + \
            (f", {chunks.lanes} lane blocks per task in turn" if chunks.lanes > 1 else "")
        extra = "".join(f"; {c.array} copied" + (f" with axis {c.axis} innermost"
                                                  if c.axis is not None else "")
                        + (" with a zero halo" if c.halo else "")
                        + (f", {c.ring.rows} row{'s' * (c.ring.rows > 1)} of axis "
                           f"{c.ring.axis} at a time per thread" if c.ring else "")
                        for c in chosen.copies)
        window = chosen.window
        if chosen.lanes_inside:
            extra += "; every lane block in each task"
        extra += _describe_prefetch(chosen.prefetch)
        if chosen.task_copy is not None:
            extra += (f"; each task's part of {chosen.task_copy.array} "
                      f"({' x '.join(map(str, chosen.task_copy.shape))}) copied first")
        if window is not None:
            extra += (f"; tasks of {window.chunk} {window.index.label}, rows copied "
                      + (f"as each {window.index.label} comes" if window.lanes_inside
                         else "first"))
        return (f"{where}implicit GEMM: vector lanes along {chosen.lane.label} (panels of "
                f"{_count(chosen.vectors, 'vector')}{packed}), {_count(chosen.rows, 'row')} of "
                f"{chosen.block.label} "
                f"broadcast per register block{extra}")
    if isinstance(chosen, OutputLanes):
        rows = f", {_count(chosen.rows, 'row')} of {chosen.block.label}" \
            if chosen.block is not None else ""
        if chosen.window is not None:
            rows += f" sharing their loads over {chosen.window.label}"
        copied = "".join(f"; {c.array} copied with axis {c.axis} innermost"
                         for c in chosen.copies)
        if chosen.stage is not None:
            copied += (f"; each task's {chosen.stage.elements} outputs staged in L1 and "
                       f"streamed out")
        if chosen.finite:
            copied += f"; {', '.join(chosen.finite)} checked finite, edge products fused"
        copied += _describe_prefetch(chosen.prefetch)
        return (f"{where}vector lanes along {chosen.lane.label} "
                f"({_count(chosen.vectors, 'vector')}"
                f"{rows} per register block{copied})")
    if isinstance(chosen, ReductionLanes):
        rows = " x ".join(f"{rows} {u.label}" for u, rows in chosen.blocks)
        return f"{where}partial sums in lanes along {chosen.lane.label}, blocks of {rows}"
    return f"{where}scalar loops"


def _describe_prefetch(prefetch: Prefetch | None) -> str:
    if prefetch is None:
        return ""
    ahead = [*prefetch.arrays, *(["the output"] * prefetch.output)]
    return f"; the next {prefetch.index.label}'s rows of {' and '.join(ahead)} prefetched"


BATCH_RUNS = {
    "threaded": "each item threading inside itself once the whole batch is work enough",
    "whole": "the chunks running over every item in turn, each tile summing the batch",
    "adding": "each item after the first adding its sums into the output",
    "scratch": "each item after the first through a scratch array, added after it"}


def _count(number: int, noun: str) -> str:
    """'1 vector', '2 vectors'."""
    return f"{number} {noun}{'s' * (number != 1)}"


def describe_batch(plan: BatchPlan) -> str:
    """One line for how a function runs over its run-time batch."""
    if plan.maps:
        return ("over a run-time batch: the items side by side" +
                ("; an item copy staging its output where the batch's output is too large "
                 "for the cache" if plan.staged is not None else ""))
    return f"over a run-time batch: the items summed in order, {BATCH_RUNS[plan.summed]}"


def describe_shared(arrangement: Arrangement) -> str | None:
    """One line for the loops a sum's pieces share (Arrangement.shared), None if none."""
    if not arrangement.shared:
        return None
    loops = ", ".join(str(index.label) for index in arrangement.shared)
    return (f"the {len(arrangement.plans)} phases share their loops over {loops}: each task "
            f"(one value of them) runs every phase in turn; {describe_split(arrangement.split)}")
