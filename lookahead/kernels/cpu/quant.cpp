// Linear layers and embeddings on GGUF-quantized weights, read in their own block format (no dequantized copy;
// linear weights in an interleaved copy of their blocks, below).
//
// Exactness contract: y[m, n] is a fixed-order function of x[m] and w[n] alone, whatever the number of rows M,
// the tile a row falls in, the thread or the ISA path (AVX512-VNNI, AVX-VNNI, AVX2 or scalar give the same bits):
//   1. x[m] is quantized alone, per group of G elements (G = 32 for the legacy formats, 256 for the K-quants):
//      d = amax / 127, q = round-to-nearest-even(x * (127 / amax)), the same scalar IEEE operations everywhere.
//   2. Every weight block's dot with the activation block is integer arithmetic in 8 int32 lanes (lane l takes the
//      products 4l..4l+3 of each 32 elements): exact in any order, so vpdpbusd, maddubs/madd and plain C agree.
//   3. The fp32 part runs in one order per output, ascending in blocks, by the format:
//      - Q4_1 / Q5_1 (outputs_tile): the 8 lanes are added into one exact integer t, s = s + float(t) * (d_w *
//        d_x), a second sum adds (m_w * d_x) * float(sum(xq)); then y = s + the second sum (+ bias). The vector
//        code runs this for 8 outputs at once (lane k = output k).
//      - the others (Q8_0, Q4_0, Q5_0, the K-quants; rows_tile): each of 8 fp32 lanes adds float(lane) * (d_w *
//        d_x) (for Q4_K / Q5_K lane j then adds float(min_j * sum(xq_j)) * ((-dmin) * d_x)); the lanes are summed
//        by one tree (lane_sum8), then the bias.
//      - repacked by quant_repack (x8_tile, "Q4_K x8" ... "Q5_1 x8" below): the block's whole dot is one exact
//        integer per output, s1 = s1 + float(I) * (d_w * d_x) (Q4_K: s2 = s2 + float(Mn) * (dmin * d_x), y = s1 -
//        s2; Q4_1 / Q5_1: s2 = s2 + (m_w * d_x) * float(sum(xq)), y = s1 + s2) (+ bias). Q4_1 / Q5_1 so give the
//        file layout's bits; the others differ from it (another fp32 order), so a model runs one layout per
//        weight, whatever the rows.
//      The portable code runs the same IEEE operations element by element; -ffp-contract=off keeps mul and add
//      apart.
// So a verify step of T nodes gives each node the bits of the one-token step that decodes the same token.
//
// Weight layout: uint8 [N, K / block_elems, block_bytes], the raw GGUF blocks of each output row; block_bytes
// names the ggml type (FORMATS below, the one table every op reads). quant_repack turns a weight of any of these
// formats into [N / 8, K / unit, bytes] units of 8 outputs each (unit: 256 elements, or 64 for the 32-element
// formats; the model does so at load), which quant_linear reads 8 outputs to a vector with no cross-lane
// reduction (on AVX512-VNNI builds the 32-element formats' units in pairs, read 16 outputs to a vector: V16). The
// activation is quantized once per call into a per-row buffer. A tile is 8 outputs (V16: 16) x up to 8 rows of x
// (4 or 8 for the repacked layouts: xrows, ROWS16), each weight block unpacked once for its rows.
// Threads own ranges of tiles (at::parallel_for), so a verify of T rows reads the weight once per 8 rows from
// cache, not memory.
#include <ATen/Parallel.h>

#include "common.h"
#include "ops.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdlib>

namespace lookahead_cpu {
namespace {

constexpr int NT = 8;          // outputs (rows of w) per tile: one fp32 lane each
constexpr int MT = 8;          // rows of x per tile: each weight block column is unpacked once for them
constexpr int64_t NB = 16;     // rows of w per cache block: their blocks stay in L1/L2 while every x tile passes
constexpr int64_t PREFETCH_TILES = 1;  // 1 beat 0, 2, 3, 4, 6 (bench/cpu/quant_verify_before_after.txt)
constexpr int64_t PARALLEL_BYTES = 1 << 16;  // weight bytes per thread at least (waking the pool costs microseconds)

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);  // exact, as the software conversion below
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

inline void prefetch(const uint8_t* p) {
#if defined(__AVX2__)
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
#else
  __builtin_prefetch(p);
#endif
}

// ---- 32 int8 values and 8 int32 lanes: the three ISA paths, one set of operations -------------------------
#if defined(__AVX2__)
using Bytes = __m256i;  // 32 int8 (or uint8) values
using Lanes = __m256i;  // 8 int32 lanes
inline Bytes load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline Bytes splat8(int v) { return _mm256_set1_epi8(static_cast<char>(v)); }
inline Bytes band(Bytes a, Bytes b) { return _mm256_and_si256(a, b); }
inline Bytes bor(Bytes a, Bytes b) { return _mm256_or_si256(a, b); }
inline Bytes bxor(Bytes a, Bytes b) { return _mm256_xor_si256(a, b); }
inline Bytes sub8(Bytes a, Bytes b) { return _mm256_sub_epi8(a, b); }
inline Bytes shr_and(Bytes a, int n, int mask) { return band(_mm256_srli_epi16(a, n), splat8(mask)); }
inline Bytes shl4(Bytes a) { return _mm256_slli_epi16(a, 4); }  // values <= 15: no carry into the next byte
// 16 bytes -> 32 values: the low nibbles (elements 0..15), then the high nibbles (16..31)
inline Bytes nibbles16(const uint8_t* p) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return band(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), splat8(0x0F));
}
// 0xFF where bit i of bits is set, byte i
inline Bytes bits_to_bytes(uint32_t bits) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  return _mm256_movm_epi8(static_cast<__mmask32>(bits));
#else
  const __m256i shuffle = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  const __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), shuffle);
  return _mm256_cmpeq_epi8(_mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)), _mm256_set1_epi64x(-1));
