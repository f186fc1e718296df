/* Test harness for the XNOR-popcount GEMM of binary_kernels.c, cross-compiled for aarch64 and
 * run under qemu-aarch64 by test_binary_kernels_aarch64.py (which compares what it prints).
 *
 * Prints "simd_level L" (what fxp_simd_level returns) and "levels L0 L1 ..." (every level in
 * 0..7 that fxp_has_simd_level accepts), then reads cases from stdin until EOF:
 *
 *     m n k w
 *     m * w words of a, then n * w words of b (hex, whitespace separated)
 *
 * and for each prints "case I", then one line per path: "gemm best RC v..." (fxp_xnor_gemm)
 * and "gemm L RC v..." for every level L in 0..7 (fxp_xnor_gemm_at; RC its return value,
 * the m * n results follow only when RC is 0; for RC != 0 it prints "untouched 1" or
 * "untouched 0" instead: whether out kept its sentinel).
 *
 * Every buffer ends exactly at a PROT_NONE page, so reading past the last word of a or b or
 * writing past out faults (qemu-user emulates the protection): the harness then dies with
 * SIGSEGV and the test sees it.
 */
#define _DEFAULT_SOURCE
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int fxp_simd_level(void);
int fxp_has_simd_level(int level);
int fxp_xnor_gemm_at(const uint64_t *a, const uint64_t *b, int64_t m, int64_t n, int64_t k, int64_t w,
                     int32_t *out, int level);
void fxp_xnor_gemm(const uint64_t *a, const uint64_t *b, int64_t m, int64_t n, int64_t k, int64_t w, int32_t *out);

#define MAX_LEVEL 7
#define SENTINEL ((int32_t)0x5eadbeef)

typedef struct {
    void *base;
    size_t length;
} mapping;

/* bytes bytes whose end touches a PROT_NONE page; NULL on failure. */
static void *guarded(size_t bytes, mapping *map) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t body = (bytes + page - 1) / page * page;
    map->length = body + page;
    map->base = mmap(NULL, map->length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map->base == MAP_FAILED)
        return NULL;
    if (mprotect((char *)map->base + body, page, PROT_NONE) != 0)
        return NULL;
    return (char *)map->base + body - bytes;
}

static int read_words(uint64_t *dst, int64_t count) {
    for (int64_t i = 0; i < count; ++i)
        if (scanf("%" SCNx64, &dst[i]) != 1)
            return -1;
    return 0;
}

static void print_result(const char *label, int rc, const int32_t *out, int64_t count) {
    printf("gemm %s %d", label, rc);
    if (rc == 0) {
        for (int64_t i = 0; i < count; ++i)
            printf(" %" PRId32, out[i]);
    } else {
        int untouched = 1;
        for (int64_t i = 0; i < count; ++i)
            untouched &= out[i] == SENTINEL;
        printf(" untouched %d", untouched);
    }
    printf("\n");
}

int main(void) {
    printf("simd_level %d\nlevels", fxp_simd_level());
    for (int level = 0; level <= MAX_LEVEL; ++level)
        if (fxp_has_simd_level(level))
            printf(" %d", level);
    printf("\n");
    int64_t m, n, k, w;
    for (int index = 0; scanf("%" SCNd64 " %" SCNd64 " %" SCNd64 " %" SCNd64, &m, &n, &k, &w) == 4; ++index) {
        if (m < 1 || n < 1 || w < 1) {
            fprintf(stderr, "case %d: bad shape\n", index);
            return 2;
        }
        mapping ma, mb, mo;
        uint64_t *a = guarded((size_t)(m * w) * sizeof(uint64_t), &ma);
        uint64_t *b = guarded((size_t)(n * w) * sizeof(uint64_t), &mb);
        int32_t *out = guarded((size_t)(m * n) * sizeof(int32_t), &mo);
        if (a == NULL || b == NULL || out == NULL) {
            fprintf(stderr, "case %d: out of memory\n", index);
            return 2;
        }
        if (read_words(a, m * w) != 0 || read_words(b, n * w) != 0) {
            fprintf(stderr, "case %d: truncated input\n", index);
            return 2;
        }
        printf("case %d\n", index);
        for (int64_t i = 0; i < m * n; ++i)
            out[i] = SENTINEL;
        fxp_xnor_gemm(a, b, m, n, k, w, out);
        print_result("best", 0, out, m * n);
        for (int level = 0; level <= MAX_LEVEL; ++level) {
            char label[8];
            for (int64_t i = 0; i < m * n; ++i)
                out[i] = SENTINEL;
            snprintf(label, sizeof label, "%d", level);
            print_result(label, fxp_xnor_gemm_at(a, b, m, n, k, w, out, level), out, m * n);
        }
        munmap(ma.base, ma.length);
        munmap(mb.base, mb.length);
        munmap(mo.base, mo.length);
    }
    return 0;
}
