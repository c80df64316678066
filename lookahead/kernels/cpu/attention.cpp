// Attention of a decode step on CPU: RoPE + the K/V store of the step's tokens, and tree attention that gives a
// draft node the bits of the one-token step that later decodes the same token.
//
// Node i of row b (committed length L) attends to the key sequence: slots 0 .. L-1, then its path (the nodes j
// with tree_mask[b, i, j], ascending: its ancestors and itself) at slots L + j. Once the path is accepted and
// compacted, the one-token step that decodes node i's token sees exactly that sequence at slots 0 .. L + depth.
// So the result is computed as a function of the key sequence alone: scores s_n = q.k_n * scale (fixed-order dot
// products), m = max s_n, p_n = exp(s_n - m), l = sum p_n in lanes by sequence index n, out = sum_n p_n v_n in
// ascending n, divided by l. Nothing depends on T, on the other nodes or rows, or on where the masked slots are.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "ops.h"

namespace lookahead_cpu {
namespace {

template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += LANES) {
    const int n = static_cast<int>(std::min<int64_t>(LANES, D - d));
    acc = _mm512_fmadd_ps(load16(q + d, n), load16(k + d, n), acc);
  }
  return lane_sum(acc);
#elif defined(LOOKAHEAD_AVX2)
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();  // lanes 0-7 and 8-15 of the 16-lane sum
  for (int64_t d = 0; d < D; d += LANES) {
    const int n = static_cast<int>(std::min<int64_t>(LANES, D - d));
    lo = _mm256_fmadd_ps(load8(q + d, n), load8(k + d, n), lo);
    hi = _mm256_fmadd_ps(load8(q + d + 8, n - 8), load8(k + d + 8, n - 8), hi);
  }
  return lane_sum(lo, hi);
#else
  float acc[LANES] = {0};
  for (int64_t d = 0; d < D; d += LANES) {
    const int n = static_cast<int>(std::min<int64_t>(LANES, D - d));
    for (int l = 0; l < n; ++l) acc[l] = std::fma(q[d + l], to_float(k[d + l]), acc[l]);
  }
  return lane_sum(acc);
#endif
}

// o[0:D] += p * v[0:D] (each element its own fused multiply-add, so any vector width gives the same bits)
template <typename T>
inline void axpy(float p, const T* v, float* o, int64_t D) {
#if defined(__AVX512F__)
  const __m512 pv = _mm512_set1_ps(p);
  for (int64_t d = 0; d < D; d += LANES) {
    const int n = static_cast<int>(std::min<int64_t>(LANES, D - d));
    const __mmask16 m = (__mmask16)((1u << n) - 1);
    _mm512_mask_storeu_ps(o + d, m, _mm512_fmadd_ps(pv, load16(v + d, n), _mm512_maskz_loadu_ps(m, o + d)));
  }
#elif defined(LOOKAHEAD_AVX2)
  const __m256 pv = _mm256_set1_ps(p);
  for (int64_t d = 0; d < D; d += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, D - d));
    store8(o + d, _mm256_fmadd_ps(pv, load8(v + d, n), load8(o + d, n)), n);
  }
#else
  for (int64_t d = 0; d < D; ++d) o[d] = std::fma(p, to_float(v[d]), o[d]);
#endif
}

#if defined(__AVX512F__)
// The lane sums of 16 vectors at once: out[j] = lane_sum(v[j]), each by the same tree (halves, quarters, then
// (l0 + l2) + (l1 + l3)), computed as four rounds of lane shuffles and adds instead of 16 separate reductions.
inline __m512 lane_sums16(const __m512 (&v)[16]) {
  __m512 u[8], w[4], x[2];
  for (int a = 0; a < 8; ++a)  // key 2a in lanes 0-7, key 2a+1 in lanes 8-15: l + (l + 8)
    u[a] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * a], v[2 * a + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * a], v[2 * a + 1], 0xEE));
  for (int c = 0; c < 4; ++c)  // quarter t holds key 4c+t: l + (l + 4)
    w[c] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * c], u[2 * c + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * c], u[2 * c + 1], 0xDD));
  for (int e = 0; e < 2; ++e) {  // lanes 0-1 of quarter q: key 8e+q, lanes 2-3: key 8e+4+q; (l0 + l2), (l1 + l3)
    const __m512d a = _mm512_castps_pd(w[2 * e]), b = _mm512_castps_pd(w[2 * e + 1]);
    x[e] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // lane 4q + r holds key 4r + q
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), s);
}

// A chunk of the scores' dot products in 16 fp32 lanes: multiply-adds over 16 elements (q in fp32, a key of any
// dtype widened), or on AVX512-BF16 builds vdpbf16ps over 32 bf16 elements (Bf16Chunk below). n: the valid elements
// of a chunk (the last one's masked load gives zeros past them).
struct Fp32Chunk {
  static constexpr int W = 16;
  using Q = __m512;
  using QT = float;
  static Q q(const float* p, int n) { return load16(p, n); }
  template <typename T> static __m512 k(const T* p, int n) { return load16(p, n); }
  static __m512 madd(__m512 acc, Q q, __m512 k) { return _mm512_fmadd_ps(q, k, acc); }
};

#if defined(__AVX512BF16__)
// bf16 keys on an AVX512-BF16 build: q . k by vdpbf16ps, 32 elements (16 pairs) a chunk, lane l adding the pairs
// (2l, 2l + 1) of each chunk in ascending chunks (linear.cpp's order), then lane_sums16's tree. The products of two
// bf16 are exact in fp32; q stays in bf16 (its rows 32 * NC elements, zeros past D) and k is read as it is, so no
// element is widened.
LOOKAHEAD_INLINE inline __m512i load32_bf16(const c10::BFloat16* p, int n) {
  return n >= 32 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16((__mmask32)((1u << n) - 1), p);
}
struct Bf16Chunk {
  static constexpr int W = 32;
  using Q = __m512i;
  using QT = c10::BFloat16;
  static Q q(const c10::BFloat16* p, int n) { return load32_bf16(p, n); }
  static __m512i k(const c10::BFloat16* p, int n) { return load32_bf16(p, n); }
  static __m512 madd(__m512 acc, Q q, __m512i k) { return _mm512_dpbf16_ps(acc, (__m512bh)q, (__m512bh)k); }
};
#endif