#endif
}
inline Bytes is_set(Bytes a, int bit) { return _mm256_cmpeq_epi8(band(a, splat8(bit)), splat8(bit)); }
inline Bytes abs8(Bytes a) { return _mm256_abs_epi8(a); }
inline Bytes sign8(Bytes x, Bytes w) { return _mm256_sign_epi8(x, w); }  // x * sign(w)
// lane l = sum over i < 4 of u[4l + i] * s[4l + i]; u unsigned <= 128, s signed in [-127, 127]
inline Lanes dot_us(Bytes u, Bytes s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else  // pairs fit int16: 2 * 128 * 127 < 32768
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
// 16 int16 scales: int16 lane i scales the elements 2i, 2i + 1 of 32
using Scales = __m256i;
inline Scales scales_splat(int v) { return _mm256_set1_epi16(static_cast<int16_t>(v)); }
// 8 unsigned 8-bit scales as int16 in both halves, so that scale j goes to every int16 lane in one shuffle
using ScaleSet = __m256i;
inline ScaleSet scale_set(const uint8_t* s) {
  return _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s))));
}
inline Scales scale_of(ScaleSet s, int j) {
  return _mm256_shuffle_epi8(s, _mm256_set1_epi16(static_cast<int16_t>(((2 * j + 1) << 8) | (2 * j))));
}
inline Scales scales_halves(int lo, int hi) {  // elements 0..15 by lo, 16..31 by hi
  return _mm256_set_m128i(_mm_set1_epi16(static_cast<int16_t>(hi)), _mm_set1_epi16(static_cast<int16_t>(lo)));
}
// acc + the lanes of dot_us with each product scaled: maddubs pairs (exact: 2 * 32 * 127 < 32768) times the
// int16 scales, summed in pairs into the same int32 lanes as dot_us
inline Lanes dot_us_scaled(Lanes acc, Bytes u, Bytes s, Scales sc) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, _mm256_maddubs_epi16(u, s), sc);
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, _mm256_maddubs_epi16(u, s), sc);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), sc));
#endif
}
inline Lanes load_u8x8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline Lanes load_i32x8(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline Lanes mul32v(Lanes a, Lanes b) { return _mm256_mullo_epi32(a, b); }
// lane k = (p[k], p[8 + k]) as two int16 (low, high): the pairs madd16 multiplies
inline Lanes pairs16(const uint8_t* p) {
  const __m128i a = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8));
  return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b));
}
// lane k = low(a) * low(b) + high(a) * high(b), int16 halves: exact in int32 for the operands given here
inline Lanes madd16(Lanes a, Lanes b) { return _mm256_madd_epi16(a, b); }
inline Lanes lanes_zero() { return _mm256_setzero_si256(); }
inline Lanes add32(Lanes a, Lanes b) { return _mm256_add_epi32(a, b); }
inline Lanes sub32(Lanes a, Lanes b) { return _mm256_sub_epi32(a, b); }
inline Lanes splat32(int32_t v) { return _mm256_set1_epi32(v); }
inline Lanes load_i8x8(const uint8_t* p) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline Bytes shl_and(Bytes a, int n, int mask) { return band(_mm256_slli_epi16(a, n), splat8(mask)); }
// the 4 bytes at p in every int32 lane
inline Bytes bcast4(const uint8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
// acc + dot_us(u, s)
inline Lanes dot_acc(Lanes acc, Bytes u, Bytes s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
// lane k = the sum of l[k]'s 8 lanes (exact integers): two rounds of hadd, then the two halves added
inline Lanes reduce8(const Lanes* l) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(l[0], l[1]), _mm256_hadd_epi32(l[2], l[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(l[4], l[5]), _mm256_hadd_epi32(l[6], l[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}
using Acc = __m256;  // 8 fp32 lanes, one per output
inline Acc acc_zero() { return _mm256_setzero_ps(); }
inline Acc splat(float v) { return _mm256_set1_ps(v); }
inline Acc mul(Acc a, Acc b) { return _mm256_mul_ps(a, b); }
inline Acc add(Acc a, Acc b) { return _mm256_add_ps(a, b); }
inline Acc sub(Acc a, Acc b) { return _mm256_sub_ps(a, b); }
// acc + float(l) * s, lane by lane
inline Acc acc_add(Acc acc, Lanes l, Acc s) { return _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(l), s)); }
inline void acc_store(Acc acc, float* out) { _mm256_storeu_ps(out, acc); }
// 8 fp16 at p, widened exactly
inline Acc halves8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
// the fp16 at byte offset off of each of 8 blocks, widened exactly
inline Acc halves8(const uint8_t* const* b, int off) {
  uint16_t h[8];
  for (int k = 0; k < 8; ++k) std::memcpy(h + k, b[k] + off, 2);
  return _mm256_cvtph_ps(_mm_setr_epi16(h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]));
}

#else  // portable C++: the same integer lanes and the same fp32 operations, element by element

struct Bytes { int8_t v[32]; };
struct Lanes { int32_t v[8]; };
inline Bytes load32(const uint8_t* p) { Bytes b; std::memcpy(b.v, p, 32); return b; }
inline Bytes splat8(int v) { Bytes b; for (auto& e : b.v) e = static_cast<int8_t>(v); return b; }
inline Bytes band(Bytes a, Bytes b) { for (int i = 0; i < 32; ++i) a.v[i] &= b.v[i]; return a; }
inline Bytes bor(Bytes a, Bytes b) { for (int i = 0; i < 32; ++i) a.v[i] |= b.v[i]; return a; }
inline Bytes bxor(Bytes a, Bytes b) { for (int i = 0; i < 32; ++i) a.v[i] ^= b.v[i]; return a; }
inline Bytes sub8(Bytes a, Bytes b) {
  for (int i = 0; i < 32; ++i) a.v[i] = static_cast<int8_t>(a.v[i] - b.v[i]);
  return a;
}
inline Bytes shr_and(Bytes a, int n, int mask) {
  for (auto& e : a.v) e = static_cast<int8_t>((static_cast<uint8_t>(e) >> n) & mask);
  return a;
}
inline Bytes shl4(Bytes a) { for (auto& e : a.v) e = static_cast<int8_t>(static_cast<uint8_t>(e) << 4); return a; }
inline Bytes nibbles16(const uint8_t* p) {
  Bytes b;
  for (int i = 0; i < 16; ++i) { b.v[i] = p[i] & 0x0F; b.v[i + 16] = p[i] >> 4; }
  return b;
}
inline Bytes bits_to_bytes(uint32_t bits) {
  Bytes b;
  for (int i = 0; i < 32; ++i) b.v[i] = (bits >> i) & 1 ? -1 : 0;
  return b;
}
inline Bytes is_set(Bytes a, int bit) { for (auto& e : a.v) e = (e & bit) == bit ? -1 : 0; return a; }
inline Bytes abs8(Bytes a) { for (auto& e : a.v) e = static_cast<int8_t>(e < 0 ? -e : e); return a; }
inline Bytes sign8(Bytes x, Bytes w) {
  for (int i = 0; i < 32; ++i) x.v[i] = static_cast<int8_t>(w.v[i] < 0 ? -x.v[i] : w.v[i] == 0 ? 0 : x.v[i]);
  return x;
}
inline Lanes dot_us(Bytes u, Bytes s) {
  Lanes l;
  for (int i = 0; i < 8; ++i) {
    int32_t t = 0;
    for (int j = 4 * i; j < 4 * i + 4; ++j) t += static_cast<int32_t>(static_cast<uint8_t>(u.v[j])) * s.v[j];
    l.v[i] = t;
  }
  return l;
}
struct Scales { int16_t v[16]; };
inline Scales scales_splat(int v) { Scales s; for (auto& e : s.v) e = static_cast<int16_t>(v); return s; }
struct ScaleSet { uint8_t v[8]; };
inline ScaleSet scale_set(const uint8_t* s) { ScaleSet t; std::memcpy(t.v, s, 8); return t; }
inline Scales scale_of(const ScaleSet& s, int j) { return scales_splat(s.v[j]); }
inline Scales scales_halves(int lo, int hi) {
  Scales s;
  for (int i = 0; i < 16; ++i) s.v[i] = static_cast<int16_t>(i < 8 ? lo : hi);
  return s;
}
inline Lanes dot_us_scaled(Lanes acc, Bytes u, Bytes s, Scales sc) {
  for (int i = 0; i < 32; ++i) acc.v[i / 4] += static_cast<int32_t>(static_cast<uint8_t>(u.v[i])) * s.v[i] * sc.v[i / 2];
  return acc;
}
inline Lanes load_u8x8(const uint8_t* p) { Lanes l; for (int i = 0; i < 8; ++i) l.v[i] = p[i]; return l; }
inline Lanes load_i32x8(const int32_t* p) { Lanes l; std::memcpy(l.v, p, sizeof(l.v)); return l; }
inline Lanes mul32v(Lanes a, Lanes b) { for (int i = 0; i < 8; ++i) a.v[i] *= b.v[i]; return a; }
inline Lanes pairs16(const uint8_t* p) {
  Lanes l;
  for (int k = 0; k < 8; ++k) l.v[k] = static_cast<int32_t>(p[k] | static_cast<uint32_t>(p[8 + k]) << 16);
  return l;
}
inline int32_t half16(int32_t v, int h) { return static_cast<int16_t>(static_cast<uint32_t>(v) >> (16 * h)); }
inline Lanes madd16(Lanes a, Lanes b) {
  for (int k = 0; k < 8; ++k)
    a.v[k] = half16(a.v[k], 0) * half16(b.v[k], 0) + half16(a.v[k], 1) * half16(b.v[k], 1);
  return a;
}
inline Lanes lanes_zero() { return Lanes{}; }
inline Lanes add32(Lanes a, Lanes b) { for (int i = 0; i < 8; ++i) a.v[i] += b.v[i]; return a; }
inline Lanes sub32(Lanes a, Lanes b) { for (int i = 0; i < 8; ++i) a.v[i] -= b.v[i]; return a; }
inline Lanes splat32(int32_t v) { Lanes l; for (auto& e : l.v) e = v; return l; }
inline Lanes load_i8x8(const uint8_t* p) {
  Lanes l;
  for (int i = 0; i < 8; ++i) l.v[i] = static_cast<int8_t>(p[i]);
  return l;
}
inline Bytes shl_and(Bytes a, int n, int mask) {
  for (auto& e : a.v) e = static_cast<int8_t>((static_cast<uint8_t>(e) << n) & mask);
  return a;
}
inline Bytes bcast4(const uint8_t* p) {
  Bytes b;
  for (int i = 0; i < 32; ++i) b.v[i] = static_cast<int8_t>(p[i % 4]);
  return b;
}
inline Lanes dot_acc(Lanes acc, Bytes u, Bytes s) { return add32(acc, dot_us(u, s)); }
inline Lanes reduce8(const Lanes* l) {
  Lanes t;
  for (int k = 0; k < 8; ++k) {
    int32_t s = 0;
    for (int i = 0; i < 8; ++i) s += l[k].v[i];
    t.v[k] = s;
  }
  return t;
}
struct Acc { float v[8]; };
inline Acc acc_zero() { return Acc{}; }
inline Acc splat(float v) { Acc a; for (auto& e : a.v) e = v; return a; }
inline Acc mul(Acc a, Acc b) { for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] * b.v[i]; return a; }
inline Acc add(Acc a, Acc b) { for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] + b.v[i]; return a; }
inline Acc sub(Acc a, Acc b) { for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] - b.v[i]; return a; }
inline Acc acc_add(Acc acc, Lanes l, Acc s) {
  for (int i = 0; i < 8; ++i) acc.v[i] = acc.v[i] + static_cast<float>(l.v[i]) * s.v[i];
  return acc;
}
inline void acc_store(Acc acc, float* out) { std::memcpy(out, acc.v, sizeof(acc.v)); }
inline Acc halves8(const uint8_t* p) {
  Acc a;
  for (int k = 0; k < 8; ++k) a.v[k] = fp16(p + 2 * k);
  return a;
}
inline Acc halves8(const uint8_t* const* b, int off) {
  Acc a;
  for (int k = 0; k < 8; ++k) a.v[k] = fp16(b[k] + off);
  return a;
}
#endif

// Short sums: without VNNI, dot_acc's maddubs pairs are added as int16 over several vectors (add_short) and
// widened into the int32 lanes once (widen_short), one madd per chain instead of one per vector. The same integers
// while no int16 sum reaches 32768: n vectors of values u <= U against |s| <= 128 need n * 2 * U * 128 < 32768
// (U = 15: 8 vectors, 31: 4), which the callers keep. With VNNI, and in the portable code, a short sum is
// dot_acc's int32 lanes.
#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512VL__)) && !defined(__AVXVNNI__)
constexpr bool SHORT_SUMS = true;
using Short = __m256i;  // 16 int16 pair sums
inline Short short_zero() { return _mm256_setzero_si256(); }
inline Short add_short(Short acc, Bytes u, Bytes s) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s)); }
inline Lanes widen_short(Lanes acc, Short p) { return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1))); }
#else
constexpr bool SHORT_SUMS = false;
using Short = Lanes;
inline Short short_zero() { return lanes_zero(); }
inline Short add_short(Short acc, Bytes u, Bytes s) { return dot_acc(acc, u, s); }
inline Lanes widen_short(Lanes acc, Short p) { return add32(acc, p); }
#endif

