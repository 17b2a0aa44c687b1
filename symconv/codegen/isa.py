"""Vector instruction sets: AVX2 + FMA and AVX-512 intrinsics behind one small interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .c import header

SIMD_PRELUDE = {isa: header(f"sc_{isa}.h") for isa in ("avx2", "avx512")}


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

    @property
    def transpose(self) -> tuple[str, int] | None:
        """The prelude's in-register transpose of a width x width block of floats, as
        (function, width) for c.emit_copy; None for doubles (copied element by element)."""
        return (f"sc_transpose{self.width}_ps", self.width) if self.dtype == "float32" else None

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

    def accumulate(self, acc: str, factors: Sequence[str], mask: str | None,
                   zeroed: bool = False) -> str:
        """acc + the product of ``factors``, in the lanes of ``mask`` only (inactive lanes keep
        acc exactly, whatever the factors hold there).  ``zeroed``: two factors, the last +0
        in every inactive lane (a load under the mask) and the first finite in them (see
        schedule._finite_factors), so a plain FMA adds +0 there and keeps acc."""
        p, sfx = self._p, self.sfx
        if zeroed:
            first, last = factors
            return self.fma(first, last, acc)
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

    def store_first(self, pointer: str, value: str, count: int) -> str:
        """The first ``count`` lanes of value to pointer[0 .. count - 1], nothing after."""
        if count >= self.width:
            return self.store(pointer, value, None)
        if self.wide:
            return self.store(pointer, value, f"(({self.mask}){(1 << count) - 1:#x})")
        return f"sc_store_first_{self.sfx}({pointer}, {value}, {count});"

    def scatter(self, pointer: str, stride: int, value: str, mask: str | None) -> str:
        """Lanes to pointer[0], pointer[stride], ... (masked lanes not written): stride 2 by
        permutes and masked stores, wider strides in one scatter; AVX-512 only (AVX2 has
        neither: its callers store lane by lane)."""
        index, sfx, scale = self._offsets(stride), self.sfx, self._scale
        if stride == 2:
            every = f"(({self.mask}){(1 << self.width) - 1:#x})"
            return f"sc_store2m_{sfx}({pointer}, {value}, {mask or every});"
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
