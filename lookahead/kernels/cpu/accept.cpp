// The tail of a verify step on the CPU: the longest correct path of every row's tree, and the KV cache compacted
// along it. Integer and copy work only (no rounding): the same results as the torch references (reference.py),
// which define them, in one call each instead of a Python walk over host lists.
#include <ATen/ATen.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "ops.h"

namespace lookahead_cpu {

namespace {

void check_tree_tensor(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong, "accept_longest_path: ", name,
              " must be a CPU int64 tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes() == like.sizes(), "accept_longest_path: ", name, " must be [B, T] like draft_tokens ",
              like.sizes(), ", got ", t.sizes());
}

}  // namespace

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
