/* Bit-packed kernels for binary ({-1,+1}) layers.
 *
 * Encoding: one bit per value, set when the value is -1, that is when
 * !(x >= 0) (so NaN binarizes to -1 exactly as torch.where(x >= 0, 1, -1)).
 * A row of K values takes W uint64 words; bits that hold no value are 0 in
 * both operands and never count, so
 *
 *     dot(a, b) = K - 2 * popcount(a XOR b)        (fxp_xnor_gemm)
 *
 * Linear rows use ceil(K / 64) words in value order.  Convolutions pack
 * each input pixel's C channels into CW = ceil(C / 64) words once
 * (fxp_pack_pixels); a patch is then the words of its kh * kw taps in
 * (ky, kx) order (fxp_im2col_words), and weights are packed the same way.
 * Padded taps are zero words, i.e. +1; the caller subtracts their
 * input-independent contribution.
 *
 * The MST reuse kernel (fxp_mst_reuse) works on int8 activations
 * transposed to (K, rows) in PyTorch's weight order k = (c * kh + ky) * kw + kx
 * (+1 / -1, 0 for padded taps), rows padded to a multiple of 64 with zeros,
 * so that one weight position is one 64-byte add.
 *
 * Everything is single-threaded and needs only libc.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#include <immintrin.h>
#define FXP_AVX512_POPCNT 1
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#define FXP_AVX2_POPCNT 1
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define FXP_NEON_POPCNT 1
#endif

#define FXP_EXPORT __attribute__((visibility("default")))

static inline uint64_t neg_bit(float v) { return (uint64_t)(!(v >= 0.0f)); }

/* +1 / -1 without a branch (signs of activations are unpredictable). */
static inline int8_t sign_byte(float v) { return (int8_t)(1 - 2 * (int)neg_bit(v)); }

/* Bits of n <= 64 consecutive floats: bit b set when !(x[b] >= 0). */
static inline uint64_t pack_word(const float *x, int64_t n) {
#ifdef FXP_AVX512_POPCNT
    if (n == 64) {
        const __m512 zero = _mm512_setzero_ps();
        uint64_t word = 0;
        for (int q = 0; q < 4; ++q)
            word |= (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(x + 16 * q), zero, _CMP_NGE_UQ) << (16 * q);
        return word;
    }
#endif
    uint64_t word = 0;
    for (int64_t b = 0; b < n; ++b)
        word |= neg_bit(x[b]) << b;
    return word;
}

/* rows x K floats -> rows x ceil(K / 64) words. */
FXP_EXPORT void fxp_pack_signs(const float *x, int64_t rows, int64_t k, uint64_t *out) {
    const int64_t words = (k + 63) / 64;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t w = 0; w < words; ++w) {
            const int64_t base = w * 64;
            out[r * words + w] = pack_word(x + r * k + base, (k - base) < 64 ? (k - base) : 64);
        }
}

/* rows x K floats -> K x stride int8 (+1 / -1); columns rows..stride-1 are left as they are. */
FXP_EXPORT void fxp_signs_transposed(const float *x, int64_t rows, int64_t k, int64_t stride, int8_t *out) {
    for (int64_t p0 = 0; p0 < k; p0 += 64) {  /* blocks of 64 output lines stay in L1 */
        const int64_t p1 = (k - p0) < 64 ? k : p0 + 64;
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t p = p0; p < p1; ++p)
                out[p * stride + r] = sign_byte(x[r * k + p]);
    }
}

typedef struct {
    int64_t batch, channels, height, width;  /* input NCHW, contiguous */
    int64_t kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
    int64_t out_h, out_w;
} conv_shape;

/* NCHW floats -> (B, H, W, CW) words: bit c % 64 of word c / 64 of a pixel is channel c's sign. */
FXP_EXPORT void fxp_pack_pixels(const float *x, const conv_shape *s, uint64_t *out) {
    const int64_t cw = (s->channels + 63) / 64, plane = s->height * s->width;
    memset(out, 0, (size_t)(s->batch * plane * cw) * sizeof(uint64_t));
    for (int64_t b = 0; b < s->batch; ++b)
        for (int64_t c = 0; c < s->channels; ++c) {
            const float *src = x + (b * s->channels + c) * plane;
            uint64_t *dst = out + b * plane * cw + c / 64;
            const uint64_t shift = (uint64_t)(c % 64);
            for (int64_t i = 0; i < plane; ++i)
                dst[i * cw] |= neg_bit(src[i]) << shift;
        }
}

