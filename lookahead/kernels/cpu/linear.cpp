// y = x @ w.T + b on CPU, invariant by construction: y[m, n] is one dot product of x[m] and w[n] accumulated in
// a fixed order (lane l of 16 takes k = l, l + 16, ... in ascending chunks; lanes added by one tree), whatever
// the number of rows M, the tile a row falls in or the thread that computes it. So a verify step of T nodes
// gives every node the bits of the one-token step that later decodes the same token.
//
// The weight stays in its natural [N, K] layout (no packed copy: one copy of each weight, and a tied LM head
// shares the embedding). On every code path a register tile of TILE_M rows of x by TILE_N rows of w loads each
// chunk of w once for all its rows of x, and rows of x are blocked so a block stays in L2 while the threads
// stream their own range of w: a verify of T nodes reads the weights once, not T times.
//
// Code paths: AVX-512 (4 x 4 tiles of 16-lane accumulators; bf16 on a CPU with AVX512_BF16 multiplies pairs with
// vdpbf16ps, lane l taking the pairs (2l, 2l + 1) of each 32-element chunk); AVX2 + FMA (2 x 3 tiles, each
// 16-lane accumulator two __m256, lanes 0-7 and 8-15, or for bf16 w from PAIRS_MIN_ROWS rows the even and the odd
// lanes; from PANEL_MIN_ROWS rows the same sums as outer products on packed panels);
// portable C++ for any other CPU (ARM: 2 x 2 tiles of 16-lane arrays the compiler vectorizes). Outside vdpbf16ps
// every element is widened to fp32 and fused-multiply-added; x is widened once per call except where vdpbf16ps
// takes it as it is.
#include <ATen/Parallel.h>

#include <array>
#include <memory>

#include "common.h"
#include "ops.h"

