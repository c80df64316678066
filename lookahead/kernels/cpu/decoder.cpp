// A whole decode step's decoder layers in one call: the ops of linear.cpp, norm.cpp and attention.cpp in the
// order CausalLM's modules run them, without a trip through Python and the dispatcher per op (about 3 ms of a
// 16 ms SmolLM2 bf16 step when the modules called each op). The same kernels, so the same bits.

#include <string>
#include <vector>

#include "ops.h"

namespace lookahead_cpu {
namespace {

// Per layer, in this order; an absent bias or sandwich norm is an empty tensor. WK, WV and W3 are empty unless
// q/k/v (gate/up) are GGUF blocks of different types, which cannot be one uint8 tensor: WQKV then holds q (or q and
// k, WK v) and W13 gate, and the parts' outputs are concatenated (each row on its own, so exactness holds).
// WEIGHT_NAMES says the order to Python (kernels/cpu/__init__.py checks it against LAYER_WEIGHTS, the names the
// model gathers by).
enum Weight {
  ATTN_NORM, WQKV, BQKV, WO, BO, FFN_NORM, W13, B13, W2, B2, POST_ATTN_NORM, POST_FFN_NORM, WK, WV, W3, PER_LAYER
};
const char* const WEIGHT_NAMES[PER_LAYER] = {"attention_norm", "wqkv", "wqkv_bias", "wo", "wo_bias", "ffn_norm",
                                             "w13", "w13_bias", "w2", "w2_bias", "post_attention_norm",
                                             "post_ffn_norm", "wk", "wv", "w3"};

c10::optional<at::Tensor> given(const at::Tensor& t) {
  return t.numel() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// h @ [w[first]; w[more...]].T + bias: one linear, or one per part (bias sliced to each) concatenated.
at::Tensor parts_linear(const at::Tensor& h, const at::Tensor* w, int first, std::initializer_list<int> more,
                        int bias) {
  if (!w[*more.begin()].numel()) return lookahead_cpu::linear(h, w[first], given(w[bias]));
  std::vector<at::Tensor> outs;
  int64_t offset = 0;
  std::vector<int> slots{first};
  slots.insert(slots.end(), more);
  for (int slot : slots) {
    if (!w[slot].numel()) continue;  // two parts: WK holds the second, WV is empty
    const int64_t n = w[slot].size(0);
    outs.push_back(lookahead_cpu::linear(h, w[slot], w[bias].numel() ? c10::optional<at::Tensor>(
                                                         w[bias].narrow(0, offset, n)) : c10::nullopt));
    offset += n;
  }
  return at::cat(outs, -1);
}

}  // namespace

std::vector<std::string> decode_layers_weights() { return {WEIGHT_NAMES, WEIGHT_NAMES + PER_LAYER}; }

// x [B, T, dim] (the embeddings; used in place as the residual stream); weights: PER_LAYER tensors per layer;
// cos/sin [B, T, R]; cache [L, 2, B, Hkv, S, D]; lens [B]; slots [B, T]; tree_mask [B, T, T] or None ->
// the final RMSNorm of the last hidden states [B, T, dim] (the LM head's input).
// Ragged (rows and nodes [N] given, attention.cpp): x [1, N, dim] holds every row's tokens flattened, cos/sin
// [1, N, R], slots [1, N], tree_mask [N, W] or None, and the cache's rows are [L, 2, R, Hkv, S, D], lens [R].
at::Tensor decode_layers(at::Tensor x, at::TensorList weights, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor cache, const at::Tensor& lens, const at::Tensor& slots,
                         const c10::optional<at::Tensor>& tree_mask, int64_t n_heads, bool interleaved, double eps,
                         const at::Tensor& final_norm, const c10::optional<at::Tensor>& rows,
                         const c10::optional<at::Tensor>& nodes) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "lookahead::decode_layers: x must be contiguous [B, T, dim]");
  TORCH_CHECK(weights.size() % PER_LAYER == 0 && cache.dim() == 6 &&
                  cache.size(0) == static_cast<int64_t>(weights.size()) / PER_LAYER,
              "lookahead::decode_layers: ", PER_LAYER, " weights per layer and a cache [L, 2, B, Hkv, S, D] of as "
              "many layers, got ", weights.size(), " weights and a cache ", cache.sizes());
  const int64_t L = cache.size(0), B = x.size(0), T = x.size(1), D = cache.size(5);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  at::Tensor h = lookahead_cpu::rms_norm(x, weights[ATTN_NORM], eps);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + l * PER_LAYER;
    at::Tensor k_cache = cache.select(0, l).select(0, 0), v_cache = cache.select(0, l).select(0, 1);
    const at::Tensor qkv = parts_linear(h, w, WQKV, {WK, WV}, BQKV);
    const at::Tensor q = lookahead_cpu::rope_store(qkv, cos, sin, k_cache, v_cache, slots, n_heads, interleaved, rows);
    const at::Tensor y = lookahead_cpu::tree_attention(rows.has_value() ? q.view({B * T, n_heads, D}) : q, k_cache,
                                                       v_cache, lens, tree_mask, scale, rows, nodes)
                             .view({B, T, -1});
    at::Tensor o = lookahead_cpu::linear(y, w[WO], given(w[BO]));
    if (w[POST_ATTN_NORM].numel()) o = lookahead_cpu::rms_norm(o, w[POST_ATTN_NORM], eps);
    h = lookahead_cpu::add_rms_norm_(x, o, w[FFN_NORM], eps);
    at::Tensor d = lookahead_cpu::linear(lookahead_cpu::silu_mul(parts_linear(h, w, W13, {W3}, B13)), w[W2], given(w[B2]));
    if (w[POST_FFN_NORM].numel()) d = lookahead_cpu::rms_norm(d, w[POST_FFN_NORM], eps);
    h = lookahead_cpu::add_rms_norm_(x, d, l + 1 < L ? weights[(l + 1) * PER_LAYER + ATTN_NORM] : final_norm, eps);
  }
  return h;
}

}  // namespace lookahead_cpu