/* Packed pixels -> rows (b, oy, ox) of kh * kw * CW words; taps outside the input are zero (+1). */
FXP_EXPORT void fxp_im2col_words(const uint64_t *pixels, const conv_shape *s, uint64_t *out) {
    const int64_t cw = (s->channels + 63) / 64, words = s->kh * s->kw * cw;
    for (int64_t b = 0; b < s->batch; ++b)
        for (int64_t oy = 0; oy < s->out_h; ++oy)
            for (int64_t ox = 0; ox < s->out_w; ++ox) {
                uint64_t *dst = out + ((b * s->out_h + oy) * s->out_w + ox) * words;
                for (int64_t ky = 0; ky < s->kh; ++ky) {
                    const int64_t iy = oy * s->stride_h - s->pad_h + ky * s->dil_h;
                    for (int64_t kx = 0; kx < s->kw; ++kx, dst += cw) {
                        const int64_t ix = ox * s->stride_w - s->pad_w + kx * s->dil_w;
                        if (iy < 0 || iy >= s->height || ix < 0 || ix >= s->width)
                            memset(dst, 0, (size_t)cw * sizeof(uint64_t));
                        else
                            memcpy(dst, pixels + ((b * s->height + iy) * s->width + ix) * cw,
                                   (size_t)cw * sizeof(uint64_t));
                    }
                }
            }
}

/* For each tap (ky, kx) and output position (oy, ox): the input pixel it reads (iy * W + ix), or -1. */
static void tap_indices(const conv_shape *s, int32_t *index) {
    for (int64_t ky = 0; ky < s->kh; ++ky)
        for (int64_t kx = 0; kx < s->kw; ++kx)
            for (int64_t oy = 0; oy < s->out_h; ++oy)
                for (int64_t ox = 0; ox < s->out_w; ++ox) {
                    const int64_t iy = oy * s->stride_h - s->pad_h + ky * s->dil_h;
                    const int64_t ix = ox * s->stride_w - s->pad_w + kx * s->dil_w;
                    const int inside = iy >= 0 && iy < s->height && ix >= 0 && ix < s->width;
                    *index++ = inside ? (int32_t)(iy * s->width + ix) : -1;
                }
}

/* im2col + sign, transposed: K x stride int8 (+1 / -1, 0 for padded taps), K in PyTorch order.
 * Returns 0, or -1 if scratch memory cannot be allocated. */
FXP_EXPORT int fxp_im2col_transposed(const float *x, const conv_shape *s, int64_t stride, int8_t *out) {
    const int64_t plane = s->height * s->width, total = s->batch * s->channels * plane;
    const int64_t positions = s->out_h * s->out_w, taps = s->kh * s->kw;
    int8_t *signs = malloc((size_t)total);
    int32_t *index = malloc((size_t)(taps * positions) * sizeof(int32_t));
    if (signs == NULL || index == NULL) {
        free(signs);
        free(index);
        return -1;
    }
    for (int64_t i = 0; i < total; ++i)
        signs[i] = sign_byte(x[i]);
    tap_indices(s, index);
    for (int64_t c = 0; c < s->channels; ++c)
        for (int64_t t = 0; t < taps; ++t) {
            const int32_t *tap = index + t * positions;
            int8_t *dst = out + (c * taps + t) * stride;
            for (int64_t b = 0; b < s->batch; ++b, dst += positions) {
                const int8_t *src = signs + (b * s->channels + c) * plane;
                for (int64_t l = 0; l < positions; ++l)
                    dst[l] = tap[l] >= 0 ? src[tap[l]] : 0;
            }
        }
    free(signs);
    free(index);
    return 0;
}

