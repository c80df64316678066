// The tail of a verify step on the CPU: the longest correct path of every row's tree, and the KV cache compacted
// along it. Integer and copy work only (no rounding): the same results as the torch references (reference.py),
// which define them, in one call each instead of a Python walk over host lists.
#include <ATen/ATen.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"
#include "ops.h"

namespace lookahead_cpu {

namespace {

void check_tree_tensor(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong, "accept_longest_path: ", name,
              " must be a CPU int64 tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes() == like.sizes(), "accept_longest_path: ", name, " must be [B, T] like draft_tokens ",
              like.sizes(), ", got ", t.sizes());
}

// The index of the first NaN of x[0, V) (one is there).
template <typename T> int64_t first_nan(const T* x, int64_t V) {
  int64_t i = 0;
  while (i < V && !std::isnan(to_float(x[i]))) ++i;
  return i;
}

// torch.argmax of x[0, V), V > 0: the first index of the largest value, a NaN counting as the largest (the first
// NaN wins); -0.0 and 0.0 tie. Comparisons only, so any order of them gives this index: one pass for the maximum
// (four 8-lane maxima), one for its first index.
template <typename T> int64_t argmax_row(const T* x, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if defined(LOOKAHEAD_VEC8)
  __m256 b0 = _mm256_set1_ps(m), b1 = b0, b2 = b0, b3 = b0, nan = _mm256_setzero_ps();
  for (; i + 32 <= V; i += 32) {
    const __m256 v0 = load8(x + i), v1 = load8(x + i + 8), v2 = load8(x + i + 16), v3 = load8(x + i + 24);
    b0 = _mm256_max_ps(b0, v0);
    b1 = _mm256_max_ps(b1, v1);
    b2 = _mm256_max_ps(b2, v2);
    b3 = _mm256_max_ps(b3, v3);
    nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(v0, v1, _CMP_UNORD_Q), _mm256_cmp_ps(v2, v3, _CMP_UNORD_Q)));
  }
  if (!_mm256_testz_ps(nan, nan)) return first_nan(x, V);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(b0, b1), _mm256_max_ps(b2, b3)));
  for (float v : lanes) m = v > m ? v : m;
#endif
  for (; i < V; ++i) {
    const float v = to_float(x[i]);
    if (std::isnan(v)) return first_nan(x, V);
    m = v > m ? v : m;
  }
  i = 0;
#if defined(LOOKAHEAD_VEC8)
  const __m256 mv = _mm256_set1_ps(m);
  for (; i + 8 <= V; i += 8)
    if (const int hit = _mm256_movemask_ps(_mm256_cmp_ps(load8(x + i), mv, _CMP_EQ_OQ))) return i + __builtin_ctz(hit);
#endif
  while (to_float(x[i]) != m) ++i;
  return i;
}

// A float's order as a signed int32: larger floats give larger keys, -0.0 and 0.0 the same (v + 0.0 turns -0.0
// into 0.0 and leaves every other value), a NaN the largest.
inline int32_t order_key(float v) {
  if (std::isnan(v)) return std::numeric_limits<int32_t>::max();
  v += 0.0f;
  int32_t b;
  std::memcpy(&b, &v, 4);
  return b >= 0 ? b : b ^ 0x7fffffff;
}

// The k best (key, index) of a row so far, best first; equal keys keep the smaller index first.
struct Best {
  std::vector<int32_t> keys;
  std::vector<int64_t> index;
  int n = 0;
  int32_t floor = std::numeric_limits<int32_t>::min();  // a key must exceed it to enter (the k-th key once full)
  explicit Best(int k) : keys(k), index(k) {}
  void offer(int32_t key, int64_t i) {
    const int k = static_cast<int>(keys.size());
    if (key <= floor && n == k) return;
    int p = n < k ? n++ : k - 1;
    for (; p > 0 && keys[p - 1] < key; --p) {
      keys[p] = keys[p - 1];
      index[p] = index[p - 1];
    }
    keys[p] = key;
    index[p] = i;
    if (n == k) floor = keys[k - 1];
  }
};