// scores[n] = (q . k[key(n)]) * scale for n < n_keys, 16 keys at a time; q is D = W * NC (the last chunk masked)
template <int NC, typename C, typename T, typename Key>
LOOKAHEAD_NOINLINE void scores_block(const typename C::QT* qf, int64_t D, const T* kh, int64_t ss, Key key,
                                     int64_t n_keys, float scale, float* scores) {
  constexpr int W = C::W;
  typename C::Q qv[NC];
  const int tail = static_cast<int>(D - W * (NC - 1));
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) qv[c] = C::q(qf + W * c, c == NC - 1 ? tail : W);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t n0 = 0; n0 < n_keys; n0 += 16) {
    const int cnt = static_cast<int>(std::min<int64_t>(16, n_keys - n0));
    const T* rows[16];
    for (int j = 0; j < 16; ++j) rows[j] = kh + key(n0 + std::min(j, cnt - 1)) * ss;  // past the end: a repeat, unstored
    __m512 acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      acc[j] = _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) acc[j] = C::madd(acc[j], qv[c], C::k(rows[j] + W * c, c == NC - 1 ? tail : W));
    }
    _mm512_mask_storeu_ps(scores + n0, (__mmask16)((1u << cnt) - 1), _mm512_mul_ps(lane_sums16(acc), sc));
  }
}

// o[0:D] = sum_n p[n] * v[key(n)] in ascending n (resume: o + that sum, continuing o's chains), the D = 16 * NC
// accumulators held in registers
template <int NC, typename T, typename Key>
LOOKAHEAD_NOINLINE void weighted_values(const float* p, int64_t D, const T* vh, int64_t ss, Key key, int64_t n_keys,
                                        float* o, bool resume) {
  __m512 acc[NC];
  const int tail = static_cast<int>(D - 16 * (NC - 1));
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) acc[c] = resume ? load16(o + 16 * c, c == NC - 1 ? tail : 16) : _mm512_setzero_ps();
  for (int64_t n = 0; n < n_keys; ++n) {
    const __m512 pn = _mm512_set1_ps(p[n]);
    const T* row = vh + key(n) * ss;
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) acc[c] = _mm512_fmadd_ps(pn, load16(row + 16 * c, c == NC - 1 ? tail : 16), acc[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) _mm512_mask_storeu_ps(o + 16 * c, (__mmask16)((1u << (c == NC - 1 ? tail : 16)) - 1), acc[c]);
}

// The two loops above for a head dim of up to 128 (NC <= 8); false for a larger one (the generic loops run).
template <typename T, typename Key>
bool attend_avx512(const float* qf, int64_t D, const T* kh, const T* vh, int64_t ss, Key key, int64_t n_keys,
                   float scale, float* scores, float* o, bool values, bool resume) {
  switch ((D + 15) / 16) {
#define LOOKAHEAD_NC(NC)                                                              \
  case NC:                                                                            \
    if (values) weighted_values<NC>(scores, D, vh, ss, key, n_keys, o, resume);       \
    else scores_block<NC, Fp32Chunk>(qf, D, kh, ss, key, n_keys, scale, scores);      \
    return true;
    LOOKAHEAD_NC(1) LOOKAHEAD_NC(2) LOOKAHEAD_NC(3) LOOKAHEAD_NC(4)
    LOOKAHEAD_NC(5) LOOKAHEAD_NC(6) LOOKAHEAD_NC(7) LOOKAHEAD_NC(8)
#undef LOOKAHEAD_NC
    default: return false;
  }
}

// The two loops above for Q = 2 .. 4 queries over the same keys (rows 0 .. n_keys - 1 of kh / vh, stride ss), each
// query's results the bits of the one-query loops: a 16-bit chunk of a key or value is loaded (and widened) once for
// all Q instead of once per query.
constexpr int MULTI_MAX = 4;  // queries a multi-query call takes at most (3 for a head dim over 96: values_multi's
inline int multi_max(int64_t D) { return D > 96 ? 3 : MULTI_MAX; }  // Q x NC accumulators stay within 24 registers)

// scores[q][n] = (q_q . k_n) * scale: 16 / Q keys of the Q queries make one block of 16 sums, each its chunks'
// multiply-adds in ascending order and then lane_sums16's tree, as scores_block's. q rows are W * NC elements (zeros
// past D): in registers for bf16 chunks where Q * NC <= 8, else read from memory (the accumulators take the
// registers).
template <int NC, int Q, typename C, typename T>
LOOKAHEAD_NOINLINE void scores_multi(const typename C::QT* const* qf, int64_t D, const T* kh, int64_t ss,
                                     int64_t n_keys, float scale, float* const* scores) {
  constexpr int KPB = 16 / Q, W = C::W;
  constexpr bool HOLD_Q = W == 32 && Q * NC <= 8;
  const int tail = static_cast<int>(D - W * (NC - 1));
  typename C::Q qv[HOLD_Q ? Q : 1][HOLD_Q ? NC : 1];
  if constexpr (HOLD_Q)
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q)
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) qv[q][c] = C::q(qf[q] + W * c, W);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t n0 = 0; n0 < n_keys; n0 += KPB) {
    const int cnt = static_cast<int>(std::min<int64_t>(KPB, n_keys - n0));
    const T* rows[KPB];
    for (int j = 0; j < KPB; ++j) rows[j] = kh + (n0 + std::min(j, cnt - 1)) * ss;  // past the end: a repeat
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c)
#pragma GCC unroll 16
      for (int j = 0; j < KPB; ++j) {
        const auto k = C::k(rows[j] + W * c, c == NC - 1 ? tail : W);
#pragma GCC unroll 4
        for (int q = 0; q < Q; ++q) {
          typename C::Q qc;
          if constexpr (HOLD_Q) qc = qv[q][c];
          else qc = C::q(qf[q] + W * c, W);
          acc[q * KPB + j] = C::madd(acc[q * KPB + j], qc, k);
        }
      }
    alignas(64) float s[16];
    _mm512_store_ps(s, _mm512_mul_ps(lane_sums16(acc), sc));
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) std::copy(s + q * KPB, s + q * KPB + cnt, scores[q] + n0);
  }
}

// o[q] = sum_n p[q][n] * v_n in ascending n (resume: o[q] + that sum), each lane's fused multiply-adds as
// weighted_values's.
template <int NC, int Q, typename T>
LOOKAHEAD_NOINLINE void values_multi(const float* const* p, int64_t D, const T* vh, int64_t ss, int64_t n_keys,
                                     float* const* o, bool resume) {
  __m512 acc[Q][NC];
  const int tail = static_cast<int>(D - 16 * (NC - 1));
#pragma GCC unroll 4
  for (int q = 0; q < Q; ++q)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c)
      acc[q][c] = resume ? load16(o[q] + 16 * c, c == NC - 1 ? tail : 16) : _mm512_setzero_ps();
  for (int64_t n = 0; n < n_keys; ++n) {
    const T* row = vh + n * ss;
    __m512 pn[Q];
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) pn[q] = _mm512_set1_ps(p[q][n]);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const __m512 v = load16(row + 16 * c, c == NC - 1 ? tail : 16);
#pragma GCC unroll 4
      for (int q = 0; q < Q; ++q) acc[q][c] = _mm512_fmadd_ps(pn[q], v, acc[q][c]);
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < Q; ++q)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c)
      _mm512_mask_storeu_ps(o[q] + 16 * c, (__mmask16)((1u << (c == NC - 1 ? tail : 16)) - 1), acc[q][c]);
}

