/* Fused CPU kernel for the `bipartite` mode of fxpress::merge_tokens (ToMe), float32, inference.
 *
 * Built on first use by fxpress.utils.cbuild and called through native_merge.py.  The similarity scores
 * come from torch (one bmm, B-major: scores[b][j][a] = <unit B_j, unit A_a>); everything after it
 * runs here in one call over the batch, replaying `_bipartite` in token_ops.py operation for
 * operation so the results are bit-identical:
 *   best B match per A token   first maximum over j (max_pool2d: `v > max || isnan(v)`, from -inf)
 *   protect_cls                A token 0 scores -inf
 *   order                      stable descending sort of the scores (NaN first, ties: lower index)
 *   merged / unmerged          the first r / the rest of that order (unmerged sorted if protect_cls)
 *   total_j                    s_Bj + s_m1 + s_m2 + ...  (merged order, as scatter_add)
 *   out B_j                    x_Bj * (s_Bj / t_j), then + x_m * (s_m / t_j) in merged order
 *   out A                      unmerged A rows copied; sizes: their sizes, then the totals
 * Products are never contracted into FMAs (the torch path rounds each product).
 */
#pragma STDC FP_CONTRACT OFF

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

/* a sorts before b in descending order (NaN greatest, as torch.sort) */
static inline int before(float a, float b) {
    return (isnan(a) && !isnan(b)) || a > b;
}

/* stable descending argsort of key[0..n) into order (insertion sort below 32, else merge sort) */
static void argsort_desc(const float *key, int64_t *order, int64_t *scratch, int64_t n) {
    for (int64_t i = 0; i < n; i++) order[i] = i;
    if (n < 32) {
        for (int64_t i = 1; i < n; i++) {
            int64_t v = order[i], j = i;
            while (j > 0 && before(key[v], key[order[j - 1]])) { order[j] = order[j - 1]; j--; }
            order[j] = v;
        }
        return;
    }
    int64_t *src = order, *dst = scratch;
    for (int64_t width = 1; width < n; width *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * width) {
            int64_t mid = lo + width < n ? lo + width : n, hi = lo + 2 * width < n ? lo + 2 * width : n;
            int64_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) dst[k++] = before(key[src[j]], key[src[i]]) ? src[j++] : src[i++];
            while (i < mid) dst[k++] = src[i++];
            while (j < hi) dst[k++] = src[j++];
        }
        int64_t *t = src; src = dst; dst = t;
    }
    if (src != order) memcpy(order, src, (size_t)n * sizeof(int64_t));
}

static void sort_ascending(int64_t *v, int64_t n) {
    for (int64_t i = 1; i < n; i++) {
        int64_t x = v[i], j = i;
        while (j > 0 && v[j - 1] > x) { v[j] = v[j - 1]; j--; }
        v[j] = x;
    }
}

/* x (batch, tokens, channels); size (batch, tokens) or NULL (all ones); scores (batch, nb, na) with
 * na = ceil(tokens / 2), nb = tokens / 2; 0 <= r <= na.  out (batch, tokens - r, channels),
 * out_size (batch, tokens - r).  Returns 0, or -1 if scratch memory could not be allocated. */
EXPORT int fxp_bipartite_merge(const float *x, const float *size, const float *scores, int64_t batch,
                               int64_t tokens, int64_t channels, int64_t r, int protect_cls,
                               float *out, float *out_size) {
    const int64_t na = (tokens + 1) / 2, nb = tokens / 2, kept_a = na - r, out_tokens = tokens - r;
    float *best = malloc((size_t)(na + nb + 1) * sizeof(float));
    int64_t *work = malloc((size_t)(4 * na + 1) * sizeof(int64_t));
    if (!best || !work) { free(best); free(work); return -1; }
    float *total = best + na;
    int64_t *match = work, *order = work + na, *scratch = work + 2 * na, *unmerged = work + 3 * na;

    for (int64_t b = 0; b < batch; b++) {
        const float *xb = x + b * tokens * channels, *sb = size ? size + b * tokens : NULL;
        const float *score = scores + b * nb * na;
        float *ob = out + b * out_tokens * channels, *osb = out_size + b * out_tokens;

        for (int64_t a = 0; a < na; a++) { best[a] = -INFINITY; match[a] = 0; }
        for (int64_t j = 0; j < nb; j++) {
            const float *row = score + j * na;
            for (int64_t a = 0; a < na; a++) {
                float v = row[a];
                if (v > best[a] || isnan(v)) { best[a] = v; match[a] = j; }
            }
        }
        if (protect_cls) best[0] = -INFINITY;
        argsort_desc(best, order, scratch, na);
        memcpy(unmerged, order + r, (size_t)kept_a * sizeof(int64_t));
        if (protect_cls) sort_ascending(unmerged, kept_a);

        for (int64_t j = 0; j < nb; j++) total[j] = sb ? sb[2 * j + 1] : 1.0f;
        for (int64_t k = 0; k < r; k++) {
            int64_t m = order[k];
            total[match[m]] += sb ? sb[2 * m] : 1.0f;
        }

        for (int64_t i = 0; i < kept_a; i++) {
            int64_t token = 2 * unmerged[i];
            memcpy(ob + i * channels, xb + token * channels, (size_t)channels * sizeof(float));
            osb[i] = sb ? sb[token] : 1.0f;
        }
        for (int64_t j = 0; j < nb; j++) {
            const float own = sb ? sb[2 * j + 1] : 1.0f, ratio = own / total[j];
            const float *src = xb + (2 * j + 1) * channels;
            float *dst = ob + (kept_a + j) * channels;
            for (int64_t c = 0; c < channels; c++) dst[c] = src[c] * ratio;
            osb[kept_a + j] = total[j];
        }
        for (int64_t k = 0; k < r; k++) {
            const int64_t m = order[k], j = match[m];
            const float share = (sb ? sb[2 * m] : 1.0f) / total[j];
            const float *src = xb + 2 * m * channels;
            float *dst = ob + (kept_a + j) * channels;
            for (int64_t c = 0; c < channels; c++) {
                const float moved = src[c] * share;
                dst[c] = dst[c] + moved;
            }
        }
    }
    free(best);
    free(work);
    return 0;
}
