/* Quantized linear layers for CPU inference, one thread: y (M, N) = x (M, K) @ W.T + bias, float32 in and out.
 *
 * Built on first use by fxpress.utils.cbuild and called through native_quant.py, which documents the
 * weight layout (the contract with the quantize pass) and holds a torch reference of the same math.
 *
 *   int4 x int8   W[n, k] from 4-bit codes q (two per byte, low nibble = even k) and per-group
 *                 (`group` consecutive k) scales: sym  W = s (q - 8);  int  W = s (q - z), z uint8;
 *                 float  W = s q + o.  Activations are quantized here per row and per group:
 *                 sx = max|x| / 127, qx = rint(x * (127 / max|x|)) in [-127, 127].  Per group the
 *                 integer dot d = sum q qx - z sum qx is exact; y += (s sx) d  (float form:
 *                 y += (s sx) sum q qx + (o sx) sum qx, so every form sees the same quantized x).
 *   int8 x int8   W = s_n wq[n, k], wq int8 (any value, -128 included); activations per row
 *                 (one group of K); y = (s_n sx) sum wq qx.
 *   codebook      W = s cb[q] + o (o optional), cb float32 (16,) per tensor: each weight row is
 *                 dequantized once into a float buffer and dotted with every row of x.
 *
 * Paths: AVX-512-VNNI (vpdpbusd on 256-bit vectors), AVX2 (vpmaddubsw + vpmaddwd; the codebook uses
 * vpermps lookups and FMA) and portable C.  The vector paths are compiled with target attributes
 * whatever the build flags are, and `level` picks one at run time: FXP_QUANT_BEST (the best this
 * CPU has, from cpuid) or a lower one to test it; one the CPU lacks falls back to the best it has.
 * The codebook path has no VNNI variant (its AVX2 code runs there).
 *
 * Work is tiled as 4 rows of x by tiles of 16 weight rows (a weight row's unpacked codes are reused by the
 * 4 activation rows); one leftover activation row (M = 1, decode) runs on its own.  int4: the vector paths
 * lay the quantized x out to match the nibbles (see layout_index), so 32 code bytes unpack to 64 values
 * with one shift and two ANDs; groups of 32 come two per 64-block.  Each group's lanes are reduced 8
 * groups at a time (vphaddd) into one vector and folded with the row's contiguous scales and zeros;
 * vpmaddubsw results are summed in int16 for at most 256 values (each lane gains at most
 * 2 * 15 * 127 = 3810 per 32 values, 30480 per 256).  int8: the activation rows past the last tile of 4
 * (all of them at decode, M = 1) each run a GEMV over the whole weight, 4 weight rows at a time, one
 * from each quarter of it, so the weight is read as 4 sequential streams (see INT8_KERNELS); at decode
 * the weight is read once per call, from L2, L3 or DRAM, so that read is the time.  x is quantized on
 * the stack when it is small.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define FXP_X86 1
#include <immintrin.h>
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#define TARGET_VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
#endif

#define EXPORT __attribute__((visibility("default")))
#define INLINE static inline __attribute__((always_inline))

enum { FXP_QUANT_BEST = 0, FXP_QUANT_SCALAR = 1, FXP_QUANT_AVX2 = 2, FXP_QUANT_VNNI = 3 };
enum { ZERO_SYM = 0, ZERO_INT = 1, ZERO_FLOAT = 2 };
#define MT 4 /* activation rows per tile */

/* The best level this CPU runs. */
EXPORT int fxp_quant_simd_level(void) {
#ifdef FXP_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return FXP_QUANT_VNNI;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return FXP_QUANT_AVX2;
#endif
    return FXP_QUANT_SCALAR;
}

static int resolve(int level) {
    static int cached = -1; /* cpuid once per process (a benign race: every thread stores the same value) */
    if (cached < 0) cached = fxp_quant_simd_level();
    const int best = cached;
    return (level == FXP_QUANT_BEST || level > best) ? best : level;
}

/* ---- activations ------------------------------------------------------------------------------ */
typedef struct {
    int8_t *q;     /* (m, k) in one of the layouts below */
    float *sx;     /* (m, groups) */
    int32_t *qsum; /* (m, groups): sum of qx over the group */
    int64_t groups;
} acts;

/* Symmetric int8 per (row, group); the same arithmetic on every path, so qx is identical everywhere. */
/* Where value c of a row goes in the vector layouts: LAYOUT32 puts each 32-block as [even k | odd k];
 * LAYOUT64 puts each 64-block as [32 even k | 32 odd k] and a trailing 32-block as in LAYOUT32. */
enum { LAYOUT_NATURAL = 0, LAYOUT32 = 1, LAYOUT64 = 2 };
static inline int64_t layout_index(int64_t c, int64_t k, int layout) {
    if (layout == LAYOUT64 && c < k / 64 * 64) return (c & ~63) + ((c & 63) >> 1) + ((c & 1) << 5);
    if (layout != LAYOUT_NATURAL) return (c & ~31) + ((c & 31) >> 1) + ((c & 1) << 4);
    return c;
}

static void quantize_rows(const float *x, int64_t m, int64_t k, int64_t group, int layout, acts *a) {
    const int64_t groups = k / group;
    for (int64_t r = 0; r < m; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const float *xg = x + r * k + g * group;
            float amax = 0.0f;
            for (int64_t i = 0; i < group; i++) {
                const float v = xg[i] < 0 ? -xg[i] : xg[i];
                amax = v > amax ? v : amax;
            }
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int32_t qs = 0;
            for (int64_t i = 0; i < group; i++) {
                float v = __builtin_rintf(xg[i] * inv);
                v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
                a->q[r * k + layout_index(g * group + i, k, layout)] = (int8_t)v;
                qs += (int32_t)v;
            }
            a->sx[r * groups + g] = amax / 127.0f;
            a->qsum[r * groups + g] = qs;
        }
    }
}

#ifdef FXP_X86
TARGET_AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TARGET_AVX2 static inline int32_t hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* quantize_rows with AVX2, bit for bit: vcvtps2dq rounds half to even as rintf does, and the products
 * x * (127 / max|x|) are the same IEEE multiplications.  Groups are multiples of 32 (int4) or one group of
 * any K (int8, natural layout, the last K % 32 values done one by one). */
