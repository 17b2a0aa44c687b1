/* sc_avx2.h: AVX2 + FMA helpers pasted after sc_scalar.h into vector builds (isa.py
   spells single intrinsics inline): horizontal sums and stride-2 loads. */
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
static inline __m256 sc_even_ps(__m256 a, __m256 b) {
    /* in-lane picks (x0 x2 x8 x10 | x4 x6 x12 x14), then the 64-bit pairs in order */
    const __m256 t = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(t), 0xD8));
}
static inline __m256 sc_load2_ps(const float *p) {
    return sc_even_ps(_mm256_loadu_ps(p),
        _mm256_maskload_ps(p + 8, _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, -1, 0)));
}
static inline __m256d sc_load2_pd(const double *p) {
    const __m256d a = _mm256_loadu_pd(p);
    const __m256d b = _mm256_maskload_pd(p + 4, _mm256_setr_epi64x(-1, -1, -1, 0));
    return _mm256_permute4x64_pd(_mm256_unpacklo_pd(a, b), 0xD8);
}
/* The same under a lane mask: each lane's mask is spread onto the element it reads, so
   masked lanes read nothing and come out 0. */
static inline __m256 sc_load2m_ps(const float *p, __m256i mask) {
    const __m256i odd_off = _mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0);
    const __m256i lo = _mm256_and_si256(odd_off, _mm256_permutevar8x32_epi32(
        mask, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)));
    const __m256i hi = _mm256_and_si256(odd_off, _mm256_permutevar8x32_epi32(
        mask, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)));
    return sc_even_ps(_mm256_maskload_ps(p, lo), _mm256_maskload_ps(p + 8, hi));
}
static inline __m256d sc_load2m_pd(const double *p, __m256i mask) {
    const __m256i odd_off = _mm256_setr_epi64x(-1, 0, -1, 0);
    const __m256i lo = _mm256_and_si256(odd_off, _mm256_permute4x64_epi64(mask, 0x50));
    const __m256i hi = _mm256_and_si256(odd_off, _mm256_permute4x64_epi64(mask, 0xFA));
    const __m256d a = _mm256_maskload_pd(p, lo);
    const __m256d b = _mm256_maskload_pd(p + 4, hi);
    return _mm256_permute4x64_pd(_mm256_unpacklo_pd(a, b), 0xD8);
}
