// Prefix attention on the CPU with paged own keys: the custom op `softprompt::prefix_paged_attention`,
// the `compiled` backend of the plan (built and loaded by kernels/compiled_build.py, called by
// kernels/compiled_backend.py).
//
// Query i of row b (i < q_lens[b], at position pos = kv_lens[b] - q_lens[b] + i) attends to its
// task's whole prefix (the prefix store's block pools [num_blocks, Hkv, block_size, D]) and to its
// row's own keys j in [kv_starts[b], kv_lens[b]) that it may see (j <= pos when causal, pos - j <
// window with a sliding window), read in place from token-major page pools [num_pages, page_size,
// Hkv, D] through the row's page table. Padding queries and queries that see nothing return zeros.
//
// Two passes, merged through their log-sum-exps (fp32):
// - prefix: one work item per (tile of a task's queries, kv head). The queries of all of a task's
//   rows x the GQA group are stacked into one matrix and multiplied against the task's prefix
//   blocks (two BLAS products per tile), so each prefix block is read once per step for all the
//   rows of its task (Hydragen, FlashInfer's cascade), not once per row;
// - own keys: one work item per query (all heads: a token's heads are adjacent in the pages, so
//   each page streams through the cache once), then the merge with the query's prefix part.
// Both passes are split over ATen's intra-op pool (at::parallel_for). Only fp32; inference only.
//
// The Python side validates the arguments with ValueErrors naming them; the TORCH_CHECKs here are
// the second line of defence for direct calls: every index read from a table is range-checked
// before it addresses memory. Includes are kept to the minimum: this builds on first use.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

struct Problem {
  const float *q;                      // [B, Sq, Hkv, G, D]
  const float *k_pages, *v_pages;      // [num_pages, page_size, Hkv, D]
  const int64_t *page_table;           // [B, W] each row's page ids in token order
  const int64_t *q_lens, *kv_lens, *kv_starts;  // [B]
  const float *prefix_k, *prefix_v;    // [num_blocks, Hkv, block_size, D]
  const int64_t *block_table;          // [T, block_width]
  const int64_t *prefix_lens;          // [T]
  const int64_t *task_ids;             // [B]
  const int64_t *prefix_queries;       // [Nq] query ids b * Sq + i, the queries of each tile together
  const int64_t *tiles;                // [n_tiles, 3] task, first, end (into prefix_queries)
  int64_t B, Sq, Hkv, G, D, W, page_size, num_pages, block_width, block_size, num_blocks, n_tiles, window;
  bool causal;
  float scale;
  float *out;                          // [B, Sq, Hkv, G, D]
  float *pre_out;                      // [B * Sq, Hkv, G, D] each query's prefix part (normalised)
  float *pre_lse;                      // [B * Sq, Hkv, G] and its log-sum-exp
};

// exp(x) for x <= 0 as a loop the compiler vectorises: x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for e^r (Cephes' expf coefficients) and 2^n through the exponent bits.
void exp_inplace(float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    float v = x[i] < -87.0f ? -87.0f : x[i];
    float t = v * 1.44269504088896341f;
    float k = (t + 12582912.0f) - 12582912.0f;  // round to nearest
    float r = v - k * 0.693359375f + k * 2.12194440e-4f;
    float poly = 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    float e = poly * r * r + r + 1.0f;
    int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float two_k;
    std::memcpy(&two_k, &bits, sizeof two_k);
    x[i] = e * two_k;
  }
}

// Row max, exp(row - max) in place, row sum; the sum is NaN when a score is not finite (a visible
// NaN / inf key), which the exp's clamp would otherwise turn into a finite weight.
inline void softmax_stats(float *row, int64_t n, float &top, float &sum) {
  top = row[0];
  float poison = 0.0f;  // 0 * score: NaN for an infinite or NaN score
  for (int64_t j = 0; j < n; j++) {
    top = row[j] > top ? row[j] : top;
    poison += 0.0f * row[j];
  }
  for (int64_t j = 0; j < n; j++) row[j] -= top;
  exp_inplace(row, n);
  sum = poison;
  for (int64_t j = 0; j < n; j++) sum += row[j];
}

inline float dot(const float *a, const float *b, int64_t D) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; j++) acc[j] += a[d + j] * b[d + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; d < D; d++) s += a[d] * b[d];
  return s;
}

