// y = x @ w.T + b on CPU, invariant by construction: y[m, n] is one dot product of x[m] and w[n] accumulated in
// a fixed order (lane l of 16 takes k = l, l + 16, ... in ascending chunks; lanes added by one tree), whatever
// the number of rows M, the tile a row falls in or the thread that computes it. So a verify step of T nodes
// gives every node the bits of the one-token step that later decodes the same token.
//
// The weight stays in its natural [N, K] layout (no packed copy: one copy of each weight, and a tied LM head
// shares the embedding). Tiles of 4 rows of x by 4 rows of w keep 16 accumulators in registers; rows of x are
// blocked so a block stays in L2 while the threads stream their own range of w.
//
// bf16 on a CPU with AVX512_BF16 multiplies pairs with vdpbf16ps (lane l takes the pairs (2l, 2l + 1) of each
// 32-element chunk); elsewhere every element is widened to fp32 and fused-multiply-added.
#include <torch/library.h>
#include <ATen/Parallel.h>

#include "common.h"
#include "ops.h"

namespace lookahead_cpu {
namespace {

constexpr int TILE = 4;          // rows of x and of w per register tile
constexpr int64_t M_BLOCK = 64;
constexpr int64_t PREFETCH_BYTES = 32768;
constexpr int64_t PARALLEL_MACS = 1 << 17;  // per thread: ~3 us of bf16 work, a few barriers' cost  // rows of x per block (64 x 1536 bf16 = 192 KB, within L2)

#if defined(__AVX512F__)

// Chunk width: 32 bf16 pairs for vdpbf16ps, 16 elements otherwise; the last chunk loads under a mask (zeros past K).
template <typename T> constexpr int chunk_width() {
#if defined(__AVX512BF16__)
  return std::is_same_v<T, c10::BFloat16> ? 32 : LANES;
#else
  return LANES;
#endif
}

// acc[i][j] += x row i . w row j over one chunk at k (n valid elements). One loop body serves every chunk, the
// masked last one included, so the accumulators stay in registers.
template <typename T, int MI, int NJ>
__attribute__((always_inline)) inline void chunk(__m512 (&acc)[TILE][TILE], const T* const* xr, const T* const* wr,
                                                 int64_t k, int n) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __mmask32 mask = n == 32 ? ~0u : ((1u << n) - 1);
    __m512i xv[MI], wv[NJ];
#pragma GCC unroll 4
    for (int i = 0; i < MI; ++i) xv[i] = _mm512_maskz_loadu_epi16(mask, xr[i] + k);
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) wv[j] = _mm512_maskz_loadu_epi16(mask, wr[j] + k);
#pragma GCC unroll 4
    for (int i = 0; i < MI; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv[i], (__m512bh)wv[j]);
    return;
  }
#endif
  __m512 xv[MI], wv[NJ];
#pragma GCC unroll 4
  for (int i = 0; i < MI; ++i) xv[i] = load16(xr[i] + k, n);
#pragma GCC unroll 4
  for (int j = 0; j < NJ; ++j) wv[j] = load16(wr[j] + k, n);
#pragma GCC unroll 4
  for (int i = 0; i < MI; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_fmadd_ps(xv[i], wv[j], acc[i][j]);
}

