/* Token-minor sparse-weight linear layer for fxpress::sparse_linear, float32, inference, one thread.
 *
 * Built on first use by fxpress.utils.cbuild and called through native_sparse.py.
 *
 *     y (T, N) = x (T, K) @ W.T + bias,   W (N, K) stored compressed by rows of blocks:
 *     block rows R = 4   values (nb, 4), col_index (nb), row_ptr (ceil(N / 4) + 1): block p of row
 *                        block i holds W[4i + r, col_index[p]] = values[p][r], r = 0..3 (rows past N are 0)
 *     block rows R = 1   plain CSR: values (nnz), col_index (nnz), row_ptr (N + 1)
 *
 * Tokens are the vector axis: a tile of TILE tokens of x is transposed into xt (K, TILE), so one
 * stored weight column is a broadcast multiply-add over whole vectors of tokens, and a 4x1 block
 * reuses each loaded token vector for 4 output rows.  The tile's outputs go to yt (N, TILE) and are
 * transposed back into y.  Tokens past T in the last tile are zeros and never written out.
 *
 * Paths: AVX-512 (2 x 16 tokens per tile) and AVX2 + FMA (2 x 8) when the build targets them
 * (cbuild uses -march=native), and portable C (16 tokens) always; `level` picks one at run time
 * (FXP_SPARSE_BEST, or a lower one to test it; a level the build lacks falls back to the best it has).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#define EXPORT __attribute__((visibility("default")))

enum { FXP_SPARSE_BEST = 0, FXP_SPARSE_SCALAR = 1, FXP_SPARSE_AVX2 = 2, FXP_SPARSE_AVX512 = 3 };
#define SCALAR_TILE 16

/* The best level this build has. */
EXPORT int fxp_sparse_simd_level(void) {
#if defined(__AVX512F__)
    return FXP_SPARSE_AVX512;
#elif defined(__AVX2__) && defined(__FMA__)
    return FXP_SPARSE_AVX2;
#else
    return FXP_SPARSE_SCALAR;
#endif
}

typedef struct {
    const float *values;
    const int32_t *col;
    const int32_t *row_ptr;
    const float *bias;
    int64_t n;           /* output features */
    int64_t block_rows;  /* 1 or 4 */
} sparse_weight;

/* ---- portable C ------------------------------------------------------------------------------ */
static void block4_scalar(const sparse_weight *w, const float *xt, float *yt) {
    const int64_t blocks = (w->n + 3) / 4;
    for (int64_t i = 0; i < blocks; i++) {
        float acc[4][SCALAR_TILE];
        for (int r = 0; r < 4; r++) {
            const float b = (w->bias && 4 * i + r < w->n) ? w->bias[4 * i + r] : 0.0f;
            for (int j = 0; j < SCALAR_TILE; j++) acc[r][j] = b;
        }
        for (int32_t p = w->row_ptr[i]; p < w->row_ptr[i + 1]; p++) {
            const float *xc = xt + (int64_t)w->col[p] * SCALAR_TILE, *v = w->values + 4 * (int64_t)p;
            for (int r = 0; r < 4; r++)
                for (int j = 0; j < SCALAR_TILE; j++) acc[r][j] += v[r] * xc[j];
        }
        for (int r = 0; r < 4 && 4 * i + r < w->n; r++)
            memcpy(yt + (4 * i + r) * SCALAR_TILE, acc[r], sizeof acc[r]);
    }
}

static void csr_scalar(const sparse_weight *w, const float *xt, float *yt) {
    for (int64_t i = 0; i < w->n; i++) {
        float acc[SCALAR_TILE];
        const float b = w->bias ? w->bias[i] : 0.0f;
        for (int j = 0; j < SCALAR_TILE; j++) acc[j] = b;
        for (int32_t p = w->row_ptr[i]; p < w->row_ptr[i + 1]; p++) {
            const float *xc = xt + (int64_t)w->col[p] * SCALAR_TILE, v = w->values[p];
            for (int j = 0; j < SCALAR_TILE; j++) acc[j] += v * xc[j];
        }
        memcpy(yt + i * SCALAR_TILE, acc, sizeof acc);
    }
}