TARGET_AVX2 static void quantize_rows_avx2(const float *x, int64_t m, int64_t k, int64_t group, int layout, acts *a) {
    const int64_t groups = k / group, body = group / 32 * 32, k64 = k / 64 * 64;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i hi = _mm256_set1_epi32(127), lo = _mm256_set1_epi32(-127);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int64_t r = 0; r < m; r++) {
        int8_t *row = a->q + r * k;
        for (int64_t g = 0; g < groups; g++) {
            const float *xg = x + r * k + g * group;
            __m256 mx = _mm256_setzero_ps();
            for (int64_t i = 0; i < body; i += 8)
                mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + i)));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            float amax = _mm_cvtss_f32(m4);
            for (int64_t i = body; i < group; i++) {
                const float v = xg[i] < 0 ? -xg[i] : xg[i];
                amax = v > amax ? v : amax;
            }
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            const __m256 vinv = _mm256_set1_ps(inv);
            __m256i qsv = _mm256_setzero_si256();
            for (int64_t i = 0; i < body; i += 32) {
                __m256i v[4];
                for (int j = 0; j < 4; j++) {
                    v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + i + 8 * j), vinv));
                    v[j] = _mm256_min_epi32(_mm256_max_epi32(v[j], lo), hi);
                    qsv = _mm256_add_epi32(qsv, v[j]);
                }
                __m256i bytes = _mm256_permutevar8x32_epi32(
                    _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3])), order);
                const int64_t c = g * group + i;
                if (layout == LAYOUT_NATURAL) {
                    _mm256_storeu_si256((__m256i *)(row + c), bytes);
                    continue;
                }
                bytes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(bytes, split), 0xD8); /* [even | odd] */
                if (layout == LAYOUT32 || c >= k64) {
                    _mm256_storeu_si256((__m256i *)(row + c), bytes);
                } else { /* half of a 64-block: its evens and odds go to the block's two 32-byte halves */
                    int8_t *base = row + (c & ~(int64_t)63) + ((c & 32) >> 1);
                    _mm_storeu_si128((__m128i *)base, _mm256_castsi256_si128(bytes));
                    _mm_storeu_si128((__m128i *)(base + 32), _mm256_extracti128_si256(bytes, 1));
                }
            }
            int32_t qs = hsum8i(qsv);
            for (int64_t i = body; i < group; i++) {
                float v = __builtin_rintf(xg[i] * inv);
                v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
                row[g * group + i] = (int8_t)v;
                qs += (int32_t)v;
            }
            a->sx[r * groups + g] = amax / 127.0f;
            a->qsum[r * groups + g] = qs;
        }
    }
}
#endif

static void quantize(const float *x, int64_t m, int64_t k, int64_t group, int layout, int level, acts *a) {
    (void)level;
#ifdef FXP_X86
    if (level >= FXP_QUANT_AVX2) {
        quantize_rows_avx2(x, m, k, group, layout, a);
        return;
    }
#endif
    quantize_rows(x, m, k, group, layout, a);
}

static int alloc_acts(acts *a, int64_t m, int64_t k, int64_t group) {
    a->groups = k / group;
    const size_t qbytes = ((size_t)(m * k) + 63) / 64 * 64;
    const size_t gbytes = ((size_t)(m * a->groups) * 4 + 63) / 64 * 64;
    char *base = aligned_alloc(64, qbytes + 2 * gbytes + 64);
    if (!base) return -1;
    a->q = (int8_t *)base;
    a->sx = (float *)(base + qbytes);
    a->qsum = (int32_t *)(base + qbytes + gbytes);
    return 0;
}

/* ---- int4 x int8 ------------------------------------------------------------------------------ */
typedef struct {
    const uint8_t *codes; /* (n, k / 2) */
    const float *scales;  /* (n, groups) */
    const void *zeros;    /* uint8 or float32 (n, groups), NULL for symmetric */
    const float *bias;    /* (n) or NULL */
    int64_t n, k, group, groups;
    int zero_kind;
} int4_weight;

static inline int32_t zero_point(const int4_weight *w, int64_t n, int64_t g) {
    return w->zero_kind == ZERO_INT ? ((const uint8_t *)w->zeros)[n * w->groups + g] : 8;
}

/* y[r, n] for activation rows r in [r0, r0 + rows) and weight rows n in [n0, n1): scalar. */
static void int4_scalar(const int4_weight *w, const acts *a, int64_t r0, int rows, int64_t n0, int64_t n1, float *y) {
    for (int64_t n = n0; n < n1; n++)
    for (int64_t r = r0; r < r0 + rows; r++) {
        const uint8_t *wrow = w->codes + n * (w->k / 2);
        const int8_t *xq = a->q + r * w->k;
        float acc = 0.0f, extra = 0.0f;
        for (int64_t g = 0; g < w->groups; g++) {
            int32_t dot = 0;
            for (int64_t i = g * w->group; i < (g + 1) * w->group; i += 2) {
                const uint8_t byte = wrow[i >> 1];
                dot += (int32_t)(byte & 15) * xq[i] + (int32_t)(byte >> 4) * xq[i + 1];
            }
            const float sx = a->sx[r * a->groups + g], s = w->scales[n * w->groups + g] * sx;
            if (w->zero_kind == ZERO_FLOAT) {
                acc += s * (float)dot;
                extra += ((const float *)w->zeros)[n * w->groups + g] * sx * (float)a->qsum[r * a->groups + g];
            } else {
                acc += s * (float)(dot - zero_point(w, n, g) * a->qsum[r * a->groups + g]);
            }
        }
        y[r * w->n + n] = acc + extra + (w->bias ? w->bias[n] : 0.0f);
    }
}

#ifdef FXP_X86
/* 32 codes (16 bytes) as 32 unsigned bytes: low 128 bits the even k, high 128 bits the odd k. */
#define UNPACK_NIBBLES(p, shift, mask) \
    _mm256_and_si256(_mm256_srlv_epi64(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p))), shift), mask)

/* One group's integer dot products sum q qx for `rows` activation rows, as 8 int32 lanes each.  AVX2
 * sums up to 8 vpmaddubsw results in int16 (each lane at most 2 * 15 * 127 = 3810) before widening. */