/* ---- dense XNOR-popcount GEMM: out[i][j] = K - 2 popcount(a_i ^ b_j) over W words --------
 * One micro-tile per path (MR rows of a against NR rows of b); the paths give the same
 * integers.  Levels: 0 = scalar popcnt, 1 = AVX-512 VPOPCNTDQ, 2 = AVX2 (vpshufb nibble
 * lookup), 3 = NEON (vcnt, aarch64 only).  fxp_xnor_gemm runs the best one compiled in;
 * fxp_xnor_gemm_at a chosen one. */
#define MR 2
#define NR 4

typedef void (*tile_fn)(const uint64_t *a, const uint64_t *b, int64_t w, int64_t mr, int64_t nr, int64_t k,
                        int32_t *out, int64_t ldo);

/* mr <= MR rows of a against nr <= NR rows of b. */
static void micro_tile_scalar(const uint64_t *a, const uint64_t *b, int64_t w, int64_t mr, int64_t nr,
                              int64_t k, int32_t *out, int64_t ldo) {
    uint64_t acc[MR][NR] = {{0}};
    if (mr == MR && nr == NR) {
        for (int64_t q = 0; q < w; ++q) {
            const uint64_t a0 = a[q], a1 = a[w + q];
            for (int j = 0; j < NR; ++j) {
                const uint64_t bw = b[j * w + q];
                acc[0][j] += (uint64_t)__builtin_popcountll(a0 ^ bw);
                acc[1][j] += (uint64_t)__builtin_popcountll(a1 ^ bw);
            }
        }
    } else {
        for (int64_t i = 0; i < mr; ++i)
            for (int64_t j = 0; j < nr; ++j)
                for (int64_t q = 0; q < w; ++q)
                    acc[i][j] += (uint64_t)__builtin_popcountll(a[i * w + q] ^ b[j * w + q]);
    }
    for (int64_t i = 0; i < mr; ++i)
        for (int64_t j = 0; j < nr; ++j)
            out[i * ldo + j] = (int32_t)(k - 2 * (int64_t)acc[i][j]);
}

#ifdef FXP_AVX512_POPCNT
static inline __m512i load_words(const uint64_t *p, int64_t left) {
    if (left >= 8)
        return _mm512_loadu_si512((const void *)p);
    return _mm512_maskz_loadu_epi64((__mmask8)((1u << left) - 1u), p);
}

static void micro_tile_avx512(const uint64_t *a, const uint64_t *b, int64_t w, int64_t mr, int64_t nr,
                              int64_t k, int32_t *out, int64_t ldo) {
    __m512i acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j)
            acc[i][j] = _mm512_setzero_si512();
    for (int64_t q = 0; q < w; q += 8) {
        __m512i bv[NR];
        for (int j = 0; j < NR; ++j)
            bv[j] = j < nr ? load_words(b + j * w + q, w - q) : _mm512_setzero_si512();
        for (int i = 0; i < MR && i < mr; ++i) {
            const __m512i av = load_words(a + i * w + q, w - q);
            for (int j = 0; j < NR; ++j)
                acc[i][j] = _mm512_add_epi64(acc[i][j], _mm512_popcnt_epi64(_mm512_xor_si512(av, bv[j])));
        }
    }
    for (int64_t i = 0; i < mr; ++i)
        for (int64_t j = 0; j < nr; ++j)
            out[i * ldo + j] = (int32_t)(k - 2 * _mm512_reduce_add_epi64(acc[i][j]));
}
#endif

