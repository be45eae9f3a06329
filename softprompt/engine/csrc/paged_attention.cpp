// Prefix + own-token attention on the CPU, read in place from the pages: the custom op
// `softprompt::paged_attention` (built and loaded by softprompt/engine/cpu_kernel.py).
//
// Each query (one per row in a decode step; a row's new tokens in a prefill) attends to its row's
// task prefix (the prefix store's block pool, [num_blocks, Hkv, block_size, D]) and to the first
// `visible` own tokens of its row (the engine's page pool, token-major [slots, Hkv, D], page p
// holding slots p*page_size .. p*page_size + page_size - 1), the last `window` of them when the
// model has a sliding window, in one softmax: no gather of the own K/V into a padded batch, no
// separate prefix pass and merge. Causal prefills are queries whose `visible` counts up.
//
// Work item = one query, all heads: its keys are read slot by slot (a slot's heads are adjacent
// in the pages), so each page streams through the cache once. Per query: scores of all visible
// keys into a scratch buffer, max, exp, sum, then V accumulated in fp32. Queries are split over
// ATen's intra-op pool (at::parallel_for). Only fp32; inference only (no autograd formula).
//
// The Python side validates the arguments with ValueErrors naming them; the TORCH_CHECKs here are
// the second line of defence for direct calls: every index read from a table is range-checked
// before it addresses memory. Includes are kept to the minimum: this builds on first use.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

