// The CPU ops one C++ file may call from another (decoder.cpp runs a whole decode step through them).
#pragma once

#include <ATen/ATen.h>

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

// quant.cpp: weights in their GGUF block format, uint8 [N, K / block_elems, block_bytes]
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
at::Tensor quant_embedding(const at::Tensor& weight, const at::Tensor& ids, at::ScalarType dtype);

}  // namespace lookahead_cpu
