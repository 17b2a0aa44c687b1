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

2. **Plans.**  Each piece gets one of three plans, chosen from its access
   patterns:

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
for any number of threads.  This module knows nothing about convolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import sympy

from ..symbolic.affine import (ceil_div, linear_parts, integer_form, normalize_congruence,
                               normalize_constraint, solve_congruence, substitute)
from ..symbolic.ir import IndexSum, Term, accesses, index_range
from ..symbolic.lowering import Bound, LoopNest, lower

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
    """The loop nest as it is."""


@dataclass(frozen=True)
class OutputLanes:
    """Lanes along ``lane`` (a piece index), ``rows`` values of ``block`` per register block,
    ``vectors`` vectors of lanes per block; ``nests`` are the piece's nests with the loops
    that decide which lanes read inside a zero-padded array moved outermost, so their lane
    masks are computed once for all inner iterations."""

    lane: sympy.Idx
    block: sympy.Idx | None
    rows: int
    vectors: int
    nests: tuple[LoopNest, ...] = ()


@dataclass(frozen=True)
class ReductionLanes:
    """Lanes along the innermost loop ``lane``; ``blocks`` are (piece index, rows) pairs
    register-blocked around it (at most two)."""

    lane: sympy.Idx
    blocks: tuple[tuple[sympy.Idx, int], ...]


Plan = Scalar | OutputLanes | ReductionLanes


# --- pieces ----------------------------------------------------------------------------------------

def pieces(fn: IndexSum) -> list[Piece]:
    """The output split into phases, each with normalised loop nests (see the module text)."""
    whole = [lower(term, fn.indices) for term in fn.terms]
    moduli = _phase_moduli([n for n in whole if n is not None], fn.indices)
    if not moduli or math.prod(moduli.values()) > MAX_PHASES:
        return [Piece(fn.indices, fn.indices, tuple(n for n in whole if n is not None))]
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
    return result


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


def plan(piece: Piece, width: int | None, registers: int = 16) -> Plan:
    """The plan for a piece, for vectors of ``width`` lanes (None: no vector unit) and a
    register file of ``registers`` vectors (accumulators get all but four of them)."""
    if width is None or not piece.nests or not piece.indices:
        return Scalar()
    budget = registers - 4
    return (_output_lanes(piece, width, budget) or _reduction_lanes(piece, width, budget)
            or Scalar())


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
    lane = piece.indices[-1]
    extent = index_range(lane)[1] + 1
    reads = _reads(piece)
    if 2 * extent < width or reads is None:    # at least half the lanes of a vector used
        return None
    if any(not 0 <= c.get(lane, 0) <= MAX_LANE_STRIDE
           for _, _, coefficients in reads for c in coefficients):
        return None
    position = piece.position[-1]
    if linear_parts(position)[0].get(lane, 0) < 1:
        return None
    in_bounds = set().union(*(_bound_symbols(n) for n in piece.nests))
    candidates = []
    for u in piece.indices[:-1]:
        if u in in_bounds:
            continue
        uses = [c for _, _, coefficients in reads for c in coefficients if u in c]
        if uses and all(lane not in c for c in uses):
            candidates.append(u)
    block = max(candidates, key=lambda u: index_range(u)[1], default=None)
    vectors_max = ceil_div(extent, width)
    nests = tuple(_lane_conditions_outermost(n, lane) for n in piece.nests)
    if block is None:
        return OutputLanes(lane, None, 1, min(vectors_max, budget // 3), nests)
    rows = balanced(index_range(block)[1] + 1, 4 if vectors_max >= 3 else 6)
    return OutputLanes(lane, block, rows, max(1, min(vectors_max, budget // rows)), nests)


def _lane_conditions_outermost(nest: LoopNest, lane) -> LoopNest:
    """Move the loops that appear beside the lane index in a zero-padded read outermost
    (the summation order changes, not the sum), where no bound forbids it."""
    padded = [a for a in accesses(nest.body) if str(a.base.label) in nest.zero_outside]
    wanted = set()
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
    for read, c in sorted(zip(reads_, coefficients), key=lambda rc: -len(rc[1])):
        options = [u for u in piece.indices if u in c and u not in in_bounds and u not in taken
                   and not any(u in other for other in coefficients if other is not c)]
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


def describe(piece: Piece, chosen: Plan) -> str:
    """One line for the C comment above a piece."""
    where = f"phase {piece.note}: " if piece.note else ""
    if isinstance(chosen, OutputLanes):
        rows = f", {chosen.rows} rows of {chosen.block.label}" if chosen.block is not None else ""
        return (f"{where}vector lanes along {chosen.lane.label} ({chosen.vectors} vectors"
                f"{rows} per register block)")
    if isinstance(chosen, ReductionLanes):
        rows = " x ".join(f"{rows} {u.label}" for u, rows in chosen.blocks)
        return f"{where}partial sums in lanes along {chosen.lane.label}, blocks of {rows}"
    return f"{where}scalar loops"