struct Problem {
  const float *q;                      // [N, Hkv, G, D]
  const float *pool_k, *pool_v;        // [slots, Hkv, D]
  const int64_t *page_table;           // [B, table_width] each row's page ids in token order
  const int64_t *visible;              // [N] own tokens query i sees: the first visible[i] of its row
  const int64_t *query_rows;           // [N] row of query i, or null: query i is row i
  const float *prefix_k, *prefix_v;    // [num_blocks, Hkv, block_size, D]
  const int64_t *block_table;          // [T, block_width]
  const int64_t *prefix_lens;          // [T]
  const int64_t *task_ids;             // [B] per row (-1: no prefix) or null
  int64_t table_width, page_size, slots, block_width, block_size, num_blocks;
  int64_t N, Hkv, G, D, window;
  float scale;
  float *out;                          // [N, Hkv, G, D]
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

// The keys of one row come in runs of consecutive slots (a prefix block, an own page): `count`
// keys from `base`; head h of key i is at base + i * key_stride + h * head_stride.
struct Run {
  const float *base;
  int64_t count, key_stride, head_stride;
};

// Fills `runs` for row b over the K (which = 0) or V pools, prefix first; returns their count.
// Every block / page id is checked before it addresses a pool.
int64_t key_runs(const Problem &p, int which, int64_t b, int64_t task, int64_t n_prefix, int64_t own_first,
                 int64_t len, Run *runs) {
  int64_t n = 0;
  const float *prefix = which ? p.prefix_v : p.prefix_k, *own = which ? p.pool_v : p.pool_k;
  for (int64_t j = 0; j < n_prefix; j += p.block_size) {
    const int64_t block = p.block_table[task * p.block_width + j / p.block_size];
    TORCH_CHECK(block >= 0 && block < p.num_blocks, "softprompt::paged_attention: block_table[", task, ", ",
                j / p.block_size, "] = ", block, " is read but the prefix pools hold ", p.num_blocks, " blocks");
    const int64_t count = std::min(n_prefix - j, p.block_size);
    runs[n++] = Run{prefix + block * p.Hkv * p.block_size * p.D, count, p.D, p.block_size * p.D};
  }
  for (int64_t t = own_first; t < len;) {
    const int64_t page = p.page_table[b * p.table_width + t / p.page_size], offset = t % p.page_size;
    TORCH_CHECK(page >= 0 && (page + 1) * p.page_size <= p.slots, "softprompt::paged_attention: page_table[", b,
                ", ", t / p.page_size, "] = ", page, " is read but the pools hold ", p.slots, " slots of ",
                p.page_size, " per page");
    const int64_t count = std::min(p.page_size - offset, len - t);
    runs[n++] = Run{own + (page * p.page_size + offset) * p.Hkv * p.D, count, p.Hkv * p.D, p.D};
    t += count;
  }
  return n;
}

// Asks for every key of `run` (all heads) to be brought into the cache. The pages are scattered,
// so the hardware prefetcher cannot guess them; memory, not arithmetic, bounds this kernel once
// the pools outgrow the cache.
inline void prefetch_run(const Run &run, int64_t Hkv, int64_t D) {
  for (int64_t i = 0; i < run.count; i++)
    for (int64_t h = 0; h < Hkv; h++) {
      const char *at = reinterpret_cast<const char *>(run.base + i * run.key_stride + h * run.head_stride);
      for (int64_t byte = 0; byte < D * static_cast<int64_t>(sizeof(float)); byte += 64)
        __builtin_prefetch(at + byte, 0, 3);
    }
}

constexpr int64_t kPrefetchAhead = 2;  // runs (pages) ahead of the one being computed on

// One thread's buffers, sized for the longest query.
struct Scratch {
  std::vector<float> scores, acc, total;
  std::vector<Run> runs;
  Scratch(int64_t Hq, int64_t D, int64_t max_keys)
      : scores(Hq * std::max<int64_t>(max_keys, 1)), acc(Hq * D), total(Hq),
        // one run per prefix block and per own page touched (each holds >= 1 key), for K and V
        runs(2 * (max_keys + 2)) {}
};

// Prefix length and first own token a query reads.
struct Span {
  int64_t row, task, n_prefix, own_first, len;
};

inline Span span_of(const Problem &p, int64_t query) {
  const int64_t b = p.query_rows ? p.query_rows[query] : query;
  const int64_t task = p.task_ids ? p.task_ids[b] : -1;
  const int64_t len = p.visible[query];
  const int64_t own_first = (p.window > 0 && len > p.window) ? len - p.window : 0;
  return Span{b, task, task >= 0 ? p.prefix_lens[task] : 0, own_first, len};
}

// One query, every head: keys are visited slot by slot (each slot's heads side by side in memory
// for the own pages), so the pages stream through the cache once. Kept out of line, as in the C
// original: inlined into the parallel lambda it measured 4-12% slower (single thread, GCC 12).
__attribute__((noinline)) void run_query(const Problem &p, int64_t query, Scratch &s) {
  const int64_t G = p.G, D = p.D, Hkv = p.Hkv, Hq = Hkv * G;
  const Span sp = span_of(p, query);
  const int64_t n = sp.n_prefix + (sp.len - sp.own_first);
  const float *q = p.q + query * Hq * D;  // [Hkv, G, D]: query head h*G+g
  float *scores = s.scores.data(), *acc = s.acc.data(), *total = s.total.data();
  Run *runs = s.runs.data();

  // K runs, then V runs: while the scores of K page r are computed, K and V pages r + AHEAD are
  // fetched, so the V pass below finds its pages in cache
  const int64_t n_runs = key_runs(p, 0, sp.row, sp.task, sp.n_prefix, sp.own_first, sp.len, runs);
  Run *v_runs = runs + n_runs;
  key_runs(p, 1, sp.row, sp.task, sp.n_prefix, sp.own_first, sp.len, v_runs);
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
      const float *k = runs[r].base + key * runs[r].key_stride;
      for (int64_t h = 0; h < Hkv; h++)
        for (int64_t g = 0; g < G; g++)
          scores[(h * G + g) * n + j] = p.scale * dot(q + (h * G + g) * D, k + h * runs[r].head_stride, D);
    }
  }
  for (int64_t hg = 0; hg < Hq; hg++) {
    float *row = scores + hg * n, top = row[0];
    for (int64_t j = 1; j < n; j++) top = row[j] > top ? row[j] : top;
    for (int64_t j = 0; j < n; j++) row[j] -= top;
    exp_inplace(row, n);
    float sum = 0.0f;
    for (int64_t j = 0; j < n; j++) sum += row[j];
    total[hg] = sum;
  }
  std::fill(acc, acc + Hq * D, 0.0f);
  for (int64_t r = 0, j = 0; r < n_runs; r++) {
    const Run &run = v_runs[r];
    int64_t key = 0;
    // four keys per pass over the accumulators: a quarter of their loads and stores
    for (; key + 4 <= run.count; key += 4, j += 4) {
      for (int64_t h = 0; h < Hkv; h++) {
        const float *v = run.base + key * run.key_stride + h * run.head_stride;
        for (int64_t g = 0; g < G; g++)
          axpy4(acc + (h * G + g) * D, scores + (h * G + g) * n + j, v, run.key_stride, D);
      }
    }
    for (; key < run.count; key++, j++) {
      const float *v = run.base + key * run.key_stride;
      for (int64_t h = 0; h < Hkv; h++)
        for (int64_t g = 0; g < G; g++)
          axpy(acc + (h * G + g) * D, scores[(h * G + g) * n + j], v + h * run.head_stride, D);
    }
  }
  float *o = p.out + query * Hq * D;
  for (int64_t hg = 0; hg < Hq; hg++)
    for (int64_t d = 0; d < D; d++) o[hg * D + d] = acc[hg * D + d] / total[hg];
}