#ifdef FXP_AVX2_POPCNT
/* Byte-wise popcount of 32 bytes (Mula): a vpshufb lookup of each nibble's count; every byte <= 8. */
static inline __m256i popcount_bytes(__m256i v, __m256i lut, __m256i nibble) {
    const __m256i lo = _mm256_and_si256(v, nibble);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

/* Vectors of 4 words whose byte counts are summed in bytes before widening: 31 * 8 = 248 <= 255. */
#define AVX2_BLOCK 31

/* The AVX2 tile; inlined with constant mr, nr for full tiles.  Words past the last multiple
 * of 4 are counted with scalar popcnt; rows i >= mr of a and j >= nr of b are never read. */
static inline __attribute__((always_inline)) void avx2_tile_body(const uint64_t *a, const uint64_t *b, int64_t w,
                                                                 int64_t mr, int64_t nr, int64_t k, int32_t *out,
                                                                 int64_t ldo) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i nibble = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    const int64_t wv = w & ~(int64_t)3;
    __m256i total[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j)
            total[i][j] = zero;
    for (int64_t q0 = 0; q0 < wv; q0 += 4 * AVX2_BLOCK) {
        const int64_t q1 = (wv - q0) < 4 * AVX2_BLOCK ? wv : q0 + 4 * AVX2_BLOCK;
        __m256i bytes[MR][NR];
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j)
                bytes[i][j] = zero;
        for (int64_t q = q0; q < q1; q += 4) {
            /* the MR a-vectors stay in registers, each b-vector is loaded once and used at once:
             * 8 accumulators + 2 + 1 + lut + mask + temporaries fit the 16 ymm registers */
            __m256i av[MR];
            for (int i = 0; i < MR; ++i)
                av[i] = i < mr ? _mm256_loadu_si256((const __m256i *)(a + i * w + q)) : zero;
            for (int j = 0; j < NR && j < nr; ++j) {
                const __m256i bv = _mm256_loadu_si256((const __m256i *)(b + j * w + q));
                for (int i = 0; i < MR; ++i) {
                    const __m256i diff = _mm256_xor_si256(av[i], bv);
                    bytes[i][j] = _mm256_add_epi8(bytes[i][j], popcount_bytes(diff, lut, nibble));
                }
            }
        }
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j)
                total[i][j] = _mm256_add_epi64(total[i][j], _mm256_sad_epu8(bytes[i][j], zero));
    }
    for (int64_t i = 0; i < mr; ++i)
        for (int64_t j = 0; j < nr; ++j) {
            uint64_t lanes[4];
            _mm256_storeu_si256((__m256i *)lanes, total[i][j]);
            uint64_t count = lanes[0] + lanes[1] + lanes[2] + lanes[3];
            for (int64_t q = wv; q < w; ++q)
                count += (uint64_t)__builtin_popcountll(a[i * w + q] ^ b[j * w + q]);
            out[i * ldo + j] = (int32_t)(k - 2 * (int64_t)count);
        }
}

/* Below this many words per row the per-output reduction costs more than the vectors save
 * (measured: equal at 8 words, scalar ahead at 4-5), so short rows take the scalar tile. */
#define AVX2_MIN_WORDS 8

static void micro_tile_avx2(const uint64_t *a, const uint64_t *b, int64_t w, int64_t mr, int64_t nr,
                            int64_t k, int32_t *out, int64_t ldo) {
    if (w < AVX2_MIN_WORDS)
        micro_tile_scalar(a, b, w, mr, nr, k, out, ldo);
    else if (mr == MR && nr == NR)
        avx2_tile_body(a, b, w, MR, NR, k, out, ldo);
    else
        avx2_tile_body(a, b, w, mr, nr, k, out, ldo);
}
#endif

#ifdef FXP_NEON_POPCNT
/* Vectors of 2 words whose byte counts (vcnt: every byte <= 8) are summed in bytes before
 * widening: 31 * 8 = 248 <= 255. */
#define NEON_BLOCK 31

/* The NEON tile; inlined with constant mr, nr for full tiles.  8 byte accumulators + 8 wide
 * totals + 2 a-vectors + 1 b-vector + temporaries fit the 32 q registers.  A last odd word
 * is counted with scalar popcount; rows i >= mr of a and j >= nr of b are never read. */
