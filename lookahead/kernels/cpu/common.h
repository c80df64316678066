// Shared helpers of the CPU ops: dtype conversion and the fixed-order reductions every op uses.
//
// Exactness rule of this directory: a value's bits depend only on the inputs it is computed from, never on how
// many other rows, nodes or tokens a call carries, on thread count or on where a loop's tail falls. Every sum
// runs in one order fixed by the data's own index (lane l of a 16-lane accumulator takes elements l, l + 16,
// ...; lanes are added by one tree); the build turns FMA contraction off (-ffp-contract=off) so the compiler
// cannot fuse a multiply and an add in one loop and not in another; exp is our own, the same code wherever it
// is inlined.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
// The AVX2 code path (x86-64-v3: AMD Zen 2/3, Intel since Haswell): a 16-lane accumulator is two __m256, lanes 0-7
// and 8-15, so every sum keeps the order of the 16-lane one.
#define LOOKAHEAD_AVX2 1
#endif
#if defined(__AVX512F__) || defined(LOOKAHEAD_AVX2)
// 8-lane helpers (load8, store8, round8, exp8 below) on every x86 code path: the row-wise ops (norms, SwiGLU,
// RoPE, the activations' quantization) use them on AVX-512 builds too, where 8 lanes a row are enough.
#define LOOKAHEAD_VEC8 1
#endif

namespace lookahead_cpu {

constexpr int LANES = 16;

// f(std::integral_constant<int, n>{}) for a count n in 1 .. MAX known only at run time (n < 1 runs 1): a tile's
// row or column count as a constant, so its accumulators live in registers.
// A tile keeps its accumulators in registers only if every call inside it is inlined, lambdas included.
#define LOOKAHEAD_INLINE __attribute__((always_inline))
// The opposite: a loop compiled as a function of its own whatever GCC's inlining budget decides for its callers
// (attention.cpp's per-query loops, called from several instantiations of one item loop).
#define LOOKAHEAD_NOINLINE __attribute__((noinline))

template <int MAX, typename F>
LOOKAHEAD_INLINE inline void with_count(int n, F f) {
  if constexpr (MAX > 1) {
    if (n < MAX) return with_count<MAX - 1>(n, f);
  }
  f(std::integral_constant<int, MAX>{});
}

// f(i0, i1) over [0, n) on as many threads as at::parallel_for(0, n, min_per_thread) would wake (a thread's share
// must pay for waking it), each owning a contiguous share as there, which it walks in CHUNKS_PER_THREAD chunks; a
// thread done with its own share then takes the next chunks of the others'. Where one vCPU runs slower (a
// neighbour's load on a VM, a core at a lower clock) the other takes over the rest of its work instead of waiting
// for it at the region's end. (llama.cpp's matmul hands out every chunk from one shared counter; that interleaves
// the threads' weight streams, and measured slower here: docs/cpu.md#threads.) Every index is done once, by one
// thread, with the same code whichever thread it is: the outputs' bits do not depend on the split.
constexpr int64_t CHUNKS_PER_THREAD = 4;
template <typename F>
void parallel_chunks(int64_t n, int64_t min_per_thread, const F& f) {
  if (n <= 0) return;
  const int64_t grain = std::max<int64_t>(1, min_per_thread);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (threads <= 1 || at::in_parallel_region()) return f(0, n);  // n < grain gives one thread
  struct alignas(64) Share {  // a cache line each: threads walking different shares touch different lines
    std::atomic<int64_t> next;
    int64_t end;
  };
  constexpr int64_t LOCAL = 8;
  Share local[LOCAL];
  std::unique_ptr<Share[]> heap(threads > LOCAL ? new Share[threads] : nullptr);
  Share* shares = heap ? heap.get() : local;
  const int64_t per = (n + threads - 1) / threads, chunk = std::max<int64_t>(1, per / CHUNKS_PER_THREAD);
  for (int64_t t = 0; t < threads; ++t) {
    shares[t].next.store(std::min(n, t * per), std::memory_order_relaxed);
    shares[t].end = std::min(n, (t + 1) * per);
  }
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t) {
    for (int64_t k = 0; k < threads; ++k) {  // its own share first, then the others' in turn
      Share& s = shares[(t0 + k) % threads];
      for (int64_t i0 = s.next.fetch_add(chunk, std::memory_order_relaxed); i0 < s.end;
           i0 = s.next.fetch_add(chunk, std::memory_order_relaxed))
        f(i0, std::min(s.end, i0 + chunk));
    }
  });
}