inline void axpy(float *__restrict__ acc, float w, const float *v, int64_t D) {
  for (int64_t d = 0; d < D; d++) acc[d] += w * v[d];
}

// acc += w[0] v[0] + ... + w[3] v[3], the four rows of v `stride` floats apart
inline void axpy4(float *__restrict__ acc, const float *w, const float *v, int64_t stride, int64_t D) {
  const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  const float *v0 = v, *v1 = v + stride, *v2 = v + 2 * stride, *v3 = v + 3 * stride;
  for (int64_t d = 0; d < D; d++) acc[d] += (w0 * v0[d] + w1 * v1[d]) + (w2 * v2[d] + w3 * v3[d]);
}

// ---------------------------------------------------------------------------------------- prefix

struct PrefixScratch {
  std::vector<float> qs, scores, keys, values, acc, top, sum;
  PrefixScratch(int64_t max_rows, int64_t max_prefix, int64_t D)
      : qs(max_rows * D), scores(max_rows * std::max<int64_t>(max_prefix, 1)), keys(max_prefix * D),
        values(max_prefix * D), acc(max_rows * D), top(max_rows), sum(max_rows) {}
};

// The task's prefix keys (or values) of kv head h, rows 0 .. P-1, copied out of their blocks into
// one [P, D] matrix; every block id is checked before it addresses the pool.
void gather_prefix(const Problem &p, const float *pool, int64_t task, int64_t h, int64_t P, float *dst) {
  for (int64_t j = 0; j < P; j += p.block_size) {
    const int64_t block = p.block_table[task * p.block_width + j / p.block_size];
    TORCH_CHECK(block >= 0 && block < p.num_blocks, "softprompt::prefix_paged_attention: block_table[", task, ", ",
                j / p.block_size, "] = ", block, " is read but the prefix pools hold ", p.num_blocks, " blocks");
    const int64_t count = std::min(p.block_size, P - j);
    std::memcpy(dst + j * p.D, pool + (block * p.Hkv + h) * p.block_size * p.D, count * p.D * sizeof(float));
  }
}

// One tile of a task's queries x the GQA group (M stacked rows), one kv head, against the task's
// whole prefix: two matrix products (ATen's mm, single-threaded inside the parallel loop) around
// the softmax, with the prefix read once for the whole tile.
void prefix_tile(const Problem &p, int64_t tile, int64_t h, PrefixScratch &s) {
  const int64_t task = p.tiles[3 * tile], first = p.tiles[3 * tile + 1], end = p.tiles[3 * tile + 2];
  const int64_t P = p.prefix_lens[task], G = p.G, D = p.D, M = (end - first) * G;
  if (P == 0 || M == 0) return;
  float *qs = s.qs.data(), *scores = s.scores.data(), *keys = s.keys.data(), *values = s.values.data();
  float *acc = s.acc.data(), *top = s.top.data(), *sum = s.sum.data();
  for (int64_t r = 0; r < end - first; r++) {
    const float *src = p.q + (p.prefix_queries[first + r] * p.Hkv + h) * G * D;
    for (int64_t x = 0; x < G * D; x++) qs[r * G * D + x] = p.scale * src[x];
  }
  gather_prefix(p, p.prefix_k, task, h, P, keys);
  gather_prefix(p, p.prefix_v, task, h, P, values);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor weights = at::from_blob(scores, {M, P}, f32), out = at::from_blob(acc, {M, D}, f32);
  at::mm_out(weights, at::from_blob(qs, {M, D}, f32), at::from_blob(keys, {P, D}, f32).t());
  for (int64_t r = 0; r < M; r++) softmax_stats(scores + r * P, P, top[r], sum[r]);
  at::mm_out(out, weights, at::from_blob(values, {P, D}, f32));
  for (int64_t r = 0; r < end - first; r++) {
    const int64_t query = p.prefix_queries[first + r];
    for (int64_t g = 0; g < G; g++) {
      const int64_t m = r * G + g, at = (query * p.Hkv + h) * G + g;
      const float inv = 1.0f / sum[m];
      for (int64_t d = 0; d < D; d++) p.pre_out[at * D + d] = acc[m * D + d] * inv;
      p.pre_lse[at] = top[m] + std::log(sum[m]);
    }
  }
}