TARGET_AVX2 INLINE void group_dot_avx2(const uint8_t *wrow, const int8_t *xq, int64_t k, int64_t kg,
                                       const int64_t blocks, const int rows, __m256i *out) {
    const __m256i shift = _mm256_setr_epi64x(0, 0, 4, 4), mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    for (int r = 0; r < rows; r++) out[r] = _mm256_setzero_si256();
    for (int64_t b0 = 0; b0 < blocks; b0 += 8) {
        const int64_t b1 = b0 + 8 < blocks ? b0 + 8 : blocks;
        __m256i acc16[MT];
        for (int r = 0; r < rows; r++) acc16[r] = _mm256_setzero_si256();
        for (int64_t b = b0; b < b1; b++) {
            const int64_t kb = kg + 32 * b;
            const __m256i wq = UNPACK_NIBBLES(wrow + kb / 2, shift, mask);
            for (int r = 0; r < rows; r++) {
                const __m256i xv = _mm256_load_si256((const __m256i *)(xq + r * k + kb));
                acc16[r] = _mm256_add_epi16(acc16[r], _mm256_maddubs_epi16(wq, xv));
            }
        }
        for (int r = 0; r < rows; r++) out[r] = _mm256_add_epi32(out[r], _mm256_madd_epi16(acc16[r], ones));
    }
}

TARGET_VNNI INLINE void group_dot_vnni(const uint8_t *wrow, const int8_t *xq, int64_t k, int64_t kg,
                                       const int64_t blocks, const int rows, __m256i *out) {
    const __m256i shift = _mm256_setr_epi64x(0, 0, 4, 4), mask = _mm256_set1_epi8(15);
    for (int r = 0; r < rows; r++) out[r] = _mm256_setzero_si256();
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t kb = kg + 32 * b;
        const __m256i wq = UNPACK_NIBBLES(wrow + kb / 2, shift, mask);
        for (int r = 0; r < rows; r++)
            out[r] = _mm256_dpbusd_epi32(out[r], wq, _mm256_load_si256((const __m256i *)(xq + r * k + kb)));
    }
}

/* 64 codes (32 bytes) as 32 unsigned bytes of the even k and 32 of the odd k (LAYOUT64 order). */
#define UNPACK64(p, lo, hi, mask)                                                                           \
    do {                                                                                                    \
        const __m256i v_ = _mm256_loadu_si256((const __m256i *)(p));                                        \
        lo = _mm256_and_si256(v_, mask);                                                                    \
        hi = _mm256_and_si256(_mm256_srli_epi16(v_, 4), mask);                                              \
    } while (0)

/* A group of `blocks64` whole 64-blocks (LAYOUT64); AVX2 sums 4 blocks (8 vpmaddubsw) in int16. */
TARGET_AVX2 INLINE void group_dot64_avx2(const uint8_t *wrow, const int8_t *xq, int64_t k, int64_t kg,
                                         const int64_t blocks64, const int rows, __m256i *out) {
    const __m256i mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    for (int r = 0; r < rows; r++) out[r] = _mm256_setzero_si256();
    for (int64_t b0 = 0; b0 < blocks64; b0 += 4) {
        const int64_t b1 = b0 + 4 < blocks64 ? b0 + 4 : blocks64;
        __m256i acc16[MT];
        for (int r = 0; r < rows; r++) acc16[r] = _mm256_setzero_si256();
        for (int64_t b = b0; b < b1; b++) {
            const int64_t kb = kg + 64 * b;
            __m256i lo, hi;
            UNPACK64(wrow + kb / 2, lo, hi, mask);
            for (int r = 0; r < rows; r++) {
                const __m256i *xv = (const __m256i *)(xq + r * k + kb);
                acc16[r] = _mm256_add_epi16(acc16[r], _mm256_maddubs_epi16(lo, _mm256_load_si256(xv)));
                acc16[r] = _mm256_add_epi16(acc16[r], _mm256_maddubs_epi16(hi, _mm256_load_si256(xv + 1)));
            }
        }
        for (int r = 0; r < rows; r++) out[r] = _mm256_add_epi32(out[r], _mm256_madd_epi16(acc16[r], ones));
    }
}

TARGET_VNNI INLINE void group_dot64_vnni(const uint8_t *wrow, const int8_t *xq, int64_t k, int64_t kg,
                                         const int64_t blocks64, const int rows, __m256i *out) {
    const __m256i mask = _mm256_set1_epi8(15);
    for (int r = 0; r < rows; r++) out[r] = _mm256_setzero_si256();
    for (int64_t kb = kg; kb < kg + 64 * blocks64; kb += 64) {
        __m256i lo, hi;
        UNPACK64(wrow + kb / 2, lo, hi, mask);
        for (int r = 0; r < rows; r++) {
            const __m256i *xv = (const __m256i *)(xq + r * k + kb);
            out[r] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(out[r], lo, _mm256_load_si256(xv)), hi,
                                         _mm256_load_si256(xv + 1));
        }
    }
}

/* Two groups of 32 in one 64-block (LAYOUT64): lanes 0-3 hold the first group's partial sums, 4-7 the second's. */
TARGET_AVX2 INLINE void pair_dot_avx2(const uint8_t *wrow, const int8_t *xq, int64_t k, int64_t kb, const int rows,
                                      __m256i *out) {
    const __m256i mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256i lo, hi;
    UNPACK64(wrow + kb / 2, lo, hi, mask);
    for (int r = 0; r < rows; r++) {
        const __m256i *xv = (const __m256i *)(xq + r * k + kb);
        out[r] = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256(xv)),
                                                    _mm256_maddubs_epi16(hi, _mm256_load_si256(xv + 1))), ones);
    }
}

TARGET_VNNI INLINE void pair_dot_vnni(const uint8_t *wrow, const int8_t *xq, int64_t k, int64_t kb, const int rows,
                                      __m256i *out) {
    const __m256i mask = _mm256_set1_epi8(15);
    __m256i lo, hi;
    UNPACK64(wrow + kb / 2, lo, hi, mask);
    for (int r = 0; r < rows; r++) {
        const __m256i *xv = (const __m256i *)(xq + r * k + kb);
        out[r] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, _mm256_load_si256(xv)), hi,
                                     _mm256_load_si256(xv + 1));
    }
}

/* Lane i of the result is the sum of group i of 4 pair vectors (group 2j in the low half of v[j], 2j + 1 high). */
TARGET_AVX2 INLINE __m256i sum_pairs4(const __m256i *v) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    return _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