// Run fn with scalar_t = float, c10::BFloat16 or c10::Half (the dtypes of the CPU path).
#define LOOKAHEAD_DISPATCH(dtype, name, ...)                                                   \
  [&] {                                                                                      \
    switch (dtype) {                                                                         \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                              \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); }                   \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }                           \
      default: TORCH_CHECK(false, name, ": dtype must be float32, bfloat16 or float16, got ", dtype); \
    }                                                                                        \
  }()

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// Round an fp32 value to the storage type (round to nearest even, as torch's casts).
template <typename T> inline T from_float(float x) { return static_cast<T>(x); }
template <> inline float from_float<float>(float x) { return x; }

// x rounded to T and back: the value a torch op of dtype T would store.
template <typename T> inline float round_to(float x) { return to_float(from_float<T>(x)); }

// The sum of 16 lanes, always in this tree: ((l0+l8) + (l4+l12)) + ... so a sum never depends on who calls it.
inline float lane_sum(const float* a) {
  float b[8], c[4];
  for (int i = 0; i < 8; ++i) b[i] = a[i] + a[i + 8];
  for (int i = 0; i < 4; ++i) c[i] = b[i] + b[i + 4];
  return (c[0] + c[2]) + (c[1] + c[3]);
}

#if defined(__AVX512F__)
// The same tree as lane_sum(const float*): GCC's _mm512_reduce_add_ps adds the halves, then the quarters, then
// (l0 + l2) + (l1 + l3) of what is left.
inline float lane_sum(__m512 v) { return _mm512_reduce_add_ps(v); }

// 16 elements from p (n <= 16 of them; the rest read as 0) as fp32 lanes.
inline __m512 load16(const float* p, int n = 16) {
  return n == 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
}
inline __m512 load16(const c10::BFloat16* p, int n = 16) {
  __m256i h = n == 16 ? _mm256_loadu_si256((const __m256i*)p)
                      : _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p, int n = 16) {
  __m256i h = n == 16 ? _mm256_loadu_si256((const __m256i*)p)
                      : _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
  return _mm512_cvtph_ps(h);
}
#endif

#if defined(LOOKAHEAD_VEC8)
// lane_sum of the 16 lanes lo (0-7), hi (8-15), by the same tree: l + (l + 8), then l + (l + 4), then
// (l0 + l2) + (l1 + l3).
inline float lane_sum(__m256 lo, __m256 hi) {
  const __m256 b = _mm256_add_ps(lo, hi);
  const __m128 c = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
  const __m128 d = _mm_add_ps(c, _mm_movehl_ps(c, c));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)));
}

// 8 elements from p (n of them, n <= 8; the rest read as 0, and nothing is read past p + n) as fp32 lanes.
inline __m256 load8(const float* p, int n = 8) {
  if (n >= 8) return _mm256_loadu_ps(p);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(p, mask);
}
inline __m128i load8_u16(const void* p, int n) {
  if (n >= 8) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  alignas(16) uint16_t buf[8] = {0};
  const uint16_t* src = static_cast<const uint16_t*>(p);
  for (int i = 0; i < n && i < 8; ++i) buf[i] = src[i];  // (a memcpy of 2n bytes trips GCC 12's bounds warnings)
  return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
}
inline __m256 load8(const c10::BFloat16* p, int n = 8) {  // bf16 is the top half of an fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load8_u16(p, n)), 16));
}
inline __m256 load8(const c10::Half* p, int n = 8) { return _mm256_cvtph_ps(load8_u16(p, n)); }