#if defined(__AVX512BF16__)
// scores_block over bf16 chunks (vdpbf16ps) for a head dim of up to 128; false for a larger one.
template <typename Key>
bool scores_bh(const c10::BFloat16* qb, int64_t D, const c10::BFloat16* kh, int64_t ss, Key key, int64_t n_keys,
               float scale, float* scores) {
  if (D > 128) return false;
  with_count<4>(static_cast<int>((D + 31) / 32), [&](auto nc) LOOKAHEAD_INLINE {
    scores_block<decltype(nc)::value, Bf16Chunk>(qb, D, kh, ss, key, n_keys, scale, scores);
  });
  return true;
}
#endif

// scores_multi or values_multi for nq = 2 .. multi_max(D) queries and a head dim of up to 128. (Not inlined: inlined
// into tree_attention's item loop, its dispatch made GCC compile that loop's other paths 1.1-1.3x slower.)
template <typename T>
LOOKAHEAD_NOINLINE void attend_multi(int nq, const float* const* qf, const T* const* qb, int64_t D, const T* kh,
                                     const T* vh, int64_t ss, int64_t n_keys, float scale, float* const* scores,
                                     float* const* o, bool values, bool resume) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (!values) {  // qb: the queries in bf16
      with_count<4>(static_cast<int>((D + 31) / 32), [&](auto nc2) LOOKAHEAD_INLINE {
        with_count<MULTI_MAX>(nq, [&](auto q) LOOKAHEAD_INLINE {
          constexpr int NC2 = decltype(nc2)::value, Q = decltype(q)::value;
          if constexpr (Q >= 2)
            scores_multi<NC2, Q, Bf16Chunk>(qb, D, kh, ss, n_keys, scale, scores);
          else
            TORCH_CHECK(false, "lookahead::tree_attention: ", nq, " queries at a head dim of ", D, " in one pass");
        });
      });
      return;
    }
  }
#endif
  with_count<8>(static_cast<int>((D + 15) / 16), [&](auto nc) LOOKAHEAD_INLINE {
    with_count<MULTI_MAX>(nq, [&](auto q) LOOKAHEAD_INLINE {
      constexpr int NC = decltype(nc)::value, Q = decltype(q)::value;
      if constexpr (Q >= 2 && Q * NC <= 24) {
        if (values)
          values_multi<NC, Q>(scores, D, vh, ss, n_keys, o, resume);
        else
          scores_multi<NC, Q, Fp32Chunk>(qf, D, kh, ss, n_keys, scale, scores);
      } else {
        TORCH_CHECK(false, "lookahead::tree_attention: ", nq, " queries at a head dim of ", D, " in one pass");
      }
    });
  });
}