/* ---- AVX2 + FMA: 16 tokens as two 8-float vectors ------------------------------------------------ */
#if defined(__AVX2__) && defined(__FMA__)
#define AVX2_TILE 16
static void block4_avx2(const sparse_weight *w, const float *xt, float *yt) {
    const int64_t blocks = (w->n + 3) / 4;
    for (int64_t i = 0; i < blocks; i++) {
        __m256 a[4][2];
        for (int r = 0; r < 4; r++) {
            const __m256 b = _mm256_set1_ps((w->bias && 4 * i + r < w->n) ? w->bias[4 * i + r] : 0.0f);
            a[r][0] = b;
            a[r][1] = b;
        }
        for (int32_t p = w->row_ptr[i]; p < w->row_ptr[i + 1]; p++) {
            const float *xc = xt + (int64_t)w->col[p] * AVX2_TILE, *v = w->values + 4 * (int64_t)p;
            const __m256 x0 = _mm256_load_ps(xc), x1 = _mm256_load_ps(xc + 8);
            for (int r = 0; r < 4; r++) {
                const __m256 vr = _mm256_broadcast_ss(v + r);
                a[r][0] = _mm256_fmadd_ps(vr, x0, a[r][0]);
                a[r][1] = _mm256_fmadd_ps(vr, x1, a[r][1]);
            }
        }
        for (int r = 0; r < 4 && 4 * i + r < w->n; r++) {
            _mm256_store_ps(yt + (4 * i + r) * AVX2_TILE, a[r][0]);
            _mm256_store_ps(yt + (4 * i + r) * AVX2_TILE + 8, a[r][1]);
        }
    }
}

static void csr_avx2(const sparse_weight *w, const float *xt, float *yt) {
    for (int64_t i = 0; i < w->n; i++) {
        __m256 a0 = _mm256_set1_ps(w->bias ? w->bias[i] : 0.0f), a1 = a0;
        __m256 c0 = _mm256_setzero_ps(), c1 = c0;  /* a second chain hides the FMA latency */
        int32_t p = w->row_ptr[i];
        const int32_t end = w->row_ptr[i + 1];
        for (; p + 1 < end; p += 2) {
            const float *xa = xt + (int64_t)w->col[p] * AVX2_TILE, *xb = xt + (int64_t)w->col[p + 1] * AVX2_TILE;
            const __m256 va = _mm256_broadcast_ss(w->values + p), vb = _mm256_broadcast_ss(w->values + p + 1);
            a0 = _mm256_fmadd_ps(va, _mm256_load_ps(xa), a0);
            a1 = _mm256_fmadd_ps(va, _mm256_load_ps(xa + 8), a1);
            c0 = _mm256_fmadd_ps(vb, _mm256_load_ps(xb), c0);
            c1 = _mm256_fmadd_ps(vb, _mm256_load_ps(xb + 8), c1);
        }
        if (p < end) {
            const float *xa = xt + (int64_t)w->col[p] * AVX2_TILE;
            const __m256 va = _mm256_broadcast_ss(w->values + p);
            a0 = _mm256_fmadd_ps(va, _mm256_load_ps(xa), a0);
            a1 = _mm256_fmadd_ps(va, _mm256_load_ps(xa + 8), a1);
        }
        _mm256_store_ps(yt + i * AVX2_TILE, _mm256_add_ps(a0, c0));
        _mm256_store_ps(yt + i * AVX2_TILE + 8, _mm256_add_ps(a1, c1));
    }
}
#endif