// The 8 lanes of one output in one tree, whatever the path: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
inline float lane_sum8(Acc acc) {
  float a[8];
  acc_store(acc, a);
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// One row of x, quantized alone: q [K] int8; per group of G elements d (fp32); per 32 elements the sum of q.
struct ActRow {
  const int8_t* q;
  const float* d;
  const int32_t* sum32;
  const int32_t* sum16;  // per 16 elements, where the format asks (Q6_K x8), else null
  const int32_t* off32;  // -OFF * sum32 per 32 elements, where the format asks (the Qx8 ones with an offset)
  const int32_t* off16;  // -OFF16 * sum16 per 16 elements, where the format asks (Q6_K x8: 32)
  const int32_t* pair32;  // (sum32[2i], sum32[2i + 1]) as two int16 per int32, where the format asks (Q4_K x8)
  const float* fsum32;    // float(sum32) (exact: |sum32| < 2^24), where the format asks (Q4_1 / Q5_1 x8)
};

// ---- the block formats: unpack a weight block once, dot it with any number of activation rows -----------------
// Each format: ELEMS per block, BYTES per block, GROUP (the activation's quantization group: one block), dequant
// (gguf-py's `dequantize` bit for bit: the same fp32 operations in the same order), D (the byte offset of the
// block's fp16 scale), TERM (what the second sum adds: NONE, AFFINE for d * q + m with the fp16 m at M, KMIN for
// the K-quants' sub-block mins with the fp16 dmin at M), a W (the unpacked block), dot (the block's integer dot
// with an activation block, as 8 int32 lanes to be added) and, for KMIN, mins (the min term's lanes).
enum class Term { NONE, AFFINE, KMIN };

// Signed weights (Q8_0, Q4_0, Q5_0): w and |w| of a block; the dot is a u8 x s8 product through the sign trick.
struct Signed {
  Bytes w, aw;
  static Lanes dot(const Signed& u, const uint8_t* xq) { return dot_us(u.aw, sign8(load32(xq), u.w)); }
};

// The 32 unsigned values of a 4-bit block (nibbles at qs) or, FIVE, a 5-bit one (the 5th bits at h): one value
// (scalar, for dequant) or all 32 (for the kernels).
template <bool FIVE> inline int value45(const uint8_t* qs, uint32_t h, int i) {
  const int q = i < 16 ? (qs[i] & 0x0F) : (qs[i - 16] >> 4);
  return FIVE ? q | static_cast<int>(((h >> i) & 1) << 4) : q;
}
template <bool FIVE> inline Bytes values45(const uint8_t* qs, uint32_t h) {
  const Bytes q = nibbles16(qs);
  return FIVE ? bor(q, band(bits_to_bytes(h), splat8(0x10))) : q;
}
inline uint32_t high_bits(const uint8_t* p) { uint32_t h; std::memcpy(&h, p, 4); return h; }

struct Q8_0 {
  static constexpr int ELEMS = 32, BYTES = 34, GROUP = 32, D = 0, M = -1;
  static constexpr Term TERM = Term::NONE;
  static void dequant(const uint8_t* b, float* y) {
    const float d = fp16(b);
    for (int i = 0; i < 32; ++i) y[i] = static_cast<float>(static_cast<int8_t>(b[2 + i])) * d;
  }
  using W = Signed;
  static void unpack(const uint8_t* b, W& u) { u.w = load32(b + 2); u.aw = abs8(u.w); }
  static Lanes dot(const W& u, const uint8_t* xq) { return Signed::dot(u, xq); }
};

// Q4_0 and Q5_0: signed values (q - 8, q - 16) times d.
template <bool FIVE> struct QSym {
  static constexpr int ELEMS = 32, BYTES = FIVE ? 22 : 18, GROUP = 32, D = 0, M = -1;
  static constexpr Term TERM = Term::NONE;
  static constexpr int QS = FIVE ? 6 : 2;
  static void dequant(const uint8_t* b, float* y) {
    const float d = fp16(b);
    const uint32_t h = FIVE ? high_bits(b + 2) : 0;
    for (int i = 0; i < 32; ++i) y[i] = d * static_cast<float>(value45<FIVE>(b + QS, h, i) - (FIVE ? 16 : 8));
  }
  using W = Signed;
  static void unpack(const uint8_t* b, W& u) {
    u.w = sub8(values45<FIVE>(b + QS, FIVE ? high_bits(b + 2) : 0), splat8(FIVE ? 16 : 8));
    u.aw = abs8(u.w);
  }
  static Lanes dot(const W& u, const uint8_t* xq) { return Signed::dot(u, xq); }
};

// Q4_1 and Q5_1: d * q + m with q unsigned: the dot is d * dx * (q . xq) + m * dx * sum(xq).
template <bool FIVE> struct QAff {
  static constexpr int ELEMS = 32, BYTES = FIVE ? 24 : 20, GROUP = 32, D = 0, M = 2;
  static constexpr Term TERM = Term::AFFINE;
  static constexpr int QS = FIVE ? 8 : 4;
  static void dequant(const uint8_t* b, float* y) {
    const float d = fp16(b), m = fp16(b + 2);
    const uint32_t h = FIVE ? high_bits(b + 4) : 0;
    for (int i = 0; i < 32; ++i) y[i] = (d * static_cast<float>(value45<FIVE>(b + QS, h, i))) + m;
  }
  struct W { Bytes q; };
  static void unpack(const uint8_t* b, W& u) { u.q = values45<FIVE>(b + QS, FIVE ? high_bits(b + 4) : 0); }
  static Lanes dot(const W& u, const uint8_t* xq) { return dot_us(u.q, load32(xq)); }
};

// The 8 6-bit scales (bytes 0..7 of out) and mins (bytes 8..15) of Q4_K / Q5_K from their 12 packed bytes, in a
// few 32-bit operations (ggml's utmp unpacking; scale_min_k4 below is the one-at-a-time definition).
inline void scales_mins_k4(const uint8_t* s, uint8_t* out) {
  uint32_t u[4];
  std::memcpy(u, s, 12);
  u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
  const uint32_t mins_lo = u[1] & 0x3f3f3f3f;
  u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
  u[2] = mins_lo;
  u[0] &= 0x3f3f3f3f;
  std::memcpy(out, u, 16);
}

// The 6-bit scales and mins of Q4_K / Q5_K (ggml's get_scale_min_k4).
inline void scale_min_k4(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q4_K and Q5_K: 256 elements, 8 sub-blocks of 32 with 6-bit scale sc and min m; y = (d * sc) * q - dmin * m.
// The dot: d * dx * sum_j sc_j (q_j . xq_j) - dmin * dx * sum_j m_j sum(xq_j), both sums in integers.
template <bool FIVE> struct QK {
  static constexpr int ELEMS = 256, BYTES = FIVE ? 176 : 144, GROUP = 256, D = 0, M = 2;
  static constexpr Term TERM = Term::KMIN;
  static constexpr int QH = 16, QS = FIVE ? 48 : 16;
  static int value(const uint8_t* b, int i) {  // element i's unsigned quant
    const int g = i / 64, r = i % 64, l = r % 32;
    int q = r < 32 ? (b[QS + 32 * g + l] & 0x0F) : (b[QS + 32 * g + l] >> 4);
    if (FIVE) q |= ((b[QH + l] >> (i / 32)) & 1) << 4;
    return q;
  }
  static void dequant(const uint8_t* b, float* y) {
    const float d = fp16(b), dmin = fp16(b + 2);
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      scale_min_k4(b + 4, j, sc, m);
      const float ds = d * static_cast<float>(sc), dm = dmin * static_cast<float>(m);
      for (int i = 32 * j; i < 32 * j + 32; ++i) y[i] = ds * static_cast<float>(value(b, i)) - dm;
    }
  }
  struct W { Bytes q[8]; uint8_t sm[16]; ScaleSet sc; };  // sm: scales 0..7, mins 8..15; sc: the scales
  static void unpack(const uint8_t* b, W& u) {
    const Bytes high = FIVE ? load32(b + QH) : splat8(0);
    for (int g = 0; g < 4; ++g) {
      const Bytes v = load32(b + QS + 32 * g);
      u.q[2 * g] = band(v, splat8(0x0F));
      u.q[2 * g + 1] = shr_and(v, 4, 0x0F);
      if (FIVE) {
        u.q[2 * g] = bor(u.q[2 * g], band(is_set(high, 1 << (2 * g)), splat8(0x10)));
        u.q[2 * g + 1] = bor(u.q[2 * g + 1], band(is_set(high, 2 << (2 * g)), splat8(0x10)));
      }
    }
    scales_mins_k4(b + 4, u.sm);
    u.sc = scale_set(u.sm);
  }
  static Lanes dot(const W& u, const uint8_t* xq) {
    Lanes total = lanes_zero();
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) total = dot_us_scaled(total, u.q[j], load32(xq + 32 * j), scale_of(u.sc, j));
    return total;
  }
  // lane j: m_j * sum(xq_j)
  static Lanes mins(const W& u, const int32_t* sums) { return mul32v(load_u8x8(u.sm + 8), load_i32x8(sums)); }
};

// Q3_K's and Q6_K's unpacked block: 8 chunks of 32 signed values w (and |w|), each chunk's two int16 scales (16
// elements each); their dot with a row's 256 quantized activations, by the sign trick (|w| . (x * sign(w)))
struct SignedChunks { Bytes w[8], aw[8]; Scales sc[8]; };
inline Lanes dot_signed(const SignedChunks& u, const uint8_t* xq) {
  Lanes total = lanes_zero();
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) total = dot_us_scaled(total, u.aw[c], sign8(load32(xq + 32 * c), u.w[c]), u.sc[c]);
  return total;
}

// Q3_K's 16 6-bit scales, sub-block i's minus 32: low nibbles from bytes 0..7 (i < 8: low, else high nibble of
// byte i % 8), high 2 bits from bytes 8..11 (bits 2 (i / 4) of byte 8 + i % 4), as gguf-py unpacks them
inline int scale_k3(const uint8_t* s, int i) {
  return (((s[i % 8] >> (4 * (i / 8))) & 0x0F) | (((s[8 + i % 4] >> (2 * (i / 4))) & 3) << 4)) - 32;
}

// Q3_K: 256 elements, hmask [32] (bit c of byte l: element 32c + l's third bit), qs [64] 2-bit quants (chunk c =
// 4h + k of 32 elements takes bits 2k, 2k + 1 of qs[32h ...]), 12 bytes of 16 6-bit scales (one per 16 elements,
// minus 32), d (fp16, last); y = (d * sc) * (q - 4), q = the 2 bits + 4 * the hmask bit.
struct Q3K {
  static constexpr int ELEMS = 256, BYTES = 110, GROUP = 256, D = 108, M = -1;
  static constexpr Term TERM = Term::NONE;
  static int value(const uint8_t* b, int i) {
    const int c = i / 32, l = i % 32;
    return (((b[32 + 32 * (c / 4) + l] >> (2 * (c % 4))) & 3) | (((b[l] >> c) & 1) << 2)) - 4;
  }
  static void dequant(const uint8_t* b, float* y) {
    const float d = fp16(b + 108);
    for (int j = 0; j < 16; ++j) {
      const float ds = d * static_cast<float>(scale_k3(b + 96, j));
      for (int i = 16 * j; i < 16 * j + 16; ++i) y[i] = ds * static_cast<float>(value(b, i));
    }
  }
  using W = SignedChunks;
  static void unpack(const uint8_t* b, W& u) {
    const Bytes hm = load32(b);
    for (int c = 0; c < 8; ++c) {
      const Bytes q = bor(shr_and(load32(b + 32 + 32 * (c / 4)), 2 * (c % 4), 3), band(is_set(hm, 1 << c), splat8(4)));
      u.w[c] = sub8(q, splat8(4));
      u.aw[c] = abs8(u.w[c]);
      u.sc[c] = scales_halves(scale_k3(b + 96, 2 * c), scale_k3(b + 96, 2 * c + 1));
    }
  }
  static Lanes dot(const W& u, const uint8_t* xq) { return dot_signed(u, xq); }
};

// Q6_K: 256 elements, ql [128] low nibbles, qh [64] 2 high bits, 16 int8 scales per 16 elements, d (fp16, last);
// y = (d * sc) * (q - 32). Chunk c of 32 elements (c = 4h + k) takes ql[64h + 32(k & 1) ...] (low nibbles for
// k < 2, high for k >= 2) and bits 2k, 2k + 1 of qh[32h ...].
struct Q6K {
  static constexpr int ELEMS = 256, BYTES = 210, GROUP = 256, D = 208, M = -1;
  static constexpr Term TERM = Term::NONE;
  static int value(const uint8_t* b, int i) {
    const int h = i / 128, k = (i % 128) / 32, l = i % 32;
    const uint8_t ql = b[64 * h + 32 * (k & 1) + l];
    const int low = k < 2 ? (ql & 0x0F) : (ql >> 4);
    return (low | (((b[128 + 32 * h + l] >> (2 * k)) & 3) << 4)) - 32;
  }
  static void dequant(const uint8_t* b, float* y) {
    const float d = fp16(b + 208);
    for (int j = 0; j < 16; ++j) {
      const float ds = d * static_cast<float>(static_cast<int8_t>(b[192 + j]));
      for (int i = 16 * j; i < 16 * j + 16; ++i) y[i] = ds * static_cast<float>(value(b, i));
    }
  }
  using W = SignedChunks;
  static void unpack(const uint8_t* b, W& u) {
    for (int h = 0; h < 2; ++h) {
      const Bytes qh = load32(b + 128 + 32 * h);
      for (int k = 0; k < 4; ++k) {
        const Bytes ql = load32(b + 64 * h + 32 * (k & 1));
        const Bytes low = k < 2 ? band(ql, splat8(0x0F)) : shr_and(ql, 4, 0x0F);
        const Bytes q = bor(low, shl4(shr_and(qh, 2 * k, 3)));
        u.w[4 * h + k] = sub8(q, splat8(32));
        u.aw[4 * h + k] = abs8(u.w[4 * h + k]);
      }
    }
    for (int c = 0; c < 8; ++c)
      u.sc[c] = scales_halves(static_cast<int8_t>(b[192 + 2 * c]), static_cast<int8_t>(b[193 + 2 * c]));
  }
  static Lanes dot(const W& u, const uint8_t* xq) { return dot_signed(u, xq); }
};

// ---- activation quantization -----------------------------------------------------------------------------
// One row x [K] -> q, d per group of G, sums per 32 (and per 16 where sum16 is given). The same IEEE operations
// on every path: amax = max |x| (max is exact in any order; a NaN is skipped, as by std::max(amax, |x|)),
// d = amax / 127, q = nearbyint(x * (127 / amax)) clamped to [-127, 127] (a NaN product to -127); the sums are
// integers. The 8-lane code below runs them lane by lane, so it gives the scalar loop's bits.
template <typename T>
void quantize_row_scalar(const T* x, int64_t K, int G, int8_t* q, float* d, int32_t* sum32, int32_t* sum16) {
  for (int64_t g = 0; g < K / G; ++g) {
    float amax = 0.0f;
    for (int64_t i = g * G; i < (g + 1) * G; ++i) amax = std::max(amax, std::fabs(to_float(x[i])));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    d[g] = amax / 127.0f;
    for (int64_t i = g * G; i < (g + 1) * G; ++i) {
      const float v = std::nearbyint(to_float(x[i]) * inv);
      q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
    }
  }
  for (int64_t b = 0; b < K / 32; ++b) {
    int32_t s = 0;
    for (int i = 0; i < 32; ++i) s += q[32 * b + i];
    sum32[b] = s;
  }
  for (int64_t b = 0; sum16 && b < K / 16; ++b) {
    int32_t s = 0;
    for (int i = 0; i < 16; ++i) s += q[16 * b + i];
    sum16[b] = s;
  }
}