TARGET_AVX2 static inline int32_t hsum4i(__m128i s) {
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* Lane i of the result is the sum of the 8 lanes of v[i]. */
TARGET_AVX2 INLINE __m256i sum_lanes8(const __m256i *v) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* The first `count` lanes set, count 1..8: lane_mask + 8 - count. */
static const int32_t lane_mask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

/* facc += (s sx) (d - z sum qx)  or, for float offsets, (s sx) d + (o sx) sum qx; one lane per group of the
 * groups g0 .. g0 + count of activation row `row` and weight row n (count < 8: the other lanes load as 0). */
TARGET_AVX2 INLINE __m256 fold8(__m256 facc, __m256i d, const int4_weight *w, const acts *a, int64_t row, int64_t n,
                                int64_t g0, const int count) {
    const int64_t wat = n * w->groups + g0, xat = row * w->groups + g0;
    const __m256i mask = _mm256_loadu_si256((const __m256i *)(lane_mask + 8 - count));
#define LOAD_PS(p) (count == 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask))
    const __m256 sx = LOAD_PS(a->sx + xat);
    const __m256i qs = count == 8 ? _mm256_loadu_si256((const __m256i *)(a->qsum + xat))
                                  : _mm256_maskload_epi32(a->qsum + xat, mask);
    if (w->zero_kind == ZERO_FLOAT) {
        facc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(qs), _mm256_mul_ps(LOAD_PS((const float *)w->zeros + wat), sx), facc);
    } else {
        if (w->zero_kind == ZERO_INT) {
            const uint8_t *zp = (const uint8_t *)w->zeros + wat;
            uint64_t bytes = 0;
            if (count == 8 || wat + 8 <= w->n * w->groups) memcpy(&bytes, zp, 8); /* lanes past count meet qs = 0 */
            else for (int i = 0; i < count; i++) bytes |= (uint64_t)zp[i] << (8 * i);
            d = _mm256_sub_epi32(d, _mm256_mullo_epi32(qs, _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)bytes))));
        } else {
            d = _mm256_sub_epi32(d, _mm256_slli_epi32(qs, 3)); /* symmetric: z = 8 */
        }
    }
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(LOAD_PS(w->scales + wat), sx), facc);
#undef LOAD_PS
}

/* One group folded on its own (the groups past the last full chunk of 8): a scalar per activation row. */
TARGET_AVX2 INLINE float fold1(const int32_t d, const int4_weight *w, const acts *a, int64_t row, int64_t n,
                               int64_t g) {
    const int64_t wat = n * w->groups + g, xat = row * w->groups + g;
    const float sx = a->sx[xat], s = w->scales[wat] * sx;
    if (w->zero_kind == ZERO_FLOAT) return s * (float)d + ((const float *)w->zeros)[wat] * sx * (float)a->qsum[xat];
    return s * (float)(d - zero_point(w, n, g) * a->qsum[xat]);
}

/* Groups are taken 8 at a time: their dot products are reduced to one vector (a lane per group) and folded
 * with the contiguous scales and zeros of the weight row and the activation scales and sums of the groups;
 * the groups past the last chunk of 8 are folded one by one.  Three shapes of group: PAIRS (group 32, two
 * per 64-block), WIDE (whole 64-blocks) and NARROW (other multiples of 32, LAYOUT32). */
enum { NARROW = 0, PAIRS = 1, WIDE = 2 };
#define INT4_ROWS(SUFFIX, TARGET)                                                                             \
    TARGET INLINE void int4_chunk_##SUFFIX(const int4_weight *w, const acts *a, int64_t r0, const int rows,  \
                                           int64_t n, int64_t g0, const int count, const int shape,          \
                                           const int64_t blocks, __m256 *facc) {                              \
        const uint8_t *wrow = w->codes + n * (w->k / 2);                                                      \
        const int8_t *xq = a->q + r0 * w->k;                                                                  \
        __m256i sums[MT];                                                                                     \
        if (shape == PAIRS) {                                                                                 \
            __m256i pv[MT][4];                                                                                \
            for (int j = 0; j < 4; j++) {                                                                     \
                __m256i dots[MT];                                                                             \
                if (2 * j < count) pair_dot_##SUFFIX(wrow, xq, w->k, (g0 + 2 * j) * 32, rows, dots);         \
                for (int r = 0; r < rows; r++) pv[r][j] = 2 * j < count ? dots[r] : _mm256_setzero_si256();   \
            }                                                                                                 \
            for (int r = 0; r < rows; r++) sums[r] = sum_pairs4(pv[r]);                                       \
        } else {                                                                                              \
            __m256i part[MT][8];                                                                              \
            for (int gi = 0; gi < 8; gi++) {                                                                  \
                __m256i dots[MT];                                                                             \
                if (gi < count && shape == WIDE)                                                              \
                    group_dot64_##SUFFIX(wrow, xq, w->k, (g0 + gi) * w->group, blocks, rows, dots);           \
                else if (gi < count)                                                                          \
                    group_dot_##SUFFIX(wrow, xq, w->k, (g0 + gi) * w->group, blocks, rows, dots);             \
                for (int r = 0; r < rows; r++) part[r][gi] = gi < count ? dots[r] : _mm256_setzero_si256();   \
            }                                                                                                 \
            for (int r = 0; r < rows; r++) sums[r] = sum_lanes8(part[r]);                                     \
        }                                                                                                     \
        for (int r = 0; r < rows; r++) facc[r] = fold8(facc[r], sums[r], w, a, r0 + r, n, g0, count);         \
    }                                                                                                         \
    /* The last group of 32 when the row has an odd number of them (a LAYOUT32 block after the 64-blocks). */ \
    TARGET INLINE void int4_last32_##SUFFIX(const int4_weight *w, const acts *a, int64_t r0, const int rows,  \
                                            int64_t n, float *tail) {                                         \
        const int64_t g = w->groups - 1;                                                                      \
        __m256i dots[MT];                                                                                     \
        group_dot_##SUFFIX(w->codes + n * (w->k / 2), a->q + r0 * w->k, w->k, g * 32, 1, rows, dots);         \
        for (int r = 0; r < rows; r++) tail[r] += fold1(hsum8i(dots[r]), w, a, r0 + r, n, g);                 \
    }                                                                                                         \
    TARGET INLINE void int4_##SUFFIX##_rows(const int4_weight *w, const acts *a, int64_t r0, const int rows,  \
                                            int64_t n0, int64_t n1, const int shape, const int64_t blocks,    \
                                            float *y) {                                                       \
        const int64_t full = w->groups / 8 * 8, rest = w->groups - full;                                      \
        const int odd = shape == PAIRS && (w->groups & 1); /* a trailing group of 32 outside the 64-blocks */  \
        for (int64_t n = n0; n < n1; n++) {                                                                   \
            __m256 facc[MT];                                                                                  \
            float tail[MT];                                                                                   \
            for (int r = 0; r < rows; r++) facc[r] = _mm256_setzero_ps(), tail[r] = 0.0f;                     \
            for (int64_t g0 = 0; g0 < full; g0 += 8)                                                          \
                int4_chunk_##SUFFIX(w, a, r0, rows, n, g0, 8, shape, blocks, facc);                           \
            if (rest >= 1 + odd)                                                                              \
                int4_chunk_##SUFFIX(w, a, r0, rows, n, full, (int)(rest - odd), shape, blocks, facc);         \
            if (odd) int4_last32_##SUFFIX(w, a, r0, rows, n, tail);                                           \
            const float b = w->bias ? w->bias[n] : 0.0f;                                                      \
            for (int r = 0; r < rows; r++) y[(r0 + r) * w->n + n] = hsum8(facc[r]) + tail[r] + b;             \
        }                                                                                                     \
    }                                                                                                         \
    /* Constant shapes and block counts for the common groups, so loops unroll and accumulators stay in      \
     * registers. */                                                                                          \
    TARGET INLINE void int4_##SUFFIX##_tile(const int4_weight *w, const acts *a, int64_t r0, const int rows, \
                                            int64_t n0, int64_t n1, float *y) {                               \
        switch (w->group) {                                                                                   \
        case 32: int4_##SUFFIX##_rows(w, a, r0, rows, n0, n1, PAIRS, 0, y); break;                            \
        case 64: int4_##SUFFIX##_rows(w, a, r0, rows, n0, n1, WIDE, 1, y); break;                             \
        case 128: int4_##SUFFIX##_rows(w, a, r0, rows, n0, n1, WIDE, 2, y); break;                            \
        default:                                                                                              \
            if (w->group % 64 == 0) int4_##SUFFIX##_rows(w, a, r0, rows, n0, n1, WIDE, w->group / 64, y);     \
            else int4_##SUFFIX##_rows(w, a, r0, rows, n0, n1, NARROW, w->group / 32, y);                      \
        }                                                                                                     \
    }                                                                                                         \
    TARGET static void int4_##SUFFIX(const int4_weight *w, const acts *a, int64_t r0, int rows, int64_t n0,  \
                                     int64_t n1, float *y) {                                                  \
        if (rows == MT) int4_##SUFFIX##_tile(w, a, r0, MT, n0, n1, y);                                        \
        else for (int r = 0; r < rows; r++) int4_##SUFFIX##_tile(w, a, r0 + r, 1, n0, n1, y);                 \
    }
