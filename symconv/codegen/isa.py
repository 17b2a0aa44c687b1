"""Vector instruction sets: AVX2 + FMA and AVX-512 intrinsics behind one small interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
        """Mask of lanes l where base + step·l >= 0.  The base is clamped (in 64 bits) to
        ±(width·|step| + 1) first, which keeps every lane's answer and keeps the lane values
        inside 32 bits whatever the extents."""
        p, epi = self._p, self._epi
        cast = "int32_t" if self.dtype == "float32" else "int64_t"
        set1 = f"{p}_set1_{epi}" if (self.wide or self.dtype == "float32") else "_mm256_set1_epi64x"
        lanes = f"{set1}(({cast})sc_clamp({base}, {self.width * abs(step) + 1}))"
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
