/* Prefix + own-token attention on the CPU, read in place from the pages.
 *
 * Each query (one per row in a decode step; a row's new tokens in a prefill) attends to its row's
 * task prefix (the prefix store's block pool, [num_blocks, Hkv, block_size, D]) and to the first
 * `visible` own tokens of its row (the engine's page pool, token-major [slots, Hkv, D], page p
 * holding slots p*page_size .. p*page_size + page_size - 1), the last `window` of them when the
 * model has a sliding window, in one softmax: no gather of the own K/V into a padded batch, no
 * separate prefix pass and merge. Causal prefills are queries whose `visible` counts up.
 *
 * Work item = one query, all heads: its keys are read slot by slot (a slot's heads are adjacent
 * in the pages), so each page streams through the cache once. Per query: scores of all visible
 * keys into a scratch buffer, max, exp, sum, then V accumulated in fp32. Queries are split over
 * `num_threads` OpenMP threads (the caller's intra-op thread count).
 *
 * Plain C so it builds in about a second with the system compiler (softprompt/engine/cpu_kernel.py
 * compiles it on first use and falls back to the torch path when it cannot). Only fp32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEADS 256                   /* query heads per row (checked by the caller) */

typedef struct {
    const float *q;                 /* [N, Hkv, G, D] */
    const float *pool_k, *pool_v;   /* [slots, Hkv, D] */
    const int64_t *page_table;      /* [B, table_width] each row's page ids in token order */
    const int64_t *visible;         /* [N] own tokens query i sees: the first visible[i] of its row */
    const int64_t *query_rows;      /* [N] row of query i, or NULL: query i is row i */
    const float *prefix_k, *prefix_v;   /* [num_blocks, Hkv, block_size, D] or NULL */
    const int64_t *block_table;     /* [T, block_width] */
    const int64_t *prefix_lens;     /* [T] */
    const int64_t *task_ids;        /* [B] per row (-1: no prefix) or NULL */
    int64_t table_width, page_size, block_width, block_size;
    int64_t N, Hkv, G, D, window, max_keys;
    float scale;
    float *out;                     /* [N, Hkv, G, D] */
} problem_t;


/* exp(x) for x <= 0 as a loop the compiler vectorises: x = n ln2 + r, |r| <= ln2 / 2, a degree-6
 * polynomial for e^r (Cephes' expf coefficients) and 2^n through the exponent bits. */
static void exp_inplace(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i] < -87.0f ? -87.0f : x[i];
        float t = v * 1.44269504088896341f;
        float k = (t + 12582912.0f) - 12582912.0f;           /* round to nearest */
        float r = v - k * 0.693359375f + k * 2.12194440e-4f;
        float poly = 1.9875691500e-4f;
        poly = poly * r + 1.3981999507e-3f;
        poly = poly * r + 8.3334519073e-3f;
        poly = poly * r + 4.1665795894e-2f;
        poly = poly * r + 1.6666665459e-1f;
        poly = poly * r + 5.0000001201e-1f;
        float e = poly * r * r + r + 1.0f;
        int32_t bits = ((int32_t)k + 127) << 23;
        float two_k;
        memcpy(&two_k, &bits, sizeof two_k);
        x[i] = e * two_k;
    }
}

static inline float dot(const float *a, const float *b, int64_t D) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[d + j] * b[d + j];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; d < D; d++) s += a[d] * b[d];
    return s;
}

static inline void axpy(float *acc, float w, const float *v, int64_t D) {
    for (int64_t d = 0; d < D; d++) acc[d] += w * v[d];
}

/* acc += w[0] v[0] + ... + w[3] v[3], the four rows of v `stride` floats apart */
static inline void axpy4(float *restrict acc, const float *w, const float *v, int64_t stride, int64_t D) {
    const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
    const float *v0 = v, *v1 = v + stride, *v2 = v + 2 * stride, *v3 = v + 3 * stride;
    for (int64_t d = 0; d < D; d++) acc[d] += (w0 * v0[d] + w1 * v1[d]) + (w2 * v2[d] + w3 * v3[d]);
}

/* The keys of one row come in runs of consecutive slots (a prefix block, an own page): `count`
 * keys from `base`; head h of key i is at base + i * key_stride + h * head_stride. */