// ------------------------------------------------------------------------------------- own keys

// The own keys of a row come in runs of consecutive slots of one page: `count` keys from `base`,
// head h of key i at base + i * Hkv * D + h * D.
struct Run {
  const float *base;
  int64_t count;
};

// Fills `runs` with the row's own keys [lo, hi) in the K (which = 0) or V pages; returns their
// count. Every page id is checked before it addresses a pool.
int64_t own_runs(const Problem &p, int which, int64_t b, int64_t lo, int64_t hi, Run *runs) {
  const float *pool = which ? p.v_pages : p.k_pages;
  int64_t n = 0;
  for (int64_t t = lo; t < hi;) {
    const int64_t page = p.page_table[b * p.W + t / p.page_size], offset = t % p.page_size;
    TORCH_CHECK(page >= 0 && page < p.num_pages, "softprompt::prefix_paged_attention: page_table[", b, ", ",
                t / p.page_size, "] = ", page, " is read but the page pools hold ", p.num_pages, " pages");
    const int64_t count = std::min(p.page_size - offset, hi - t);
    runs[n++] = Run{pool + (page * p.page_size + offset) * p.Hkv * p.D, count};
    t += count;
  }
  return n;
}

// Asks for every key of `run` (all heads) to be brought into the cache: the pages are scattered,
// so the hardware prefetcher cannot guess them.
inline void prefetch_run(const Run &run, int64_t Hkv, int64_t D) {
  const char *at = reinterpret_cast<const char *>(run.base);
  for (int64_t byte = 0; byte < run.count * Hkv * D * static_cast<int64_t>(sizeof(float)); byte += 64)
    __builtin_prefetch(at + byte, 0, 3);
}

constexpr int64_t kPrefetchAhead = 2;  // runs (pages) ahead of the one being computed on

struct OwnScratch {
  std::vector<float> scores, acc, total, top;
  std::vector<Run> runs;
  OwnScratch(int64_t Hq, int64_t D, int64_t max_keys)
      : scores(Hq * std::max<int64_t>(max_keys, 1)), acc(Hq * D), total(Hq), top(Hq),
        runs(2 * (max_keys + 2)) {}
};

// Own keys [lo, hi) a real query sees.
struct Span {
  int64_t lo, hi;
};

inline Span own_span(const Problem &p, int64_t b, int64_t i) {
  const int64_t pos = p.kv_lens[b] - p.q_lens[b] + i;
  const int64_t hi = p.causal ? std::min(pos + 1, p.kv_lens[b]) : p.kv_lens[b];
  int64_t lo = p.kv_starts[b];
  if (p.window > 0) lo = std::max(lo, pos - p.window + 1);
  return Span{lo, std::max(lo, hi)};
}