INT4_ROWS(avx2, TARGET_AVX2)
INT4_ROWS(vnni, TARGET_VNNI)
#endif

typedef void (*int4_kernel)(const int4_weight *, const acts *, int64_t, int, int64_t, int64_t, float *);

/* Weight rows are walked in tiles of NT so a tile's codes stay in L1 while every activation tile uses them. */
#define NT 16
#define TILED(KERNEL, W, A, M, N, Y)                                                                      \
    for (int64_t n0 = 0; n0 < (N); n0 += NT) {                                                            \
        const int64_t n1 = n0 + NT < (N) ? n0 + NT : (N);                                                 \
        for (int64_t r0 = 0; r0 < (M); r0 += MT) {                                                        \
            const int rows = (M) - r0 < MT ? (int)((M) - r0) : MT;                                        \
            KERNEL(W, A, r0, rows, n0, n1, Y);                                                            \
        }                                                                                                 \
    }

/* x (m, k), codes (n, k/2), scales (n, k/group), zeros per zero_kind (0 sym: NULL, 1 int: uint8, 2 float:
 * float32, each (n, k/group)), bias (n) or NULL, y (m, n).  k % group == 0 and group % 32 == 0 (checked
 * by the caller).  Returns 0, or -1 if scratch memory could not be allocated. */
EXPORT int fxp_int4_linear(const float *x, int64_t m, int64_t k, const uint8_t *codes, const float *scales,
                           const void *zeros, const float *bias, int64_t n, int64_t group, int zero_kind,
                           int level, float *y) {
    const int4_weight w = {codes, scales, zeros, bias, n, k, group, k / group, zero_kind};
    acts a;
    if (alloc_acts(&a, m, k, group)) return -1;
    level = resolve(level);
    quantize(x, m, k, group, level == FXP_QUANT_SCALAR ? LAYOUT_NATURAL
             : group == 32 || group % 64 == 0 ? LAYOUT64 : LAYOUT32, level, &a);
    int4_kernel kernel = int4_scalar;
#ifdef FXP_X86
    if (level == FXP_QUANT_VNNI) kernel = int4_vnni;
    else if (level == FXP_QUANT_AVX2) kernel = int4_avx2;
#endif
    TILED(kernel, &w, &a, m, n, y);
    free(a.q);
    return 0;
}

/* ---- int8 x int8 ------------------------------------------------------------------------------ */
typedef struct {
    const int8_t *wq;    /* (n, k) */
    const float *scales; /* (n) */
    const float *bias;   /* (n) or NULL */
    int64_t n, k;
} int8_weight;

static inline int32_t int8_tail(const int8_t *wrow, const int8_t *xq, int64_t from, int64_t k) {
    int32_t dot = 0;
    for (int64_t i = from; i < k; i++) dot += (int32_t)wrow[i] * xq[i];
    return dot;
}

static void int8_scalar(const int8_weight *w, const acts *a, int64_t r0, int rows, int64_t n0, int64_t n1, float *y) {
    for (int64_t n = n0; n < n1; n++)
    for (int64_t r = r0; r < r0 + rows; r++) {
        const int32_t dot = int8_tail(w->wq + n * w->k, a->q + r * w->k, 0, w->k);
        y[r * w->n + n] = w->scales[n] * a->sx[r] * (float)dot + (w->bias ? w->bias[n] : 0.0f);
    }
}

#ifdef FXP_X86
/* Lane j of the result is the sum of the 8 lanes of v[j], j < 4. */
TARGET_AVX2 INLINE __m128i sum_lanes4(const __m256i *v) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* |w| as unsigned bytes (128 for -128) times x * sign(w) (|x| <= 127): each vpmaddubsw pair is at most
 * 2 * 128 * 127 = 32512, so nothing saturates and -128 weights are exact.
 *
 * Tiles of MT activation rows (batches): 2 activation rows by 4 weight rows at a time (8 accumulators,
 * each |w| used twice, the 8 dots reduced as one vector); the weight rows past the last 4 one at a time.
 * One activation row (decode, where the weight streams from L3 or DRAM and is read once): a GEMV over
 * 4 weight rows at a time (one from each quarter of the weight, see int8_*_gemv), 64 values a step; the
 * 4 dots end as one 128-bit vector, so the scales and bias are vector operations. */

