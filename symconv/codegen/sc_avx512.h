/* sc_avx512.h: AVX-512 helpers pasted after sc_scalar.h into vector builds (isa.py
   spells single intrinsics inline): stride-2 loads and stores, a 16 x 16 transpose, streamed
   stores. */
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

/* A 16 x 16 block of floats transposed: row i of the block is src[i*ss .. i*ss + 15], and
   element j of it goes to dst[j*ds + i] (a copy's channels moved innermost, 16 channels x 16
   positions at a time).  Pairs of rows interleave by 32 bits, then by 64 bits within each
   128-bit lane (u[4g + m], lane k: element 4k + m of rows 4g .. 4g + 3), then the 128-bit
   lanes are gathered across u[m], u[4 + m], u[8 + m], u[12 + m]: 64 shuffles, no gathers. */
static inline void sc_transpose16_ps(const float *src, int64_t ss, float *dst, int64_t ds) {
    __m512 t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        const __m512 a = _mm512_loadu_ps(src + i * ss), b = _mm512_loadu_ps(src + (i + 1) * ss);
        t[i] = _mm512_unpacklo_ps(a, b);
        t[i + 1] = _mm512_unpackhi_ps(a, b);
    }
    for (int g = 0; g < 16; g += 4) {
        const __m512d a = _mm512_castps_pd(t[g]), b = _mm512_castps_pd(t[g + 1]);
        const __m512d c = _mm512_castps_pd(t[g + 2]), d = _mm512_castps_pd(t[g + 3]);
        u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int m = 0; m < 4; ++m) {
        const __m512 low = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44);
        const __m512 high = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xEE);
        const __m512 low2 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44);
        const __m512 high2 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xEE);
        _mm512_storeu_ps(dst + m * ds, _mm512_shuffle_f32x4(low, low2, 0x88));
        _mm512_storeu_ps(dst + (4 + m) * ds, _mm512_shuffle_f32x4(low, low2, 0xDD));
        _mm512_storeu_ps(dst + (8 + m) * ds, _mm512_shuffle_f32x4(high, high2, 0x88));
        _mm512_storeu_ps(dst + (12 + m) * ds, _mm512_shuffle_f32x4(high, high2, 0xDD));
    }
}

SC_STREAM(ps, float, 16, _mm512_loadu_ps, _mm512_stream_ps)
SC_STREAM(pd, double, 8, _mm512_loadu_pd, _mm512_stream_pd)