// One query, every head: its own part, then merged with its prefix part into `out`.
__attribute__((noinline)) void own_query(const Problem &p, int64_t query, OwnScratch &s) {
  const int64_t G = p.G, D = p.D, Hkv = p.Hkv, Hq = Hkv * G;
  const int64_t b = query / p.Sq, i = query % p.Sq;
  float *o = p.out + query * Hq * D;
  if (i >= p.q_lens[b]) {
    std::fill(o, o + Hq * D, 0.0f);
    return;
  }
  const bool prefix = p.prefix_lens[p.task_ids[b]] > 0;
  const float *pre_o = p.pre_out + query * Hq * D, *pre_l = p.pre_lse + query * Hq;
  const Span sp = own_span(p, b, i);
  const int64_t n = sp.hi - sp.lo;
  if (n == 0) {
    if (prefix) std::copy(pre_o, pre_o + Hq * D, o);
    else std::fill(o, o + Hq * D, 0.0f);
    return;
  }
  const float *q = p.q + query * Hq * D;  // [Hkv, G, D]: query head h*G+g
  float *scores = s.scores.data(), *acc = s.acc.data(), *total = s.total.data(), *top = s.top.data();
  Run *runs = s.runs.data();
  const int64_t n_runs = own_runs(p, 0, b, sp.lo, sp.hi, runs);
  Run *v_runs = runs + n_runs;
  own_runs(p, 1, b, sp.lo, sp.hi, v_runs);
  for (int64_t r = 0; r < kPrefetchAhead && r < n_runs; r++) {
    prefetch_run(runs[r], Hkv, D);
    prefetch_run(v_runs[r], Hkv, D);
  }
  for (int64_t r = 0, j = 0; r < n_runs; r++) {
    if (r + kPrefetchAhead < n_runs) {
      prefetch_run(runs[r + kPrefetchAhead], Hkv, D);
      prefetch_run(v_runs[r + kPrefetchAhead], Hkv, D);
    }
    for (int64_t key = 0; key < runs[r].count; key++, j++) {
      const float *k = runs[r].base + key * Hkv * D;
      for (int64_t h = 0; h < Hkv; h++)
        for (int64_t g = 0; g < G; g++)
          scores[(h * G + g) * n + j] = p.scale * dot(q + (h * G + g) * D, k + h * D, D);
    }
  }
  for (int64_t hg = 0; hg < Hq; hg++) softmax_stats(scores + hg * n, n, top[hg], total[hg]);
  std::fill(acc, acc + Hq * D, 0.0f);
  for (int64_t r = 0, j = 0; r < n_runs; r++) {
    const Run &run = v_runs[r];
    int64_t key = 0;
    // four keys per pass over the accumulators: a quarter of their loads and stores
    for (; key + 4 <= run.count; key += 4, j += 4)
      for (int64_t h = 0; h < Hkv; h++) {
        const float *v = run.base + key * Hkv * D + h * D;
        for (int64_t g = 0; g < G; g++) axpy4(acc + (h * G + g) * D, scores + (h * G + g) * n + j, v, Hkv * D, D);
      }
    for (; key < run.count; key++, j++) {
      const float *v = run.base + key * Hkv * D;
      for (int64_t h = 0; h < Hkv; h++)
        for (int64_t g = 0; g < G; g++) axpy(acc + (h * G + g) * D, scores[(h * G + g) * n + j], v + h * D, D);
    }
  }
  for (int64_t hg = 0; hg < Hq; hg++) {
    float w_own = 1.0f / total[hg], w_pre = 0.0f;
    if (prefix) {  // softmax over both parts: weights exp(lse_part - lse_total)
      const float own_lse = top[hg] + std::log(total[hg]), high = std::max(own_lse, pre_l[hg]);
      const float e_own = std::exp(own_lse - high), e_pre = std::exp(pre_l[hg] - high);
      w_own = e_own / (e_own + e_pre) / total[hg];
      w_pre = e_pre / (e_own + e_pre);
    }
    for (int64_t d = 0; d < D; d++)
      o[hg * D + d] = acc[hg * D + d] * w_own + (prefix ? w_pre * pre_o[hg * D + d] : 0.0f);
  }
}

// ------------------------------------------------------------------------------------------- op

void check_tensor(const at::Tensor &t, const char *name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "softprompt::prefix_paged_attention: `", name, "` must be a CPU tensor; got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "softprompt::prefix_paged_attention: `", name, "` must be ", dtype,
              "; got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "softprompt::prefix_paged_attention: `", name, "` must have ", dim,
              " dimensions; got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "softprompt::prefix_paged_attention: `", name, "` must be contiguous (strides ",
              t.strides(), " for shape ", t.sizes(), ")");
}

// Every entry of an index vector in [low, high].
void check_range(const int64_t *x, int64_t n, int64_t low, int64_t high, const char *name) {
  for (int64_t i = 0; i < n; i++)
    TORCH_CHECK(x[i] >= low && x[i] <= high, "softprompt::prefix_paged_attention: `", name, "`[", i, "] = ", x[i],
                "; expected ", low, " .. ", high);
}