namespace lookahead_cpu {
namespace {

constexpr int64_t M_BLOCK = 64;  // rows of x per block (64 x 1536 fp32 = 384 KB, within L2)
constexpr int64_t PREFETCH_BYTES = 32768;   // how far ahead a tile prefetches w: docs/benchmarks.md#prefetch_bytes
constexpr int64_t PARALLEL_MACS = 1 << 17;  // per thread: ~3 us of bf16 work, a few barriers' cost (#parallel_macs)

// The end of every tile: y[m0 + i, n0 + j] = sum(i, j) (+ bias[n0 + j]), rounded to T once.
template <typename T, int MI, int NJ, typename Sum>
LOOKAHEAD_INLINE inline void store_tile(T* y, const T* bias, int64_t m0, int64_t n0, int64_t N, Sum sum) {
#pragma GCC unroll 4
  for (int i = 0; i < MI; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) {
      float s = sum(i, j);
      if (bias) s = s + to_float(bias[n0 + j]);
      y[(m0 + i) * N + n0 + j] = from_float<T>(s);
    }
}

#if defined(__AVX512F__) || defined(LOOKAHEAD_AVX2)
// Pointers to a tile's COUNT rows of a [*, K] matrix: rows[i] = base + (first + i) * K.
template <int COUNT, typename T>
LOOKAHEAD_INLINE inline std::array<const T*, COUNT> rows_of(const T* base, int64_t first, int64_t K) {
  std::array<const T*, COUNT> rows;
#pragma GCC unroll 4
  for (int i = 0; i < COUNT; ++i) rows[i] = base + (first + i) * K;
  return rows;
}

// body(k, n) over [0, K) in chunks of W elements (n valid; only the last may be short), while the tile's NJ rows of
// w (from w on) are prefetched into L2 PREFETCH_BYTES ahead, a line at a time, as one sequential stream: a tile
// reads its rows interleaved (a line of each per chunk), which the hardware prefetchers follow poorly.
template <int W, int NJ, typename T, typename Body>
LOOKAHEAD_INLINE inline void over_chunks(const T* w, int64_t K, Body body) {
  constexpr int64_t STEP = W * sizeof(T) * NJ;  // bytes of w one chunk reads
  const char* ahead = reinterpret_cast<const char*>(w) + PREFETCH_BYTES;
  const int64_t full = K / W * W;
  for (int64_t k = 0; k < full; k += W) {
    const char* line = ahead + k * sizeof(T) * NJ;
#pragma GCC unroll 4
    for (int64_t b = 0; b < STEP; b += 64) _mm_prefetch(line + b, _MM_HINT_T1);
    body(k, W);
  }
  if (full < K) body(full, static_cast<int>(K - full));
}
#endif

#if defined(__AVX512F__)

constexpr int TILE_M = 4, TILE_N = 4;  // rows of x, rows of w per register tile (16 accumulators)
#if defined(__AVX512BF16__)
constexpr bool WIDEN_X = false;  // x stays in its dtype (vdpbf16ps multiplies bf16 pairs)
#else
constexpr bool WIDEN_X = true;  // x widened to fp32 once per call: a tile widens only its rows of w
#endif

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
template <typename T, int MI, int NJ, typename X>
LOOKAHEAD_INLINE inline void chunk(__m512 (&acc)[TILE_M][TILE_N], const X* const* xr, const T* const* wr, int64_t k,
                                   int n) {
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

template <typename T, int MI, int NJ, typename X>
void tile(const X* x, const T* w, const T* bias, T* y, int64_t m0, int64_t n0, int64_t K, int64_t N) {
  constexpr int W = chunk_width<T>();
  const auto xr = rows_of<MI>(x, m0, K);
  const auto wr = rows_of<NJ>(w, n0, K);
  __m512 acc[TILE_M][TILE_N];
#pragma GCC unroll 4
  for (int i = 0; i < MI; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_setzero_ps();
  over_chunks<W, NJ>(w + n0 * K, K,
                     [&](int64_t k, int n) LOOKAHEAD_INLINE { chunk<T, MI, NJ>(acc, xr.data(), wr.data(), k, n); });
  store_tile<T, MI, NJ>(y, bias, m0, n0, N, [&](int i, int j) LOOKAHEAD_INLINE { return lane_sum(acc[i][j]); });
}

#elif defined(LOOKAHEAD_AVX2)

// 2 x 3 tiles: 12 accumulators (two __m256 per 16-lane sum), 3 widened rows of w and a row of x fill the 16 ymm
// registers, one half-chunk at a time. Verify sizes are mostly even, which 2-row tiles split without a 1-row
// remainder (docs/hosts.md: 2 x 3 against 3 x 2, 2 x 2 and 4 x 1).
constexpr int TILE_M = 2, TILE_N = 3;
constexpr bool WIDEN_X = true;  // x widened to fp32 once per call
// From how many rows of x a tile holds w in registers (HOLD below), and bf16 w runs as pairs (chunk_pairs): both
// pay where the multiply-adds bound the tile, not the weight stream (docs/hosts.md#the-tiles-loads).
constexpr int64_t HELD_MIN_ROWS = 6, PAIRS_MIN_ROWS = 3;

// acc[h][i][j] += x row i . w row j over the half h (lanes 8h .. 8h + 7) of the 16-element chunk at k (n valid
// elements, zeros past them). HOLD: each row of w's chunk is loaded into a register once for all rows of x; GCC
// would otherwise fold an fp32 load into every row's FMA (12 loads a chunk instead of 6), and the loads, not the
// FMAs, would bound the tile.
template <typename T, int MI, int NJ, bool HOLD>
LOOKAHEAD_INLINE inline void chunk(__m256 (&acc)[2][TILE_M][TILE_N], const float* const* xr, const T* const* wr,
                                   int64_t k, int n) {
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    __m256 wv[NJ];
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) {
      wv[j] = load8(wr[j] + k + 8 * h, n - 8 * h);
      if constexpr (HOLD) __asm__("" : "+x"(wv[j]));  // an empty asm that takes wv[j] in a register
    }
#pragma GCC unroll 4
    for (int i = 0; i < MI; ++i) {
      const __m256 xv = load8(xr[i] + k + 8 * h, n - 8 * h);
#pragma GCC unroll 4
      for (int j = 0; j < NJ; ++j) acc[h][i][j] = _mm256_fmadd_ps(xv, wv[j], acc[h][i][j]);
    }
  }
}

// bf16 w: a 16-element chunk is one 256-bit load, 8 pairs (2p, 2p + 1). The even elements are its 32-bit lanes
// shifted left by 16 and the odd ones the same lanes with the low halves taken from those (zero) by one blend: two
// ops per chunk instead of four widenings. So acc[0] holds lanes 0, 2, .., 14 and acc[1] lanes 1, 3, .., 15 (each
// lane still adds its own products in ascending chunks), and x comes paired to match: xp[16c + p] = x[16c + 2p],
// xp[16c + 8 + p] = x[16c + 2p + 1] (pair_x), rows of 16 * ceil(K / 16), zeros past K.
// The 16 elements of a chunk at src, n of them valid: src itself, or (a K that is not a multiple of 16) the n copied
// into buf with zeros after them.
LOOKAHEAD_INLINE inline const c10::BFloat16* chunk16(const c10::BFloat16* src, int n, c10::BFloat16 (&buf)[16]) {
  if (n >= 16) return src;
  for (int l = 0; l < 16; ++l) buf[l] = l < n ? src[l] : c10::BFloat16(0.0f);
  return buf;
}

template <int MI, int NJ>
LOOKAHEAD_INLINE inline void chunk_pairs(__m256 (&acc)[2][TILE_M][TILE_N], const float* const* xr,
                                         const c10::BFloat16* const* wr, int64_t k, int n) {
  const c10::BFloat16* wk[NJ];
  alignas(32) c10::BFloat16 tail[NJ][16];  // the last chunk: zeros past K, as the paired x has
#pragma GCC unroll 4
  for (int j = 0; j < NJ; ++j) wk[j] = chunk16(wr[j] + k, n, tail[j]);
  __m256i wv[NJ];
#pragma GCC unroll 4
  for (int j = 0; j < NJ; ++j) wv[j] = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)wk[j]), 16);