static inline __attribute__((always_inline)) void neon_tile_body(const uint64_t *a, const uint64_t *b, int64_t w,
                                                                 int64_t mr, int64_t nr, int64_t k, int32_t *out,
                                                                 int64_t ldo) {
    const int64_t wv = w & ~(int64_t)1;
    const uint8x16_t zero = vdupq_n_u8(0);
    uint64x2_t total[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j)
            total[i][j] = vdupq_n_u64(0);
    for (int64_t q0 = 0; q0 < wv; q0 += 2 * NEON_BLOCK) {
        const int64_t q1 = (wv - q0) < 2 * NEON_BLOCK ? wv : q0 + 2 * NEON_BLOCK;
        uint8x16_t bytes[MR][NR];
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j)
                bytes[i][j] = zero;
        for (int64_t q = q0; q < q1; q += 2) {
            uint8x16_t av[MR];
            for (int i = 0; i < MR; ++i)
                av[i] = i < mr ? vreinterpretq_u8_u64(vld1q_u64(a + i * w + q)) : zero;
            for (int j = 0; j < NR && j < nr; ++j) {
                const uint8x16_t bv = vreinterpretq_u8_u64(vld1q_u64(b + j * w + q));
                for (int i = 0; i < MR; ++i)
                    bytes[i][j] = vaddq_u8(bytes[i][j], vcntq_u8(veorq_u8(av[i], bv)));
            }
        }
        /* bytes -> 8 u16 -> 4 u32 -> accumulated into 2 u64 lanes (pairwise widening adds) */
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j)
                total[i][j] = vpadalq_u32(total[i][j], vpaddlq_u16(vpaddlq_u8(bytes[i][j])));
    }
    for (int64_t i = 0; i < mr; ++i)
        for (int64_t j = 0; j < nr; ++j) {
            uint64_t count = vaddvq_u64(total[i][j]);
            for (int64_t q = wv; q < w; ++q)
                count += (uint64_t)__builtin_popcountll(a[i * w + q] ^ b[j * w + q]);
            out[i * ldo + j] = (int32_t)(k - 2 * (int64_t)count);
        }
}

/* No short-row cut-over to the scalar tile as on AVX2: aarch64 has no scalar popcount
 * instruction before CSSC, so __builtin_popcountll is itself a vcnt of one word. */
static void micro_tile_neon(const uint64_t *a, const uint64_t *b, int64_t w, int64_t mr, int64_t nr,
                            int64_t k, int32_t *out, int64_t ldo) {
    if (mr == MR && nr == NR)
        neon_tile_body(a, b, w, MR, NR, k, out, ldo);
    else
        neon_tile_body(a, b, w, mr, nr, k, out, ldo);
}
#endif

/* The micro-tile of a level, NULL if this build does not have it. */
static tile_fn tile_for(int level) {
    switch (level) {
    case 0:
        return micro_tile_scalar;
#ifdef FXP_AVX512_POPCNT
    case 1:
        return micro_tile_avx512;
#endif
#ifdef FXP_AVX2_POPCNT
    case 2:
        return micro_tile_avx2;
#endif
#ifdef FXP_NEON_POPCNT
    case 3:
        return micro_tile_neon;
#endif
    default:
        return NULL;
    }
}

/* Which popcount path fxp_xnor_gemm takes: 1 = AVX-512 VPOPCNTDQ, 2 = AVX2, 3 = NEON, 0 = scalar. */
FXP_EXPORT int fxp_simd_level(void) {
#if defined(FXP_AVX512_POPCNT)
    return 1;
#elif defined(FXP_AVX2_POPCNT)
    return 2;
#elif defined(FXP_NEON_POPCNT)
    return 3;
#else
    return 0;
#endif
}

/* 1 if this build can run level (see fxp_simd_level), else 0. */
FXP_EXPORT int fxp_has_simd_level(int level) { return tile_for(level) != NULL; }

/* a: m x w words, b: n x w words -> out: m x n int32, on the given level's path.
 * Returns 0, or -1 (out untouched) if this build does not have that level. */
FXP_EXPORT int fxp_xnor_gemm_at(const uint64_t *a, const uint64_t *b, int64_t m, int64_t n, int64_t k, int64_t w,
                                int32_t *out, int level) {
    const tile_fn tile = tile_for(level);
    if (tile == NULL)
        return -1;
    for (int64_t j = 0; j < n; j += NR) {
        const int64_t nr = (n - j) < NR ? (n - j) : NR;
        for (int64_t i = 0; i < m; i += MR)
            tile(a + i * w, b + j * w, w, (m - i) < MR ? (m - i) : MR, nr, k, out + i * n + j, n);
    }
    return 0;
}

/* a: m x w words, b: n x w words -> out: m x n int32, on the best path compiled in. */
FXP_EXPORT void fxp_xnor_gemm(const uint64_t *a, const uint64_t *b, int64_t m, int64_t n, int64_t k, int64_t w,
                              int32_t *out) {
    fxp_xnor_gemm_at(a, b, m, n, k, w, out, fxp_simd_level());
}

