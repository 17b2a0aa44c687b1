"""IR -> C: one function per index sum, loops with every extent a constant of the spec.

Each output element is computed by its own gather: the free indices are the
outer loops, each term adds its loop nest into a register accumulator, and
the element is written once.  Loop bounds are the lowered ``max(ceil)`` /
``min(floor)`` expressions, evaluated with floor division that is correct
for negative numerators; strided loops start on their residue.  The text is
deterministic: the same sums give byte-identical C.
"""

from __future__ import annotations

import keyword
import math
import re
from dataclasses import dataclass
from typing import Sequence

import sympy
from sympy.codegen.ast import float32, float64, real
from sympy.printing.c import C99CodePrinter

from . import schedule
from .ir import (Array, Bound, Condition, IndexSum, IRError, LoopNest, accesses, index_range,
                 integer_form, linear_parts, nest_box, to_text, value_range)

C_TYPES = {"float32": "float", "float64": "double"}

PRELUDE = """\
#include <stdint.h>
#include <math.h>

/* Integer helpers for loop bounds: b > 0, a may be negative. */
static inline int64_t sc_floordiv(int64_t a, int64_t b) { int64_t q = a / b; return q - ((a % b) < 0); }
static inline int64_t sc_ceildiv(int64_t a, int64_t b) { return -sc_floordiv(-a, b); }
static inline int64_t sc_mod(int64_t a, int64_t b) { int64_t r = a % b; return r < 0 ? r + b : r; }
static inline int64_t sc_max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t sc_min(int64_t a, int64_t b) { return a < b ? a : b; }
"""

_C_RESERVED = {
    "auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else", "enum",
    "extern", "float", "for", "goto", "if", "inline", "int", "long", "register", "restrict",
    "return", "short", "signed", "sizeof", "static", "struct", "switch", "typedef", "union",
    "unsigned", "void", "volatile", "while", "int64_t", "bool",
}


@dataclass(frozen=True)
class CFunction:
    """A generated C function: ``symbol(inputs..., output)``, all arrays of one dtype."""

    name: str
    symbol: str
    inputs: tuple[Array, ...]
    output: Array
    declaration: str


@dataclass(frozen=True)
class CSource:
    text: str
    functions: tuple[CFunction, ...]

    @property
    def cdef(self) -> str:
        """Declarations for cffi."""
        return "\n".join(f.declaration for f in self.functions) + "\n"


def _check_name(name: str, what: str) -> str:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or name in _C_RESERVED \
            or keyword.iskeyword(name) or name.startswith("sc_"):
        raise IRError(f"{what} name {name!r} cannot be used in C (letters, digits and _, starting "
                      f"with a letter; not a C keyword; not starting with sc_)")
    return name


def c_affine(expr) -> str:
    """An integer-valued affine expression; a quotient is exact, so C's division is right."""
    num, den = integer_form(expr)
    text = _IntPrinter().doprint(num)
    return text if den == 1 else f"({text}) / {den}"


class _IntPrinter(C99CodePrinter):
    def _print_Idx(self, expr):
        return str(expr.label)


def flat_offset(access: sympy.Indexed) -> str:
    """C-order offset of an access, its integer parts folded into one affine expression."""
    shape = [int(s) for s in access.base.shape]
    strides = [math.prod(shape[t + 1:]) for t in range(len(shape))]
    whole, quotients = sympy.Integer(0), []
    for stride, position in zip(strides, access.indices):
        num, den = integer_form(position)
        if den == 1:
            whole += stride * num
        else:
            quotients.append(f"{stride}*({c_affine(position)})" if stride != 1 else
                             c_affine(position))
    parts = [] if whole == 0 and quotients else [c_affine(sympy.expand(whole))]
    return " + ".join(parts + quotients)


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


class _BodyPrinter(C99CodePrinter):
    """Array reads as flat loads (zero-padded arrays guarded); small powers as products."""

    def __init__(self, dtype: str, padded: dict | None = None):
        super().__init__({"type_aliases": {real: float32 if dtype == "float32" else float64}})
        self.padded = padded or {}

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


def _fold(parts: list[str], name: str) -> str:
    text = parts[0]
    for part in parts[1:]:
        text = f"{name}({text}, {part})"
    return text


def _bound(bounds: Sequence[Bound], is_lower: bool) -> str:
    parts = []
    for b in bounds:
        num = c_affine(b.num)
        if b.den == 1:
            parts.append(num)
        else:
            parts.append(f"sc_{'ceildiv' if is_lower else 'floordiv'}({num}, {b.den})")
    return _fold(parts, "sc_max" if is_lower else "sc_min")


def _condition(condition: Condition) -> str:
    expr = c_affine(condition.expr)
    if condition.modulus == 0:
        return f"{expr} >= 0"
    return f"sc_mod({expr}, {condition.modulus}) == 0"


class _Writer:
    def __init__(self):
        self.lines: list[str] = []
        self.depth = 0

    def line(self, text: str = "") -> None:
        self.lines.append("    " * self.depth + text if text else "")

    def open(self, text: str = "") -> None:
        self.line(f"{text} {{" if text else "{")
        self.depth += 1

    def close(self) -> None:
        self.depth -= 1
        self.line("}")


def _emit_nest(out: _Writer, nest: LoopNest, body: str) -> None:
    opened = 0
    if nest.guards:
        out.open(f"if ({' && '.join(f'({_condition(g)})' for g in nest.guards)})")
        opened += 1
    for loop in nest.loops:
        var = _check_name(str(loop.index.label), "index")
        low, high = _bound(loop.lower, True), _bound(loop.upper, False)
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
            out.open(f"if ({' && '.join(f'({_condition(c)})' for c in loop.checks)})")
            opened += 1
    out.line(f"sc_acc += {body};")
    for _ in range(opened):
        out.close()


PARALLEL_WORK = 1 << 19  # loop iterations below which threads cost more than they save
PARALLEL_GRAIN = 64      # dynamic-schedule chunks per parallel loop, about