#elif defined(LOOKAHEAD_AVX2)
// lane_sum(lo, hi) of 8 keys at once, from b[j] = lo[j] + hi[j] (the tree's first level): l + (l + 4) within each
// key, then (l0 + l2) + (l1 + l3), as lane shuffles across keys instead of 8 separate reductions. Lane j of the
// result is key j's sum.
inline __m256 lane_sums8(const __m256 (&b)[8]) {
  __m256 c[4], x[2];
  for (int a = 0; a < 4; ++a)  // lanes 0-3: key 2a's b[l] + b[l + 4], lanes 4-7: key 2a + 1's
    c[a] = _mm256_add_ps(_mm256_permute2f128_ps(b[2 * a], b[2 * a + 1], 0x20),
                         _mm256_permute2f128_ps(b[2 * a], b[2 * a + 1], 0x31));
  for (int e = 0; e < 2; ++e)  // (c0 + c2), (c1 + c3): [4e: d0 d1, 4e+2: d0 d1 | 4e+1: d0 d1, 4e+3: d0 d1]
    x[e] = _mm256_add_ps(_mm256_shuffle_ps(c[2 * e], c[2 * e + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(c[2 * e], c[2 * e + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 s = _mm256_add_ps(_mm256_shuffle_ps(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),  // d0 + d1:
                                 _mm256_shuffle_ps(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));  // keys 0 2 4 6 | 1 3 5 7
  return _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// 16 bf16 as two fp32 vectors in one load and two unpacks: elements 0-3 and 8-11, then 4-7 and 12-15 (a bf16 is
// the top half of its fp32). The loops below keep each element in its own lane and undo the order where it counts.
struct Bf16Pair {
  __m256 a, b;
};
inline Bf16Pair load16_bf16_interleaved(const c10::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), zero = _mm256_setzero_si256();
  return {_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v))};
}
// The 128-bit halves regrouped: (a.lo | b.lo, a.hi | b.hi). It maps elements 0-7 | 8-15 to that load's order and
// back: 0-3 | 8-11 and 4-7 | 12-15 <-> 0-3 | 4-7 and 8-11 | 12-15.
inline Bf16Pair regroup(__m256 a, __m256 b) {
  return {_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31)};
}

// scores[n] = (q . k[key(n)]) * scale for n < n_keys, 8 keys at a time, each dot as dot() takes it (16-lane
// chunks, lanes 0-7 and 8-15 in two accumulators); q is D = 16 * NC (FULL), or its last chunk is short by D's tail
template <int NC, bool FULL, typename T, typename Key>
LOOKAHEAD_NOINLINE void scores_block(const float* qf, int64_t D, const T* kh, int64_t ss, Key key, int64_t n_keys,
                                     float scale, float* scores) {
  __m256 qlo[NC], qhi[NC];
  const int tail = static_cast<int>(D - 16 * (NC - 1));
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) {
    const int n = c == NC - 1 ? tail : 16;
    qlo[c] = load8(qf + 16 * c, n);
    qhi[c] = load8(qf + 16 * c + 8, n - 8);
  }
  // bf16 keys of whole chunks load as Bf16Pair: q's lanes in the same order, and lane_sum's first level
  // (l + (l + 8)) pairs the halves of each vector instead of the two vectors
  constexpr bool PAIRS = FULL && std::is_same_v<T, c10::BFloat16>;
  if constexpr (PAIRS) {
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {  // q 0-3 | 8-11 and 4-7 | 12-15 of the chunk
      const Bf16Pair q = regroup(qlo[c], qhi[c]);
      qlo[c] = q.a;
      qhi[c] = q.b;
    }
  }
  const __m256 sc = _mm256_set1_ps(scale);
  for (int64_t n0 = 0; n0 < n_keys; n0 += 8) {
    const int cnt = static_cast<int>(std::min<int64_t>(8, n_keys - n0));
    __m256 b[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {  // past the end: a repeat of the last key, unstored
      const T* row = kh + key(n0 + std::min(j, cnt - 1)) * ss;
      __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) {
        if constexpr (PAIRS) {
          const Bf16Pair k = load16_bf16_interleaved(row + 16 * c);
          lo = _mm256_fmadd_ps(qlo[c], k.a, lo);
          hi = _mm256_fmadd_ps(qhi[c], k.b, hi);
        } else {
          const int n = FULL || c < NC - 1 ? 16 : tail;  // a constant where the chunk is whole: unmasked loads
          lo = _mm256_fmadd_ps(qlo[c], load8(row + 16 * c, n), lo);
          hi = _mm256_fmadd_ps(qhi[c], load8(row + 16 * c + 8, n - 8), hi);
        }
      }
      if constexpr (PAIRS) {  // lo: elements 0-3 | 8-11, hi: 4-7 | 12-15
        const Bf16Pair h = regroup(lo, hi);
        b[j] = _mm256_add_ps(h.a, h.b);
      } else {
        b[j] = _mm256_add_ps(lo, hi);
      }
    }
    store8(scores + n0, _mm256_mul_ps(lane_sums8(b), sc), cnt);
  }
}

// o[d0 : d0 + 8 * NC8] = sum_n p[n] * v[key(n)][...] in ascending n (resume: o + that sum), as axpy() takes it, the
// accumulators held in registers (n valid elements from d0: 8 * NC8 where FULL)
template <int NC8, bool FULL, typename T, typename Key>
LOOKAHEAD_NOINLINE void weighted_values(const float* p, const T* vh, int64_t ss, Key key, int64_t n_keys, int64_t d0,
                                        int n, float* o, bool resume) {
  if constexpr (FULL) n = 8 * NC8;
  __m256 acc[NC8];
#pragma GCC unroll 8
  for (int c = 0; c < NC8; ++c) acc[c] = resume ? load8(o + d0 + 8 * c, std::min(n - 8 * c, 8)) : _mm256_setzero_ps();
  // bf16 rows of whole 16-element groups load as Bf16Pair: acc[2g] holds elements 0-3 | 8-11 of group g, acc[2g + 1]
  // 4-7 | 12-15, put back in order at the store (and into that order from o's, resuming: regroup is its own inverse)
  constexpr bool PAIRS = FULL && NC8 % 2 == 0 && std::is_same_v<T, c10::BFloat16>;
  if constexpr (PAIRS)
    if (resume)
#pragma GCC unroll 8
      for (int c = 0; c < NC8; c += 2) {
        const Bf16Pair v = regroup(acc[c], acc[c + 1]);
        acc[c] = v.a;
        acc[c + 1] = v.b;
      }
  for (int64_t k = 0; k < n_keys; ++k) {
    const __m256 pk = _mm256_set1_ps(p[k]);
    const T* row = vh + key(k) * ss + d0;
    if constexpr (PAIRS) {
#pragma GCC unroll 8
      for (int c = 0; c < NC8; c += 2) {
        const Bf16Pair v = load16_bf16_interleaved(row + 8 * c);
        acc[c] = _mm256_fmadd_ps(pk, v.a, acc[c]);
        acc[c + 1] = _mm256_fmadd_ps(pk, v.b, acc[c + 1]);
      }
    } else {
#pragma GCC unroll 8
      for (int c = 0; c < NC8; ++c) acc[c] = _mm256_fmadd_ps(pk, load8(row + 8 * c, std::min(n - 8 * c, 8)), acc[c]);
    }
  }
  if constexpr (PAIRS) {
#pragma GCC unroll 8
    for (int c = 0; c < NC8; c += 2) {
      const Bf16Pair v = regroup(acc[c], acc[c + 1]);
      acc[c] = v.a;
      acc[c + 1] = v.b;
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < NC8; ++c) store8(o + d0 + 8 * c, acc[c], std::min(n - 8 * c, 8));
}

// The two loops above for a head dim of up to 128 (values 64 dims at a time); false for a larger one.
template <typename T, typename Key>
bool attend_avx2(const float* qf, int64_t D, const T* kh, const T* vh, int64_t ss, Key key, int64_t n_keys,
                 float scale, float* scores, float* o, bool values, bool resume) {
  if (D > 128) return false;
  if (values) {
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      const int n = static_cast<int>(std::min<int64_t>(64, D - d0));
      switch ((n + 7) / 8) {
#define LOOKAHEAD_NC8(NC8) \
  case NC8:                                                                                  \
    if (n == 8 * NC8) weighted_values<NC8, true>(scores, vh, ss, key, n_keys, d0, n, o, resume);  \
    else weighted_values<NC8, false>(scores, vh, ss, key, n_keys, d0, n, o, resume);              \
    break;
        LOOKAHEAD_NC8(1) LOOKAHEAD_NC8(2) LOOKAHEAD_NC8(3) LOOKAHEAD_NC8(4)
        LOOKAHEAD_NC8(5) LOOKAHEAD_NC8(6) LOOKAHEAD_NC8(7) LOOKAHEAD_NC8(8)
#undef LOOKAHEAD_NC8
      }
    }
    return true;
  }
  switch ((D + 15) / 16) {
#define LOOKAHEAD_NC(NC) \
  case NC:                                                                               \
    if (D == 16 * NC) scores_block<NC, true>(qf, D, kh, ss, key, n_keys, scale, scores);  \
    else scores_block<NC, false>(qf, D, kh, ss, key, n_keys, scale, scores);              \
    return true;
    LOOKAHEAD_NC(1) LOOKAHEAD_NC(2) LOOKAHEAD_NC(3) LOOKAHEAD_NC(4)
    LOOKAHEAD_NC(5) LOOKAHEAD_NC(6) LOOKAHEAD_NC(7) LOOKAHEAD_NC(8)
#undef LOOKAHEAD_NC
    default: return false;
  }
}
#endif

// Softmax of one query's scores in place: sp[n] = exp(sp[n] - max), and the sum of them in lanes by key index
// (lsum[n % 16]), 16 keys at a time on the vector paths: the scalar loops' bits everywhere.
void softmax_lanes(float* sp, int64_t n_keys, float* lsum) {
  std::fill(lsum, lsum + LANES, 0.0f);
#if defined(__AVX512F__)
  {  // the max, exp and the lane sums 16 keys at a time (the tail under a mask): the scalar loops' bits
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int64_t n = 0; n < n_keys; n += LANES) {
      const __mmask16 k = (__mmask16)((1u << std::min<int64_t>(LANES, n_keys - n)) - 1);
      mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, sp + n));
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    __m512 ls = _mm512_setzero_ps();
    for (int64_t n = 0; n < n_keys; n += LANES) {
      const __mmask16 k = (__mmask16)((1u << std::min<int64_t>(LANES, n_keys - n)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sp + n), m)));
      _mm512_mask_storeu_ps(sp + n, k, e);
      ls = _mm512_add_ps(ls, e);
    }
    _mm512_storeu_ps(lsum, ls);
  }