#if defined(LOOKAHEAD_VEC8)
// The sum of 8 int32 lanes (exact)
inline int32_t hsum8(__m256i v) {
  const __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i b = _mm_add_epi32(a, _mm_shuffle_epi32(a, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(_mm_add_epi32(b, _mm_shuffle_epi32(b, _MM_SHUFFLE(2, 3, 0, 1))));
}

template <typename T>
void quantize_row(const T* x, int64_t K, int G, int8_t* q, float* d, int32_t* sum32, int32_t* sum16) {
  if (G % 32 != 0) return quantize_row_scalar(x, K, G, q, d, sum32, sum16);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < K / G; ++g) {
    const T* xg = x + g * G;
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < G; i += 8) amax = _mm256_max_ps(_mm256_and_ps(load8(xg + i), abs_mask), amax);
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float a = std::max(_mm_cvtss_f32(m4), _mm_cvtss_f32(_mm_shuffle_ps(m4, m4, 1)));
    const float inv = a > 0.0f ? 127.0f / a : 0.0f;
    d[g] = a / 127.0f;
    const __m256 iv = _mm256_set1_ps(inv);
    for (int i = 0; i < G; i += 32) {
      __m256i v[4];
      for (int j = 0; j < 4; ++j) {
        const __m256 r = _mm256_round_ps(_mm256_mul_ps(load8(xg + i + 8 * j), iv),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));  // max(NaN, lo) is lo
      }
      const int64_t e = g * G + i;  // 32 elements: sums of 32 (and 16) from the int32 lanes
      const int32_t s0 = hsum8(_mm256_add_epi32(v[0], v[1])), s1 = hsum8(_mm256_add_epi32(v[2], v[3]));
      sum32[e / 32] = s0 + s1;
      if (sum16) {
        sum16[e / 16] = s0;
        sum16[e / 16 + 1] = s1;
      }
      const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + e), _mm256_permutevar8x32_epi32(p, order));
    }
  }
}
#else
template <typename T>
void quantize_row(const T* x, int64_t K, int G, int8_t* q, float* d, int32_t* sum32, int32_t* sum16) {
  quantize_row_scalar(x, K, G, q, d, sum32, sum16);
}
#endif

// The rows of x of one call, each quantized alone into its own slice of one buffer: the calling thread's scratch,
// kept between calls and grown to the largest (as attention.cpp keeps its own; a SmolLM2 step makes ~150 quantized
// linear calls, which each allocated and zero-filled eight arrays). Every byte a call reads it writes first. One
// Activations is alive per thread at a time: the linear kernels make theirs and are done with it when they return.
struct Activations {
  const ActRow* rows;
  // off: the format's offset per 32 elements (off32 = -off * sum32; 0: none), off16 the same per 16 (sum16 then
  // kept); with_pairs: pair32 (|sum32| <= 32 * 127 fits an int16); with_fsum: fsum32
  template <typename T>
  Activations(const T* x, int64_t M, int64_t K, int G, bool with_sum16, int off = 0, int off_16 = 0,
              bool with_pairs = false, bool with_fsum = false) {
    const int64_t n32 = K / 32, n16 = with_sum16 ? K / 16 : 0;  // per row
    size_t bytes = 0;
    auto take = [&](size_t n) {  // offset of an array of n bytes, a whole number of cache lines each
      const size_t at = bytes;
      bytes += (n + 63) / 64 * 64;
      return at;
    };
    const size_t o_rows = take(M * sizeof(ActRow)), o_q = take(M * K), o_d = take(M * (K / G) * sizeof(float)),
                 o_s32 = take(M * n32 * 4), o_s16 = take(M * n16 * 4), o_off32 = take(off ? M * n32 * 4 : 0),
                 o_off16 = take(off_16 ? M * n16 * 4 : 0), o_pair = take(with_pairs ? M * (K / 64) * 4 : 0),
                 o_fsum = take(with_fsum ? M * n32 * 4 : 0);
    thread_local std::vector<char> scratch;
    if (scratch.size() < bytes) scratch.resize(bytes);
    char* base = scratch.data();
    ActRow* out = reinterpret_cast<ActRow*>(base + o_rows);
    rows = out;
    for (int64_t m = 0; m < M; ++m) {
      int8_t* q = reinterpret_cast<int8_t*>(base + o_q) + m * K;
      float* d = reinterpret_cast<float*>(base + o_d) + m * (K / G);
      int32_t* s32 = reinterpret_cast<int32_t*>(base + o_s32) + m * n32;
      int32_t* s16 = with_sum16 ? reinterpret_cast<int32_t*>(base + o_s16) + m * n16 : nullptr;
      int32_t* o32 = off ? reinterpret_cast<int32_t*>(base + o_off32) + m * n32 : nullptr;
      int32_t* o16 = off_16 ? reinterpret_cast<int32_t*>(base + o_off16) + m * n16 : nullptr;
      int32_t* pair = with_pairs ? reinterpret_cast<int32_t*>(base + o_pair) + m * (K / 64) : nullptr;
      float* fsum = with_fsum ? reinterpret_cast<float*>(base + o_fsum) + m * n32 : nullptr;
      quantize_row(x + m * K, K, G, q, d, s32, s16);
      for (int64_t b = 0; o32 && b < n32; ++b) o32[b] = -off * s32[b];
      for (int64_t b = 0; o16 && b < n16; ++b) o16[b] = -off_16 * s16[b];
      for (int64_t i = 0; pair && i < K / 64; ++i) {
        const uint32_t low = static_cast<uint16_t>(s32[2 * i]), high = static_cast<uint16_t>(s32[2 * i + 1]);
        pair[i] = static_cast<int32_t>(low | high << 16);
      }
      for (int64_t b = 0; fsum && b < n32; ++b) fsum[b] = static_cast<float>(s32[b]);
      out[m] = ActRow{q, d, s32, s16, o32, o16, pair, fsum};
    }
  }
};

// Q8_0, Q4_0, Q5_0 and the K-quants: y[m0 .. m0 + MI) x [n0, n1), one output at a time; each row keeps 8 fp32
// lanes, lane l adding float(lane l of the block's integer dot) * (d_w * d_x) (then float(lane l of the min
// term) * ((-dmin) * d_x)) in block order, summed by lane_sum8 at the end. Reducing the lanes across outputs
// (below) measured slower for these: for the K-quants at 1 to 8 rows (a block's fp32 work is spread over 256
// elements), for Q8_0 at one row (1.4-1.6x the time at a 1B model's shapes; its blocks are cheap to dot), which is
// the plain decode step (bench/cpu/quant_verify_before_after.txt).
template <typename F, typename T, int MI>
void rows_tile(const uint8_t* w, const ActRow* act, const T* bias, T* y, int64_t m0, int rows, int64_t n0,
               int64_t n1, int64_t nb, int64_t N) {
  const int mi = MI ? MI : rows;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * nb * F::BYTES;
    Acc acc[MI ? MI : MT];
    for (int i = 0; i < mi; ++i) acc[i] = acc_zero();
    typename F::W u;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = wr + b * F::BYTES;
      F::unpack(blk, u);
      const float d = fp16(blk + F::D), dmin = F::TERM == Term::KMIN ? -fp16(blk + F::M) : 0.0f;
#pragma GCC unroll 8
      for (int i = 0; i < mi; ++i) {
        const ActRow& a = act[m0 + i];
        const uint8_t* xq = reinterpret_cast<const uint8_t*>(a.q) + F::ELEMS * b;
        acc[i] = acc_add(acc[i], F::dot(u, xq), splat(d * a.d[b]));
        if constexpr (F::TERM == Term::KMIN)
          acc[i] = acc_add(acc[i], F::mins(u, a.sum32 + 8 * b), splat(dmin * a.d[b]));
      }
    }
    for (int i = 0; i < mi; ++i) {
      const float s = lane_sum8(acc[i]);
      y[(m0 + i) * N + n] = from_float<T>(bias ? s + to_float(bias[n]) : s);
    }
  }
}

// Q4_1 / Q5_1: y[m0 .. m0 + MI) x [n0, n0 + 8): the 8 weight blocks of each block column are unpacked
// once and dotted with every row of the tile; the 8 integer dots of a row are reduced across lanes (reduce8), so
// lane k of the fp32 vectors is output k. Outputs past N repeat row N - 1 and are not stored.
template <typename F, typename T, int MI>
void outputs_tile(const uint8_t* w, const ActRow* act, const T* bias, T* y, int64_t m0, int rows, int64_t n0,
                  int64_t nb, int64_t N) {
  static_assert(F::TERM == Term::AFFINE, "outputs_tile: the formats d * q + m (Q4_1, Q5_1)");
  const int mi = MI ? MI : rows;
  const uint8_t* wr[NT];
  for (int k = 0; k < NT; ++k) wr[k] = w + std::min(n0 + k, N - 1) * nb * F::BYTES;
  Acc acc[MI ? MI : MT], second[MI ? MI : MT];
  for (int i = 0; i < mi; ++i) { acc[i] = acc_zero(); second[i] = acc_zero(); }
  typename F::W u[NT];
  // The tile's rows are one contiguous range, read 8 blocks at a time from 8 short streams that the hardware
  // prefetcher does not follow: each block step prefetches its share of the range PREFETCH_TILES tiles ahead.
  const int64_t tile_bytes = NT * nb * F::BYTES;
  const uint8_t* ahead = w + (n0 + PREFETCH_TILES * NT) * nb * F::BYTES;
  const uint8_t* end = w + N * nb * F::BYTES;
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t o = b * NT * F::BYTES; o < std::min(tile_bytes, (b + 1) * NT * F::BYTES); o += 64)
      if (ahead + o < end) prefetch(ahead + o);
    const uint8_t* blk[NT];
    for (int k = 0; k < NT; ++k) {
      blk[k] = wr[k] + b * F::BYTES;
      F::unpack(blk[k], u[k]);
    }
    const Acc d = halves8(blk, F::D), m = halves8(blk, F::M);
    for (int i = 0; i < mi; ++i) {
      const ActRow& a = act[m0 + i];
      const uint8_t* xq = reinterpret_cast<const uint8_t*>(a.q) + F::ELEMS * b;
      const Acc dx = splat(a.d[b]);
      Lanes l[NT];
#pragma GCC unroll 8
      for (int k = 0; k < NT; ++k) l[k] = F::dot(u[k], xq);
      acc[i] = acc_add(acc[i], reduce8(l), mul(d, dx));
      second[i] = add(second[i], mul(mul(m, dx), splat(static_cast<float>(a.sum32[b]))));
    }
  }
  const int nk = static_cast<int>(std::min<int64_t>(NT, N - n0));
  for (int i = 0; i < mi; ++i) {
    float s[NT];
    acc_store(add(acc[i], second[i]), s);
    for (int k = 0; k < nk; ++k)
      y[(m0 + i) * N + n0 + k] = from_float<T>(bias ? s[k] + to_float(bias[n0 + k]) : s[k]);
  }
}

// A tile of `rows` rows and 8 outputs from n0, by the format's strategy. MI: the row count as a constant, so the
// accumulators live in registers, or 0 (the portable build: one instance with a run-time count, as eight
// instances of its unrolled scalar loops took the compiler over a minute).
template <typename F, typename T, int MI>
void tile(const uint8_t* w, const ActRow* act, const T* bias, T* y, int64_t m0, int rows, int64_t n0, int64_t nb,
          int64_t N) {
  if constexpr (F::TERM == Term::AFFINE)
    outputs_tile<F, T, MI>(w, act, bias, y, m0, rows, n0, nb, N);
  else
    rows_tile<F, T, MI>(w, act, bias, y, m0, rows, n0, std::min(N, n0 + NT), nb, N);
}