def _work(nests: Sequence[LoopNest], indices: Sequence[sympy.Idx]) -> int:
    """Loop iterations of a piece, counting every loop over its full index range."""
    per_element = sum(math.prod(hi - lo + 1 for lo, hi in
                                (index_range(loop.index) for loop in nest.loops))
                      for nest in nests)
    return math.prod(hi - lo + 1 for lo, hi in map(index_range, indices)) * max(per_element, 1)


def _schedule(iterations: int) -> str:
    """Dynamic scheduling in about PARALLEL_GRAIN chunks: when another process holds a core,
    the other thread takes over the remaining chunks instead of waiting for it.  Which thread
    computes an element never changes its value."""
    return f"schedule(dynamic, {max(1, iterations // PARALLEL_GRAIN)})"


def _parallel(out: _Writer, loops: Sequence[sympy.Idx], work: int) -> None:
    """Threads over ``loops``, the outermost loops of a piece."""
    if work >= PARALLEL_WORK and loops:
        iterations = math.prod(index_range(i)[1] - index_range(i)[0] + 1 for i in loops)
        out.line(f"#pragma omp parallel for collapse({len(loops)}) {_schedule(iterations)} "
                 f"num_threads(sc_threads)")


def _output_offset(fn: IndexSum, piece: schedule.Piece) -> sympy.Expr:
    """C-order offset of the output element a piece computes, in the piece's indices."""
    shape = fn.output.shape
    return sympy.expand(sum(math.prod(shape[t + 1:]) * p for t, p in enumerate(piece.position)))


def _emit_scalar_piece(out: _Writer, fn: IndexSum, piece: schedule.Piece, dtype: str) -> None:
    """The plain nest: one accumulator per output element, terms added in order."""
    _parallel(out, piece.indices, _work(piece.nests, piece.indices))
    for idx in piece.indices:
        var = _check_name(str(idx.label), "index")
        lo, hi = index_range(idx)
        out.open(f"for (int64_t {var} = {lo}; {var} <= {hi}; ++{var})")
    out.line(f"{C_TYPES[dtype]} sc_acc = 0;")
    for nest in piece.nests:
        box = nest_box(nest, piece.indices)
        padded = {a: outside_checks(a, box) for a in accesses(nest.body)
                  if str(a.base.label) in nest.zero_outside}
        _emit_nest(out, nest, _BodyPrinter(dtype, padded).doprint(nest.body))
    out.line(f"{fn.output.name}[{c_affine(_output_offset(fn, piece))}] = sc_acc;")
    for _ in piece.indices:
        out.close()


# --- vector code (AVX2 + FMA, or AVX-512) ------------------------------------------------------

SIMD_PRELUDE = {
    "avx2": """\
#include <immintrin.h>

static inline float sc_hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
static inline double sc_hsum_pd(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
/* Every other element, p[0], p[2], ...: two loads and a shuffle instead of a gather; the
   second load stops at the last element used, so nothing past it is read. */
static inline __m256 sc_load2_ps(const float *p) {
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256 a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), even);
    const __m256 b = _mm256_permutevar8x32_ps(
        _mm256_maskload_ps(p + 8, _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, -1, 0)), even);
    return _mm256_permute2f128_ps(a, b, 0x20);
}
static inline __m256d sc_load2_pd(const double *p) {
    const __m256d a = _mm256_loadu_pd(p);
    const __m256d b = _mm256_maskload_pd(p + 4, _mm256_setr_epi64x(-1, -1, -1, 0));
    return _mm256_permute4x64_pd(_mm256_unpacklo_pd(a, b), 0xD8);
}
/* The same under a lane mask: each lane's mask is spread onto the element it reads, so
   masked lanes read nothing and come out 0. */
static inline __m256 sc_load2m_ps(const float *p, __m256i mask) {
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256i odd_off = _mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0);
    const __m256i lo = _mm256_and_si256(odd_off, _mm256_permutevar8x32_epi32(
        mask, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)));
    const __m256i hi = _mm256_and_si256(odd_off, _mm256_permutevar8x32_epi32(
        mask, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)));
    const __m256 a = _mm256_permutevar8x32_ps(_mm256_maskload_ps(p, lo), even);
    const __m256 b = _mm256_permutevar8x32_ps(_mm256_maskload_ps(p + 8, hi), even);
    return _mm256_permute2f128_ps(a, b, 0x20);
}
static inline __m256d sc_load2m_pd(const double *p, __m256i mask) {
    const __m256i odd_off = _mm256_setr_epi64x(-1, 0, -1, 0);
    const __m256i lo = _mm256_and_si256(odd_off, _mm256_permute4x64_epi64(mask, 0x50));
    const __m256i hi = _mm256_and_si256(odd_off, _mm256_permute4x64_epi64(mask, 0xFA));
    const __m256d a = _mm256_maskload_pd(p, lo);
    const __m256d b = _mm256_maskload_pd(p + 4, hi);
    return _mm256_permute4x64_pd(_mm256_unpacklo_pd(a, b), 0xD8);
}
""",
    "avx512": """\
#include <immintrin.h>

/* Every other element, p[0], p[2], ...: two loads and one two-source permute; the second
   load stops at the last element used, so nothing past it is read. */
static inline __m512 sc_load2_ps(const float *p) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    return _mm512_permutex2var_ps(_mm512_loadu_ps(p), even,
                                  _mm512_maskz_loadu_ps((__mmask16)0x7FFF, p + 16));
}
static inline __m512d sc_load2_pd(const double *p) {
    const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    return _mm512_permutex2var_pd(_mm512_loadu_pd(p), even,
                                  _mm512_maskz_loadu_pd((__mmask8)0x7F, p + 8));
}
/* The same under a lane mask: bit q of the mask moves to bit 2q of the elements' mask
   (pdep), so masked lanes read nothing and come out 0. */
static inline __m512 sc_load2m_ps(const float *p, __mmask16 mask) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    const uint32_t spread = _pdep_u32(mask, 0x55555555u);
    return _mm512_permutex2var_ps(_mm512_maskz_loadu_ps((__mmask16)spread, p), even,
                                  _mm512_maskz_loadu_ps((__mmask16)(spread >> 16), p + 16));
}
static inline __m512d sc_load2m_pd(const double *p, __mmask8 mask) {
    const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    const uint32_t spread = _pdep_u32(mask, 0x5555u);
    return _mm512_permutex2var_pd(_mm512_maskz_loadu_pd((__mmask8)spread, p), even,
                                  _mm512_maskz_loadu_pd((__mmask8)(spread >> 8), p + 8));
}
""",
}