#pragma GCC unroll 4
  for (int i = 0; i < MI; ++i) {
    const __m256 xv = _mm256_loadu_ps(xr[i] + k);
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) acc[0][i][j] = _mm256_fmadd_ps(xv, _mm256_castsi256_ps(wv[j]), acc[0][i][j]);
  }
#pragma GCC unroll 4
  for (int j = 0; j < NJ; ++j) wv[j] = _mm256_blend_epi16(wv[j], _mm256_loadu_si256((const __m256i*)wk[j]), 0xAA);
#pragma GCC unroll 4
  for (int i = 0; i < MI; ++i) {
    const __m256 xv = _mm256_loadu_ps(xr[i] + k + 8);
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) acc[1][i][j] = _mm256_fmadd_ps(xv, _mm256_castsi256_ps(wv[j]), acc[1][i][j]);
  }
}

// x [M, K] as pairs for chunk_pairs, in fp32: rows of Kp = 16 * ceil(K / 16).
inline void pair_x(const c10::BFloat16* x, float* xp, int64_t M, int64_t K, int64_t Kp) {
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t k = 0; k < Kp; k += 16) {
        alignas(32) c10::BFloat16 tail[16];
        const c10::BFloat16* src = chunk16(x + m * K + k, static_cast<int>(std::min<int64_t>(16, K - k)), tail);
        const __m256i raw = _mm256_loadu_si256((const __m256i*)src);
        const __m256i even = _mm256_slli_epi32(raw, 16);
        _mm256_storeu_si256((__m256i*)(xp + m * Kp + k), even);
        _mm256_storeu_si256((__m256i*)(xp + m * Kp + k + 8), _mm256_blend_epi16(even, raw, 0xAA));
      }
  });
}

