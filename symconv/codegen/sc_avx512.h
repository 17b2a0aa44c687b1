/* sc_avx512.h: AVX-512 helpers pasted after sc_scalar.h into vector builds (isa.py
   spells single intrinsics inline): stride-2 loads. */
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