// The indices of the k largest of x[0, V), largest first, equal values by index (torch.topk leaves their order
// open; a stable descending sort gives this one), a NaN above every number. For k <= 64 one pass: 8 lanes' order
// keys against the k-th best so far, and the rare lane above it offered to the list.
template <typename T> void top_k_row(const T* x, int64_t V, int k, int64_t* out) {
  if (k > 64) {  // many: a partial sort of every (key, index), O(V log k), rather than O(V k) inserts
    std::vector<std::pair<int32_t, int64_t>> all(V);
    for (int64_t i = 0; i < V; ++i) all[i] = {order_key(to_float(x[i])), i};
    std::partial_sort(all.begin(), all.begin() + k, all.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    for (int j = 0; j < k; ++j) out[j] = all[j].second;
    return;
  }
  Best best(k);
  int64_t i = 0;
#if defined(LOOKAHEAD_VEC8)
  alignas(32) int32_t lane_keys[8];
  for (; i + 8 <= V; i += 8) {
    const __m256 v = _mm256_add_ps(load8(x + i), _mm256_setzero_ps());
    const __m256i bits = _mm256_castps_si256(v);
    __m256i key = _mm256_xor_si256(bits, _mm256_srli_epi32(_mm256_srai_epi32(bits, 31), 1));
    key = _mm256_blendv_epi8(key, _mm256_set1_epi32(std::numeric_limits<int32_t>::max()),
                             _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    int above = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, _mm256_set1_epi32(best.floor))));
    if (!above) continue;
    _mm256_store_si256(reinterpret_cast<__m256i*>(lane_keys), key);
    for (; above; above &= above - 1) {
      const int l = __builtin_ctz(above);
      best.offer(lane_keys[l], i + l);
    }
  }
#endif
  for (; i < V; ++i) best.offer(order_key(to_float(x[i])), i);
  std::copy(best.index.begin(), best.index.end(), out);
}

}  // namespace

// logits [..., V] (fp32, bf16 or fp16), 0 <= k <= V -> int64 [..., k]: the indices of each row's k largest
// logits, largest first (torch.topk's indices, with equal values ordered by index). The recycled predictions of a
// drafting step: torch.topk took 253-257 us for 8 rows of 49,152 logits at k = 8, this op 30-35 us (AMD EPYC Zen 4,
// 2 threads; bench/cpu/host_work_session11.txt).
at::Tensor top_k_indices(const at::Tensor& logits, int64_t k) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() >= 1 && k >= 0 && k <= logits.size(-1),
              "top_k_indices: logits must be a CPU tensor [..., V] and 0 <= k <= V, got ", logits.sizes(), " and k = ",
              k);
  const at::Tensor x = logits.contiguous();
  const int64_t V = x.size(-1), M = V ? x.numel() / V : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = k;
  at::Tensor out = at::empty(shape, x.options().dtype(at::kLong));
  if (k == 0 || M == 0) return out;
  int64_t* o = out.data_ptr<int64_t>();
  LOOKAHEAD_DISPATCH(x.scalar_type(), "top_k_indices", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, (1 << 16) / V), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) top_k_row(p + m * V, V, static_cast<int>(k), o + m * k);
    });
  });
  return out;
}

// logits [..., V] (fp32, bf16 or fp16) -> int64 [...]: torch.argmax(logits, -1), without a widened copy of
// half-precision logits (torch's argmax took 43 us for one row of 49,152 fp32 logits and 59 us from bf16 through
// a float copy, AMD EPYC Zen 4, torch 2.13: ~1% of a quantized SmolLM2 step).
at::Tensor argmax(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() >= 1 && logits.size(-1) > 0,
              "argmax: logits must be a CPU tensor [..., V] with V > 0, got ", logits.sizes(), " on ", logits.device());
  const at::Tensor x = logits.contiguous();
  const int64_t V = x.size(-1), M = x.numel() / V;
  at::Tensor out = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  LOOKAHEAD_DISPATCH(x.scalar_type(), "argmax", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, (1 << 16) / V), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) o[m] = argmax_row(p + m * V, V);
    });
  });
  return out;
}