// lanes 0-7 and 8-15 of a 16-lane sum from its even lanes e and odd lanes o.
LOOKAHEAD_INLINE inline float lane_sum_pairs(__m256 e, __m256 o) {
  const __m256 a = _mm256_unpacklo_ps(e, o), b = _mm256_unpackhi_ps(e, o);  // (0 1 2 3 | 8 9 10 11), (4 .. | 12 ..)
  return lane_sum(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// PAIRS (bf16 only): chunk_pairs on x paired by pair_x, rows of ldx elements; otherwise chunk<HOLD> on x widened,
// rows of ldx = K.
template <typename T, int MI, int NJ, bool HOLD, bool PAIRS = false>
void tile(const float* x, int64_t ldx, const T* w, const T* bias, T* y, int64_t m0, int64_t n0, int64_t K,
          int64_t N) {
  const auto xr = rows_of<MI>(x, m0, ldx);
  const auto wr = rows_of<NJ>(w, n0, K);
  __m256 acc[2][TILE_M][TILE_N];
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h)
#pragma GCC unroll 4
    for (int i = 0; i < MI; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NJ; ++j) acc[h][i][j] = _mm256_setzero_ps();
  over_chunks<LANES, NJ>(w + n0 * K, K, [&](int64_t k, int n) LOOKAHEAD_INLINE {
    if constexpr (PAIRS)
      chunk_pairs<MI, NJ>(acc, xr.data(), wr.data(), k, n);
    else
      chunk<T, MI, NJ, HOLD>(acc, xr.data(), wr.data(), k, n);
  });
  store_tile<T, MI, NJ>(y, bias, m0, n0, N, [&](int i, int j) LOOKAHEAD_INLINE {
    return PAIRS ? lane_sum_pairs(acc[0][i][j], acc[1][i][j]) : lane_sum(acc[0][i][j], acc[1][i][j]);
  });
}

// Many rows (a prefill): the same sums as an outer product, the tile above's bits at a GEMM's multiply-add rate.
// Lane l of y[m, n]'s 16-lane sum is x[m, l] w[n, l] + x[m, l + 16] w[n, l + 16] + ..., one fused multiply-add
// per chunk in ascending order: a scalar x[m, 16c + l] broadcast against 16 columns' w[n, 16c + l] adds the same
// products in the same order to 16 columns' lane l at once. So a 6 x 16 register tile (12 accumulators: 6 rows
// by 2 halves of a 16-column panel) runs lane by lane, each lane's chunks ascending, and the 16 lanes' sums are
// then added by lane_sum's tree, 8 columns a vector. x and each panel of w are packed lane-major per call (zeros
// past K, so the last chunk adds 0 * 0 as the tile's masked load does), which pays only when many rows share
// them.
constexpr int64_t PANEL_MIN_ROWS = 32;  // from here the panels beat the tile: docs/benchmarks.md#panel_min_rows
constexpr int PANEL = 16, PANEL_ROWS = 6;

// The transpose of 8 rows of 8 fp32 in place: r[i][j] <- r[j][i].
LOOKAHEAD_INLINE inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// wp[(l * C + c) * 16 + j] = w[n0 + j, 16 c + l] as fp32 (0 past N or K): the panel of nj columns at n0, lane
// by lane (a lane's chunks are then one sequential stream), each chunk's 16 x 16 block transposed as four 8 x 8.
template <typename T>
void pack_panel(const T* w, int64_t n0, int nj, int64_t K, int64_t C, float* wp) {
  for (int64_t c = 0; c < C; ++c) {
    const int n = static_cast<int>(std::min<int64_t>(16, K - 16 * c));
    for (int jb = 0; jb < PANEL; jb += 8)
      for (int lb = 0; lb < 16; lb += 8) {
        __m256 r[8];
        for (int j = 0; j < 8; ++j)
          r[j] = jb + j < nj ? load8(w + (n0 + jb + j) * K + 16 * c + lb, n - lb) : _mm256_setzero_ps();
        transpose8(r);
        for (int l = 0; l < 8; ++l) _mm256_storeu_ps(wp + ((lb + l) * C + c) * PANEL + jb, r[l]);
      }
  }
}

// y[m0 .. m0 + MI, n0 .. n0 + nj] from x's packed block of rows xb[(l * C + c) * 6 + i] = x[m0 + i, 16 c + l] and
// the packed panel wp.
template <typename T, int MI>
void panel_rows(const float* xb, const float* wp, const T* bias, T* y, int64_t m0, int64_t n0, int nj, int64_t C,
                int64_t N) {
  alignas(32) float part[MI][16][PANEL];  // lane l's sum of each row and column
  for (int l = 0; l < 16; ++l) {
    __m256 acc[MI][2];
#pragma GCC unroll 6
    for (int i = 0; i < MI; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    const float* wl = wp + l * C * PANEL;
    const float* xl = xb + l * C * PANEL_ROWS;
    for (int64_t c = 0; c < C; ++c) {
      const __m256 w0 = _mm256_loadu_ps(wl + c * PANEL), w1 = _mm256_loadu_ps(wl + c * PANEL + 8);
#pragma GCC unroll 6
      for (int i = 0; i < MI; ++i) {
        const __m256 xv = _mm256_broadcast_ss(xl + c * PANEL_ROWS + i);
        acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
      }
    }
#pragma GCC unroll 6
    for (int i = 0; i < MI; ++i) {
      _mm256_store_ps(part[i][l], acc[i][0]);
      _mm256_store_ps(part[i][l] + 8, acc[i][1]);
    }
  }
  for (int i = 0; i < MI; ++i)
    for (int h = 0; h < nj; h += 8) {  // lane_sum's tree, 8 columns a vector
      __m256 b[8], c[4];
      for (int l = 0; l < 8; ++l) b[l] = _mm256_add_ps(_mm256_load_ps(part[i][l] + h), _mm256_load_ps(part[i][l + 8] + h));
      for (int l = 0; l < 4; ++l) c[l] = _mm256_add_ps(b[l], b[l + 4]);
      __m256 s = _mm256_add_ps(_mm256_add_ps(c[0], c[2]), _mm256_add_ps(c[1], c[3]));
      const int n = std::min(8, nj - h);
      if (bias) s = _mm256_add_ps(s, load8(bias + n0 + h, n));
      store8(y + (m0 + i) * N + n0 + h, s, n);
    }
}

// Every row of y by panels of 16 columns, each thread owning a range of panels.
template <typename T>
void linear_panels(const T* x, const T* w, const T* bias, T* y, int64_t M, int64_t K, int64_t N) {
  const int64_t C = (K + 15) / 16, blocks = (M + PANEL_ROWS - 1) / PANEL_ROWS, panels = (N + PANEL - 1) / PANEL;
  const int64_t block_size = 16 * C * PANEL_ROWS;
  // x packed (and widened) by the threads, every element written, zeros past M and K: no serial fill first
  std::unique_ptr<float[]> xp(new float[blocks * block_size]);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t i = 0; i < PANEL_ROWS; ++i) {
        const int64_t m = b * PANEL_ROWS + i;
        float* xb = xp.get() + b * block_size + i;
        for (int64_t k = 0; k < 16 * C; ++k)
          xb[((k % 16) * C + k / 16) * PANEL_ROWS] = m < M && k < K ? to_float(x[m * K + k]) : 0.0f;
      }
  });
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> wp(16 * C * PANEL);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * PANEL;
      const int nj = static_cast<int>(std::min<int64_t>(PANEL, N - n0));
      pack_panel(w, n0, nj, K, C, wp.data());
      for (int64_t b = 0; b < blocks; ++b)
        with_count<PANEL_ROWS>(static_cast<int>(std::min<int64_t>(PANEL_ROWS, M - b * PANEL_ROWS)), [&](auto rows) {
          panel_rows<T, decltype(rows)::value>(xp.get() + b * block_size, wp.data(), bias, y, b * PANEL_ROWS, n0, nj,
                                               C, N);
        });
    }
  });
}