template <typename F, typename T>
void linear_kernel(const T* x, const uint8_t* w, const T* bias, T* y, int64_t M, int64_t K, int64_t N) {
  const int64_t nb = K / F::ELEMS;
  const Activations act(x, M, K, F::GROUP, false);
  const int64_t tiles = (N + NT - 1) / NT, tile_bytes = NT * nb * F::BYTES;
  const int64_t grain = std::max<int64_t>(1, PARALLEL_BYTES / std::max<int64_t>(1, tile_bytes));
  parallel_chunks(tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t c0 = t0; c0 < t1; c0 += NB / NT) {  // a cache block of NB rows of w
      const int64_t c1 = std::min(t1, c0 + NB / NT);
      for (int64_t m0 = 0; m0 < M; m0 += MT)
        for (int64_t c = c0; c < c1; ++c) {
          const ActRow* a = act.rows;
          const int64_t n0 = c * NT;
          const int rows = static_cast<int>(std::min<int64_t>(MT, M - m0));
#if defined(__AVX2__)
          with_count<MT>(rows, [&](auto mi) { tile<F, T, decltype(mi)::value>(w, a, bias, y, m0, rows, n0, nb, N); });
#else
          tile<F, T, 0>(w, a, bias, y, m0, rows, n0, nb, N);
#endif
        }
    }
  });
}

// ---- the x8 layouts' vector sets: one unit of 8 outputs (V8), or two units in 512-bit vectors (V16) ----------------
// The repacked blocks below are written once against a set V: V::at(base, o) is where byte o of a unit's block lies
// (V8: base + o), V::load(p) reads the unit's 32 bytes there, the other loads likewise; the operations act lane by
// lane. V16 reads two units' blocks at once from the x16 layout (quant_repack, on builds that have V16): the two
// blocks interleaved 32 bytes at a time, so that byte o of the second lies 32 bytes after byte o of the first and a
// 512-bit load takes a vector of both. Lane k of a V16 vector is output k of the first unit (k < 8) or output
// k - 8 of the second, and runs the operations that lane k % 8 of a V8 vector runs for that output: the same bits.
// V16 exists where AVX512-VNNI does: on this project's Zen 4 a 512-bit vpdpbusd did 1.13-1.35x the multiply-adds of
// two 256-bit ones, 1.39-1.78x with its activation broadcast from memory (bench/cpu/session14/vnni_peak.txt), and
// every broadcast serves 16 outputs.
struct V8 {
  static constexpr int OUT = 8;
  static constexpr int STRIDE = 1;  // units a block step spans in memory
  using B = Bytes;
  using L = Lanes;
  using S = Short;
  using A = Acc;
  static const uint8_t* at(const uint8_t* base, int o) { return base + o; }
  static B load(const uint8_t* p) { return load32(p); }
  static B bcast(const uint8_t* p) { return bcast4(p); }
  static B splat_b(int v) { return splat8(v); }
  static B and_(B a, B b) { return band(a, b); }
  static B or_(B a, B b) { return bor(a, b); }
  static B xor_(B a, B b) { return bxor(a, b); }
  static B shr_mask(B a, int n, int mask) { return shr_and(a, n, mask); }
  static B shl_mask(B a, int n, int mask) { return shl_and(a, n, mask); }
  static B abs_b(B a) { return abs8(a); }
  static B sign_b(B x, B w) { return sign8(x, w); }
  static L zero() { return lanes_zero(); }
  static L splat_l(int32_t v) { return splat32(v); }
  static L dot(L acc, B u, B s) { return dot_acc(acc, u, s); }
  static S short_0() { return short_zero(); }
  static S add_s(S acc, B u, B s) { return add_short(acc, u, s); }
  static L widen(L acc, S p) { return widen_short(acc, p); }
  static L add_l(L a, L b) { return add32(a, b); }
  static L mul_l(L a, L b) { return mul32v(a, b); }
  static L madd(L a, L b) { return madd16(a, b); }
  static L u8(const uint8_t* p) { return load_u8x8(p); }
  static L i8(const uint8_t* p) { return load_i8x8(p); }
  static L pairs(const uint8_t* p) { return pairs16(p); }
  static A halves(const uint8_t* p) { return halves8(p); }
  static A zero_a() { return acc_zero(); }
  static A splat_a(float v) { return splat(v); }
  static A mul_a(A a, A b) { return mul(a, b); }
  static A add_a(A a, A b) { return add(a, b); }
  static A sub_a(A a, A b) { return sub(a, b); }
  static A fma_l(A acc, L l, A s) { return acc_add(acc, l, s); }  // acc + float(l) * s (two roundings)
  static void store(A a, float* out) { acc_store(a, out); }
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LOOKAHEAD_X16 1
struct V16 {
  static constexpr int OUT = 16;
  static constexpr int STRIDE = 2;
  using B = __m512i;
  using L = __m512i;
  using S = __m512i;
  using A = __m512;
  // byte o of the first unit's block at base: byte o of the second's lies 32 bytes on (x16 layout, below)
  static const uint8_t* at(const uint8_t* base, int o) { return base + o / 32 * 64 + o % 32; }
  static B join(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }
  static __m128i eight2(const uint8_t* p) {  // 8 bytes at p, then the second unit's 8
    return _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)),
                              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 32)));
  }
  static B load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static B bcast(const uint8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
  static B splat_b(int v) { return _mm512_set1_epi8(static_cast<char>(v)); }
  static B and_(B a, B b) { return _mm512_and_si512(a, b); }
  static B or_(B a, B b) { return _mm512_or_si512(a, b); }
  static B xor_(B a, B b) { return _mm512_xor_si512(a, b); }
  static B shr_mask(B a, int n, int mask) { return and_(_mm512_srli_epi16(a, n), splat_b(mask)); }
  static B shl_mask(B a, int n, int mask) { return and_(_mm512_slli_epi16(a, n), splat_b(mask)); }
  static L zero() { return _mm512_setzero_si512(); }
  static L splat_l(int32_t v) { return _mm512_set1_epi32(v); }
  static L dot(L acc, B u, B s) { return _mm512_dpbusd_epi32(acc, u, s); }
  static S short_0() { return zero(); }
  static S add_s(S acc, B u, B s) { return dot(acc, u, s); }
  static L widen(L acc, S p) { return add_l(acc, p); }
  static L add_l(L a, L b) { return _mm512_add_epi32(a, b); }
  static L mul_l(L a, L b) { return _mm512_mullo_epi32(a, b); }
  static L madd(L a, L b) { return _mm512_madd_epi16(a, b); }
  static L u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(eight2(p)); }
  static L i8(const uint8_t* p) { return _mm512_cvtepi8_epi32(eight2(p)); }
  static L pairs(const uint8_t* p) { return join(pairs16(p), pairs16(p + 32)); }
  static A halves(const uint8_t* p) {
    return _mm512_cvtph_ps(_mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32)),
                                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static A zero_a() { return _mm512_setzero_ps(); }
  static A splat_a(float v) { return _mm512_set1_ps(v); }
  static A mul_a(A a, A b) { return _mm512_mul_ps(a, b); }
  static A add_a(A a, A b) { return _mm512_add_ps(a, b); }
  static A sub_a(A a, A b) { return _mm512_sub_ps(a, b); }
  static A fma_l(A acc, L l, A s) { return _mm512_add_ps(acc, _mm512_mul_ps(_mm512_cvtepi32_ps(l), s)); }
  static void store(A a, float* out) { _mm512_storeu_ps(out, a); }
};
#endif

// Where quant_repack puts unit t (of `units`) of a format with F::X16, on builds with V16: units 2i and 2i + 1 as
// one stream of pair blocks (block b of both, interleaved 32 bytes at a time: V16::at), the last of an odd count
// alone at the end in the unit layout. Reading the two units of a pair from their own places instead (two streams,
// no interleave) made SmolLM2's linears 1.1-2.5x slower at one row of x, streaming from memory.
inline bool paired(int64_t t, int64_t units) {
#if defined(LOOKAHEAD_X16)
  return t < units / 2 * 2;
#else
  return false;
#endif
}

// ---- interleaved by 8 outputs (quant_repack): one int32 lane per output, no lane reductions ----------------------
// A repacked weight is uint8 [N / 8, nb, BYTES]: unit (t, b) holds block b of the 8 rows 8t .. 8t + 7 (blocks 2b,
// 2b + 1 for the 32-element formats, below), the quants as vectors of 32 bytes whose int32 lane k is 4 bytes of
// row k. A broadcast of the activation's matching 4 bytes and one u8 x s8 dot (vpdpbusd, or maddubs + madd) add 4
// products to each of the 8 rows' lanes, so a block's integer dot ends in the lane of its output and the fp32 work
// is done for 8 outputs at once. The same bytes as the file's blocks (or 2-3% more for Q4_K / Q5_K: their scales
// unpacked to bytes), read once per row of x in a tile.
// Per row and block, in integers (exact in any order), then in block order:
//   Q4_K, Q5_K: I = sum_j sc_j * (q_j . xq_j), Mn = sum_j m_j * sum(xq_j);  s1 = s1 + float(I) * (d * dx),
//         s2 = s2 + float(Mn) * (dmin * dx); y = s1 - s2 (+ bias).
//   Q6_K, Q3_K: I = sum_j sc_j * (q_j . xq_j - OFF16 * sum(xq_j)) over the 16 sub-blocks of 16 (q unsigned, 0..63
//         with OFF16 32, or 0..7 with OFF16 4);
//         s1 = s1 + float(I) * (d * dx); y = s1 - 0 (+ bias).
//   Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: Qx8 below.
// The repacked layouts are ours (no file holds them); quant_repack builds them from the file's blocks at load.