/* How far ahead of its loads each weight row of the GEMV is prefetched (prefetches never fault, so the
 * bytes past the end of the weight are harmless), and from what weight size on: smaller ones stay in
 * L2 / L3 between calls, where the hardware prefetchers keep up and the prefetches cost ~8% here. */
#define INT8_PREFETCH 512
#define INT8_PREFETCH_MIN ((int64_t)4 << 20)
#define INT8_KERNELS(SUFFIX, TARGET, MAC)                                                                 \
    TARGET INLINE void int8_##SUFFIX##_rows(const int8_weight *w, const acts *a, int64_t r0,              \
                                            const int rows, int64_t n, float *y) {                        \
        const int8_t *wrow = w->wq + n * w->k;                                                            \
        const int64_t body = w->k / 32 * 32;                                                              \
        __m256i iacc[MT];                                                                                 \
        for (int r = 0; r < rows; r++) iacc[r] = _mm256_setzero_si256();                                  \
        for (int64_t kb = 0; kb < body; kb += 32) {                                                       \
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(wrow + kb));                          \
            const __m256i wa = _mm256_abs_epi8(wv);                                                       \
            for (int r = 0; r < rows; r++) {                                                              \
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(a->q + (r0 + r) * w->k + kb));    \
                iacc[r] = MAC(iacc[r], wa, _mm256_sign_epi8(xv, wv));                                     \
            }                                                                                             \
        }                                                                                                 \
        const float b = w->bias ? w->bias[n] : 0.0f;                                                      \
        for (int r = 0; r < rows; r++) {                                                                  \
            const int32_t dot = hsum8i(iacc[r]) + int8_tail(wrow, a->q + (r0 + r) * w->k, body, w->k);    \
            y[(r0 + r) * w->n + n] = w->scales[n] * a->sx[r0 + r] * (float)dot + b;                       \
        }                                                                                                 \
    }                                                                                                     \
    /* 2 activation rows (r, r + 1) by 4 weight rows (n .. n + 3): 8 accumulators, each |w| used twice; the   \
     * 8 dots end as one vector, a 128-bit half per activation row. */                                    \
    TARGET INLINE void int8_##SUFFIX##_2x4(const int8_weight *w, const acts *a, int64_t r, int64_t n, float *y) { \
        const int64_t k = w->k, body = k / 32 * 32;                                                       \
        const int8_t *w0 = w->wq + n * k, *x0 = a->q + r * k, *x1 = x0 + k;                               \
        __m256i acc[8];                                                                                   \
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_si256();                                      \
        for (int64_t kb = 0; kb < body; kb += 32) {                                                       \
            const __m256i xa = _mm256_loadu_si256((const __m256i *)(x0 + kb));                            \
            const __m256i xb = _mm256_loadu_si256((const __m256i *)(x1 + kb));                            \
            for (int j = 0; j < 4; j++) {                                                                 \
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(w0 + j * k + kb));                \
                const __m256i wa = _mm256_abs_epi8(wv);                                                   \
                acc[j] = MAC(acc[j], wa, _mm256_sign_epi8(xa, wv));                                       \
                acc[4 + j] = MAC(acc[4 + j], wa, _mm256_sign_epi8(xb, wv));                               \
            }                                                                                             \
        }                                                                                                 \
        __m256i d = sum_lanes8(acc);                                                                      \
        if (body < k) {                                                                                   \
            int32_t rest[8];                                                                              \
            for (int j = 0; j < 4; j++) {                                                                 \
                rest[j] = int8_tail(w0 + j * k, x0, body, k);                                             \
                rest[4 + j] = int8_tail(w0 + j * k, x1, body, k);                                         \
            }                                                                                             \
            d = _mm256_add_epi32(d, _mm256_loadu_si256((const __m256i *)rest));                           \
        }                                                                                                 \
        const __m256 scales = _mm256_broadcast_ps((const __m128 *)(w->scales + n));                       \
        const __m256 sx = _mm256_setr_m128(_mm_set1_ps(a->sx[r]), _mm_set1_ps(a->sx[r + 1]));            \
        __m256 out = _mm256_mul_ps(_mm256_mul_ps(scales, sx), _mm256_cvtepi32_ps(d));                     \
        if (w->bias) out = _mm256_add_ps(out, _mm256_broadcast_ps((const __m128 *)(w->bias + n)));        \
        _mm_storeu_ps(y + r * w->n + n, _mm256_castps256_ps128(out));                                     \
        _mm_storeu_ps(y + (r + 1) * w->n + n, _mm256_extractf128_ps(out, 1));                             \
    }                                                                                                     \
    TARGET static void int8_##SUFFIX(const int8_weight *w, const acts *a, int64_t r0, int rows, int64_t n0, \
                                     int64_t n1, float *y) {                                              \
        int64_t n = n0;                                                                                   \
        if (rows == MT)                                                                                   \
            for (; n + 4 <= n1; n += 4)                                                                   \
                for (int r = 0; r < MT; r += 2) int8_##SUFFIX##_2x4(w, a, r0 + r, n, y);                  \
        for (; n < n1; n++) int8_##SUFFIX##_rows(w, a, r0, rows, n, y);                                   \
    }                                                                                                     \
    /* The dots of `count` (1 or 4) weight rows, row j at w0 + j * stride, with xq (k values), as the      \
     * first lanes; with `prefetch` each row is prefetched INT8_PREFETCH bytes ahead of its loads. */       \
    TARGET INLINE __m128i int8_##SUFFIX##_dots(const int8_t *w0, const int64_t stride, const int8_t *xq,  \
                                               const int64_t k, const int count, const int prefetch) {    \
        const int64_t k64 = k / 64 * 64, body = k / 32 * 32;                                              \
        __m256i acc[4];                                                                                   \
        for (int j = 0; j < count; j++) acc[j] = _mm256_setzero_si256();                                  \
        for (int64_t kb = 0; kb < k64; kb += 64) {                                                        \
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + kb));                            \
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + kb + 32));                       \
            for (int j = 0; j < count; j++) {                                                             \
                const int8_t *p = w0 + j * stride + kb;                                                   \
                if (prefetch) _mm_prefetch((const char *)((uintptr_t)p + INT8_PREFETCH), _MM_HINT_T0);    \
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)p);                                \
                const __m256i v1 = _mm256_loadu_si256((const __m256i *)(p + 32));                         \
                acc[j] = MAC(MAC(acc[j], _mm256_abs_epi8(v0), _mm256_sign_epi8(x0, v0)),                  \
                             _mm256_abs_epi8(v1), _mm256_sign_epi8(x1, v1));                              \
            }                                                                                             \
        }                                                                                                 \
        if (body > k64) {                                                                                 \
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + k64));                           \
            for (int j = 0; j < count; j++) {                                                             \
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)(w0 + j * stride + k64));          \
                acc[j] = MAC(acc[j], _mm256_abs_epi8(v0), _mm256_sign_epi8(x0, v0));                      \
            }                                                                                             \
        }                                                                                                 \
        int32_t rest[4] = {0, 0, 0, 0};                                                                   \
        if (body < k)                                                                                     \
            for (int j = 0; j < count; j++) rest[j] = int8_tail(w0 + j * stride, xq, body, k);            \
        if (count == 1) return _mm_cvtsi32_si128(hsum8i(acc[0]) + rest[0]);                               \
        return _mm_add_epi32(sum_lanes4(acc), _mm_loadu_si128((const __m128i *)rest));                    \
    }                                                                                                     \
    /* y (n) = (scales sx) (wq xq) + bias for one activation row.  The weight is read once, and from L3 or   \
     * DRAM when it is large, so the order of the loads is what counts: the rows are split into 4 quarters  \
     * and row i of each quarter is summed at once, 4 long sequential streams that the hardware           \
     * prefetchers follow (a single stream, or 4 neighbouring rows at a time, reads DRAM ~1.5x slower     \
     * here); the N % 4 last rows go one by one.  Software prefetches help only a weight that comes from    \
     * DRAM (one past INT8_PREFETCH_MIN bytes) and cost a cached one time. */                             \
    TARGET static void int8_##SUFFIX##_gemv(const int8_weight *w, const int8_t *xq, float sx, float *y) {  \
        const int64_t k = w->k, q = w->n / 4;                                                             \
        const int prefetch = w->n * k >= INT8_PREFETCH_MIN;                                               \
        const __m128 vsx = _mm_set1_ps(sx);                                                               \
        for (int64_t i = 0; i < q; i++) {                                                                 \
            const __m128i d = prefetch ? int8_##SUFFIX##_dots(w->wq + i * k, q * k, xq, k, 4, 1)          \
                                       : int8_##SUFFIX##_dots(w->wq + i * k, q * k, xq, k, 4, 0);         \
            const float *s = w->scales + i;                                                               \
            const __m128 scales = _mm_setr_ps(s[0], s[q], s[2 * q], s[3 * q]);                            \
            __m128 out = _mm_mul_ps(_mm_mul_ps(scales, vsx), _mm_cvtepi32_ps(d));                         \
            if (w->bias) {                                                                                \
                const float *b = w->bias + i;                                                             \
                out = _mm_add_ps(out, _mm_setr_ps(b[0], b[q], b[2 * q], b[3 * q]));                       \
            }                                                                                             \
            float o[4];                                                                                   \
            _mm_storeu_ps(o, out);                                                                        \
            y[i] = o[0], y[i + q] = o[1], y[i + 2 * q] = o[2], y[i + 3 * q] = o[3];                       \
        }                                                                                                 \
        for (int64_t n = 4 * q; n < w->n; n++) {                                                          \
            const int32_t dot = _mm_cvtsi128_si32(int8_##SUFFIX##_dots(w->wq + n * k, 0, xq, k, 1, 0));   \
            y[n] = w->scales[n] * sx * (float)dot + (w->bias ? w->bias[n] : 0.0f);                        \
        }                                                                                                 \
    }