#elif defined(LOOKAHEAD_AVX2)
  {  // the same, 16 keys at a time as two halves (keys n % 16 < 8 in lo, the others in hi): the scalar bits
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (int64_t n = 0; n < n_keys; n += 8) {
      const int c = static_cast<int>(std::min<int64_t>(8, n_keys - n));
      const __m256 valid = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
      mv = _mm256_max_ps(mv, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), load8(sp + n, c), valid));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mv);
    float mx = lanes[0];
    for (int l = 1; l < 8; ++l) mx = std::max(mx, lanes[l]);
    const __m256 m = _mm256_set1_ps(mx);
    __m256 ls[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t n = 0; n < n_keys; n += 8) {
      const int c = static_cast<int>(std::min<int64_t>(8, n_keys - n));
      const __m256 valid = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
      const __m256 e = _mm256_and_ps(valid, exp8(_mm256_sub_ps(load8(sp + n, c), m)));
      store8(sp + n, e, c);
      ls[(n / 8) % 2] = _mm256_add_ps(ls[(n / 8) % 2], e);
    }
    _mm256_storeu_ps(lsum, ls[0]);
    _mm256_storeu_ps(lsum + 8, ls[1]);
  }
#else
  float m = -INFINITY;
  for (int64_t n = 0; n < n_keys; ++n) m = std::max(m, sp[n]);
  for (int64_t n = 0; n < n_keys; ++n) sp[n] = exp_f32(sp[n] - m);
  for (int64_t n = 0; n < n_keys; ++n) lsum[n % LANES] = lsum[n % LANES] + sp[n];
#endif
}

constexpr int64_t QB = 16;  // queries per work item at most
constexpr int64_t KB = 64;  // shared fp32 keys per block: 16 KiB of K (or V) at a head dim of 64

// A work item of tree_attention: queries q0 .. q1 - 1 of (cache row b, KV head g), query q being head
// g * group + q % group of token order[first[b] + q / group]
struct Item {
  int64_t b, g, q0, q1;
};
// tree_attention's plan of a call: each row's tokens (row b's: order[first[b] .. first[b + 1])), and the items
struct Plan {
  std::vector<int64_t> first, order, sorted, fill;
  std::vector<Item> items;
};

// A thread's scratch in tree_attention, kept across its items and calls: per query its q in fp32, its output sums,
// its scores, its softmax sum, its path's slots past the shared keys, its shared and total key counts, its token and
// head; the queries on a block of keys.
struct Scratch {
  std::vector<float> qf, o, scores, sums;
  std::vector<c10::BFloat16> qb;  // the queries in bf16 for vdpbf16ps (AVX512-BF16 builds, bf16 q)
  std::vector<int64_t> path, shared, n_keys, tok, head, active;
};

struct CacheView {  // a [B, H, S, D] cache tensor's pointer and strides (rows may be a view of a bigger cache)
  int64_t sb, sh, ss;
};

}  // namespace

// Two layouts of a step's tokens. Padded: q [B, T, Hq, D], token (b, i) is node i of cache row b, tree_mask
// [B, T, T] bool (tree_mask[b, i, j]: node i sees node j) or None (a causal chain). Ragged (rows given): q [N, Hq, D]
// flattened over the rows (as flash-attn's varlen), rows [N] / nodes [N] int64 the cache row and node index of each
// token, tree_mask [N, W] bool (token n sees node j of its row) or None. Either way node i of row b has its K/V at
// slot lens[b] + i of k/v_cache [R, Hkv, S, D] (R cache rows) -> out shaped as q.
at::Tensor tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& lens, const c10::optional<at::Tensor>& tree_mask, double scale,
                          const c10::optional<at::Tensor>& rows, const c10::optional<at::Tensor>& nodes) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() && lens.device().is_cpu(),
              "lookahead::tree_attention runs on CPU tensors");
  const bool ragged = rows.has_value();
  TORCH_CHECK(ragged == nodes.has_value(), "lookahead::tree_attention: rows and nodes come together");
  TORCH_CHECK(q.dim() == (ragged ? 3 : 4) && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "lookahead::tree_attention: q [B, T, Hq, D] (or [N, Hq, D] with rows), k/v_cache [R, Hkv, S, D], got ",
              q.sizes(), " ", k_cache.sizes(), " ", v_cache.sizes());
  const int64_t N = ragged ? q.size(0) : q.size(0) * q.size(1), Hq = q.size(-2), D = q.size(-1);
  const int64_t R = k_cache.size(0), Hkv = k_cache.size(1), S = k_cache.size(2);
  const int64_t T = ragged ? 0 : q.size(1);  // the padded layout's nodes per row
  TORCH_CHECK((ragged || R == q.size(0)) && k_cache.size(3) == D && Hq % Hkv == 0,
              "lookahead::tree_attention: cache rows / head dim / head groups do not fit q");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "lookahead::tree_attention: q and the cache must share a dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1 && k_cache.strides() == v_cache.strides(),
              "lookahead::tree_attention: cache head dim must be contiguous and k/v strided alike");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.dim() == 1 && lens.size(0) == R,
              "lookahead::tree_attention: cache_lens must be int64 [cache rows]");
  const at::Tensor lc = lens.contiguous();
  const int64_t* lp = lc.data_ptr<int64_t>();
  std::vector<int64_t> row_of(N), node_of(N);  // each token's cache row and node index
  if (ragged) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && nodes->scalar_type() == at::kLong && rows->dim() == 1 &&
                nodes->dim() == 1 && rows->size(0) == N && nodes->size(0) == N,
                "lookahead::tree_attention: rows and nodes must be int64 [N]");
    const at::Tensor rc = rows->contiguous(), nc = nodes->contiguous();
    std::copy(rc.data_ptr<int64_t>(), rc.data_ptr<int64_t>() + N, row_of.begin());
    std::copy(nc.data_ptr<int64_t>(), nc.data_ptr<int64_t>() + N, node_of.begin());
  } else {
    for (int64_t n = 0; n < N; ++n) row_of[n] = n / T, node_of[n] = n % T;
  }
  at::Tensor mask;
  int64_t W = 0;  // nodes per mask row
  if (tree_mask.has_value()) {
    if (ragged) {
      TORCH_CHECK(tree_mask->scalar_type() == at::kBool && tree_mask->dim() == 2 && tree_mask->size(0) == N,
                  "lookahead::tree_attention: with rows, tree_mask must be bool [N, W]");
    } else {
      TORCH_CHECK(tree_mask->scalar_type() == at::kBool && tree_mask->dim() == 3 && tree_mask->size(0) == R &&
                  tree_mask->size(1) == T && tree_mask->size(2) == T,
                  "lookahead::tree_attention: tree_mask must be bool [B, T, T]");
    }
    mask = tree_mask->contiguous();
    W = mask.size(-1);
  }
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t b = row_of[n], i = node_of[n];
    TORCH_CHECK(b >= 0 && b < R && i >= 0 && (!mp || i < W), "lookahead::tree_attention: token ", n,
                " is node ", i, " of row ", b, ", outside the cache's ", R, " rows or the mask's ", W, " nodes");
    TORCH_CHECK(lp[b] >= 0 && lp[b] + i < S, "lookahead::tree_attention: row ", b, " has ", lp[b],
                " committed slots and a node ", i, ": more than the cache's ", S);
    TORCH_CHECK(!mp || mp[n * W + i], "lookahead::tree_attention: token ", n, " (node ", i, " of row ", b,
                ") does not see itself in tree_mask");
  }
  // which tokens see the whole chain of their row's nodes 0 .. i (a prompt chunk, a chain draft): their keys are
  // the slots 0 .. L + i in order, with no path to gather per head
  std::vector<uint8_t> chain(N, 1);
  if (mp)
    for (int64_t n = 0; n < N; ++n)
      chain[n] = std::find(mp + n * W, mp + n * W + node_of[n] + 1, false) == mp + n * W + node_of[n] + 1;
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty_like(qc);
  const int64_t group = Hq / Hkv;
  const int64_t Dq = (D + 15) / 16 * 16;  // a query's row in fp32 scratch, zeros past D
