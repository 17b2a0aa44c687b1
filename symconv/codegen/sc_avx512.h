/* sc_avx512.h: AVX-512 helpers pasted after sc_scalar.h into vector builds (isa.py
   spells single intrinsics inline): stride-2 loads and stores. */
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

/* The inverse, a stride-2 store: lane l to p[2l], the odd elements between left as they
   are. Each half of the vector is spread over the even elements of one vector (a one-source
   permute) and stored under the even-element mask; the masked form stores lane l only where
   bit l of the mask is set. A scatter does the same, one element at a time (on AMD's Zen 4 a
   16-lane scatter costs about as much as 16 loads and stores). */
static inline void sc_store2m_ps(float *p, __m512 v, __mmask16 mask) {
    const __m512i low = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i high = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14,
                                           15, 15);
    const uint32_t spread = _pdep_u32(mask, 0x55555555u);
    _mm512_mask_storeu_ps(p, (__mmask16)spread, _mm512_permutexvar_ps(low, v));
    _mm512_mask_storeu_ps(p + 16, (__mmask16)(spread >> 16), _mm512_permutexvar_ps(high, v));
}
static inline void sc_store2m_pd(double *p, __m512d v, __mmask8 mask) {
    const __m512i low = _mm512_setr_epi64(0, 0, 1, 1, 2, 2, 3, 3);
    const __m512i high = _mm512_setr_epi64(4, 4, 5, 5, 6, 6, 7, 7);
    const uint32_t spread = _pdep_u32(mask, 0x5555u);
    _mm512_mask_storeu_pd(p, (__mmask8)spread, _mm512_permutexvar_pd(low, v));
    _mm512_mask_storeu_pd(p + 8, (__mmask8)(spread >> 8), _mm512_permutexvar_pd(high, v));
}