template <typename T, int MI, int NJ>
void tile(const T* x, const T* w, const T* bias, T* y, int64_t m0, int64_t n0, int64_t K, int64_t N) {
  constexpr int W = chunk_width<T>();
  const T* xr[TILE];
  const T* wr[TILE];
#pragma GCC unroll 4
  for (int i = 0; i < MI; ++i) xr[i] = x + (m0 + i) * K;
#pragma GCC unroll 4
  for (int j = 0; j < NJ; ++j) wr[j] = w + (n0 + j) * K;
  __m512 acc[TILE][TILE];
#pragma GCC unroll 4
  for (int i = 0; i < MI; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t full = K / W * W;
  // Software prefetch into L2, PREFETCH_BYTES ahead of this tile, as one sequential stream: a tile reads its 4 rows
  // of w interleaved (a line of each per chunk), which the hardware prefetchers follow poorly. Measured on SmolLM2's
  // bf16 weights, one thread (AMD EPYC Zen 4): 8 rows of x cost 1.8x one row with 16 KB into L1, 1.04x with 32 KB
  // into L2 (64 KB: 1.2x); one row is unchanged.
  const char* ahead = reinterpret_cast<const char*>(w + n0 * K) + PREFETCH_BYTES;
  for (int64_t k = 0; k < full; k += W) {
    const char* line = ahead + k * sizeof(T) * TILE;
    for (int j = 0; j < TILE; ++j) _mm_prefetch(line + 64 * j, _MM_HINT_T1);
    chunk<T, MI, NJ>(acc, xr, wr, k, W);
  }
  if (full < K) chunk<T, MI, NJ>(acc, xr, wr, full, static_cast<int>(K - full));
#pragma GCC unroll 4
  for (int i = 0; i < MI; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) {
      float s = lane_sum(acc[i][j]);
      if (bias) s = s + to_float(bias[n0 + j]);
      y[(m0 + i) * N + n0 + j] = from_float<T>(s);
    }
}

#else  // no AVX-512: the same order in plain C++ (16 lanes per accumulator), vectorised by the compiler

template <typename T, int MI, int NJ>
void tile(const T* x, const T* w, const T* bias, T* y, int64_t m0, int64_t n0, int64_t K, int64_t N) {
  for (int i = 0; i < MI; ++i)
    for (int j = 0; j < NJ; ++j) {
      const T* xr = x + (m0 + i) * K;
      const T* wr = w + (n0 + j) * K;
      float acc[LANES] = {0};
      for (int64_t k = 0; k < K; k += LANES) {
        int n = static_cast<int>(std::min<int64_t>(LANES, K - k));
        for (int l = 0; l < n; ++l) acc[l] = std::fma(to_float(xr[k + l]), to_float(wr[k + l]), acc[l]);
      }
      float s = lane_sum(acc);
      if (bias) s = s + to_float(bias[n0 + j]);
      y[(m0 + i) * N + n0 + j] = from_float<T>(s);
    }
}

#endif

template <typename T, int MI>
void tile_rows(const T* x, const T* w, const T* bias, T* y, int64_t m0, int64_t n0, int nj, int64_t K,
               int64_t N) {
  switch (nj) {
    case 4: tile<T, MI, 4>(x, w, bias, y, m0, n0, K, N); break;
    case 3: tile<T, MI, 3>(x, w, bias, y, m0, n0, K, N); break;
    case 2: tile<T, MI, 2>(x, w, bias, y, m0, n0, K, N); break;
    default: tile<T, MI, 1>(x, w, bias, y, m0, n0, K, N); break;
  }
}

template <typename T>
void linear_kernel(const T* x, const T* w, const T* bias, T* y, int64_t M, int64_t K, int64_t N) {
  const int64_t n_tiles = (N + TILE - 1) / TILE;
  // each thread owns a range of w's rows; every tile's math is the same whoever runs it. A thread gets at least
  // PARALLEL_MACS of work: waking the pool costs microseconds idle and a whole time slice when another process
  // holds a core, which a small layer cannot win back.
  const int64_t grain = std::max<int64_t>(1, PARALLEL_MACS / std::max<int64_t>(1, M * K * TILE));
  at::parallel_for(0, n_tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t mb = 0; mb < M; mb += M_BLOCK) {
      const int64_t me = std::min(M, mb + M_BLOCK);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * TILE;
        const int nj = static_cast<int>(std::min<int64_t>(TILE, N - n0));
        int64_t m = mb;
        for (; m + TILE <= me; m += TILE) tile_rows<T, 4>(x, w, bias, y, m, n0, nj, K, N);
        switch (me - m) {
          case 3: tile_rows<T, 3>(x, w, bias, y, m, n0, nj, K, N); break;
          case 2: tile_rows<T, 2>(x, w, bias, y, m, n0, nj, K, N); break;
          case 1: tile_rows<T, 1>(x, w, bias, y, m, n0, nj, K, N); break;
          default: break;
        }
      }
    }
  });
}

}  // namespace

// x [..., K], weight [N, K], bias [N] or None -> [..., N], all of one dtype (fp32, bf16, fp16), contiguous.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  if (weight.scalar_type() == at::kByte) return quant_linear(x, weight, bias);  // GGUF blocks (quant.cpp)
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "lookahead::linear runs on CPU tensors");
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1), "lookahead::linear: x [..., K] and weight [N, K]"
              " must agree on K, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "lookahead::linear: x and weight dtypes differ");
  TORCH_CHECK(weight.is_contiguous(), "lookahead::linear: weight must be contiguous");
  const at::Tensor xc = x.contiguous();
  const int64_t K = weight.size(1), N = weight.size(0), M = xc.numel() / K;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == x.scalar_type() &&
                bias->is_contiguous(), "lookahead::linear: bias must be a contiguous [N] tensor of x's dtype");
  }
  LOOKAHEAD_DISPATCH(x.scalar_type(), "lookahead::linear", [&] {
    linear_kernel<scalar_t>(xc.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                            bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), M, K,
                            N);
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(lookahead, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(lookahead, CPU, m) { m.impl("linear", linear); }

}  // namespace lookahead_cpu