/* ---- MST-ordered channel reuse ---------------------------------------------------------
 * plan (int32): [C, K, channel[C], parent[C], offset[C + 1], position[offset[C]]].  Step s
 * computes channel j = channel[s] from parent i = parent[s] (computed earlier; -1: root):
 *
 *     y_j = y_i + 2 * sum_{p in D} w_j[p] x[p]        (root: y_j = sum_{p < K} w_j[p] x[p])
 *
 * D = position[offset[s] : offset[s + 1]], the positions where w_i and w_j differ (all
 * K for the root), ordered so that the first positive[s] have w_j[p] = +1 and the rest -1.
 * xt is K x stride int8 (stride a multiple of ROWS); y is C x stride int32.  Sums of up
 * to 127 terms are accumulated in int8 (one 64-byte add per position), then widened.
 */
#define ROWS 64
#define CHUNK 127

#if defined(FXP_AVX512_POPCNT) && defined(__AVX512BW__)
/* acc[r] += sign * sum_c xt[pos[c]][r] for the ROWS rows at xt, one 64-byte add per position. */
static void add_rows(const int8_t *xt, int64_t stride, const int32_t *pos, int64_t count, int32_t sign,
                     int32_t acc[ROWS]) {
    for (int64_t c0 = 0; c0 < count; c0 += CHUNK) {
        const int64_t c1 = (count - c0) < CHUNK ? count : c0 + CHUNK;
        __m512i part = _mm512_setzero_si512();
        for (int64_t c = c0; c < c1; ++c)
            part = _mm512_add_epi8(part, _mm512_loadu_si512((const void *)(xt + (int64_t)pos[c] * stride)));
        for (int q = 0; q < 4; ++q) {
            __m512i wide = _mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(part, q));
            __m512i *dst = (__m512i *)(acc + 16 * q);
            _mm512_storeu_si512(dst, sign > 0 ? _mm512_add_epi32(_mm512_loadu_si512(dst), wide)
                                              : _mm512_sub_epi32(_mm512_loadu_si512(dst), wide));
        }
    }
}
#else
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-loop-unroll-and-jam")))
#endif
static void add_rows(const int8_t *xt, int64_t stride, const int32_t *pos, int64_t count, int32_t sign,
                     int32_t acc[ROWS]) {
    for (int64_t c0 = 0; c0 < count; c0 += CHUNK) {
        const int64_t c1 = (count - c0) < CHUNK ? count : c0 + CHUNK;
        int8_t part[ROWS] = {0};
        for (int64_t c = c0; c < c1; ++c) {
            const int8_t *xr = xt + (int64_t)pos[c] * stride;
            for (int r = 0; r < ROWS; ++r)
                part[r] = (int8_t)(part[r] + xr[r]);
        }
        for (int r = 0; r < ROWS; ++r)
            acc[r] += sign * part[r];
    }
}
#endif

FXP_EXPORT void fxp_mst_reuse(const int8_t *xt, int64_t stride, const int32_t *plan, const int32_t *positive,
                              int32_t *y) {
    const int64_t c = plan[0];
    const int32_t *channel = plan + 2, *parent = channel + c, *offset = parent + c, *position = offset + c + 1;
    for (int64_t m0 = 0; m0 < stride; m0 += ROWS)
        for (int64_t s = 0; s < c; ++s) {
            int32_t acc[ROWS] = {0};
            const int32_t *pos = position + offset[s];
            add_rows(xt + m0, stride, pos, positive[s], 1, acc);
            add_rows(xt + m0, stride, pos + positive[s], offset[s + 1] - offset[s] - positive[s], -1, acc);
            int32_t *yj = y + channel[s] * stride + m0;
            if (parent[s] < 0) {
                for (int r = 0; r < ROWS; ++r)
                    yj[r] = acc[r];
            } else {
                const int32_t *yi = y + parent[s] * stride + m0;
                for (int r = 0; r < ROWS; ++r)
                    yj[r] = yi[r] + 2 * acc[r];
            }
        }
}