at::Tensor prefix_paged_attention(const at::Tensor &q, const at::Tensor &k_pages, const at::Tensor &v_pages,
                                  const at::Tensor &page_table, const at::Tensor &q_lens, const at::Tensor &kv_lens,
                                  const at::Tensor &kv_starts, const at::Tensor &prefix_k, const at::Tensor &prefix_v,
                                  const at::Tensor &block_table, const at::Tensor &prefix_lens,
                                  const at::Tensor &task_ids, const at::Tensor &prefix_queries,
                                  const at::Tensor &tiles, bool causal, double scale, int64_t window,
                                  int64_t num_threads) {
  constexpr auto f32 = at::kFloat, i64 = at::kLong;
  check_tensor(q, "q", f32, 4);
  check_tensor(k_pages, "k_pages", f32, 4);
  check_tensor(v_pages, "v_pages", f32, 4);
  check_tensor(prefix_k, "prefix_k", f32, 4);
  check_tensor(prefix_v, "prefix_v", f32, 4);
  for (auto [t, name] : {std::pair{&q_lens, "q_lens"}, {&kv_lens, "kv_lens"}, {&kv_starts, "kv_starts"},
                         {&prefix_lens, "prefix_lens"}, {&task_ids, "task_ids"}, {&prefix_queries, "prefix_queries"}})
    check_tensor(*t, name, i64, 1);
  check_tensor(page_table, "page_table", i64, 2);
  check_tensor(block_table, "block_table", i64, 2);
  check_tensor(tiles, "tiles", i64, 2);
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t num_pages = k_pages.size(0), page_size = k_pages.size(1), Hkv = k_pages.size(2);
  const int64_t T = block_table.size(0), block_size = prefix_k.size(2), W = page_table.size(1);
  TORCH_CHECK(D >= 1 && Hkv >= 1 && Hq % Hkv == 0 && Hq >= 1, "softprompt::prefix_paged_attention: `q` [B, Sq, Hq, D] "
              "and `k_pages` [num_pages, page_size, Hkv, D] need D >= 1 and Hq a multiple of Hkv; got ", q.sizes(),
              " and ", k_pages.sizes());
  TORCH_CHECK(page_size >= 1 && k_pages.size(3) == D && v_pages.sizes() == k_pages.sizes(),
              "softprompt::prefix_paged_attention: `k_pages` and `v_pages` must both be [num_pages, page_size >= 1, "
              "Hkv, D=", D, "]; got ", k_pages.sizes(), " and ", v_pages.sizes());
  TORCH_CHECK(prefix_k.sizes() == prefix_v.sizes() && prefix_k.size(1) == Hkv && block_size >= 1 &&
              prefix_k.size(3) == D, "softprompt::prefix_paged_attention: `prefix_k` and `prefix_v` must both be "
              "[blocks, Hkv=", Hkv, ", block_size >= 1, D=", D, "]; got ", prefix_k.sizes(), " and ", prefix_v.sizes());
  for (auto [t, name] : {std::pair{&q_lens, "q_lens"}, {&kv_lens, "kv_lens"}, {&kv_starts, "kv_starts"},
                         {&task_ids, "task_ids"}})
    TORCH_CHECK(t->size(0) == B, "softprompt::prefix_paged_attention: `", name, "` must be [B=", B, "]; got ",
                t->sizes());
  TORCH_CHECK(page_table.size(0) == B, "softprompt::prefix_paged_attention: `page_table` must be [B=", B,
              ", W]; got ", page_table.sizes());
  TORCH_CHECK(prefix_lens.size(0) == T, "softprompt::prefix_paged_attention: `prefix_lens` must be [T=", T,
              "] (the block table's rows); got ", prefix_lens.sizes());
  TORCH_CHECK(tiles.size(1) == 3, "softprompt::prefix_paged_attention: `tiles` must be [n, 3]; got ", tiles.sizes());
  TORCH_CHECK(window >= 0, "softprompt::prefix_paged_attention: `window` must be >= 0 (0: none); got ", window);
  const int64_t *ql = q_lens.data_ptr<int64_t>(), *kl = kv_lens.data_ptr<int64_t>();
  const int64_t *tasks = task_ids.data_ptr<int64_t>(), *plens = prefix_lens.data_ptr<int64_t>();
  check_range(ql, B, 0, Sq, "q_lens");
  check_range(kl, B, 0, W * page_size, "kv_lens");
  for (int64_t b = 0; b < B; b++)
    check_range(kv_starts.data_ptr<int64_t>() + b, 1, 0, kl[b], "kv_starts");
  check_range(tasks, B, 0, T - 1, "task_ids");
  check_range(plens, T, 0, block_table.size(1) * block_size, "prefix_lens");
  // the tiles cover every real query of a row with a prefix exactly once, under its row's task:
  // the own pass reads the prefix part of exactly those queries
  const int64_t n_tiles = tiles.size(0), Nq = prefix_queries.size(0);
  const int64_t *tl = tiles.data_ptr<int64_t>(), *pq = prefix_queries.data_ptr<int64_t>();
  std::vector<char> covered(B * Sq, 0);
  int64_t max_rows = 0, max_prefix = 0;
  for (int64_t t = 0; t < n_tiles; t++) {
    const int64_t task = tl[3 * t], first = tl[3 * t + 1], end = tl[3 * t + 2];
    TORCH_CHECK(task >= 0 && task < T && first >= 0 && first <= end && end <= Nq,
                "softprompt::prefix_paged_attention: `tiles`[", t, "] = (", task, ", ", first, ", ", end,
                ") must be (task < ", T, ", first <= end <= ", Nq, ")");
    for (int64_t x = first; x < end; x++) {
      const int64_t query = pq[x];
      TORCH_CHECK(query >= 0 && query < B * Sq && tasks[query / Sq] == task && query % Sq < ql[query / Sq] &&
                  !covered[query], "softprompt::prefix_paged_attention: `prefix_queries`[", x, "] = ", query,
                  " is not a real query of a row of task ", task, " seen once");
      covered[query] = 1;
    }
    max_rows = std::max(max_rows, (end - first) * (Hq / Hkv));
    max_prefix = std::max(max_prefix, plens[task]);
  }
  for (int64_t b = 0; b < B; b++)
    for (int64_t i = 0; i < ql[b]; i++)
      TORCH_CHECK(covered[b * Sq + i] || plens[tasks[b]] == 0, "softprompt::prefix_paged_attention: query ", i,
                  " of row ", b, " (task ", tasks[b], ") is in no tile of `tiles`");

  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor pre_out = at::empty(q.sizes(), q.options());
  at::Tensor pre_lse = at::empty({B, Sq, Hq}, q.options());
  const Problem p{q.data_ptr<float>(), k_pages.data_ptr<float>(), v_pages.data_ptr<float>(),
                  page_table.data_ptr<int64_t>(), ql, kl, kv_starts.data_ptr<int64_t>(),
                  prefix_k.data_ptr<float>(), prefix_v.data_ptr<float>(), block_table.data_ptr<int64_t>(), plens,
                  tasks, pq, tl, B, Sq, Hkv, Hq / Hkv, D, W, page_size, num_pages, block_table.size(1),
                  block_size, prefix_k.size(0), n_tiles, window, causal, static_cast<float>(scale),
                  out.data_ptr<float>(), pre_out.data_ptr<float>(), pre_lse.data_ptr<float>()};
  const int64_t threads = num_threads > 0 ? num_threads : at::get_num_threads();
  // prefix pass: (tile, kv head) items, one contiguous share per thread so each sets up its
  // scratch once (num_threads caps the shares; 0: ATen's intra-op count)
  const int64_t items = n_tiles * Hkv;
  if (items > 0) {
    at::parallel_for(0, items, std::max<int64_t>(1, (items + threads - 1) / threads), [&](int64_t lo, int64_t hi) {
      PrefixScratch scratch(max_rows, max_prefix, D);
      for (int64_t item = lo; item < hi; item++) prefix_tile(p, item / Hkv, item % Hkv, scratch);
    });
  }
  int64_t max_keys = 0;
  for (int64_t b = 0; b < B; b++) max_keys = std::max(max_keys, kl[b]);
  const int64_t N = B * Sq;
  at::parallel_for(0, N, std::max<int64_t>(1, (N + threads - 1) / threads), [&](int64_t lo, int64_t hi) {
    OwnScratch scratch(Hq, D, max_keys);
    for (int64_t query = lo; query < hi; query++) own_query(p, query, scratch);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(softprompt, m) {
  m.def("prefix_paged_attention(Tensor q, Tensor k_pages, Tensor v_pages, Tensor page_table, Tensor q_lens, "
        "Tensor kv_lens, Tensor kv_starts, Tensor prefix_k, Tensor prefix_v, Tensor block_table, "
        "Tensor prefix_lens, Tensor task_ids, Tensor prefix_queries, Tensor tiles, bool causal, float scale, "
        "int window=0, int num_threads=0) -> Tensor");
}

// Registered for every backend so that a tensor on another device reaches the checks above and
// gets a clear error instead of a missing-kernel one.
TORCH_LIBRARY_IMPL(softprompt, CompositeExplicitAutograd, m) {
  m.impl("prefix_paged_attention", &prefix_paged_attention);
}