#define MAC_AVX2(acc, wa, xs) \
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xs), _mm256_set1_epi16(1)))
#define MAC_VNNI(acc, wa, xs) _mm256_dpbusd_epi32(acc, wa, xs)
INT8_KERNELS(avx2, TARGET_AVX2, MAC_AVX2)
INT8_KERNELS(vnni, TARGET_VNNI, MAC_VNNI)
#endif

typedef void (*int8_kernel)(const int8_weight *, const acts *, int64_t, int, int64_t, int64_t, float *);

/* Activations of up to this many bytes (m * k, decode) are quantized into a buffer on the stack. */
#define INT8_STACK 16384

static int int8_run(const int8_weight *w, const float *x, int64_t m, int level, float *y) {
    _Alignas(64) int8_t stack_q[INT8_STACK];
    float stack_sx[MT];
    int32_t stack_qsum[MT];
    acts a = {stack_q, stack_sx, stack_qsum, 1};
    const int on_stack = m <= MT && m * w->k <= INT8_STACK;
    if (!on_stack && alloc_acts(&a, m, w->k, w->k)) return -1;
    level = resolve(level);
    quantize(x, m, w->k, w->k, LAYOUT_NATURAL, level, &a);
    int8_kernel kernel = int8_scalar;
    const int64_t tiled = level == FXP_QUANT_SCALAR ? m : m / MT * MT; /* the rest: one GEMV per row */
#ifdef FXP_X86
    void (*gemv)(const int8_weight *, const int8_t *, float, float *) = NULL;
    if (level == FXP_QUANT_VNNI) kernel = int8_vnni, gemv = int8_vnni_gemv;
    else if (level == FXP_QUANT_AVX2) kernel = int8_avx2, gemv = int8_avx2_gemv;
    for (int64_t r = tiled; r < m; r++) gemv(w, a.q + r * w->k, a.sx[r], y + r * w->n);
#endif
    TILED(kernel, w, &a, tiled, w->n, y);
    if (!on_stack) free(a.q);
    return 0;
}

/* x (m, k), wq int8 (n, k), scales (n), bias (n) or NULL, y (m, n); activations per row.
 * Returns 0, or -1 if scratch memory could not be allocated. */
EXPORT int fxp_int8_linear(const float *x, int64_t m, int64_t k, const int8_t *wq, const float *scales,
                           const float *bias, int64_t n, int level, float *y) {
    const int8_weight w = {wq, scales, bias, n, k};
    return int8_run(&w, x, m, level, y);
}