typedef struct {
    const float *base;
    int64_t count, key_stride, head_stride;
} run_t;

/* Fills `runs` for row b over the K (which = 0) or V pools, prefix first; returns their count. */
static int64_t key_runs(const problem_t *p, int which, int64_t b, int64_t task, int64_t n_prefix,
                        int64_t own_first, int64_t len, run_t *runs) {
    int64_t n = 0;
    const float *prefix = which ? p->prefix_v : p->prefix_k, *own = which ? p->pool_v : p->pool_k;
    for (int64_t j = 0; j < n_prefix; j += p->block_size) {
        int64_t block = p->block_table[task * p->block_width + j / p->block_size];
        int64_t count = n_prefix - j < p->block_size ? n_prefix - j : p->block_size;
        runs[n++] = (run_t){prefix + block * p->Hkv * p->block_size * p->D, count, p->D, p->block_size * p->D};
    }
    for (int64_t t = own_first; t < len;) {
        int64_t page = p->page_table[b * p->table_width + t / p->page_size], offset = t % p->page_size;
        int64_t count = p->page_size - offset < len - t ? p->page_size - offset : len - t;
        runs[n++] = (run_t){own + (page * p->page_size + offset) * p->Hkv * p->D, count, p->Hkv * p->D, p->D};
        t += count;
    }
    return n;
}

/* Asks for every key of `run` (all heads) to be brought into the cache. The pages are scattered,
 * so the hardware prefetcher cannot guess them; memory, not arithmetic, bounds this kernel once
 * the pools outgrow the cache. */
static inline void prefetch_run(const run_t *run, int64_t Hkv, int64_t D) {
    for (int64_t i = 0; i < run->count; i++)
        for (int64_t h = 0; h < Hkv; h++) {
            const char *at = (const char *)(run->base + i * run->key_stride + h * run->head_stride);
            for (int64_t byte = 0; byte < D * (int64_t)sizeof(float); byte += 64) __builtin_prefetch(at + byte, 0, 3);
        }
}

#define PREFETCH_AHEAD 2            /* runs (pages) ahead of the one being computed on */

/* One query, every head: keys are visited slot by slot (each slot's heads side by side in memory
 * for the own pages), so the pages stream through the cache once. */
static void run_query(const problem_t *p, int64_t query, float *scores, float *acc, run_t *runs) {
    const int64_t G = p->G, D = p->D, Hkv = p->Hkv, Hq = Hkv * G;
    const int64_t b = p->query_rows ? p->query_rows[query] : query;
    const int64_t task = p->task_ids ? p->task_ids[b] : -1;
    const int64_t n_prefix = task >= 0 ? p->prefix_lens[task] : 0;
    const int64_t len = p->visible[query];
    const int64_t own_first = (p->window > 0 && len > p->window) ? len - p->window : 0;
    const int64_t n = n_prefix + (len - own_first);
    const float *q = p->q + query * Hq * D;              /* [Hkv, G, D]: query head h*G+g */

    /* K runs, then V runs: while the scores of K page r are computed, K and V pages r + AHEAD are
     * fetched, so the V pass below finds its pages in cache */
    int64_t n_runs = key_runs(p, 0, b, task, n_prefix, own_first, len, runs);
    key_runs(p, 1, b, task, n_prefix, own_first, len, runs + n_runs);
    run_t *v_runs = runs + n_runs;
    for (int64_t r = 0; r < PREFETCH_AHEAD && r < n_runs; r++) {
        prefetch_run(&runs[r], Hkv, D);
        prefetch_run(&v_runs[r], Hkv, D);
    }
    for (int64_t r = 0, j = 0; r < n_runs; r++) {
        if (r + PREFETCH_AHEAD < n_runs) {
            prefetch_run(&runs[r + PREFETCH_AHEAD], Hkv, D);
            prefetch_run(&v_runs[r + PREFETCH_AHEAD], Hkv, D);
        }
        for (int64_t key = 0; key < runs[r].count; key++, j++) {
            const float *k = runs[r].base + key * runs[r].key_stride;
            for (int64_t h = 0; h < Hkv; h++)
                for (int64_t g = 0; g < G; g++)
                    scores[(h * G + g) * n + j] = p->scale * dot(q + (h * G + g) * D, k + h * runs[r].head_stride, D);
        }
    }
    float total[MAX_HEADS];
    for (int64_t hg = 0; hg < Hq; hg++) {
        float *s = scores + hg * n, top = s[0];
        for (int64_t j = 1; j < n; j++) top = s[j] > top ? s[j] : top;
        for (int64_t j = 0; j < n; j++) s[j] -= top;
        exp_inplace(s, n);
        float sum = 0.0f;
        for (int64_t j = 0; j < n; j++) sum += s[j];
        total[hg] = sum;
    }
    memset(acc, 0, sizeof(float) * Hq * D);
    for (int64_t r = 0, j = 0; r < n_runs; r++) {
        const run_t *run = &v_runs[r];
        int64_t key = 0;
        /* four keys per pass over the accumulators: a quarter of their loads and stores */
        for (; key + 4 <= run->count; key += 4, j += 4) {
            for (int64_t h = 0; h < Hkv; h++) {
                const float *v = run->base + key * run->key_stride + h * run->head_stride;
                for (int64_t g = 0; g < G; g++) {
                    const float *w = scores + (h * G + g) * n + j;
                    axpy4(acc + (h * G + g) * D, w, v, run->key_stride, D);
                }
            }
        }
        for (; key < run->count; key++, j++) {
            const float *v = run->base + key * run->key_stride;
            for (int64_t h = 0; h < Hkv; h++)
                for (int64_t g = 0; g < G; g++)
                    axpy(acc + (h * G + g) * D, scores[(h * G + g) * n + j], v + h * run->head_stride, D);
        }
    }
    float *o = p->out + query * Hq * D;
    for (int64_t hg = 0; hg < Hq; hg++)
        for (int64_t d = 0; d < D; d++) o[hg * D + d] = acc[hg * D + d] / total[hg];
}