/* ---- AVX-512: 32 tokens as two 16-float vectors -------------------------------------------------- */
#if defined(__AVX512F__)
#define AVX512_TILE 32
static void block4_avx512(const sparse_weight *w, const float *xt, float *yt) {
    const int64_t blocks = (w->n + 3) / 4;
    for (int64_t i = 0; i < blocks; i++) {
        __m512 a[4][2];
        for (int r = 0; r < 4; r++) {
            const __m512 b = _mm512_set1_ps((w->bias && 4 * i + r < w->n) ? w->bias[4 * i + r] : 0.0f);
            a[r][0] = b;
            a[r][1] = b;
        }
        for (int32_t p = w->row_ptr[i]; p < w->row_ptr[i + 1]; p++) {
            const float *xc = xt + (int64_t)w->col[p] * AVX512_TILE, *v = w->values + 4 * (int64_t)p;
            const __m512 x0 = _mm512_load_ps(xc), x1 = _mm512_load_ps(xc + 16);
            for (int r = 0; r < 4; r++) {
                const __m512 vr = _mm512_set1_ps(v[r]);
                a[r][0] = _mm512_fmadd_ps(vr, x0, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(vr, x1, a[r][1]);
            }
        }
        for (int r = 0; r < 4 && 4 * i + r < w->n; r++) {
            _mm512_store_ps(yt + (4 * i + r) * AVX512_TILE, a[r][0]);
            _mm512_store_ps(yt + (4 * i + r) * AVX512_TILE + 16, a[r][1]);
        }
    }
}

static void csr_avx512(const sparse_weight *w, const float *xt, float *yt) {
    for (int64_t i = 0; i < w->n; i++) {
        __m512 a0 = _mm512_set1_ps(w->bias ? w->bias[i] : 0.0f), a1 = a0;
        __m512 c0 = _mm512_setzero_ps(), c1 = c0;
        int32_t p = w->row_ptr[i];
        const int32_t end = w->row_ptr[i + 1];
        for (; p + 1 < end; p += 2) {
            const float *xa = xt + (int64_t)w->col[p] * AVX512_TILE, *xb = xt + (int64_t)w->col[p + 1] * AVX512_TILE;
            const __m512 va = _mm512_set1_ps(w->values[p]), vb = _mm512_set1_ps(w->values[p + 1]);
            a0 = _mm512_fmadd_ps(va, _mm512_load_ps(xa), a0);
            a1 = _mm512_fmadd_ps(va, _mm512_load_ps(xa + 16), a1);
            c0 = _mm512_fmadd_ps(vb, _mm512_load_ps(xb), c0);
            c1 = _mm512_fmadd_ps(vb, _mm512_load_ps(xb + 16), c1);
        }
        if (p < end) {
            const float *xa = xt + (int64_t)w->col[p] * AVX512_TILE;
            const __m512 va = _mm512_set1_ps(w->values[p]);
            a0 = _mm512_fmadd_ps(va, _mm512_load_ps(xa), a0);
            a1 = _mm512_fmadd_ps(va, _mm512_load_ps(xa + 16), a1);
        }
        _mm512_store_ps(yt + i * AVX512_TILE, _mm512_add_ps(a0, c0));
        _mm512_store_ps(yt + i * AVX512_TILE + 16, _mm512_add_ps(a1, c1));
    }
}
#endif

/* ---- driver ----------------------------------------------------------------------------------- */
typedef void (*tile_kernel)(const sparse_weight *, const float *, float *);

static int64_t pick(int level, int64_t block_rows, tile_kernel *kernel) {
    const int best = fxp_sparse_simd_level();
    if (level == FXP_SPARSE_BEST || level > best) level = best;
#if defined(__AVX512F__)
    if (level == FXP_SPARSE_AVX512) {
        *kernel = block_rows == 4 ? block4_avx512 : csr_avx512;
        return AVX512_TILE;
    }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (level >= FXP_SPARSE_AVX2) {
        *kernel = block_rows == 4 ? block4_avx2 : csr_avx2;
        return AVX2_TILE;
    }
#endif
    *kernel = block_rows == 4 ? block4_scalar : csr_scalar;
    return SCALAR_TILE;
}

/* x (tokens, k), y (tokens, n), row-major; block_rows 1 or 4 (see the header); level: which path.
 * Returns 0, -1 if scratch memory could not be allocated, -2 for a block_rows other than 1 or 4. */
EXPORT int fxp_sparse_linear(const float *x, int64_t tokens, int64_t k, const float *values,
                             const int32_t *col_index, const int32_t *row_ptr, const float *bias,
                             int64_t n, int64_t block_rows, int level, float *y) {
    if (block_rows != 1 && block_rows != 4) return -2;
    const sparse_weight w = {values, col_index, row_ptr, bias, n, block_rows};
    tile_kernel kernel;
    const int64_t tile = pick(level, block_rows, &kernel);
    const int64_t rows = block_rows == 4 ? (n + 3) / 4 * 4 : n;
    size_t bytes = (size_t)(k + rows) * (size_t)tile * sizeof(float);
    bytes = (bytes + 63) / 64 * 64;
    float *xt = aligned_alloc(64, bytes > 0 ? bytes : 64);
    if (!xt) return -1;
    float *yt = xt + k * tile;
    for (int64_t t0 = 0; t0 < tokens; t0 += tile) {
        const int64_t width = tokens - t0 < tile ? tokens - t0 : tile;
        if (width < tile) memset(xt, 0, (size_t)(k * tile) * sizeof(float));
        for (int64_t j = 0; j < width; j++) {
            const float *row = x + (t0 + j) * k;
            for (int64_t c = 0; c < k; c++) xt[c * tile + j] = row[c];
        }
        kernel(&w, xt, yt);
        for (int64_t j = 0; j < width; j++) {
            float *out = y + (t0 + j) * n;
            for (int64_t i = 0; i < n; i++) out[i] = yt[i * tile + j];
        }
    }
    free(xt);
    return 0;
}