// Q4_K x 8 and Q5_K x 8: d [8] and dmin [8] (fp16, as in the file), the 6-bit scales [8 sub-blocks][8 rows] and
// mins [8][8] as bytes, for Q5_K 8 vectors of fifth bits (vector v: bytes 4v .. 4v + 3 of each row's qh, bit j of
// byte l element 32j + l's), then 4 groups of 8 vectors: vector v of group g holds bytes 4v .. 4v + 3 of each row's
// qs[32g ...], their low nibbles elements 64g + 4v .. 64g + 4v + 3, their high ones 64g + 32 + 4v ...
template <bool FIVE> struct QKx8 {
  static constexpr int ELEMS = 256, SOURCE = FIVE ? 176 : 144, D = 0, DMIN = 16, SCALES = 32, MINS = 96, QH = 160;
  static constexpr int QS = FIVE ? QH + 256 : 160, BYTES = QS + 1024;
  static constexpr int SRC_QH = 16, SRC_QS = FIVE ? 48 : 16;  // in the file's block
  static constexpr int GROUP = 256, BLOCKS = 1;  // GROUP: the activation's; BLOCKS: the file's per unit
  static constexpr int ROWS512 = 8;              // rows of x per pass with AVX-512's 32 registers (xrows)
  // V16 (its fields are 32-byte aligned, or within 32 bytes) ran its weights 0.74-0.86x the time from cache, but the
  // 1B model's step 1.04x at one row of x, 1.01-1.10x at 2-4 and 0.93-0.95x at 8 (streaming): not used
  static constexpr bool X16 = false;
  static constexpr bool SUM16 = false, PAIRS = true, FSUM = false;
  static constexpr int OFF = 0, OFF16 = 0;
  template <typename V> static typename V::A finish(typename V::A s1, typename V::A s2) { return V::sub_a(s1, s2); }
  static constexpr int PREFETCH = 0;  // bytes ahead: the hardware's prefetch did as well (4096: 0.99x, 8192: 1.07x)
  static constexpr int PREFETCH_ROWS = 1;  // from this many rows of x
  static void repack(const uint8_t* src, uint8_t* dst, int64_t t, int64_t nb) {  // unit t's nb blocks at dst
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* o = dst + b * BYTES;
      for (int k = 0; k < 8; ++k) {
        const uint8_t* blk = src + ((8 * t + k) * nb + b) * SOURCE;
        std::memcpy(o + D + 2 * k, blk, 2);
        std::memcpy(o + DMIN + 2 * k, blk + 2, 2);
        uint8_t sm[16];
        scales_mins_k4(blk + 4, sm);
        for (int j = 0; j < 8; ++j) {
          o[SCALES + 8 * j + k] = sm[j];
          o[MINS + 8 * j + k] = sm[8 + j];
        }
        for (int v = 0; v < 32; ++v) std::memcpy(o + QS + 32 * v + 4 * k, blk + SRC_QS + 4 * v, 4);
        if (FIVE)
          for (int v = 0; v < 8; ++v) std::memcpy(o + QH + 32 * v + 4 * k, blk + SRC_QH + 4 * v, 4);
      }
    }
  }
  // s1, s2 of rows act[0 .. R) += block b at base
  template <typename V, int R> LOOKAHEAD_INLINE
  static void block(const uint8_t* base, const ActRow* act, int64_t b, typename V::A* s1,
                    typename V::A* s2) {
    using L = typename V::L;
    {  // s2 first (its own sum, so the order of s1's and s2's updates is free), while few registers are live:
       // Mn = sum_j min_j sum(xq_j), the mins of sub-blocks 2i, 2i + 1 as an int16 pair per output times the
       // row's pair of sums (madd: the same integer as 8 products)
      const typename V::A dmin = V::halves(V::at(base, DMIN));
      const L mp[4] = {V::pairs(V::at(base, MINS)), V::pairs(V::at(base, MINS + 16)),
                       V::pairs(V::at(base, MINS + 32)), V::pairs(V::at(base, MINS + 48))};
      for (int r = 0; r < R; ++r) {
        L mn = V::zero();
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) mn = V::add_l(mn, V::madd(mp[i], V::splat_l(act[r].pair32[4 * b + i])));
        s2[r] = V::fma_l(s2[r], mn, V::mul_a(dmin, V::splat_a(act[r].d[b])));
      }
    }
    L I[R];
    for (int r = 0; r < R; ++r) I[r] = V::zero();
    auto group = [&](const int g) LOOKAHEAD_INLINE {
      // second chains for the odd vectors with VNNI at <= 2 rows; short sums without (8 vectors of 4-bit values,
      // or 4 + 4 of 5-bit ones)
      constexpr bool SPLIT = SHORT_SUMS ? FIVE : R <= 2;
      typename V::S lo_sum[R], hi_sum[R], lo2[SPLIT ? R : 1], hi2[SPLIT ? R : 1];
      for (int r = 0; r < R; ++r) lo_sum[r] = hi_sum[r] = V::short_0();
      if constexpr (SPLIT)
        for (int r = 0; r < R; ++r) lo2[r] = hi2[r] = V::short_0();
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) {
        const typename V::B wv = V::load(V::at(base, QS + 32 * (8 * g + v)));
        typename V::B wl = V::and_(wv, V::splat_b(0x0F)), wh = V::shr_mask(wv, 4, 0x0F);
        if constexpr (FIVE) {  // bits 2g and 2g + 1 of the fifth bits' bytes to bit 4 of the low and the high values
          const typename V::B h = V::load(V::at(base, QH + 32 * v));
          wl = V::or_(wl, 2 * g <= 4 ? V::shl_mask(h, 4 - 2 * g, 0x10) : V::shr_mask(h, 2 * g - 4, 0x10));
          wh = V::or_(wh, 2 * g + 1 <= 4 ? V::shl_mask(h, 3 - 2 * g, 0x10) : V::shr_mask(h, 2 * g - 3, 0x10));
        }
        for (int r = 0; r < R; ++r) {
          const uint8_t* xq = reinterpret_cast<const uint8_t*>(act[r].q) + 256 * b + 64 * g + 4 * v;
          if (SPLIT && v % 2) {
            lo2[r] = V::add_s(lo2[r], wl, V::bcast(xq));
            hi2[r] = V::add_s(hi2[r], wh, V::bcast(xq + 32));
          } else {
            lo_sum[r] = V::add_s(lo_sum[r], wl, V::bcast(xq));
            hi_sum[r] = V::add_s(hi_sum[r], wh, V::bcast(xq + 32));
          }
        }
      }
      L lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        lo[r] = V::widen(V::zero(), lo_sum[r]), hi[r] = V::widen(V::zero(), hi_sum[r]);
        if constexpr (SPLIT) lo[r] = V::widen(lo[r], lo2[r]), hi[r] = V::widen(hi[r], hi2[r]);
      }
      const L sl = V::u8(V::at(base, SCALES + 16 * g)), sh = V::u8(V::at(base, SCALES + 16 * g + 8));
      for (int r = 0; r < R; ++r) I[r] = V::add_l(I[r], V::add_l(V::mul_l(lo[r], sl), V::mul_l(hi[r], sh)));
    };
    // Q5_K at up to 4 rows: the groups unrolled, so that the fifth bits' shifts are constants (0.7-0.9x the time
    // at 1-4 rows, one thread, weight in L2; unrolled at 8 rows, Q5_K and Q4_K took 1.25-1.6x)
    if constexpr (FIVE && R <= 4) {
      group(0); group(1); group(2); group(3);
    } else {
      for (int g = 0; g < 4; ++g) group(g);
    }
    const typename V::A d = V::halves(V::at(base, D));
    for (int r = 0; r < R; ++r) s1[r] = V::fma_l(s1[r], I[r], V::mul_a(d, V::splat_a(act[r].d[b])));
  }
};

// Q6_K x 8 and Q3_K x 8 (the 256-element types with 16 int8 scales per block, one per 16 elements): d [8] (fp16),
// the int8 scales [16 sub-blocks][8 rows] (Q3_K's 6-bit ones minus 32), then the quants. Q6_K: per half h of 128
// elements 8 vectors of ql for kk = 0 and 8 for kk = 1 (vector v: each row's ql[64h + 32kk + 4v ...]; low nibbles
// chunk kk, high nibbles chunk kk + 2 of the half) and 8 of qh (vector v: each row's qh[32h + 4v ...]; bits 2k,
// 2k + 1 chunk k). Q3_K: per half 8 vectors of qs (vector v: each row's qs[32h + 4v ...]; bits 2k, 2k + 1 chunk k),
// then 8 of hmask for both halves (vector v: each row's hmask[4v ...]; bit 4h + k chunk k of half h). A value is
// q - 32 (Q6_K, q 6 bits) or q - 4 (Q3_K: q = 2 bits + 4 * its hmask bit).
template <int BITS> struct QSx8 {
  static constexpr bool THREE = BITS == 3;
  static constexpr int ELEMS = 256, SOURCE = THREE ? 110 : 210, SRC_D = THREE ? 108 : 208;
  static constexpr int D = 0, SCALES = 16, QS = 144, HALF = THREE ? 256 : 768, HM = QS + 2 * HALF;
  static constexpr int BYTES = HM + (THREE ? 256 : 0);
  static constexpr int GROUP = 256, BLOCKS = 1;
  static constexpr int ROWS512 = 4;  // its 16 accumulators per 4 rows: 8 took 1.2x the time at 8 rows (Q6_K)
  static constexpr bool X16 = false;  // its quants at 144 + 32v: not 32-byte aligned for V16's interleave
  static constexpr bool SUM16 = true, PAIRS = false, FSUM = false;  // its sub-blocks of 16
  static constexpr int OFF = 0, OFF16 = THREE ? 4 : 32;  // the offset term per sub-block of 16
  template <typename V> static typename V::A finish(typename V::A s1, typename V::A s2) { return V::sub_a(s1, s2); }
  // Q6_K against none: 0.90x at two threads, 0.93x at one (8192: 0.96x, 0.85x); Q3_K the same bytes ahead
  static constexpr int PREFETCH = 4096;
  static constexpr int PREFETCH_ROWS = 1;
  static void repack(const uint8_t* src, uint8_t* dst, int64_t t, int64_t nb) {  // unit t's nb blocks at dst
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* o = dst + b * BYTES;
      for (int k = 0; k < 8; ++k) {
        const uint8_t* blk = src + ((8 * t + k) * nb + b) * SOURCE;
        std::memcpy(o + D + 2 * k, blk + SRC_D, 2);
        for (int j = 0; j < 16; ++j)
          o[SCALES + 8 * j + k] = THREE ? static_cast<uint8_t>(scale_k3(blk + 96, j)) : blk[192 + j];
        for (int h = 0; h < 2; ++h) {
          uint8_t* half = o + QS + HALF * h;
          for (int v = 0; v < 8; ++v) {
            if (THREE) {
              std::memcpy(half + 32 * v + 4 * k, blk + 32 + 32 * h + 4 * v, 4);
              continue;
            }
            std::memcpy(half + 32 * v + 4 * k, blk + 64 * h + 4 * v, 4);
            std::memcpy(half + 32 * (8 + v) + 4 * k, blk + 64 * h + 32 + 4 * v, 4);
            std::memcpy(half + 32 * (16 + v) + 4 * k, blk + 128 + 32 * h + 4 * v, 4);
          }
        }
        if (THREE)
          for (int v = 0; v < 8; ++v) std::memcpy(o + HM + 32 * v + 4 * k, blk + 4 * v, 4);
      }
    }
  }
  // the unsigned quants of chunks 0..3 of half h, bytes 4v .. 4v + 3 of each row
  template <typename V> LOOKAHEAD_INLINE static void chunks(const uint8_t* base, int h, int v, typename V::B* c) {
    using B = typename V::B;
    const int half = QS + HALF * h;
    if constexpr (THREE) {  // bits 2k, 2k + 1 of qs, and bit 4h + k of hmask to bit 2
      const B Q = V::load(V::at(base, half + 32 * v)), H = V::load(V::at(base, HM + 32 * v));
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const int bit = 4 * h + k;
        const B high = bit >= 2 ? V::shr_mask(H, bit - 2, 0x04) : V::shl_mask(H, 2 - bit, 0x04);
        c[k] = V::or_(V::shr_mask(Q, 2 * k, 0x03), high);
      }
    } else {
      const B H = V::load(V::at(base, half + 32 * (16 + v))), L0 = V::load(V::at(base, half + 32 * v)),
              L1 = V::load(V::at(base, half + 32 * (8 + v)));
      c[0] = V::or_(V::and_(L0, V::splat_b(0x0F)), V::shl_mask(H, 4, 0x30));
      c[1] = V::or_(V::and_(L1, V::splat_b(0x0F)), V::shl_mask(H, 2, 0x30));
      c[2] = V::or_(V::shr_mask(L0, 4, 0x0F), V::and_(H, V::splat_b(0x30)));
      c[3] = V::or_(V::shr_mask(L1, 4, 0x0F), V::shr_mask(H, 2, 0x30));
    }
  }
  template <typename V, int R> LOOKAHEAD_INLINE
  static void block(const uint8_t* base, const ActRow* act, int64_t b, typename V::A* s1,
                    typename V::A*) {
    using L = typename V::L;
    using B = typename V::B;
    L I[R];
    for (int r = 0; r < R; ++r) I[r] = V::zero();
    // the halves unrolled, so that their offsets (and Q3_K's shifts) are constants: Q6_K 0.73-0.82x the time at
    // 1-8 rows (one weight in L2, one thread)
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      for (int e = 0; e < 2; ++e) {  // elements 0..15 of each chunk (one sub-block of 16), then 16..31
        L acc[R][4];  // sub-block j's q . xq - OFF16 sum(xq): it starts at the offset term (exact in any order)
        for (int r = 0; r < R; ++r)
          for (int k = 0; k < 4; ++k) acc[r][k] = V::splat_l(act[r].off16[16 * b + 8 * h + 2 * k + e]);
#pragma GCC unroll 4
        for (int v = 4 * e; v < 4 * e + 4; ++v) {
          B c[4];
          chunks<V>(base, h, v, c);
          for (int r = 0; r < R; ++r) {
            const uint8_t* xq = reinterpret_cast<const uint8_t*>(act[r].q) + 256 * b + 128 * h + 4 * v;
#pragma GCC unroll 4
            for (int k = 0; k < 4; ++k) acc[r][k] = V::dot(acc[r][k], c[k], V::bcast(xq + 32 * k));
          }
        }
        for (int k = 0; k < 4; ++k) {
          const int j = 8 * h + 2 * k + e;
          const L sc = V::i8(V::at(base, SCALES + 8 * j));
          for (int r = 0; r < R; ++r)
            I[r] = V::add_l(I[r], V::mul_l(acc[r][k], sc));
        }
      }
    }
    const typename V::A d = V::halves(V::at(base, D));
    for (int r = 0; r < R; ++r) s1[r] = V::fma_l(s1[r], I[r], V::mul_a(d, V::splat_a(act[r].d[b])));
  }
};