/* A weight bound once (what Int8Linear holds): fxp_int8_linear with 4 arguments a call, for the
 * Python call overhead that decode pays on every linear.  native_quant.py mirrors this struct. */
typedef struct {
    const int8_t *wq;
    const float *scales;
    const float *bias;
    int64_t n, k;
    int32_t level, reserved;
} fxp_int8_bound;

EXPORT int fxp_int8_linear_bound(const fxp_int8_bound *b, const float *x, int64_t m, float *y) {
    const int8_weight w = {b->wq, b->scales, b->bias, b->n, b->k};
    return int8_run(&w, x, m, b->level, y);
}

/* ---- codebook dequant + float GEMV ------------------------------------------------------------- */
typedef struct {
    const uint8_t *codes;  /* (n, k / 2) */
    const float *scales;   /* (n, groups) */
    const float *offsets;  /* (n, groups) or NULL */
    const float *codebook; /* (16) */
    const float *bias;
    int64_t n, k, group, groups;
} codebook_weight;

/* W row n into wrow (natural order): per group a 16-entry table s * cb + o (multiply, then add). */
static void dequant_row_scalar(const codebook_weight *w, int64_t n, float *wrow) {
    const uint8_t *codes = w->codes + n * (w->k / 2);
    for (int64_t g = 0; g < w->groups; g++) {
        const float s = w->scales[n * w->groups + g], o = w->offsets ? w->offsets[n * w->groups + g] : 0.0f;
        float table[16];
        for (int j = 0; j < 16; j++) table[j] = s * w->codebook[j] + o;
        for (int64_t i = g * w->group; i < (g + 1) * w->group; i += 2) {
            wrow[i] = table[codes[i >> 1] & 15];
            wrow[i + 1] = table[codes[i >> 1] >> 4];
        }
    }
}

static void dot_rows_scalar(const float *wrow, const float *x, int64_t m, int64_t k, int64_t n, int64_t col,
                            float b, float *y) {
    for (int64_t r = 0; r < m; r++) {
        float acc = 0.0f;
        for (int64_t i = 0; i < k; i++) acc += wrow[i] * x[r * k + i];
        y[r * n + col] = acc + b;
    }
}

#ifdef FXP_X86
/* W row n into wrow, each 32-block as [even k | odd k] (x is permuted the same way). */
TARGET_AVX2 static void dequant_row_avx2(const codebook_weight *w, int64_t n, float *wrow) {
    const __m256i shift = _mm256_setr_epi64x(0, 0, 4, 4), mask = _mm256_set1_epi8(15);
    const uint8_t *codes = w->codes + n * (w->k / 2);
    const __m256 cb_lo = _mm256_loadu_ps(w->codebook), cb_hi = _mm256_loadu_ps(w->codebook + 8);
    for (int64_t g = 0; g < w->groups; g++) {
        const __m256 s = _mm256_set1_ps(w->scales[n * w->groups + g]);
        const __m256 o = _mm256_set1_ps(w->offsets ? w->offsets[n * w->groups + g] : 0.0f);
        const __m256 lo = _mm256_add_ps(_mm256_mul_ps(s, cb_lo), o), hi = _mm256_add_ps(_mm256_mul_ps(s, cb_hi), o);
        for (int64_t kb = g * w->group; kb < (g + 1) * w->group; kb += 32) {
            const __m256i q = UNPACK_NIBBLES(codes + kb / 2, shift, mask);
            const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
            for (int h = 0; h < 2; h++) {
                for (int part = 0; part < 2; part++) {
                    const __m256i idx = _mm256_cvtepu8_epi32(part ? _mm_srli_si128(halves[h], 8) : halves[h]);
                    const __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
                    const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx),
                                                      _mm256_permutevar8x32_ps(hi, idx), pick);
                    _mm256_store_ps(wrow + kb + 16 * h + 8 * part, v);
                }
            }
        }
    }
}

TARGET_AVX2 static void dot_rows_avx2(const float *wrow, const float *x, int64_t m, int64_t k, int64_t n,
                                      int64_t col, float b, float *y) {
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * k;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < k; i += 32) {
            a0 = _mm256_fmadd_ps(_mm256_load_ps(wrow + i), _mm256_load_ps(xr + i), a0);
            a1 = _mm256_fmadd_ps(_mm256_load_ps(wrow + i + 8), _mm256_load_ps(xr + i + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_load_ps(wrow + i + 16), _mm256_load_ps(xr + i + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_load_ps(wrow + i + 24), _mm256_load_ps(xr + i + 24), a3);
        }
        y[r * n + col] = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + b;
    }
}
#endif

/* x (m, k), codes (n, k/2), scales (n, k/group), offsets (n, k/group) or NULL, codebook (16), bias (n) or
 * NULL, y (m, n).  Returns 0, or -1 if scratch memory could not be allocated. */
EXPORT int fxp_codebook_linear(const float *x, int64_t m, int64_t k, const uint8_t *codes, const float *scales,
                               const float *offsets, const float *codebook, const float *bias, int64_t n,
                               int64_t group, int level, float *y) {
    const codebook_weight w = {codes, scales, offsets, codebook, bias, n, k, group, k / group};
    const size_t bytes = ((size_t)((m + 1) * k) * sizeof(float) + 63) / 64 * 64;
    float *wrow = aligned_alloc(64, bytes > 0 ? bytes : 64);
    if (!wrow) return -1;
    float *xp = wrow + k; /* x, permuted per 32-block on the vector path; k % 32 == 0 keeps rows aligned */
    void (*dequant)(const codebook_weight *, int64_t, float *) = dequant_row_scalar;
    void (*dot)(const float *, const float *, int64_t, int64_t, int64_t, int64_t, float, float *) = dot_rows_scalar;
    int permute = 0;
    (void)level;
#ifdef FXP_X86
    if (resolve(level) >= FXP_QUANT_AVX2) dequant = dequant_row_avx2, dot = dot_rows_avx2, permute = 1;
#endif
    for (int64_t i = 0; i < m * k; i++) {
        const int64_t c = i % k;
        xp[i - c + layout_index(c, k, permute ? LAYOUT32 : LAYOUT_NATURAL)] = x[i];
    }
    for (int64_t j = 0; j < n; j++) {
        dequant(&w, j, wrow);
        dot(wrow, xp, m, k, n, j, bias ? bias[j] : 0.0f, y);
    }
    free(wrow);
    return 0;
}
