// Every CPU op's schema, in one place. The ops live in the `lookahead_cpu` namespace (kernels/cpu/__init__.py
// calls them as torch.ops.lookahead_cpu.*); accept_longest_path, compact_kv, argmax and top_k_indices also serve
// the registry's own `lookahead` ops (kernels/ops.py defines those, with the torch references as the fallback of
// any device without a kernel): integer, selection and copy work, so the same results whichever runs, reached
// without a Python frame. So do decode_layers and the GGUF-block ops, which have no other implementation (the
// model calls decode_layers only where kernels.fused_decoder(x), and quantized weights load only where the C++ ops
// do).
#include <torch/library.h>

#include "ops.h"

namespace lookahead_cpu {

TORCH_LIBRARY_FRAGMENT(lookahead_cpu, m) {
  // linear.cpp: y = x @ weight.T + bias in fp32/bf16/fp16, each output a fixed-order sum over its own row
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("cpu_code_path() -> str", cpu_code_path);
  // quant.cpp: the same with GGUF block weights (uint8 [N, K / block_elems, block_bytes])
  m.def("quant_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("quant_embedding(Tensor weight, Tensor ids, ScalarType dtype) -> Tensor");
  m.def("quant_repack(Tensor weight) -> Tensor");
  // norm.cpp
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor h, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  // attention.cpp
  m.def("tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lens, Tensor? tree_mask, float scale, "
        "Tensor? rows=None, Tensor? nodes=None) -> Tensor");
  m.def("rope_store(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, "
        "int n_heads, bool interleaved, Tensor? rows=None) -> Tensor");
  // accept.cpp
  m.def("accept_longest_path(Tensor draft_tokens, Tensor parents, Tensor target_tokens) -> (Tensor, Tensor)");
  m.def("compact_kv(Tensor(a!) cache, Tensor lens, Tensor path, Tensor num_accepted) -> ()");
  m.def("argmax(Tensor logits) -> Tensor");
  m.def("top_k_indices(Tensor logits, int k) -> Tensor");
  // decoder.cpp: the layers of a decode step in one call
  m.def("decode_layers(Tensor(a!) x, Tensor[] weights, Tensor cos, Tensor sin, Tensor(b!) cache, Tensor lens, "
        "Tensor slots, Tensor? tree_mask, int n_heads, bool interleaved, float eps, Tensor final_norm, "
        "Tensor? rows=None, Tensor? nodes=None) -> Tensor");
  m.def("decode_layers_weights() -> str[]", decode_layers_weights);
}

TORCH_LIBRARY_IMPL(lookahead_cpu, CPU, m) {
  m.impl("linear", linear);
  m.impl("quant_linear", quant_linear);
  m.impl("quant_embedding", quant_embedding);
  m.impl("quant_repack", quant_repack);
  m.impl("rms_norm", rms_norm);
  m.impl("add_rms_norm_", add_rms_norm_);
  m.impl("silu_mul", silu_mul);
  m.impl("tree_attention", tree_attention);
  m.impl("rope_store", rope_store);
  m.impl("accept_longest_path", accept_longest_path);
  m.impl("compact_kv", compact_kv);
  m.impl("argmax", argmax);
  m.impl("top_k_indices", top_k_indices);
  m.impl("decode_layers", decode_layers);
}

TORCH_LIBRARY_IMPL(lookahead, CPU, m) {
  m.impl("accept_longest_path", accept_longest_path);
  m.impl("compact_kv", compact_kv);
  m.impl("argmax", argmax);
  m.impl("top_k_indices", top_k_indices);
  m.impl("decode_layers", decode_layers);  // a Python frame would convert its ~450-tensor list twice: ~90 us a step
  m.impl("quant_linear", quant_linear);
  m.impl("quant_embedding", quant_embedding);
}

}  // namespace lookahead_cpu