// The 32-element formats x 8 (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): a unit is 8 outputs x 64 elements, two of the file's
// blocks per output (j = 0, 1), so that no repacked size equals another format's block. Per j: d [8] (fp16, as in
// the file; D + 16j), for Q4_1 / Q5_1 m [8] (M + 16j), for Q5_0 / Q5_1 one vector of 5th bits (H + 32j: byte i of
// lane k has bit v = element 4v + i's, bit 4 + v = element 16 + 4v + i's, v < 4), then the quants: 4-/5-bit
// formats 4 vectors (vector v: bytes 4v .. 4v + 3 of each row's qs, low nibbles elements 4v .., high ones
// 16 + 4v ..), Q8_0 8 vectors (vector v: each row's elements 4v .. 4v + 3). The same bytes as the file's blocks.
// Per row and block, in integers, I = q . xq - OFF * sum(xq) with q the unsigned quant (OFF = 8 for Q4_0, 16 for
// Q5_0, 0 for the affine ones; Q8_0: q = w + 128 and OFF = 128 where vpdpbusd takes u8 x s8, else the sign trick
// |w| . (xq * sign(w)) and OFF = 0: the same integer), then in block order s1 = s1 + float(I) * (d * dx), and for
// Q4_1 / Q5_1 s2 = s2 + (m * dx) * float(sum(xq)), y = s1 + s2 (+ bias): the file layout's operations in its
// order (outputs_tile), so the affine formats give the same bits in either layout.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
constexpr bool UNSIGNED_DOT = true;  // vpdpbusd: u8 x s8 at full range
#else
constexpr bool UNSIGNED_DOT = false;  // maddubs saturates int16 past 2 * 128 * 127
#endif

template <int BITS, bool AFFINE> struct Qx8 {
  static constexpr bool FIVE = BITS == 5;
  static constexpr int ELEMS = 64, GROUP = 32, BLOCKS = 2, ROWS512 = 8, ROWS16 = 8;
  // V16 where built: SmolLM2's linears (Q4_1, Q8_0) 0.70-0.82x the time at 8 rows of x, 0.91-0.99x at one (two
  // threads, streaming from memory; bench/cpu/session14/linears_ab_smollm2_q4_1.txt)
  static constexpr bool X16 = true;
  static constexpr int SOURCE = BITS == 8 ? 34 : (BITS == 5 ? 22 : 18) + (AFFINE ? 2 : 0);
  static constexpr int SRC_QH = AFFINE ? 4 : 2, SRC_QS = SRC_QH + (FIVE ? 4 : 0);  // in the file's block
  static constexpr int D = 0, M = 32, H = AFFINE ? 64 : 32, QS = H + (FIVE ? 64 : 0);
  static constexpr int QBYTES = BITS == 8 ? 256 : 128;  // per j
  static constexpr int BYTES = QS + 2 * QBYTES;
  static constexpr int OFF = BITS == 8 ? (UNSIGNED_DOT ? 128 : 0) : AFFINE ? 0 : (FIVE ? 16 : 8);
  static constexpr bool SUM16 = false, PAIRS = false, FSUM = AFFINE;
  static constexpr int OFF16 = 0;
  // 4-/5-bit formats from 3 rows of x: SmolLM2's verify of 8 nodes 0.83-0.85x the time without (with V16, measured
  // with it from 2 rows); at 1-2 rows it cost 3-7%, and on Q8_0 (the head) at 4-8 rows
  static constexpr int PREFETCH = BITS == 8 ? 0 : 2048, PREFETCH_ROWS = 3;
  static_assert(BITS != 8 || !AFFINE, "Qx8: Q8_0 is symmetric");
  template <typename V> static typename V::A finish(typename V::A s1, typename V::A s2) { return V::add_a(s1, s2); }
  static void repack(const uint8_t* src, uint8_t* dst, int64_t t, int64_t nb) {  // unit t's nb blocks at dst
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* o = dst + b * BYTES;
      for (int k = 0; k < 8; ++k)
        for (int j = 0; j < 2; ++j) {
          const uint8_t* blk = src + ((8 * t + k) * 2 * nb + 2 * b + j) * SOURCE;
          std::memcpy(o + D + 16 * j + 2 * k, blk, 2);
          if (AFFINE) std::memcpy(o + M + 16 * j + 2 * k, blk + 2, 2);
          if (FIVE) {
            const uint32_t h = high_bits(blk + SRC_QH);
            for (int i = 0; i < 4; ++i) {
              int byte = 0;
              for (int v = 0; v < 4; ++v)
                byte |= static_cast<int>((h >> (4 * v + i)) & 1) << v | static_cast<int>((h >> (16 + 4 * v + i)) & 1)
                        << (4 + v);
              o[H + 32 * j + 4 * k + i] = static_cast<uint8_t>(byte);
            }
          }
          for (int v = 0; v < QBYTES / 32; ++v)
            std::memcpy(o + QS + QBYTES * j + 32 * v + 4 * k, blk + (BITS == 8 ? 2 : SRC_QS) + 4 * v, 4);
        }
    }
  }
  template <typename V, int R> LOOKAHEAD_INLINE
  static void block(const uint8_t* base, const ActRow* act, int64_t b, typename V::A* s1,
                    typename V::A* s2) {
    using L = typename V::L;
    using B = typename V::B;
    for (int j = 0; j < 2; ++j) {
      L acc[R];  // I = q . xq - OFF * sum(xq): the integer starts at the offset term (exact in any order)
      for (int r = 0; r < R; ++r) acc[r] = OFF ? V::splat_l(act[r].off32[2 * b + j]) : V::zero();
      const int64_t e0 = 64 * b + 32 * j;  // the block's first element
      if constexpr (BITS == 8) {
        constexpr bool SPLIT = R <= 4;  // a second chain per row for the odd vectors (exact: integers)
        L acc2[SPLIT ? R : 1];
        if constexpr (SPLIT)
          for (int r = 0; r < R; ++r) acc2[r] = V::zero();
#pragma GCC unroll 8
        for (int v = 0; v < 8; ++v) {
          const B w = V::load(V::at(base, QS + QBYTES * j + 32 * v));
          B u;
          if constexpr (UNSIGNED_DOT) u = V::xor_(w, V::splat_b(0x80));
          else u = V::abs_b(w);
          for (int r = 0; r < R; ++r) {
            B x = V::bcast(reinterpret_cast<const uint8_t*>(act[r].q) + e0 + 4 * v);
            if constexpr (!UNSIGNED_DOT) x = V::sign_b(x, w);
            if (SPLIT && v % 2)
              acc2[r] = V::dot(acc2[r], u, x);
            else
              acc[r] = V::dot(acc[r], u, x);
          }
        }
        if constexpr (SPLIT)
          for (int r = 0; r < R; ++r) acc[r] = V::add_l(acc[r], acc2[r]);
      } else {
        const B h = FIVE ? V::load(V::at(base, H + 32 * j)) : V::splat_b(0);
        // the high nibbles in a second chain per row: with VNNI at <= 4 rows (two dependent chains of vpdpbusd
        // instead of one), and as short sums for 5-bit values (4 vectors each); 4-bit values take one short sum
        constexpr bool SPLIT = SHORT_SUMS ? FIVE : R <= 4;
        typename V::S lo_sum[R], hi_sum[SPLIT ? R : 1];
        for (int r = 0; r < R; ++r) lo_sum[r] = SHORT_SUMS ? V::short_0() : acc[r];
        if constexpr (SPLIT)
          for (int r = 0; r < R; ++r) hi_sum[r] = V::short_0();
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) {
          const B wv = V::load(V::at(base, QS + QBYTES * j + 32 * v));
          B lo = V::and_(wv, V::splat_b(0x0F)), hi = V::shr_mask(wv, 4, 0x0F);
          if (FIVE) {
            lo = V::or_(lo, V::shl_mask(h, 4 - v, 0x10));
            hi = V::or_(hi, V::shr_mask(h, v, 0x10));
          }
          for (int r = 0; r < R; ++r) {
            const uint8_t* xq = reinterpret_cast<const uint8_t*>(act[r].q) + e0 + 4 * v;
            lo_sum[r] = V::add_s(lo_sum[r], lo, V::bcast(xq));
            if constexpr (SPLIT)
              hi_sum[r] = V::add_s(hi_sum[r], hi, V::bcast(xq + 16));
            else
              lo_sum[r] = V::add_s(lo_sum[r], hi, V::bcast(xq + 16));
          }
        }
        for (int r = 0; r < R; ++r) {
          acc[r] = SHORT_SUMS ? V::widen(acc[r], lo_sum[r]) : lo_sum[r];
          if constexpr (SPLIT) acc[r] = V::widen(acc[r], hi_sum[r]);
        }
      }
      const typename V::A d = V::halves(V::at(base, D + 16 * j)),
                          m = AFFINE ? V::halves(V::at(base, M + 16 * j)) : V::zero_a();
      for (int r = 0; r < R; ++r) {
        const typename V::A dx = V::splat_a(act[r].d[2 * b + j]);
        s1[r] = V::fma_l(s1[r], acc[r], V::mul_a(d, dx));
        if constexpr (AFFINE) s2[r] = V::add_a(s2[r], V::mul_a(V::mul_a(m, dx), V::splat_a(act[r].fsum32[2 * b + j])));
      }
    }
  }
};

// y[m0 .. m0 + R) x [8t, 8t + V::OUT) over a repacked weight: unit t (V16: the pair of units t, t + 1); rows: the
// call's rows of x (M)
template <typename F, typename V, typename T, int R>
void x8_tile(const uint8_t* w, const ActRow* act, const T* bias, T* y, int64_t m0, int64_t t, int64_t nb,
             int64_t N, int64_t rows) {
  typename V::A s1[R], s2[R];
  for (int r = 0; r < R; ++r) s1[r] = s2[r] = V::zero_a();
  const uint8_t* end = w + (N / 8) * nb * F::BYTES;
  const uint8_t* unit = w + t * nb * F::BYTES;  // a pair's blocks start where its first unit's would
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* base = unit + b * V::STRIDE * F::BYTES;
    if (F::PREFETCH && m0 == 0 && rows >= F::PREFETCH_ROWS)
      for (int o = 0; o < V::STRIDE * F::BYTES; o += 64)
        if (base + F::PREFETCH + o < end) prefetch(base + F::PREFETCH + o);
    F::template block<V, R>(base, act + m0, b, s1, s2);
  }
  for (int r = 0; r < R; ++r) {
    float s[V::OUT];
    V::store(F::template finish<V>(s1[r], s2[r]), s);
    for (int k = 0; k < V::OUT; ++k)
      y[(m0 + r) * N + 8 * t + k] = from_float<T>(bias ? s[k] + to_float(bias[8 * t + k]) : s[k]);
  }
}

// Rows of x per pass over a tile of 8 outputs (the weight is re-read from cache for each further pass): with
// AVX-512's 32 registers the format's ROWS512 (Q4_K 8: against 4, 0.74-0.76x the time at 5-6 rows, 0.91x at 8,
// two threads), else 4; 1 in the portable build (its scalar loops as one instance each). Over 16 outputs (V16)
// the format's ROWS16.
template <typename F> constexpr int xrows() {
#if defined(__AVX512VL__)
  return F::ROWS512;
#elif defined(__AVX2__)
  return 4;
#else
  return 1;
#endif
}