#else  // any other CPU (ARM): the same order in portable C++, vectorised by the compiler

constexpr int TILE_M = 2, TILE_N = 2;  // 4 accumulators of 16 lanes: 16 NEON registers
constexpr bool WIDEN_X = true;  // x widened to fp32 once per call

template <typename T, int MI, int NJ>
void tile(const float* x, const T* w, const T* bias, T* y, int64_t m0, int64_t n0, int64_t K, int64_t N) {
  float acc[MI][NJ][LANES] = {};
  float wv[NJ][LANES];
  for (int64_t k = 0; k < K; k += LANES) {
    const int n = static_cast<int>(std::min<int64_t>(LANES, K - k));
    for (int j = 0; j < NJ; ++j) {  // a chunk of each row of w, widened once for all MI rows of x (zeros past K)
      const T* wr = w + (n0 + j) * K + k;
      if (n == LANES)
        for (int l = 0; l < LANES; ++l) wv[j][l] = to_float(wr[l]);
      else
        for (int l = 0; l < LANES; ++l) wv[j][l] = l < n ? to_float(wr[l]) : 0.0f;
    }
    for (int i = 0; i < MI; ++i) {
      float xv[LANES];
      const float* xr = x + (m0 + i) * K + k;
      if (n == LANES)
        for (int l = 0; l < LANES; ++l) xv[l] = xr[l];
      else
        for (int l = 0; l < LANES; ++l) xv[l] = l < n ? xr[l] : 0.0f;
      for (int j = 0; j < NJ; ++j)
        for (int l = 0; l < LANES; ++l) acc[i][j][l] = std::fma(xv[l], wv[j][l], acc[i][j][l]);
    }
  }
  store_tile<T, MI, NJ>(y, bias, m0, n0, N, [&](int i, int j) LOOKAHEAD_INLINE { return lane_sum(acc[i][j]); });
}

#endif