@dataclass(frozen=True)
class Simd:
    """Vector spellings for one instruction set and element type.  AVX2: 8 floats or 4
    doubles, masks are integer vectors with all bits set in active lanes.  AVX-512: 16 floats
    or 8 doubles, masks are k-registers (one bit per lane)."""

    isa: str      # "avx2" or "avx512"
    dtype: str

    @property
    def wide(self) -> bool:
        return self.isa == "avx512"

    @property
    def width(self) -> int:
        return (16 if self.wide else 8) if self.dtype == "float32" else (8 if self.wide else 4)

    @property
    def registers(self) -> int:
        return 32 if self.wide else 16

    @property
    def _p(self) -> str:
        return "_mm512" if self.wide else "_mm256"

    @property
    def vec(self) -> str:
        base = "__m512" if self.wide else "__m256"
        return base if self.dtype == "float32" else base + "d"

    @property
    def mask(self) -> str:
        if self.wide:
            return "__mmask16" if self.dtype == "float32" else "__mmask8"
        return "__m256i"

    @property
    def sfx(self) -> str:
        return "ps" if self.dtype == "float32" else "pd"

    @property
    def _epi(self) -> str:
        return "epi32" if self.dtype == "float32" else "epi64"

    def zero(self) -> str:
        return f"{self._p}_setzero_{self.sfx}()"

    def set1(self, x: str) -> str:
        return f"{self._p}_set1_{self.sfx}({x})"

    def load(self, pointer: str, stride: int, mask: str | None) -> str:
        """Lanes at pointer[0], pointer[stride], ...; masked lanes read as 0 (not read)."""
        p, sfx = self._p, self.sfx
        if stride == 1:
            if mask is None:
                return f"{p}_loadu_{sfx}({pointer})"
            return (f"{p}_maskz_loadu_{sfx}({mask}, {pointer})" if self.wide else
                    f"{p}_maskload_{sfx}({pointer}, {mask})")
        if stride == 2:
            return (f"sc_load2_{sfx}({pointer})" if mask is None else
                    f"sc_load2m_{sfx}({pointer}, {mask})")
        scale, index = self._scale, self._offsets(stride)
        if self.wide:
            return (f"{p}_i32gather_{sfx}({index}, {pointer}, {scale})" if mask is None else
                    f"{p}_mask_i32gather_{sfx}({self.zero()}, {mask}, {index}, {pointer}, "
                    f"{scale})")
        if mask is None:
            return f"{p}_i32gather_{sfx}({pointer}, {index}, {scale})"
        return (f"{p}_mask_i32gather_{sfx}({self.zero()}, {pointer}, {index}, "
                f"_mm256_castsi256_{sfx}({mask}), {scale})")

    @property
    def _scale(self) -> int:
        """Bytes per element, the scale of gathers and scatters."""
        return 4 if self.dtype == "float32" else 8

    def _offsets(self, stride: int) -> str:
        """32-bit element offsets 0, stride, 2·stride, ... for a gather."""
        values = ", ".join(str(stride * i) for i in range(self.width))
        if self.width == 16:
            return f"_mm512_setr_epi32({values})"
        return f"_mm256_setr_epi32({values})" if self.width == 8 else f"_mm_setr_epi32({values})"

    def fma(self, a: str, b: str, c: str) -> str:
        return f"{self._p}_fmadd_{self.sfx}({a}, {b}, {c})"

    def mul(self, a: str, b: str) -> str:
        return f"{self._p}_mul_{self.sfx}({a}, {b})"

    def add(self, a: str, b: str) -> str:
        return f"{self._p}_add_{self.sfx}({a}, {b})"

    def accumulate(self, acc: str, factors: Sequence[str], mask: str | None) -> str:
        """acc + the product of ``factors``, in the lanes of ``mask`` only (inactive lanes keep
        acc exactly, whatever the factors hold there)."""
        p, sfx = self._p, self.sfx
        product = factors[0]
        for f in factors[1:-1]:
            product = self.mul(product, f)
        if len(factors) == 1:
            if mask is None:
                return self.add(acc, product)
            if self.wide:
                return f"{p}_mask_add_{sfx}({acc}, {mask}, {acc}, {product})"
            return (f"_mm256_add_{sfx}({acc}, _mm256_and_{sfx}({product}, "
                    f"_mm256_castsi256_{sfx}({mask})))")
        if mask is None:
            return self.fma(product, factors[-1], acc)
        if self.wide:
            return f"{p}_mask3_fmadd_{sfx}({product}, {factors[-1]}, {acc}, {mask})"
        return (f"_mm256_add_{sfx}({acc}, _mm256_and_{sfx}({self.mul(product, factors[-1])}, "
                f"_mm256_castsi256_{sfx}({mask})))")

    def store(self, pointer: str, value: str, mask: str | None) -> str:
        p, sfx = self._p, self.sfx
        if mask is None:
            return f"{p}_storeu_{sfx}({pointer}, {value});"
        if self.wide:
            return f"{p}_mask_storeu_{sfx}({pointer}, {mask}, {value});"
        return f"{p}_maskstore_{sfx}({pointer}, {mask}, {value});"

    def scatter(self, pointer: str, stride: int, value: str, mask: str | None) -> str:
        """Lanes to pointer[0], pointer[stride], ... (masked lanes not written) in one
        scatter; AVX-512 only (AVX2 has none: its callers store lane by lane)."""
        index, sfx, scale = self._offsets(stride), self.sfx, self._scale
        if mask is None:
            return f"_mm512_i32scatter_{sfx}({pointer}, {index}, {value}, {scale});"
        return f"_mm512_mask_i32scatter_{sfx}({pointer}, {mask}, {index}, {value}, {scale});"

    def hsum(self, value: str) -> str:
        return f"_mm512_reduce_add_{self.sfx}({value})" if self.wide else \
            f"sc_hsum_{self.sfx}({value})"

    def nonnegative(self, base: str, step: int) -> str:
        """Mask of lanes l where base + step·l >= 0."""
        p, epi = self._p, self._epi
        cast = "int32_t" if self.dtype == "float32" else "int64_t"
        set1 = f"{p}_set1_{epi}" if (self.wide or self.dtype == "float32") else "_mm256_set1_epi64x"
        lanes = f"{set1}(({cast})({base}))"
        if step:
            values = ", ".join(str(step * i) for i in range(self.width))
            setr = f"{p}_setr_{epi}" if (self.wide or self.dtype == "float32") else \
                "_mm256_setr_epi64x"
            lanes = f"{p}_add_{epi}({lanes}, {setr}({values}))"
        if self.wide:
            return f"{p}_cmpgt_{epi}_mask({lanes}, {set1}(-1))"
        return f"{p}_cmpgt_{epi}({lanes}, {set1}(-1))"

    def from_bool(self, condition: str) -> str:
        """All lanes if the scalar condition holds, none otherwise."""
        if self.wide:
            return f"(({self.mask})(-(int)({condition})))"
        return f"_mm256_set1_epi32(-(int)({condition}))"

    def both(self, a: str, b: str) -> str:
        return f"(({self.mask})(({a}) & ({b})))" if self.wide else f"_mm256_and_si256({a}, {b})"

    def any(self, mask: str) -> str:
        return f"(({mask}) != 0)" if self.wide else f"!_mm256_testz_si256({mask}, {mask})"