template <typename F, typename T>
void x8_kernel(const T* x, const uint8_t* w, const T* bias, T* y, int64_t M, int64_t K, int64_t N) {
  const int64_t nb = K / F::ELEMS;
  const Activations act(x, M, K, F::GROUP, F::SUM16, F::OFF, F::OFF16, F::PAIRS, F::FSUM);
  const int64_t units = N / 8, unit_bytes = nb * F::BYTES;
  // a tile: V16 over units 2i, 2i + 1 where AVX512-VNNI is built in (a last odd unit alone, V8), else V8 over unit i
#if defined(LOOKAHEAD_X16)
  constexpr int PER = F::X16 ? 2 : 1;
#else
  constexpr int PER = 1;
#endif
  const int64_t tiles = (units + PER - 1) / PER;
  const int64_t grain = std::max<int64_t>(1, PARALLEL_BYTES / std::max<int64_t>(1, PER * unit_bytes));
  parallel_chunks(tiles, grain, [&](int64_t i0, int64_t i1) {
    const ActRow* a = act.rows;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = PER * i;
#if defined(LOOKAHEAD_X16)
      if constexpr (F::X16) if (paired(t, units)) {
        constexpr int XROWS = F::ROWS16;
        for (int64_t m0 = 0; m0 < M; m0 += XROWS)
          with_count<XROWS>(static_cast<int>(std::min<int64_t>(XROWS, M - m0)),
                            [&](auto r) { x8_tile<F, V16, T, decltype(r)::value>(w, a, bias, y, m0, t, nb, N, M); });
        continue;
      }
#endif
      constexpr int XROWS = xrows<F>();
      for (int64_t m0 = 0; m0 < M; m0 += XROWS)
        with_count<XROWS>(static_cast<int>(std::min<int64_t>(XROWS, M - m0)),
                          [&](auto r) { x8_tile<F, V8, T, decltype(r)::value>(w, a, bias, y, m0, t, nb, N, M); });
    }
  });
}

// ---- the table: one entry per ggml type, keyed by its block bytes ------------------------------------------
struct Format {
  const char* name;
  int elems, bytes;
  int rows;  // outputs per row of the weight tensor: 1, or 8 for a repacked one (dequant is then null)
  int source, blocks;  // a repacked one's: the file format's block bytes, and its blocks per unit per row
  void (*repack)(const uint8_t*, uint8_t*, int64_t, int64_t);  // (file blocks, out, unit t, blocks per unit)
  bool x16;  // a repacked one's units in the x16 layout's pairs (paired())
  void (*dequant)(const uint8_t*, float*);
  void (*linear_f32)(const float*, const uint8_t*, const float*, float*, int64_t, int64_t, int64_t);
  void (*linear_bf16)(const c10::BFloat16*, const uint8_t*, const c10::BFloat16*, c10::BFloat16*, int64_t, int64_t,
                      int64_t);
};

template <typename F> constexpr Format entry(const char* name) {
  return Format{name, F::ELEMS, F::BYTES, 1, 0, 1, nullptr, false, &F::dequant, &linear_kernel<F, float>,
                &linear_kernel<F, c10::BFloat16>};
}
template <typename F> constexpr Format repacked(const char* name) {
  static_assert(!F::X16 || F::BYTES % 32 == 0, "the x16 layout interleaves blocks 32 bytes at a time");
  return Format{name, F::ELEMS, F::BYTES, 8, F::SOURCE, F::BLOCKS, &F::repack, F::X16, nullptr, &x8_kernel<F, float>,
                &x8_kernel<F, c10::BFloat16>};
}

const Format FORMATS[] = {
    entry<Q8_0>("Q8_0"),                 entry<QSym<false>>("Q4_0"),          entry<QAff<false>>("Q4_1"),
    entry<QSym<true>>("Q5_0"),           entry<QAff<true>>("Q5_1"),           entry<Q3K>("Q3_K"),
    entry<QK<false>>("Q4_K"),            entry<QK<true>>("Q5_K"),             entry<Q6K>("Q6_K"),
    repacked<QSx8<3>>("Q3_K x8"),        repacked<QKx8<false>>("Q4_K x8"),    repacked<QKx8<true>>("Q5_K x8"),
    repacked<QSx8<6>>("Q6_K x8"),        repacked<Qx8<8, false>>("Q8_0 x8"),  repacked<Qx8<4, false>>("Q4_0 x8"),
    repacked<Qx8<4, true>>("Q4_1 x8"),   repacked<Qx8<5, false>>("Q5_0 x8"),  repacked<Qx8<5, true>>("Q5_1 x8"),
};

const Format& format_of(const at::Tensor& w, const char* op) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 3 && w.is_contiguous(), op,
              ": a quantized weight is a contiguous CPU uint8 tensor [N, K / block_elems, block_bytes], got ",
              w.scalar_type(), " ", w.sizes());
  for (const Format& f : FORMATS)
    if (f.bytes == w.size(2)) return f;
  TORCH_CHECK(false, op, ": no block format of ", w.size(2), " bytes; supported: Q8_0 (34), Q4_0 (18), Q4_1 (20), "
              "Q5_0 (22), Q5_1 (24), Q3_K (110), Q4_K (144), Q5_K (176), Q6_K (210), and quant_repack's "
              "Q3_K x8 (912), Q4_K x8 (1184), Q5_K x8 (1440), Q6_K x8 (1680), Q8_0 x8 (544), Q4_0 x8 (288), "
              "Q4_1 x8 (320), Q5_0 x8 (352), Q5_1 x8 (384)");
}

}  // namespace

// x [..., K] (fp32 or bf16), w uint8 [N, K / elems, bytes] (or a repacked [N / 8, K / elems, bytes]), bias [N] of
// x's dtype or None -> [..., N] in x's dtype.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const Format& f = format_of(weight, "lookahead::quant_linear");
  const int64_t N = weight.size(0) * f.rows, K = weight.size(1) * f.elems;
  TORCH_CHECK(x.device().is_cpu() && x.size(-1) == K, "lookahead::quant_linear: x [..., K] must be on the CPU with K = ",
              K, " (the weight's ", weight.size(1), " ", f.name, " blocks of ", f.elems, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "lookahead::quant_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == x.scalar_type() &&
                bias->is_contiguous(), "lookahead::quant_linear: bias must be a contiguous [N] tensor of x's dtype");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.numel() / K;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const uint8_t* w = weight.data_ptr<uint8_t>();
  if (x.scalar_type() == at::kFloat)
    f.linear_f32(xc.data_ptr<float>(), w, bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(),
                 M, K, N);
  else
    f.linear_bf16(xc.data_ptr<c10::BFloat16>(), w, bias.has_value() ? bias->data_ptr<c10::BFloat16>() : nullptr,
                  y.data_ptr<c10::BFloat16>(), M, K, N);
  return y;
}

// w uint8 [V, K / elems, bytes], ids (int64, any shape) -> [*ids.shape, K] in dtype: the dequantized rows.
at::Tensor quant_embedding(const at::Tensor& weight, const at::Tensor& ids, at::ScalarType dtype) {
  const Format& f = format_of(weight, "lookahead::quant_embedding");
  TORCH_CHECK(f.dequant, "lookahead::quant_embedding: a ", f.name, " weight (quant_repack's) serves linear layers "
              "only; look tokens up in the file's own blocks");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "lookahead::quant_embedding: ids must be int64 or int32, got ", ids.scalar_type());
  const int64_t V = weight.size(0), nb = weight.size(1), K = nb * f.elems;
  const at::Tensor idc = ids.to(at::kLong).contiguous();
  const int64_t n = idc.numel();
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < V, "lookahead::quant_embedding: id ", id[i], " outside [0, ", V, ")");
  at::Tensor out = at::empty({n, K}, at::kFloat);
  float* o = out.data_ptr<float>();
  const uint8_t* w = weight.data_ptr<uint8_t>();
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t b = 0; b < nb; ++b) f.dequant(w + (id[i] * nb + b) * f.bytes, o + i * K + b * f.elems);
  });
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(K);
  return out.view(shape).to(dtype);
}

namespace {
// An uninitialised uint8 tensor on 2 MiB pages where Linux grants them (transparent huge pages, "madvise" mode
// included): a decode step streams every weight once, and on 4 KiB pages each page costs a TLB miss. The repacked
// 1B Q4_K_M weights on 2 MiB pages took 0.90x the time at one thread, 0.95-0.97x at two (one process, alternating).
at::Tensor on_huge_pages(at::IntArrayRef shape) {
  int64_t bytes = 1;
  for (int64_t s : shape) bytes *= s;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t HUGE_PAGE = size_t(1) << 21;
  const size_t size = (static_cast<size_t>(bytes) + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
  if (void* p = size ? std::aligned_alloc(HUGE_PAGE, size) : nullptr) {
    madvise(p, size, MADV_HUGEPAGE);  // advice: where the kernel declines, the buffer keeps 4 KiB pages
    // fault the pages in on this thread: threads that first touch one huge page at once made a 2-thread repack
    // take 9-12x its 1-thread time (27-37 against 3 ms for a 9 MB weight)
    for (size_t at = 0; at < size; at += 4096) static_cast<volatile char*>(p)[at] = 0;
    return at::from_blob(p, shape, [](void* q) { std::free(q); }, at::TensorOptions().dtype(at::kByte));
  }
#endif
  return at::empty(shape, at::TensorOptions().dtype(at::kByte));
}
}  // namespace

// w uint8 [N, K / elems, bytes] in Q4_K, Q6_K, Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1, N a multiple of 8 (and for the
// 32-element formats K of 64) -> the same weight interleaved by 8 outputs (the "x8" layouts above), which
// quant_linear reads with one int32 lane per output.
at::Tensor quant_repack(const at::Tensor& weight) {
  const Format& f = format_of(weight, "lookahead::quant_repack");
  const int64_t N = weight.size(0), nb = weight.size(1);
  const Format* r = nullptr;  // the interleaved layout of f's blocks
  for (const Format& g : FORMATS)
    if (f.rows == 1 && g.rows == 8 && g.source == f.bytes) r = &g;
  TORCH_CHECK(r, "lookahead::quant_repack: Q3_K, Q4_K, Q5_K, Q6_K, Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1 blocks are "
              "repacked, got ", f.name);
  TORCH_CHECK(N % 8 == 0, "lookahead::quant_repack: the rows (outputs) come in tiles of 8, got ", N,
              " rows: keep this weight's file layout");
  TORCH_CHECK(nb % r->blocks == 0, "lookahead::quant_repack: a ", f.name, " row is repacked in pairs of blocks (64 "
              "elements), got ", nb, " blocks: keep this weight's file layout");
  at::Tensor out = on_huge_pages({N / 8, nb / r->blocks, r->bytes});
  const uint8_t* src = weight.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t units = N / 8, blocks = nb / r->blocks, unit_bytes = blocks * r->bytes;
  at::parallel_for(0, units, 16, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> unit(unit_bytes);
    for (int64_t t = t0; t < t1; ++t) {
      if (!(r->x16 && paired(t, units))) {
        r->repack(src, dst + t * unit_bytes, t, blocks);
        continue;
      }
      r->repack(src, unit.data(), t, blocks);  // then into its pair's blocks, every other 32 bytes
      uint8_t* pair = dst + (t - t % 2) * unit_bytes;
      for (int64_t b = 0; b < blocks; ++b)
        for (int o = 0; o < r->bytes; o += 32)
          std::memcpy(pair + 2 * b * r->bytes + 2 * o + 32 * (t % 2), unit.data() + b * r->bytes + o, 32);
    }
  });
  return out;
}

}  // namespace lookahead_cpu