#if defined(__AVX512F__)
  const size_t MULTI = D <= 128 ? multi_max(D) : 1;  // queries passed together over the same keys
#else
  const size_t MULTI = 1;
#endif
  const CacheView kv{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const float sc = static_cast<float>(scale);
  // A query (token t, head h) sees keys n < shared at slot n (the committed slots 0 .. L-1, and for a token whose
  // path is the chain of its row's nodes 0 .. i, as in a prompt chunk or a chain draft, the slots L .. L + i too),
  // then its path's other nodes. The queries of one cache row and KV head share those keys: a work item takes up
  // to QB of them. fp32 keys pass in blocks of KB through all of the item's queries, so that a block is read once
  // from memory and then from L1 (the keys of one head at a 2k context are 512 KiB in fp32); 16-bit keys pass whole,
  // read in place, up to MULTI queries at a time on AVX-512 builds (each chunk loaded, and widened where it must be,
  // once for all of them; bf16 scores on AVX512-BF16 builds multiply bf16 pairs, Bf16Chunk). Each query's scores,
  // softmax and weighted sum are the same operations in the same order as for a query alone.
  //
  // Each row's tokens, from both ends in turn (0, N-1, 1, ...): a causal chunk's short and long key sequences alike
  // in every item
  thread_local Plan plan;  // the calling thread's, kept across calls
  auto& [first, order, sorted, fill, items] = plan;
  first.assign(R + 1, 0), order.resize(N), sorted.resize(N), items.clear();
  for (int64_t n = 0; n < N; ++n) ++first[row_of[n] + 1];
  for (int64_t b = 0; b < R; ++b) first[b + 1] += first[b];
  fill.assign(first.begin(), first.end() - 1);
  for (int64_t n = 0; n < N; ++n) sorted[fill[row_of[n]]++] = n;
  for (int64_t b = 0; b < R; ++b)
    for (int64_t u = 0, c = first[b + 1] - first[b]; u < c; ++u)
      order[first[b] + u] = sorted[first[b] + (u % 2 ? c - 1 - u / 2 : u / 2)];
  const int64_t threads = at::get_num_threads();
  for (int64_t b = 0; b < R; ++b) {
    const int64_t nq = (first[b + 1] - first[b]) * group;
    if (!nq) continue;
    // at most QB queries each, at least two items per thread in a count the threads divide where the queries allow
    // (an item is not split between threads: 9 items of 2 queries took 1.07-1.13x the time of 18 of one at 2
    // threads, each query on its own); 16-bit queries go one at a time where a build passes them one by one
    int64_t chunks = (nq + QB - 1) / QB;
    while (chunks < nq && (R * Hkv * chunks < 2 * threads || R * Hkv * chunks % threads)) ++chunks;
    int64_t per = (nq + chunks - 1) / chunks;
    if (q.scalar_type() != at::kFloat && MULTI == 1) per = 1;
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t q0 = 0; q0 < nq; q0 += per) items.push_back({b, g, q0, std::min(nq, q0 + per)});
  }
  LOOKAHEAD_DISPATCH(q.scalar_type(), "lookahead::tree_attention", [&] {
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    parallel_chunks(static_cast<int64_t>(items.size()), 1, [&](int64_t w0, int64_t w1) {
      thread_local Scratch scratch;
      auto& [qf, o, scores, sums, qb, path, shared, n_keys, tok, head, active] = scratch;
#if defined(__AVX512BF16__)
      constexpr bool bh = std::is_same_v<scalar_t, c10::BFloat16>;  // q . k by vdpbf16ps, q in bf16
#else
      constexpr bool bh = false;
#endif
      const int64_t Dq2 = (D + 31) / 32 * 32;  // a query's row in bf16 scratch, zeros past D
      for (int64_t w = w0; w < w1; ++w) {
        const Item& it = items[w];
        const int64_t nq = it.q1 - it.q0, b = it.b, L = lp[b];
        const scalar_t* kh = kp + b * kv.sb + it.g * kv.sh;
        const scalar_t* vh = vp + b * kv.sb + it.g * kv.sh;
        int64_t most = 0, longest = 0, path_max = 0;  // the most keys, the longest shared range, the longest path rest
        shared.resize(nq), n_keys.resize(nq), tok.resize(nq), head.resize(nq), sums.resize(nq);
        for (int64_t j = 0; j < nq; ++j) {
          const int64_t qi = it.q0 + j, t = order[first[b] + qi / group], i = node_of[t];
          tok[j] = t, head[j] = it.g * group + qi % group;
          int64_t on_path = i + 1;  // the nodes it sees
          if (!chain[t]) on_path = std::count(mp + t * W, mp + t * W + i + 1, true);
          shared[j] = L + (chain[t] ? i + 1 : 0);
          n_keys[j] = L + on_path;
          most = std::max(most, n_keys[j]), longest = std::max(longest, shared[j]);
          path_max = std::max(path_max, n_keys[j] - shared[j]);
        }
        // q in fp32 where the fp32 loops take the scores (bf16 ones up to a head dim of 128 read qb instead)
        const bool fp32_q = !bh || D > 128;
        if (fp32_q) qf.assign(nq * Dq, 0.0f);
        else qf.resize(nq * Dq);  // only its pointers are handed on (attend_multi's qf, unread)
        o.resize(nq * Dq), scores.resize(nq * most), path.resize(nq * path_max);
        if constexpr (bh) qb.assign(nq * Dq2, c10::BFloat16(0.0f));
        for (int64_t j = 0; j < nq; ++j) {
          const scalar_t* qrow = qp + (tok[j] * Hq + head[j]) * D;
          if constexpr (bh) std::copy(qrow, qrow + D, qb.begin() + j * Dq2);
          if (fp32_q)
            for (int64_t d = 0; d < D; ++d) qf[j * Dq + d] = to_float(qrow[d]);
          if (n_keys[j] > shared[j]) {  // the path's nodes past the shared ones, root first
            int64_t* out_slots = path.data() + j * path_max;
            for (int64_t i = 0; i <= node_of[tok[j]]; ++i)
              if (mp[tok[j] * W + i]) *out_slots++ = L + i;
          }
        }
        // scores (values: the weighted sums into o) of query j over its keys [n0, n1): key n - n0 at row key(n - n0)
        // of heads kh / vh (row stride ss)
        auto pass = [&](int64_t j, int64_t n0, int64_t n1, const auto* kh, const auto* vh, int64_t ss, auto key,
                        bool values) {
          float* sp = scores.data() + j * most + n0;
          float* oj = o.data() + j * Dq;
          const int64_t n = n1 - n0;
          bool fast = false;
#if defined(__AVX512BF16__)
          if constexpr (bh) {
            if (!values && scores_bh(qb.data() + j * Dq2, D, kh, ss, key, n, sc, sp)) return;
          }
#endif
#if defined(__AVX512F__)
          fast = attend_avx512(qf.data() + j * Dq, D, kh, vh, ss, key, n, sc, sp, oj, values, n0 > 0);
#elif defined(LOOKAHEAD_AVX2)
          fast = attend_avx2(qf.data() + j * Dq, D, kh, vh, ss, key, n, sc, sp, oj, values, n0 > 0);
#endif
          if (fast) return;
          if (!values)
            for (int64_t k = 0; k < n; ++k) sp[k] = dot(qf.data() + j * Dq, kh + key(k) * ss, D) * sc;
          else
            for (int64_t k = 0; k < n; ++k) axpy(sp[k], vh + key(k) * ss, oj, D);
        };
        // fp32 keys in blocks of KB from L1; 16-bit keys whole (in blocks they took 1.03-1.07x the time at 1-4
        // nodes, query by query: bf16 K / V are read from L2 fast enough)
        constexpr bool in_place = !std::is_same_v<scalar_t, float>;
        const int64_t kb = in_place ? std::max<int64_t>(1, longest) : KB;
        for (int values = 0; values < 2; ++values) {
          if (values) {  // between the passes: each query's softmax over all of its scores
            std::fill(o.begin(), o.begin() + nq * Dq, 0.0f);
            for (int64_t j = 0; j < nq; ++j) {
              float lsum[LANES];
              softmax_lanes(scores.data() + j * most, n_keys[j], lsum);
              sums[j] = lane_sum(lsum);
            }
          }
          for (int64_t k0 = 0; k0 < longest; k0 += kb) {
            const int64_t k1 = std::min(longest, k0 + kb);
            const auto* kb0 = kh + k0 * kv.ss;
            const auto* vb0 = vh + k0 * kv.ss;
            if (!in_place || MULTI == 1) {  // query by query
              for (int64_t j = 0; j < nq; ++j)
                if (shared[j] > k0)
                  pass(j, k0, std::min(shared[j], k1), kb0, vb0, kv.ss, [](int64_t n) { return n; }, values);
              continue;
            }
#if defined(__AVX512F__)
            // the queries in groups of up to MULTI by where their shared keys end (an insertion sort of at most
            // QB), each group together up to its first end, then each query's rest alone
            active.clear();
            for (int64_t j = 0; j < nq; ++j) {
              if (shared[j] <= k0) continue;
              active.push_back(j);
              for (size_t u = active.size() - 1; u > 0 && shared[active[u - 1]] > shared[active[u]]; --u)
                std::swap(active[u - 1], active[u]);
            }
            for (size_t a = 0; a < active.size();) {
              const size_t cnt = std::min<size_t>(active.size() - a, MULTI);
              const int64_t end = std::min(shared[active[a]], k1);
              if (cnt == 1) {
                pass(active[a++], k0, end, kb0, vb0, kv.ss, [](int64_t n) { return n; }, values);
                continue;
              }
              const float* qs[MULTI_MAX];
              const scalar_t* qbs[MULTI_MAX];
              float *sp[MULTI_MAX], *os[MULTI_MAX];
              for (size_t u = 0; u < cnt; ++u) {
                const int64_t j = active[a + u];
                qs[u] = qf.data() + j * Dq, sp[u] = scores.data() + j * most + k0, os[u] = o.data() + j * Dq;
                qbs[u] = bh ? reinterpret_cast<const scalar_t*>(qb.data() + j * Dq2) : nullptr;
              }
              attend_multi(static_cast<int>(cnt), qs, qbs, D, kb0, vb0, kv.ss, end - k0, sc, sp, os, values,
                           k0 > 0);
              for (size_t u = 1; u < cnt; ++u) {
                const int64_t j = active[a + u], e = std::min(shared[j], k1);
                if (e > end)
                  pass(j, end, e, kh + end * kv.ss, vh + end * kv.ss, kv.ss, [](int64_t n) { return n; }, values);
              }
              a += cnt;
            }
#endif
          }
          for (int64_t j = 0; j < nq; ++j)
            if (n_keys[j] > shared[j]) {
              const int64_t* rest = path.data() + j * path_max;
              pass(j, shared[j], n_keys[j], kh, vh, kv.ss, [rest](int64_t n) { return rest[n]; }, values);
            }
        }
        for (int64_t j = 0; j < nq; ++j) {
          const float inv = 1.0f / sums[j];
          scalar_t* orow = op + (tok[j] * Hq + head[j]) * D;
          for (int64_t d = 0; d < D; ++d) orow[d] = from_float<scalar_t>(o[j * Dq + d] * inv);
        }
      }
    });
  });
  return out;
}