def _min_over(expr, ranges: dict) -> str:
    """C expression for the minimum of an integer affine ``expr`` when each symbol ranges over
    ``ranges[symbol] = (low C expr, high C expr)``; other symbols keep their C value."""
    coefficients, constant = linear_parts(expr)
    parts = [str(int(constant))]
    for v, c in sorted(coefficients.items(), key=lambda vc: str(vc[0])):
        c = int(c)
        low, high = ranges.get(v, (str(v.label), str(v.label)) if isinstance(v, sympy.Idx)
                               else (str(v), str(v)))
        parts.append(f"{c}*({low if c > 0 else high})")
    return " + ".join(parts)


def _nonnegative_everywhere(exprs, ranges) -> list[str]:
    return [f"({_min_over(e, ranges)}) >= 0" for e in exprs]


def _depends(expr, symbol) -> bool:
    return symbol in sympy.sympify(expr).free_symbols


class _Reads:
    """The accesses of one nest: constant factor, and per access its offset and flags."""

    def __init__(self, nest: LoopNest):
        self.constant, reads = schedule.factors(nest.body)
        self.items = []
        for access in reads:
            offset = sympy.expand(sum(
                math.prod(int(n) for n in access.base.shape[t + 1:]) * integer_form(p)[0]
                for t, p in enumerate(access.indices)))
            self.items.append((access, offset, str(access.base.label) in nest.zero_outside))


def _in_range_exprs(access: sympy.Indexed, box=None) -> list[sympy.Expr]:
    """Affine expressions, all >= 0 exactly when every index of the access is in range
    (with a box: only those that can fail somewhere in it)."""
    exprs = []
    for position, extent in zip(access.indices, access.base.shape):
        num = integer_form(position)[0]
        for expr in (num, int(extent) - 1 - num):
            if box is None or value_range(expr, box)[0] < 0:
                exprs.append(expr)
    return exprs


def _padded_mask(simd: "Simd", exprs, lane, lane_value, replace, base: str) -> str:
    """``base`` narrowed to the lanes where every ``expr >= 0``: lane-dependent ones as vector
    compares, the others as one scalar test."""
    vector, scalar = [], []
    for expr in exprs:
        local = sympy.expand(expr.xreplace(replace))
        if _depends(expr, lane):
            vector.append(_lane_condition(simd, local, lane, lane_value))
        else:
            scalar.append(f"({c_affine(local)}) >= 0")
    masks = [base] + vector
    if scalar:
        masks.append(simd.from_bool(" && ".join(scalar)))
    return _and_all(simd, masks)


@dataclass(frozen=True)
class _Variant:
    """One shape of output-lane block: rows x vectors accumulators, masked at the edges."""

    rows: int
    vectors: int
    masked: bool