/* Queries first..last-1 with this thread's scratch; 0 on success, 1 when scratch memory is short. */
static int run_queries(const problem_t *p, int64_t first, int64_t last) {
    const int64_t Hq = p->Hkv * p->G;
    float *scores = (float *)malloc(sizeof(float) * (size_t)(Hq * (p->max_keys > 0 ? p->max_keys : 1)));
    float *acc = (float *)malloc(sizeof(float) * (size_t)(Hq * p->D));
    /* runs: one per prefix block and per own page touched (at most max_keys + 2), for K and for V */
    run_t *runs = (run_t *)malloc(sizeof(run_t) * (size_t)(2 * (p->max_keys + 2)));
    int status = 0;
    if (scores && acc && runs)
        for (int64_t i = first; i < last; i++) run_query(p, i, scores, acc, runs);
    else
        status = 1;
    free(scores);
    free(acc);
    free(runs);
    return status;
}

/* Returns 0 on success, 1 when scratch memory could not be allocated. */
int paged_decode_attention(const float *q, const float *pool_k, const float *pool_v, const int64_t *page_table,
                           int64_t table_width, const int64_t *visible, const int64_t *query_rows,
                           int64_t page_size,
                           const float *prefix_k, const float *prefix_v, const int64_t *block_table,
                           int64_t block_width, const int64_t *prefix_lens, const int64_t *task_ids,
                           int64_t block_size, int64_t N, int64_t Hkv, int64_t G, int64_t D, float scale,
                           int64_t window, int64_t max_keys, float *out, int64_t num_threads) {
    problem_t p = {q, pool_k, pool_v, page_table, visible, query_rows, prefix_k, prefix_v, block_table,
                   prefix_lens, task_ids, table_width, page_size, block_width, block_size, N, Hkv, G, D, window,
                   max_keys, scale, out};
    if (num_threads < 1) num_threads = 1;
    if (num_threads > N) num_threads = N > 0 ? N : 1;
    int status = 0;
#ifdef _OPENMP
    /* In a torch process this is torch's own OpenMP runtime (already loaded under the same
     * soname), so the work goes to its thread pool instead of competing with it. */
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : status)
#endif
    for (int64_t t = 0; t < num_threads; t++)
        status |= run_queries(&p, N * t / num_threads, N * (t + 1) / num_threads);
    return status;
}
