/* sc_scalar.h: what every generated C file starts with (emit.py pastes it in, so the
   file compiles alone): integer division for loop bounds and aligned scratch. */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <omp.h>

/* Integer helpers for loop bounds: b > 0, a may be negative. */
static inline int64_t sc_floordiv(int64_t a, int64_t b) { int64_t q = a / b; return q - ((a % b) < 0); }
static inline int64_t sc_ceildiv(int64_t a, int64_t b) { return -sc_floordiv(-a, b); }
static inline int64_t sc_mod(int64_t a, int64_t b) { int64_t r = a % b; return r < 0 ? r + b : r; }
static inline int64_t sc_max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t sc_min(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t sc_clamp(int64_t a, int64_t b) { return sc_max(-b, sc_min(a, b)); }

/* Scratch for packed panels, aligned to a cache line (and so to any vector), the pointer
   malloc gave just below it; NULL if the memory is not there, and then the caller takes a
   path that needs none.  (C99: no aligned_alloc.) */
static inline void *sc_alloc(size_t bytes) {
    unsigned char *const raw = malloc(bytes + 64);
    if (!raw) return NULL;
    unsigned char *const aligned = raw + 64 - ((uintptr_t)raw & 63);  /* >= 16 bytes on */
    ((void **)aligned)[-1] = raw;
    return aligned;
}
static inline void sc_free(void *aligned) { if (aligned) free(((void **)aligned)[-1]); }

/* sc_stream_<sfx>(dst, src, n), which the vector headers define with their intrinsics: n
   elements from src to dst by non-temporal stores, past the caches (schedule.Stage). Plain
   stores up to dst's first 64-byte line and after its last whole vector, then a fence: the
   task's stores are visible to every thread once it ends. */
#define SC_STREAM(sfx, type, lanes, load, stream)                                      \
    static inline void sc_stream_##sfx(type *dst, const type *src, int64_t n) {        \
        int64_t i = 0;                                                                  \
        for (; i < n && ((uintptr_t)(dst + i) & 63); ++i) dst[i] = src[i];              \
        for (; i + (lanes) <= n; i += (lanes)) stream(dst + i, load(src + i));          \
        for (; i < n; ++i) dst[i] = src[i];                                             \
        _mm_sfence();                                                                   \
    }