// x's element type inside the tiles: T itself, or fp32 where the path widens x once per call.
template <typename T> using x_t = std::conditional_t<WIDEN_X, float, T>;

// f(rows, cols, m, n0) for every tile of y [M, N], rows and cols as constants. Each thread owns a range of w's
// rows; every tile's math is the same whoever runs it. A thread gets at least PARALLEL_MACS of work: waking the
// pool costs microseconds idle and a whole time slice when another process holds a core, which a small layer
// cannot win back. (f is left to GCC to inline: forced, the AVX-512 tiles ran 1.3x slower at 8 rows.)
template <typename F>
void for_tiles(int64_t M, int64_t K, int64_t N, F f) {
  const int64_t n_tiles = (N + TILE_N - 1) / TILE_N;
  const int64_t grain = std::max<int64_t>(1, PARALLEL_MACS / std::max<int64_t>(1, M * K * TILE_N));
  parallel_chunks(n_tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t mb = 0; mb < M; mb += M_BLOCK) {
      const int64_t me = std::min(M, mb + M_BLOCK);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * TILE_N;
        const int nj = static_cast<int>(std::min<int64_t>(TILE_N, N - n0));
        for (int64_t m = mb; m < me; m += TILE_M)  // the tile of the rows (<= TILE_M) and columns left
          with_count<TILE_M>(static_cast<int>(std::min<int64_t>(TILE_M, me - m)),
                             [&](auto rows) { with_count<TILE_N>(nj, [&](auto cols) { f(rows, cols, m, n0); }); });
      }
    }
  });
}

#if defined(LOOKAHEAD_AVX2)
// bf16 from PAIRS_MIN_ROWS rows: x paired once per call, then the pairs' tiles.
void linear_pairs(const c10::BFloat16* x, const c10::BFloat16* w, const c10::BFloat16* bias, c10::BFloat16* y,
                  int64_t M, int64_t K, int64_t N) {
  const int64_t Kp = (K + 15) / 16 * 16;
  std::vector<float> paired(M * Kp);
  pair_x(x, paired.data(), M, K, Kp);
  for_tiles(M, K, N, [&](auto rows, auto cols, int64_t m, int64_t n0) {
    tile<c10::BFloat16, decltype(rows)::value, decltype(cols)::value, false, true>(paired.data(), Kp, w, bias, y, m,
                                                                                   n0, K, N);
  });
}
#endif

template <typename T>
void linear_kernel(const T* x, const T* w, const T* bias, T* y, int64_t M, int64_t K, int64_t N) {
#if defined(LOOKAHEAD_AVX2)
  if (M >= PANEL_MIN_ROWS) return linear_panels(x, w, bias, y, M, K, N);  // widens x as it packs it
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (M >= PAIRS_MIN_ROWS) return linear_pairs(x, w, bias, y, M, K, N);
  }
#endif
  const x_t<T>* xs;
  std::vector<float> widened;  // x in fp32 where the path multiplies in fp32 (exact: every bf16/fp16 is an fp32)
  if constexpr (std::is_same_v<x_t<T>, T>) {
    xs = x;
  } else {
    widened.resize(M * K);
    at::parallel_for(0, M * K, 1 << 16, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) widened[e] = to_float(x[e]);
    });
    xs = widened.data();
  }
#if defined(LOOKAHEAD_AVX2)
  if (M >= HELD_MIN_ROWS)
    return for_tiles(M, K, N, [&](auto rows, auto cols, int64_t m, int64_t n0) {
      tile<T, decltype(rows)::value, decltype(cols)::value, true>(xs, K, w, bias, y, m, n0, K, N);
    });
  for_tiles(M, K, N, [&](auto rows, auto cols, int64_t m, int64_t n0) {
    tile<T, decltype(rows)::value, decltype(cols)::value, false>(xs, K, w, bias, y, m, n0, K, N);
  });
#else
  for_tiles(M, K, N, [&](auto rows, auto cols, int64_t m, int64_t n0) {
    tile<T, decltype(rows)::value, decltype(cols)::value>(xs, w, bias, y, m, n0, K, N);
  });
#endif
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

// The code path these ops were compiled for (the -march they were built with decides it): "avx512_bf16",
// "avx512", "avx2" or "portable". dtype="auto" is chosen by it (kernels/cpu/__init__.py).
std::string cpu_code_path() {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return "avx512_bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(LOOKAHEAD_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace lookahead_cpu
