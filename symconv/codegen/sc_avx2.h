/* sc_avx2.h: AVX2 + FMA helpers pasted after sc_scalar.h into vector builds (isa.py
   spells single intrinsics inline): horizontal sums, stride-2 loads, stores of a vector's
   first elements, an 8 x 8 transpose, streamed stores. */
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
/* The first n elements of v (n a constant below the width) to p[0 .. n-1], nothing after
   them, in 128-, 64- and 32-bit stores: AVX2's masked store is microcoded on AMD cores. */
static inline void sc_store_first_ps(float *p, __m256 v, int n) {
    __m128 part = _mm256_castps256_ps128(v);
    if (n >= 4) {
        _mm_storeu_ps(p, part);
        part = _mm256_extractf128_ps(v, 1);
        p += 4;
        n -= 4;
    }
    if (n >= 2) {
        _mm_storel_pi((__m64 *)p, part);
        part = _mm_movehl_ps(part, part);
        p += 2;
        n -= 2;
    }
    if (n) _mm_store_ss(p, part);
}
static inline void sc_store_first_pd(double *p, __m256d v, int n) {
    __m128d part = _mm256_castpd256_pd128(v);
    if (n >= 2) {
        _mm_storeu_pd(p, part);
        part = _mm256_extractf128_pd(v, 1);
        p += 2;
        n -= 2;
    }
    if (n) _mm_store_sd(p, part);
}
/* An 8 x 8 block of floats transposed: row i is src[i*ss .. i*ss + 7], element j of it goes
   to dst[j*ds + i].  Interleaves by 32 and 64 bits within 128-bit lanes (u[4g + m], lane k:
   element 4k + m of rows 4g .. 4g + 3), then pairs the lanes of u[m] and u[4 + m]. */
static inline void sc_transpose8_ps(const float *src, int64_t ss, float *dst, int64_t ds) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        const __m256 a = _mm256_loadu_ps(src + i * ss), b = _mm256_loadu_ps(src + (i + 1) * ss);
        t[i] = _mm256_unpacklo_ps(a, b);
        t[i + 1] = _mm256_unpackhi_ps(a, b);
    }
    for (int g = 0; g < 8; g += 4) {
        const __m256d a = _mm256_castps_pd(t[g]), b = _mm256_castps_pd(t[g + 1]);
        const __m256d c = _mm256_castps_pd(t[g + 2]), d = _mm256_castps_pd(t[g + 3]);
        u[g] = _mm256_castpd_ps(_mm256_unpacklo_pd(a, c));
        u[g + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(a, c));
        u[g + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(b, d));
        u[g + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(b, d));
    }
    for (int m = 0; m < 4; ++m) {
        _mm256_storeu_ps(dst + m * ds, _mm256_permute2f128_ps(u[m], u[4 + m], 0x20));
        _mm256_storeu_ps(dst + (4 + m) * ds, _mm256_permute2f128_ps(u[m], u[4 + m], 0x31));
    }
}

SC_STREAM(ps, float, 8, _mm256_loadu_ps, _mm256_stream_ps)
SC_STREAM(pd, double, 4, _mm256_loadu_pd, _mm256_stream_pd)