// Store 8 fp32 lanes to p rounded to T (n <= 8 of them), with torch's rounding (to nearest even; a NaN stays NaN).
inline void store8(float* p, __m256 v, int n = 8) {
  if (n >= 8) return _mm256_storeu_ps(p, v);
  _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), v);
}
inline void store8_u16(void* p, __m128i h, int n) {
  if (n >= 8) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  alignas(16) uint16_t buf[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(buf), h);
  if (n > 0) std::memcpy(p, buf, 2 * n);
}
// The bf16 bits of 8 fp32 lanes (in the low half of each 32-bit lane) by c10::BFloat16's round_to_nearest_even:
// (u + 0x7fff + ((u >> 16) & 1)) >> 16; a NaN becomes 0x7fc0.
inline __m256i bf16_bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
inline void store8(c10::BFloat16* p, __m256 v, int n = 8) {
  const __m256i r = bf16_bits8(v);
  store8_u16(p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)), n);
}
inline void store8(c10::Half* p, __m256 v, int n = 8) {
  store8_u16(p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), n);
}

// round_to<T> on 8 lanes: each value rounded to T (to nearest even) and back.
template <typename T> inline __m256 round8(__m256 v);
template <> inline __m256 round8<float>(__m256 v) { return v; }
template <> inline __m256 round8<c10::BFloat16>(__m256 v) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16));
}
template <> inline __m256 round8<c10::Half>(__m256 v) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif

// exp(x) in fp32 by Cody-Waite range reduction and a degree-6 polynomial (about 1 ulp), written once for a float
// and for 8 or 16 lanes: only IEEE basic operations, in one order, so every lane gets the scalar's bits. What
// differs by type: the clamp that keeps 2^n a normal number (-126 <= n <= 127; a NaN x stays NaN, except on the
// AVX-512 path, where it is clamped), 2^n from the rounded n, and zero where x underflowed.
inline bool exp_underflow(float x) { return x < -87.3f; }
inline float exp_clamp(float x) { return std::min(std::max(x, -87.3f), 88.0f); }
inline float exp_scale(float n) {
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return scale;
}
inline float exp_zero_where(bool underflow, float v) { return underflow ? 0.0f : v; }

#if defined(__AVX512F__)
inline __mmask16 exp_underflow(__m512 x) { return _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ); }
inline __m512 exp_clamp(__m512 x) {
  return _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.0f));
}
inline __m512 exp_scale(__m512 n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline __m512 exp_zero_where(__mmask16 underflow, __m512 v) { return _mm512_maskz_mov_ps(~underflow, v); }
#endif

#if defined(LOOKAHEAD_VEC8)
inline __m256 exp_underflow(__m256 x) { return _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ); }
inline __m256 exp_clamp(__m256 x) {  // a NaN x is returned, as by std::max
  return _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
}
inline __m256 exp_scale(__m256 n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline __m256 exp_zero_where(__m256 underflow, __m256 v) { return _mm256_andnot_ps(underflow, v); }
#endif

// V: float, __m256 or __m512 (GCC's vector types take scalar operands lane by lane).
template <typename V> inline V exp_lanes(V x) {
  const auto underflow = exp_underflow(x);
  x = exp_clamp(x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (x * 1.44269504088896341f + shifter) - shifter;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  return exp_zero_where(underflow, p * exp_scale(n));
}

inline float exp_f32(float x) { return exp_lanes(x); }
#if defined(__AVX512F__)
inline __m512 exp16(__m512 x) { return exp_lanes(x); }
#endif
#if defined(LOOKAHEAD_VEC8)
inline __m256 exp8(__m256 x) { return exp_lanes(x); }
#endif

}  // namespace lookahead_cpu
