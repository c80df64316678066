// Row-wise ops of a decoder layer on CPU: RMSNorm (optionally after the residual add) and SwiGLU's silu(gate) * up.
// Each row is computed alone in a fixed order (common.h), so its bits never depend on the other rows. Roundings
// follow transformers' Llama in the tensor's dtype: the norm in fp32, rounded to the dtype, then times the weight;
// silu(gate) rounded to the dtype before the product with up.
#include <ATen/Parallel.h>

#include "common.h"
#include "ops.h"

namespace lookahead_cpu {
namespace {

template <typename T>
void rms_row(const T* x, const T* w, T* out, int64_t D, float eps) {
#if defined(LOOKAHEAD_VEC8)
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();  // lanes 0-7 and 8-15 of the 16-lane sum
  for (int64_t d = 0; d < D; d += LANES) {
    const int n = static_cast<int>(std::min<int64_t>(LANES, D - d));
    const __m256 a = load8(x + d, n), b = load8(x + d + 8, n - 8);
    lo = _mm256_add_ps(lo, _mm256_mul_ps(a, a));
    hi = _mm256_add_ps(hi, _mm256_mul_ps(b, b));
  }
  const float r = 1.0f / std::sqrt(lane_sum(lo, hi) / static_cast<float>(D) + eps);
  const __m256 rv = _mm256_set1_ps(r);
  for (int64_t d = 0; d < D; d += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, D - d));
    store8(out + d, _mm256_mul_ps(load8(w + d, n), round8<T>(_mm256_mul_ps(load8(x + d, n), rv))), n);
  }
#else
  float acc[LANES] = {0};
  for (int64_t d = 0; d < D; d += LANES) {
    const int n = static_cast<int>(std::min<int64_t>(LANES, D - d));
    for (int l = 0; l < n; ++l) {
      const float v = to_float(x[d + l]);
      acc[l] = acc[l] + v * v;
    }
  }
  const float r = 1.0f / std::sqrt(lane_sum(acc) / static_cast<float>(D) + eps);
  for (int64_t d = 0; d < D; ++d) out[d] = from_float<T>(to_float(w[d]) * round_to<T>(to_float(x[d]) * r));
#endif
}

// row[0:D] += h[0:D], rounded to T (the residual stream)
template <typename T>
void add_row(T* row, const T* h, int64_t D) {
#if defined(LOOKAHEAD_VEC8)
  for (int64_t d = 0; d < D; d += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, D - d));
    store8(row + d, _mm256_add_ps(load8(row + d, n), load8(h + d, n)), n);
  }
#else
  for (int64_t d = 0; d < D; ++d) row[d] = from_float<T>(to_float(row[d]) + to_float(h[d]));
#endif
}

// o[0:I] = silu(g) * u, silu(g) = g / (1 + exp(-g)) rounded to T
template <typename T>
void silu_mul_row(const T* g, const T* u, T* o, int64_t I) {
#if defined(LOOKAHEAD_VEC8)
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < I; i += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, I - i));
    const __m256 x = load8(g + i, n);
    const __m256 act = round8<T>(_mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_xor_ps(x, sign)))));
    store8(o + i, _mm256_mul_ps(act, load8(u + i, n)), n);
  }
#else
  for (int64_t i = 0; i < I; ++i) {
    const float x = to_float(g[i]);
    const float act = round_to<T>(x / (1.0f + exp_f32(-x)));
    o[i] = from_float<T>(act * to_float(u[i]));
  }
#endif
}

void check_rows(const at::Tensor& x, const at::Tensor& w, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " runs on CPU tensors");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), name, ": tensors must be contiguous");
  TORCH_CHECK(w.dim() == 1 && x.size(-1) == w.size(0) && w.scalar_type() == x.scalar_type(), name,
              ": weight must be [D] of x's dtype, got x ", x.sizes(), " weight ", w.sizes());
}

}  // namespace

// x [..., D], weight [D] -> [..., D]
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "lookahead::rms_norm");
  at::Tensor out = at::empty_like(x);
  const int64_t D = x.size(-1), M = x.numel() / D;
  LOOKAHEAD_DISPATCH(x.scalar_type(), "lookahead::rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, (1 << 16) / D), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) rms_row(xp + m * D, wp, op + m * D, D, static_cast<float>(eps));
    });
  });
  return out;
}

// In place x += h (the residual stream, rounded to its dtype), then -> rms_norm(x) [..., D]
at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& h, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "lookahead::add_rms_norm_");
  TORCH_CHECK(h.sizes() == x.sizes() && h.scalar_type() == x.scalar_type() && h.is_contiguous(),
              "lookahead::add_rms_norm_: h must match x, got ", h.sizes(), " and ", x.sizes());
  at::Tensor out = at::empty_like(x);
  const int64_t D = x.size(-1), M = x.numel() / D;
  LOOKAHEAD_DISPATCH(x.scalar_type(), "lookahead::add_rms_norm_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, (1 << 16) / D), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        scalar_t* row = xp + m * D;
        add_row(row, hp + m * D, D);
        rms_row(row, wp, op + m * D, D, static_cast<float>(eps));
      }
    });
  });
  return out;
}

// Elements per thread at least in silu_mul: its exp costs a few nanoseconds an element, so a verify step's rows
// (8 x 1536 for SmolLM2) pay for a second thread where the norms' (a few hundred elements a row) do not
constexpr int64_t SILU_ELEMS = 1 << 12;

// gate_up [..., 2I] (gate then up) -> silu(gate) * up [..., I]
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu() && gate_up.is_contiguous() && gate_up.size(-1) % 2 == 0,
              "lookahead::silu_mul: gate_up must be a contiguous CPU tensor [..., 2I], got ", gate_up.sizes());
  const int64_t I = gate_up.size(-1) / 2, M = gate_up.numel() / (2 * I);
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = I;
  at::Tensor out = at::empty(shape, gate_up.options());
  LOOKAHEAD_DISPATCH(gate_up.scalar_type(), "lookahead::silu_mul", [&] {
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, SILU_ELEMS / I), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) silu_mul_row(gp + m * 2 * I, gp + m * 2 * I + I, op + m * I, I);
    });
  });
  return out;
}

}  // namespace lookahead_cpu