void check_tensor(const at::Tensor &t, const char *name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "softprompt::paged_attention: `", name, "` must be a CPU tensor; got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "softprompt::paged_attention: `", name, "` must be ", dtype, "; got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "softprompt::paged_attention: `", name, "` must have ", dim, " dimensions; got shape ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "softprompt::paged_attention: `", name, "` must be contiguous (strides ",
              t.strides(), " for shape ", t.sizes(), ")");
}

// Every entry of an index vector in [low, high].
void check_range(const int64_t *x, int64_t n, int64_t low, int64_t high, const char *name) {
  for (int64_t i = 0; i < n; i++)
    TORCH_CHECK(x[i] >= low && x[i] <= high, "softprompt::paged_attention: `", name, "`[", i, "] = ", x[i],
                "; expected ", low, " .. ", high);
}

at::Tensor paged_attention(const at::Tensor &q, const at::Tensor &pool_k, const at::Tensor &pool_v,
                           const at::Tensor &page_table, const at::Tensor &visible,
                           const std::optional<at::Tensor> &query_rows, int64_t page_size,
                           const at::Tensor &prefix_k, const at::Tensor &prefix_v, const at::Tensor &block_table,
                           const at::Tensor &prefix_lens, const std::optional<at::Tensor> &task_ids, double scale,
                           int64_t window, int64_t num_threads) {
  constexpr auto f32 = at::kFloat, i64 = at::kLong;
  check_tensor(q, "q", f32, 4);
  check_tensor(pool_k, "pool_k", f32, 3);
  check_tensor(pool_v, "pool_v", f32, 3);
  check_tensor(prefix_k, "prefix_k", f32, 4);
  check_tensor(prefix_v, "prefix_v", f32, 4);
  check_tensor(page_table, "page_table", i64, 2);
  check_tensor(visible, "visible", i64, 1);
  check_tensor(block_table, "block_table", i64, 2);
  check_tensor(prefix_lens, "prefix_lens", i64, 1);
  const int64_t N = q.size(0), Hkv = q.size(1), G = q.size(2), D = q.size(3);
  const int64_t B = page_table.size(0), W = page_table.size(1), T = block_table.size(0);
  const int64_t block_size = prefix_k.size(2);
  TORCH_CHECK(Hkv >= 1 && G >= 1 && D >= 1, "softprompt::paged_attention: `q` must be [N, Hkv, G, D] with Hkv, G, "
              "D >= 1; got ", q.sizes());
  TORCH_CHECK(page_size >= 1, "softprompt::paged_attention: `page_size` must be >= 1; got ", page_size);
  TORCH_CHECK(window >= 0, "softprompt::paged_attention: `window` must be >= 0 (0: none); got ", window);
  TORCH_CHECK(pool_k.sizes() == pool_v.sizes() && pool_k.size(1) == Hkv && pool_k.size(2) == D,
              "softprompt::paged_attention: `pool_k` and `pool_v` must both be [slots, Hkv=", Hkv, ", D=", D,
              "]; got ", pool_k.sizes(), " and ", pool_v.sizes());
  TORCH_CHECK(prefix_k.sizes() == prefix_v.sizes() && prefix_k.size(1) == Hkv && block_size >= 1 &&
              prefix_k.size(3) == D, "softprompt::paged_attention: `prefix_k` and `prefix_v` must both be [blocks, "
              "Hkv=", Hkv, ", block_size >= 1, D=", D, "]; got ", prefix_k.sizes(), " and ", prefix_v.sizes());
  TORCH_CHECK(visible.size(0) == N, "softprompt::paged_attention: `visible` must be [N=", N, "]; got ",
              visible.sizes());
  TORCH_CHECK(prefix_lens.size(0) == T, "softprompt::paged_attention: `prefix_lens` must be [T=", T,
              "] (the block table's rows); got ", prefix_lens.sizes());
  check_range(visible.data_ptr<int64_t>(), N, 1, W * page_size, "visible");
  check_range(prefix_lens.data_ptr<int64_t>(), T, 0, block_table.size(1) * block_size, "prefix_lens");
  const int64_t *rows = nullptr, *tasks = nullptr;
  if (query_rows) {
    check_tensor(*query_rows, "query_rows", i64, 1);
    TORCH_CHECK(query_rows->size(0) == N, "softprompt::paged_attention: `query_rows` must be [N=", N, "]; got ",
                query_rows->sizes());
    rows = query_rows->data_ptr<int64_t>();
    check_range(rows, N, 0, B - 1, "query_rows");
  } else {
    TORCH_CHECK(N == B, "softprompt::paged_attention: ", N, " queries for ", B, " rows need `query_rows`");
  }
  if (task_ids) {
    check_tensor(*task_ids, "task_ids", i64, 1);
    TORCH_CHECK(task_ids->size(0) == B, "softprompt::paged_attention: `task_ids` must be [B=", B, "]; got ",
                task_ids->sizes());
    tasks = task_ids->data_ptr<int64_t>();
    check_range(tasks, B, -1, T - 1, "task_ids");
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  const Problem p{q.data_ptr<float>(), pool_k.data_ptr<float>(), pool_v.data_ptr<float>(),
                  page_table.data_ptr<int64_t>(), visible.data_ptr<int64_t>(), rows, prefix_k.data_ptr<float>(),
                  prefix_v.data_ptr<float>(), block_table.data_ptr<int64_t>(), prefix_lens.data_ptr<int64_t>(),
                  tasks, W, page_size, pool_k.size(0), block_table.size(1), block_size, prefix_k.size(0), N, Hkv,
                  G, D, window, static_cast<float>(scale), out.data_ptr<float>()};
  int64_t max_keys = 0;
  for (int64_t i = 0; i < N; i++) {
    const Span sp = span_of(p, i);
    max_keys = std::max(max_keys, sp.n_prefix + sp.len - sp.own_first);
  }
  // one chunk of queries per thread (a query is already thousands of dot products), so each
  // thread sets up its scratch once; num_threads caps the chunks (0: ATen's intra-op count)
  const int64_t threads = num_threads > 0 ? num_threads : at::get_num_threads();
  const int64_t grain = std::max<int64_t>(1, (N + threads - 1) / threads);
  at::parallel_for(0, N, grain, [&](int64_t first, int64_t last) {
    Scratch scratch(Hkv * G, D, max_keys);
    for (int64_t i = first; i < last; i++) run_query(p, i, scratch);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(softprompt, m) {
  m.def("paged_attention(Tensor q, Tensor pool_k, Tensor pool_v, Tensor page_table, Tensor visible, "
        "Tensor? query_rows, int page_size, Tensor prefix_k, Tensor prefix_v, Tensor block_table, "
        "Tensor prefix_lens, Tensor? task_ids, float scale, int window=0, int num_threads=0) -> Tensor");
}

// Registered for every backend so that a tensor on another device reaches the checks above and
// gets a clear error instead of a missing-kernel one.
TORCH_LIBRARY_IMPL(softprompt, CompositeExplicitAutograd, m) {
  m.impl("paged_attention", &paged_attention);
}