def _lane_interior(chosen: schedule.OutputLanes, piece: schedule.Piece) -> tuple[int, int]:
    """The lanes whose every lane-dependent condition (loop bounds, guards, padded reads)
    holds for all values of every other index: there, blocks need no masks."""
    lane = chosen.lane
    low, high = 0, index_range(lane)[1]
    for nest in chosen.nests:
        box = nest_box(nest, piece.indices)
        exprs = []
        for loop in nest.loops:
            exprs += [b.den * _ceil_const(loop.lower[0]) - b.num
                      for b in loop.lower[1:] if _depends(b.num, lane)]
            exprs += [b.num - b.den * (int(loop.upper[0].num) // loop.upper[0].den)
                      for b in loop.upper[1:] if _depends(b.num, lane)]
        exprs += [g.expr for g in nest.guards if _depends(g.expr, lane)]
        for access, _, padded in _Reads(nest).items:
            if padded:
                exprs += [e for e in _in_range_exprs(access, box) if _depends(e, lane)]
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


def _lane_segments(extent: int, width: int, wide: int, interior) -> list[tuple[int, int, bool]]:
    """Cover lanes 0..extent-1 with (start, vectors, masked) blocks: wide unmasked blocks where
    they fit inside the interior, single unmasked vectors where those fit, masked vectors
    elsewhere."""
    low, high = interior
    segments, start = [], 0
    while start < extent:
        if wide > 1 and start >= low and start + wide * width - 1 <= high:
            segments.append((start, wide, False))
            start += wide * width
        elif start >= low and start + width - 1 <= high:
            segments.append((start, 1, False))
            start += width
        else:
            segments.append((start, 1, True))
            start += width
    return segments


def _emit_output_lanes(out: _Writer, fn: IndexSum, piece: schedule.Piece,
                       chosen: schedule.OutputLanes, simd: Simd) -> None:
    """Blocks of consecutive outputs along the lane index, cut once for all rows: wide
    register blocks (rows x vectors) inside the interior, single vectors with more rows
    where a wide block does not fit, masked single vectors at the edges.  Masked lanes read
    zeros past an array's edge (padding, and the lanes past the end, which are not stored);
    only lanes outside a loop's bounds are blended out of the sums."""
    lane, block = chosen.lane, chosen.block
    lane_name = str(lane.label)
    outer = [i for i in piece.indices if i != lane and i != block]
    block_extent = index_range(block)[1] + 1 if block is not None else 1
    single_rows = schedule.balanced(block_extent, (simd.registers - 4) // 2) \
        if block is not None else 1
    variants = {(chosen.vectors, False): _Variant(chosen.rows, chosen.vectors, False),
                (1, False): _Variant(single_rows, 1, False),
                (1, True): _Variant(single_rows, 1, True)}
    segments = _lane_segments(index_range(lane)[1] + 1, simd.width, chosen.vectors,
                              _lane_interior(chosen, piece))

    _parallel(out, outer, _work(chosen.nests, piece.indices))
    for idx in outer:
        lo, hi = index_range(idx)
        out.open(f"for (int64_t {_check_name(str(idx.label), 'index')} = {lo}; "
                 f"{idx.label} <= {hi}; ++{idx.label})")
    runs: list[list[tuple[int, int, bool]]] = []
    for segment in segments:
        if runs and runs[-1][-1][1:] == segment[1:] and \
                runs[-1][-1][0] + segment[1] * simd.width == segment[0]:
            runs[-1].append(segment)
        else:
            runs.append([segment])
    for run in runs:
        variant = variants[run[0][1:]]
        step = variant.vectors * simd.width
        out.open(f"for (int64_t {lane_name} = {run[0][0]}; {lane_name} <= {run[-1][0]}; "
                 f"{lane_name} += {step})")
        if block is not None:
            out.open(f"for (int64_t {block.label} = 0; {block.label} < {block_extent}; "
                     f"{block.label} += {variant.rows})")
        _output_lane_block(out, fn, piece, chosen, simd, variant)
        if block is not None:
            out.close()
        out.close()
    for _ in outer:
        out.close()


def _ceil_const(bound: Bound) -> int:
    return -((-int(bound.num)) // bound.den)


def _output_lane_block(out, fn, piece, chosen, simd, variant: _Variant) -> None:
    lane, block = chosen.lane, chosen.block
    rows, vectors, masked = variant.rows, variant.vectors, variant.masked
    width, ctype = simd.width, C_TYPES[simd.dtype]
    lane_name, lane_hi = str(lane.label), index_range(lane)[1]
    accs = [[f"sc_a{r}_{q}" for q in range(vectors)] for r in range(rows)]
    out.line(f"{simd.vec} " + ", ".join(f"{a} = {simd.zero()}" for row in accs for a in row) + ";")
    row_vars = []
    partial_rows = block is not None and (index_range(block)[1] + 1) % rows != 0
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
    if masked:
        for q in range(vectors):
            out.line(f"const {simd.mask} sc_valid{q} = "
                     f"{simd.nonnegative(f'{lane_hi} - sc_lane{q}', -1)};")

    for number, nest in enumerate(chosen.nests):
        reads = _Reads(nest)
        box = nest_box(nest, piece.indices)
        opened = 0
        scalar_guards = [g for g in nest.guards if not _depends(g.expr, lane)]
        lane_guards = [g for g in nest.guards if _depends(g.expr, lane)]
        if scalar_guards:
            out.open(f"if ({' && '.join(f'({_condition(g)})' for g in scalar_guards)})")
            opened += 1
        out.open()
        opened += 1
        # masks (edge path only): domain = lanes inside the bounds so far (blended);
        # loads[a] = lanes that may read access a (valid, in the domain, inside padding)
        domain: list[str] | None = None
        lane_padding = {a: [e for e in _in_range_exprs(access, box) if _depends(e, lane)]
                        for a, (access, _, padded) in enumerate(reads.items) if padded}
        loads = {}
        depth_of = {loop.index: d for d, loop in enumerate(nest.loops, start=1)}
        if masked:
            if lane_guards:
                domain = []
                for q in range(vectors):
                    name = f"sc_d{number}_0_{q}"
                    conds = [_lane_condition(simd, g.expr, lane, lane_at[q]) for g in lane_guards]
                    out.line(f"const {simd.mask} {name} = {_and_all(simd, conds)};")
                    domain.append(name)
            _define_load_masks(out, simd, reads, lane, lane_at, vectors, lane_padding, domain,
                               loads, number, 0, depth_of, False)
        for depth, loop in enumerate(nest.loops, start=1):
            var = _check_name(str(loop.index.label), "index")
            keep_low = [b for b in loop.lower if not _depends(b.num, lane)]
            keep_high = [b for b in loop.upper if not _depends(b.num, lane)]
            out.open(f"for (int64_t {var} = {_bound(keep_low, True)}; {var} <= "
                     f"{_bound(keep_high, False)}; ++{var})")
            opened += 1
            if not masked:
                continue
            lane_bounds = [(b, True) for b in loop.lower if _depends(b.num, lane)] + \
                          [(b, False) for b in loop.upper if _depends(b.num, lane)]
            changed = False
            if lane_bounds:
                new = []
                for q in range(vectors):
                    conds = [domain[q]] if domain else []
                    for b, is_lower in lane_bounds:
                        expr = b.den * loop.index - b.num if is_lower else b.num - b.den * loop.index
                        conds.append(_lane_condition(simd, expr, lane, lane_at[q]))
                    name = f"sc_d{number}_{depth}_{q}"
                    out.line(f"const {simd.mask} {name} = {_and_all(simd, conds)};")
                    new.append(name)
                domain = new
                changed = True
                out.open(f"if ({' || '.join(simd.any(m) for m in domain)})")
                opened += 1
            _define_load_masks(out, simd, reads, lane, lane_at, vectors, lane_padding, domain,
                               loads, number, depth, depth_of, changed)
        _accumulate_output_lanes(out, reads, chosen, simd, accs, row_vars, lane_at,
                                 loads if masked else None, domain, box, variant)
        for _ in range(opened):
            out.close()

    # store the block
    offset = _output_offset(fn, piece)
    out_stride = int(linear_parts(offset)[0].get(lane, 0))
    for r in range(rows):
        row_offset = offset.xreplace({block: row_vars[r]}) if block is not None else offset
        if partial_rows:
            out.open(f"if ({block.label} + {r} <= {index_range(block)[1]})")
        for q in range(vectors):
            at = c_affine(row_offset.xreplace({lane: lane_at[q]}))
            pointer = f"{fn.output.name} + {at}"
            mask = f"sc_valid{q}" if masked else None
            if out_stride == 1:
                out.line(simd.store(pointer, accs[r][q], mask))
            elif simd.wide:
                out.line(simd.scatter(pointer, out_stride, accs[r][q], mask))
            else:
                out.open()
                out.line(f"{ctype} sc_t[{width}];")
                out.line(simd.store("sc_t", accs[r][q], None))
                limit = f"sc_l <= {lane_hi} - sc_lane{q}" if masked else None
                loop = f"for (int sc_l = 0; sc_l < {width}; ++sc_l)"
                out.line(f"{loop} {{ if ({limit}) {fn.output.name}[{at} + {out_stride}*sc_l] = "
                         f"sc_t[sc_l]; }}" if limit else
                         f"{loop} {fn.output.name}[{at} + {out_stride}*sc_l] = sc_t[sc_l];")
                out.close()
        if partial_rows:
            out.close()


def _define_load_masks(out, simd, reads, lane, lane_at, vectors, lane_padding, domain, loads,
                       number, depth, depth_of, domain_changed) -> None:
    """(Re)define, at this loop depth, the masks of the vector reads that change here: lanes
    that exist, lie in the domain, and read inside a zero-padded array.  A read's mask is
    defined at the depth of the innermost loop its padding conditions use, and again where
    the domain narrows below that."""
    for a, (access, offset, padded) in enumerate(reads.items):
        if not _depends(offset, lane):
            continue
        exprs = lane_padding.get(a, [])
        symbols = set().union(set(), *(sympy.sympify(e).free_symbols for e in exprs))
        level = max((depth_of[v] for v in symbols if v in depth_of), default=0)
        if not (depth == level or (domain_changed and depth > level)):
            continue
        names = []
        for q in range(vectors):
            conds = [f"sc_valid{q}"] + ([domain[q]] if domain else []) + \
                    [_lane_condition(simd, e, lane, lane_at[q]) for e in exprs]
            name = f"sc_l{number}_{a}_{depth}_{q}"
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


def _accumulate_output_lanes(out, reads: _Reads, chosen, simd: Simd, accs, row_vars, lane_at,
                             loads, domain, box, variant: _Variant) -> None:
    """Load each read once per row or per vector and add the products into the block."""
    lane, block, rows, vectors = chosen.lane, chosen.block, variant.rows, variant.vectors
    ctype = C_TYPES[simd.dtype]
    per_row: list[list[str]] = [[] for _ in range(rows)]   # factor vectors per row
    per_vector: list[list[str]] = [[] for _ in range(vectors)]
    shared: list[str] = []
    constant = reads.constant      # folded into the first broadcast read, if there is one
    for number, (access, offset, padded) in enumerate(reads.items):
        name = str(access.base.label)
        stride = int(linear_parts(offset)[0].get(lane, 0))
        # index conditions of a zero-padded read that do not depend on the lane: one test
        scalar_checks = [e for e in _in_range_exprs(access, box) if not _depends(e, lane)] \
            if padded else []
        if stride == 0:
            targets = range(rows) if block is not None and _depends(offset, block) else [None]
            for r in targets:
                at = offset.xreplace({block: row_vars[r]}) if r is not None else offset
                replace = {block: row_vars[r]} if r is not None else {}
                load = f"{name}[{c_affine(at)}]"
                if scalar_checks:
                    test = " && ".join(f"({c_affine(sympy.expand(e.xreplace(replace)))}) >= 0"
                                       for e in scalar_checks)
                    load = f"(({test}) ? {load} : 0)"
                if constant != 1:
                    load = f"{_number(constant, ctype)}*{load}"
                vector = f"sc_v{number}_{r if r is not None else 'x'}"
                out.line(f"const {simd.vec} {vector} = {simd.set1(load)};")
                (per_row[r] if r is not None else shared).append(vector)
            constant = sympy.Integer(1)
        else:
            test = " && ".join(f"({c_affine(e)}) >= 0" for e in scalar_checks)
            for q in range(vectors):
                at = c_affine(offset.xreplace({lane: lane_at[q]}))
                mask = loads[number][q] if loads is not None else None
                load = simd.load(f"{name} + {at}", stride, mask)
                if test:
                    load = f"({test}) ? {load} : {simd.zero()}"
                vector = f"sc_w{number}_{q}"
                out.line(f"const {simd.vec} {vector} = {load};")
                per_vector[q].append(vector)
    scale = None
    if constant != 1:
        scale = "sc_scale"
        out.line(f"const {simd.vec} sc_scale = {simd.set1(_number(constant, ctype))};")
    for r in range(rows):
        for q in range(vectors):
            factors = shared + per_row[r] + per_vector[q] + ([scale] if scale else [])
            acc = accs[r][q]
            out.line(f"{acc} = {simd.accumulate(acc, factors, domain[q] if domain else None)};")


def _number(value, ctype: str) -> str:
    suffix = "f" if ctype == "float" else ""
    return f"(({ctype})({float(value)!r}{suffix}))" if not value.is_Integer else f"(({ctype}){int(value)})"


def _emit_reduction_lanes(out: _Writer, fn: IndexSum, piece: schedule.Piece,
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
    parallel = _work(piece.nests, piece.indices) >= PARALLEL_WORK
    if parallel:
        out.line("#pragma omp parallel num_threads(sc_threads)")
    out.open()
    out.open(f"for (int64_t sc_chunk = 0; sc_chunk < {chunks.count}; ++sc_chunk)")
    out.line(f"const int64_t sc_r0 = (sc_chunk / {chunks.segments}) * {chunks.rows}, "
             f"sc_r1 = sc_min(sc_r0 + {chunks.rows}, {chunks.total_rows});")
    out.line(f"const int64_t sc_s0 = {chunks.lane_lo} + (sc_chunk % {chunks.segments}) * "
             f"{chunks.segment}, sc_s1 = sc_s0 + {chunks.segment - 1};")
    if parallel:
        loops = len(outer) + len(blocks)
        tasks = math.prod(index_range(i)[1] - index_range(i)[0] + 1 for i in outer) * \
            math.prod(-(-(index_range(u)[1] + 1) // rows) for u, rows in blocks)
        out.line(f"#pragma omp for{f' collapse({loops})' if loops > 1 else ''} "
                 f"{_schedule(tasks)}")
    for idx in outer:
        lo, hi = index_range(idx)
        out.open(f"for (int64_t {_check_name(str(idx.label), 'index')} = {lo}; "
                 f"{idx.label} <= {hi}; ++{idx.label})")
    for u, rows in blocks:
        out.open(f"for (int64_t {_check_name(str(u.label), 'index')} = 0; {u.label} <= "
                 f"{index_range(u)[1]}; {u.label} += {rows})")
    row_vars = {}
    for u, rows in blocks:
        row_vars[u] = []
        for r in range(rows):
            name = f"sc_{u.label}{r}"
            out.line(f"const int64_t {name} = sc_min({u.label} + {r}, {index_range(u)[1]});")
            row_vars[u].append(sympy.Symbol(name))
    combos = _product_rows(blocks)
    accs = {combo: "sc_a" + "_".join(map(str, combo)) for combo in combos}
    out.line(f"{simd.vec} " + ", ".join(f"{a} = {simd.zero()}" for a in accs.values()) + ";")
    opened = 0
    if nest.guards:
        out.open(f"if ({' && '.join(f'({_condition(g)})' for g in nest.guards)})")
        opened += 1
    # rows in runs along the innermost row index: the indices are divided out of sc_r once
    # per run, and within it the index and the base pointers just step
    out.open("for (int64_t sc_r = sc_r0; sc_r < sc_r1; )")
    opened += 1
    radix, stepping = 1, None
    for loop in reversed(nest.loops[:-1]):
        var = _check_name(str(loop.index.label), "index")
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
        mine = [u for u in block_indices if _depends(offset, u)]
        for r in (range(len(row_vars[mine[0]])) if mine else [None]):
            at = offset.xreplace({mine[0]: row_vars[mine[0]][r]}) if mine else offset
            at = sympy.expand(at.xreplace({lane: 0}))
            pointer = f"sc_b{number}_{r if r is not None else 'x'}"
            out.line(f"const {ctype} *restrict {pointer} = {access.base.label} + {c_affine(at)};")
            step = int(linear_parts(at)[0].get(stepping, 0)) if stepping is not None else 0
            if step:
                steps.append(f"{pointer} += {step};")
    if stepping is not None:
        steps.append(f"++{_check_name(str(stepping.label), 'index')};")
    out.open("for (int64_t sc_k = 0; sc_k < sc_run; ++sc_k)" if stepping is not None else "")
    opened += 1
    last = nest.loops[-1]
    lane_name = _check_name(str(lane.label), "index")
    out.line(f"const int64_t sc_lo = sc_max({_bound(last.lower, True)}, sc_s0), sc_hi = "
             f"sc_min({_bound(last.upper, False)}, sc_s1);")
    # the lane range in which every zero-padded read stays inside its array
    lows, highs, always = ["sc_lo"], ["sc_hi"], []
    box = nest_box(nest, piece.indices)
    for access, offset, padded in reads.items:
        if not padded:
            continue
        for expr in _in_range_exprs(access, box):
            coefficients, _ = linear_parts(expr)
            c = int(coefficients.get(lane, 0))
            rows = [u for u in block_indices if u in coefficients]
            # every row of the block must read inside: the first and last rows bound it
            for replace in ([{}] if not rows else
                            [{rows[0]: row_vars[rows[0]][0]}, {rows[0]: row_vars[rows[0]][-1]}]):
                rest = c_affine(sympy.expand((expr - c * lane).xreplace(replace)))
                if c > 0:
                    lows.append(f"sc_ceildiv(-({rest}), {c})")
                elif c < 0:
                    highs.append(f"sc_floordiv({rest}, {-c})")
                else:
                    always.append(f"({rest}) >= 0")
    out.line(f"const int64_t sc_flo = {_fold(lows, 'sc_max')}, sc_fhi = "
             f"{_fold(highs, 'sc_min')};")
    # vectors start at sc_lo + W·k: masked ones before sc_first, plain ones up to sc_last
    # (when a padded read is never inside, no vector is plain: sc_first lies past every lane,
    # and W·sc_first must not overflow)
    inside = " && ".join(always) if always else "1"
    out.line(f"const int64_t sc_first = ({inside}) ? sc_max(0, sc_ceildiv(sc_flo - sc_lo, "
             f"{width})) : INT64_MAX / {2 * width};")
    out.line(f"const int64_t sc_last = sc_floordiv(sc_fhi - {width - 1} - sc_lo, {width});")
    # vectors 0 .. sc_count-1: masked before sc_a, plain from sc_a to sc_b-1, masked after
    out.line(f"const int64_t sc_count = (sc_hi - sc_lo + {width}) / {width};")
    out.line("const int64_t sc_a = sc_min(sc_first, sc_count), "
             "sc_b = sc_max(sc_a, sc_min(sc_last + 1, sc_count));")
    for first, last, plain in (("0", "sc_a", False), ("sc_a", "sc_b", True),
                               ("sc_b", "sc_count", False)):
        out.open(f"for (int64_t sc_v = {first}; sc_v < {last}; ++sc_v)")
        out.line(f"const int64_t {lane_name} = sc_lo + {width} * sc_v;")
        if plain:
            _accumulate_reduction(out, reads, chosen, simd, accs, row_vars, None, box)
        else:
            out.line(f"const {simd.mask} sc_valid = "
                     f"{simd.nonnegative(f'sc_hi - {lane_name}', -1)};")
            _accumulate_reduction(out, reads, chosen, simd, accs, row_vars, "sc_valid", box)
        out.close()
    for line in steps:
        out.line(line)
    out.close()    # one row
    out.line("sc_r += sc_run;" if stepping is not None else "++sc_r;")
    for _ in range(opened - 1):
        out.close()
    offset = _output_offset(fn, piece)
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
        return -(-self.total_rows // self.rows) * self.segments


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
        segment = -(-CHUNK_ELEMENTS // width) * width
        return _Chunks(ranges, total_rows, 1, lane_lo, segment, -(-extent // segment))
    rows = max(1, CHUNK_ELEMENTS // extent)
    return _Chunks(ranges, total_rows, rows, lane_lo, extent, 1)


def _product_rows(blocks):
    combos = [()]
    for _, rows in blocks:
        combos = [c + (r,) for c in combos for r in range(rows)]
    return combos


def _accumulate_reduction(out, reads: _Reads, chosen, simd: Simd, accs, row_vars, mask,
                          box) -> None:
    lane = chosen.lane
    blocks = [u for u, _ in chosen.blocks]
    ctype = C_TYPES[simd.dtype]
    loaded = []   # per read: {row-combo-key: vector name}
    for number, (access, offset, padded) in enumerate(reads.items):
        stride = int(linear_parts(offset)[0].get(lane, 0))
        mine = [u for u in blocks if _depends(offset, u)]
        names = {}
        for r in (range(len(row_vars[mine[0]])) if mine else [None]):
            at = offset.xreplace({mine[0]: row_vars[mine[0]][r]}) if mine else offset
            local = access.xreplace({mine[0]: row_vars[mine[0]][r]}) if mine else access
            vector = f"sc_v{number}_{r if r is not None else 'x'}"
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
                    replace = {mine[0]: row_vars[mine[0]][r]} if mine else {}
                    m = _padded_mask(simd, _in_range_exprs(access, box), lane, lane, replace, mask)
                base = f"sc_b{number}_{r if r is not None else 'x'}"
                pointer = f"{base} + {lane}" if stride == 1 else f"{base} + {stride}*{lane}"
                out.line(f"const {simd.vec} {vector} = {simd.load(pointer, stride, m)};")
            names[(mine[0], r) if mine else None] = vector
        loaded.append((mine[0] if mine else None, names))
    scale = None
    if reads.constant != 1:
        scale = "sc_scale"
        out.line(f"const {simd.vec} sc_scale = {simd.set1(_number(reads.constant, ctype))};")
    for combo, acc in accs.items():
        rows = dict(zip(blocks, combo))
        factors = [names[(u, rows[u])] if u is not None else names[None] for u, names in loaded]
        if scale:
            factors.append(scale)
        out.line(f"{acc} = {simd.accumulate(acc, factors, mask)};")


def emit_function(name: str, fn: IndexSum, inputs: Sequence[Array], dtype: str,
                  isa: str | None = None, prefix: str = "symconv_") -> tuple[str, CFunction]:
    """C text of one index sum as ``void <prefix><name>(inputs..., output, threads)``.

    The output is computed piece by piece (see schedule.py), each piece by its plan;
    with ``isa`` ("avx2" or "avx512") the vector plans use that instruction set.  Every output element is computed by
    one thread in a fixed order, so results do not depend on the number of threads."""
    ctype = C_TYPES[dtype]
    symbol = f"{prefix}{_check_name(name, 'function')}"
    for array in (*inputs, fn.output):
        _check_name(array.name, "array")
    read = {a.name for a in fn.inputs}
    missing = read - {a.name for a in inputs}
    if missing:
        raise IRError(f"{name}: reads {sorted(missing)} which are not among its arguments")
    params = [f"const {ctype} *restrict {a.name}" for a in inputs] + \
             [f"{ctype} *restrict {fn.output.name}", "int sc_threads"]
    plain = [f"const {ctype} *{a.name}" for a in inputs] + [f"{ctype} *{fn.output.name}",
                                                            "int sc_threads"]
    out = _Writer()
    formula = to_text(fn).replace("*/", "* /")
    out.line("/*")
    for text in formula.splitlines():
        out.line(f" * {text}")
    out.line(" */")
    out.open(f"void {symbol}({', '.join(params)})")
    vector = Simd(isa, dtype) if isa else None
    for piece in schedule.pieces(fn):
        chosen = schedule.plan(piece, vector.width if vector else None,
                               vector.registers if vector else 0)
        out.open()
        out.line(f"/* {schedule.describe(piece, chosen).replace('*/', '* /')} */")
        if isinstance(chosen, schedule.OutputLanes):
            _emit_output_lanes(out, fn, piece, chosen, vector)
        elif isinstance(chosen, schedule.ReductionLanes):
            _emit_reduction_lanes(out, fn, piece, chosen, vector)
        else:
            _emit_scalar_piece(out, fn, piece, dtype)
        out.close()
    out.close()
    declaration = f"void {symbol}({', '.join(plain)});"
    return "\n".join(out.lines) + "\n", CFunction(name, symbol, tuple(inputs), fn.output, declaration)


def emit(functions: Sequence[tuple[str, IndexSum, Sequence[Array]]], dtype: str,
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
    for name, fn, inputs in functions:
        text, function = emit_function(name, fn, inputs, dtype, isa, prefix)
        parts += ["\n", text]
        declared.append(function)
    return CSource("".join(parts), tuple(declared))