// RoPE on q and k of a step's tokens and the store of their K/V.
// qkv [B, T, (Hq + 2 Hkv) * D]; cos/sin [B, T, R] (R = rotary dims, in the dtype); k/v_cache [B, Hkv, S, D];
// slots [B, T] int64 -> q [B, T, Hq, D]; k_cache[b, :, slots[b, t]] = RoPE(k), v likewise (unrotated).
// Ragged (rows [B * T] int64 given): token t goes to cache row rows[t] instead of t / T, of any of the cache's rows.
// interleaved: rotate the pairs (x0, x1), (x2, x3), ...; otherwise the two halves of the first R dims.
at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                      at::Tensor& v_cache, const at::Tensor& slots, int64_t n_heads, bool interleaved,
                      const c10::optional<at::Tensor>& rows) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 3 && qkv.is_contiguous(),
              "lookahead::rope_store: qkv must be a contiguous CPU tensor [B, T, (Hq + 2 Hkv) * D]");
  const int64_t B = qkv.size(0), T = qkv.size(1);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
  const int64_t R = cos.size(-1);
  TORCH_CHECK(qkv.size(2) == (n_heads + 2 * Hkv) * D && (rows.has_value() || k_cache.size(0) == B) &&
                  v_cache.sizes() == k_cache.sizes(),
              "lookahead::rope_store: qkv ", qkv.sizes(), " does not fit a cache ", k_cache.sizes(), " with ",
              n_heads, " query heads");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 3 && cos.size(0) == B && cos.size(1) == T && R <= D &&
              R % 2 == 0 && cos.is_contiguous() && sin.is_contiguous(),
              "lookahead::rope_store: cos/sin must be contiguous [B, T, R] with even R <= head dim");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type() &&
              k_cache.scalar_type() == qkv.scalar_type() && v_cache.scalar_type() == qkv.scalar_type(),
              "lookahead::rope_store: qkv, cos, sin and the cache must share a dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.strides() == v_cache.strides(),
              "lookahead::rope_store: cache head dim must be contiguous and k/v strided alike");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 2 && slots.size(0) == B && slots.size(1) == T,
              "lookahead::rope_store: slots must be int64 [B, T]");
  std::vector<int64_t> row_of(B * T);
  if (rows.has_value()) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->numel() == B * T,
                "lookahead::rope_store: rows must be int64 with one entry per token");
    const at::Tensor rc = rows->contiguous();
    std::copy(rc.data_ptr<int64_t>(), rc.data_ptr<int64_t>() + B * T, row_of.begin());
    for (int64_t t = 0; t < B * T; ++t)
      TORCH_CHECK(row_of[t] >= 0 && row_of[t] < k_cache.size(0), "lookahead::rope_store: row ", row_of[t],
                  " outside the cache's ", k_cache.size(0));
  } else {
    for (int64_t t = 0; t < B * T; ++t) row_of[t] = t / T;
  }
  const at::Tensor sl = slots.contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t t = 0; t < B * T; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < S, "lookahead::rope_store: slot ", sp[t], " outside the cache's ", S);
  at::Tensor q = at::empty({B, T, n_heads, D}, qkv.options());
  const CacheView kv{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  LOOKAHEAD_DISPATCH(qkv.scalar_type(), "lookahead::rope_store", [&] {
    using T_ = scalar_t;
    const T_* xp = qkv.data_ptr<T_>();
    const T_* cp = cos.data_ptr<T_>();
    const T_* snp = sin.data_ptr<T_>();
    T_* qp = q.data_ptr<T_>();
    T_* kp = k_cache.data_ptr<T_>();
    T_* vp = v_cache.data_ptr<T_>();
    const int64_t width = (n_heads + 2 * Hkv) * D;
    // transformers' rounding: q * cos and rotate(q) * sin each rounded to the dtype, then their sum
    auto rope = [&](const T_* x, const T_* c, const T_* s, T_* y) {
#if defined(LOOKAHEAD_VEC8)
      // the same operations 8 lanes at a time; -x * s is (-x) * s, the scalar's product
      const __m256 neg = _mm256_set1_ps(-0.0f);
      if (!interleaved && R % 16 == 0) {
        for (int64_t d = 0; d < R / 2; d += 8) {
          const __m256 a = load8(x + d), b = load8(x + d + R / 2);
          const __m256 ca = load8(c + d), cb = load8(c + d + R / 2), sa = load8(s + d), sb = load8(s + d + R / 2);
          store8(y + d, _mm256_add_ps(round8<T_>(_mm256_mul_ps(a, ca)),
                                      round8<T_>(_mm256_mul_ps(_mm256_xor_ps(b, neg), sa))));
          store8(y + d + R / 2, _mm256_add_ps(round8<T_>(_mm256_mul_ps(b, cb)), round8<T_>(_mm256_mul_ps(a, sb))));
        }
        std::copy(x + R, x + D, y + R);
        return;
      }
      if (interleaved && R % 8 == 0) {
        const __m256 even_neg = _mm256_setr_ps(-0.0f, 0.0f, -0.0f, 0.0f, -0.0f, 0.0f, -0.0f, 0.0f);
        for (int64_t d = 0; d < R; d += 8) {
          const __m256 a = load8(x + d);
          const __m256 partner = _mm256_xor_ps(_mm256_permute_ps(a, _MM_SHUFFLE(2, 3, 0, 1)), even_neg);
          store8(y + d, _mm256_add_ps(round8<T_>(_mm256_mul_ps(a, load8(c + d))),
                                      round8<T_>(_mm256_mul_ps(partner, load8(s + d)))));
        }
        std::copy(x + R, x + D, y + R);
        return;
      }
#endif
      for (int64_t d = 0; d < R; ++d) {
        float partner;
        if (interleaved) {
          partner = d % 2 == 0 ? -to_float(x[d + 1]) : to_float(x[d - 1]);
        } else {
          partner = d < R / 2 ? -to_float(x[d + R / 2]) : to_float(x[d - R / 2]);
        }
        const float a = round_to<T_>(to_float(x[d]) * to_float(c[d]));
        const float b = round_to<T_>(partner * to_float(s[d]));
        y[d] = from_float<T_>(a + b);
      }
      for (int64_t d = R; d < D; ++d) y[d] = x[d];
    };
    at::parallel_for(0, B * T, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = row_of[t];
        const T_* x = xp + t * width;
        const T_* c = cp + t * R;
        const T_* s = snp + t * R;
        for (int64_t h = 0; h < n_heads; ++h) rope(x + h * D, c, s, qp + (t * n_heads + h) * D);
        for (int64_t h = 0; h < Hkv; ++h) {
          const int64_t off = b * kv.sb + h * kv.sh + sp[t] * kv.ss;
          rope(x + (n_heads + h) * D, c, s, kp + off);
          const T_* v = x + (n_heads + Hkv + h) * D;
          std::copy(v, v + D, vp + off);
        }
      }
    });
  });
  return q;
}

}  // namespace lookahead_cpu
