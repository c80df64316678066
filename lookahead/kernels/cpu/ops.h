// The CPU ops, as C++ functions: registry.cpp gives each its schema, and decoder.cpp runs a whole decode step
// through them.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

namespace lookahead_cpu {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& lens, const c10::optional<at::Tensor>& tree_mask, double scale,
                          const c10::optional<at::Tensor>& rows, const c10::optional<at::Tensor>& nodes);
at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                      at::Tensor& v_cache, const at::Tensor& slots, int64_t n_heads, bool interleaved,
                      const c10::optional<at::Tensor>& rows);

// accept.cpp: the tail of a verify step (the greedy targets, the accepted path, the compacted cache)
std::tuple<at::Tensor, at::Tensor> accept_longest_path(const at::Tensor& draft_tokens, const at::Tensor& parents,
                                                       const at::Tensor& target_tokens);
void compact_kv(at::Tensor& cache, const at::Tensor& lens, const at::Tensor& path, const at::Tensor& num_accepted);
at::Tensor argmax(const at::Tensor& logits);
at::Tensor top_k_indices(const at::Tensor& logits, int64_t k);

// decoder.cpp: a decode step's layers in one call, and the order of the weights it takes per layer
at::Tensor decode_layers(at::Tensor x, at::TensorList weights, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor cache, const at::Tensor& lens, const at::Tensor& slots,
                         const c10::optional<at::Tensor>& tree_mask, int64_t n_heads, bool interleaved, double eps,
                         const at::Tensor& final_norm, const c10::optional<at::Tensor>& rows,
                         const c10::optional<at::Tensor>& nodes);
std::vector<std::string> decode_layers_weights();

// linear.cpp: the code path the ops were compiled for ("avx512_bf16", "avx512", "avx2" or "portable")
std::string cpu_code_path();

// quant.cpp: weights in their GGUF block format, uint8 [N, K / block_elems, block_bytes]
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
at::Tensor quant_embedding(const at::Tensor& weight, const at::Tensor& ids, at::ScalarType dtype);
at::Tensor quant_repack(const at::Tensor& weight);

}  // namespace lookahead_cpu