// draft_tokens, parents, target_tokens [B, T] int64 (node 0 the root, parents[i] < i or -1 for padding) ->
// (path [B, T]: the accepted nodes root first, padded with -1; num_accepted [B], root included). A node is correct
// when its parent is and its token is the parent's target; the deepest correct node wins, ties the smallest index.
std::tuple<at::Tensor, at::Tensor> accept_longest_path(const at::Tensor& draft_tokens, const at::Tensor& parents,
                                                       const at::Tensor& target_tokens) {
  TORCH_CHECK(draft_tokens.dim() == 2, "accept_longest_path: draft_tokens must be [B, T], got ",
              draft_tokens.sizes());
  check_tree_tensor(draft_tokens, "draft_tokens", draft_tokens);
  check_tree_tensor(parents, "parents", draft_tokens);
  check_tree_tensor(target_tokens, "target_tokens", draft_tokens);
  const int64_t B = draft_tokens.size(0), T = draft_tokens.size(1);
  const at::Tensor tokens = draft_tokens.contiguous(), par = parents.contiguous(), tgt = target_tokens.contiguous();
  at::Tensor path = at::full({B, T}, -1, tokens.options());
  at::Tensor num = at::empty({B}, tokens.options());
  const int64_t *tok_p = tokens.data_ptr<int64_t>(), *par_p = par.data_ptr<int64_t>(),
                *tgt_p = tgt.data_ptr<int64_t>();
  int64_t *path_p = path.data_ptr<int64_t>(), *num_p = num.data_ptr<int64_t>();
  std::vector<int64_t> depth(T);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t *tk = tok_p + b * T, *pr = par_p + b * T, *tg = tgt_p + b * T;
    int64_t* out = path_p + b * T;
    if (T == 0) {
      num_p[b] = 0;
      continue;
    }
    depth[0] = 0;
    int64_t best = 0;
    for (int64_t i = 1; i < T; ++i) {  // parents come before children: one pass in index order settles every node
      const int64_t p = pr[i];
      depth[i] = -1;  // not correct
      if (p >= 0 && p < i && depth[p] >= 0 && tk[i] == tg[p]) {
        depth[i] = depth[p] + 1;
        if (depth[i] > depth[best]) best = i;  // strictly deeper: ties keep the smallest index
      }
    }
    for (int64_t node = best; node >= 0; node = pr[node]) out[depth[node]] = node;
    num_p[b] = depth[best] + 1;
  }
  return {path, num};
}

// In place, per row b: slot lens[b] + j of every layer's K and V takes slot lens[b] + path[b, j], j < num[b].
// cache [L, 2, B, Hkv, S, D] (any strides but a contiguous last dim). A path is increasing (a node's depth is at
// most its index), so copying j in increasing order never overwrites a slot a later j still reads.
void compact_kv(at::Tensor& cache, const at::Tensor& lens, const at::Tensor& path, const at::Tensor& num_accepted) {
  TORCH_CHECK(cache.dim() == 6 && cache.stride(5) == 1, "compact_kv: cache must be [L, 2, B, Hkv, S, D] with a "
              "contiguous last dim, got ", cache.sizes());
  TORCH_CHECK(path.dim() == 2 && path.size(0) == cache.size(2) && lens.numel() == path.size(0) &&
                  num_accepted.numel() == path.size(0),
              "compact_kv: path [B, T], lens [B] and num_accepted [B] must match the cache's B = ", cache.size(2));
  const at::Tensor p = path.to(at::kLong).contiguous(), l = lens.to(at::kLong).contiguous(),
                   n = num_accepted.to(at::kLong).contiguous();
  const int64_t L = cache.size(0), B = cache.size(2), H = cache.size(3), S = cache.size(4), T = p.size(1);
  const int64_t row_bytes = cache.size(5) * cache.element_size();
  char* base = static_cast<char*>(cache.data_ptr());
  const int64_t es = cache.element_size();
  const int64_t* pp = p.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = l.data_ptr<int64_t>()[b], count = n.data_ptr<int64_t>()[b];
    TORCH_CHECK(count <= T, "compact_kv: row ", b, " accepts ", count, " nodes of a path of ", T);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t src = pp[b * T + j];
      if (src == j) continue;
      TORCH_CHECK(src > j && len + src < S, "compact_kv: row ", b, " path[", j, "] = ", src,
                  " is not a node below its depth within the cache");
      for (int64_t layer = 0; layer < L; ++layer)
        for (int64_t kv = 0; kv < 2; ++kv)
          for (int64_t h = 0; h < H; ++h) {
            char* head = base + es * (layer * cache.stride(0) + kv * cache.stride(1) + b * cache.stride(2) +
                                      h * cache.stride(3));
            std::memmove(head + es * (len + j) * cache.stride(4), head + es * (len + src) * cache.stride(4),
                         row_bytes);
          }
    }
  }
}

}  // namespace lookahead_cpu
