// SIMD building blocks of the kernels in csrc/: fp32/bf16 loads and stores, exp, 2^x, SiLU and
// exact (erf) GELU for AVX-512, AVX2 and scalar, and the Vec traits (vec::Avx512, vec::Avx2) over
// which each kernel loop is written once.
//
// A loop is a template over Vec, run through a per-ISA entry point that carries the ISA's target
// attribute and FASTDIFF_FLATTEN: the template and every Vec call are inlined into it, so each
// instantiation is compiled for its own ISA only (Vec's members cannot be always_inline: the
// template itself has the default target). Which entry point runs is chosen at run time from
// fastdiff::simd().
//
// Accuracy with kFull (fp32 results): exp ~2 ulp (Cephes polynomial, exact 2^n scaling); SiLU
// divides through a Newton-refined reciprocal (~1e-7 rel); kFull = false (bf16 results) drops
// terms and Newton steps for ~1e-4 relative, far below bf16's 4e-3 rounding. GELU uses Phi(x) = erfc(-x/sqrt2)/2 with Numerical
// Recipes' erfc (fractional error < 1.2e-7 everywhere), so even the far negative tail, where
// 1 + erf(x) cancels, stays accurate (~2e-6 relative at x = -9, limited by exp's argument).
// exp2<5> (attention's softmax weights in fp32): 1.1e-7 relative; exp2<3>: 1.2e-4, for weights
// rounded to bf16 (2^-9) right after.
#pragma once
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// GCC 12 reports the self-initialised placeholder inside its own AVX-512 intrinsics
// (_mm512_undefined_ps, GCC bug 105593) as uninitialised at every inlined call site.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#define FASTDIFF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define FASTDIFF_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define FASTDIFF_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define FASTDIFF_AVX2 __attribute__((target("avx2,fma")))
#define FASTDIFF_INLINE_AVX512 FASTDIFF_AVX512 __attribute__((always_inline)) inline
#define FASTDIFF_INLINE_AVX2 FASTDIFF_AVX2 __attribute__((always_inline)) inline
#define FASTDIFF_FLATTEN __attribute__((flatten))

// The loop templates pass vectors by value before they are inlined into their ISA's entry point.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastdiff::vec {

// Numerical Recipes erfcc coefficients, highest power of t first.
constexpr float kErfcPoly[10] = {0.17087277f, -0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f,
                                 -0.18628806f, 0.09678418f, 0.37409196f, 1.00002368f, -1.26551223f};
// Cephes expf polynomial for e^r, |r| <= ln2/2, highest power first.
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f, kLog2e = 1.44269504088896341f;
constexpr float kExpMax = 88.7f, kExpMin = -87.3f;
// 2^f on [-0.5, 0.5] (least squares on Chebyshev nodes), lowest power first, degree 5 or 3.
constexpr float kExp2Deg5[6] = {1.f, 0.6931468844f, 0.2402223796f, 0.0555089302f, 0.0096717076f, 0.0013218677f};
constexpr float kExp2Deg3[4] = {1.f, 0.6933686733f, 0.2422183752f, 0.0545928292f};
template <int kDegree>
constexpr const float* exp2_coefficients() {
  static_assert(kDegree == 3 || kDegree == 5);
  return kDegree == 5 ? kExp2Deg5 : kExp2Deg3;
}

// ---------------------------------------------------------------- scalar
inline float bf16_to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float silu_scalar(float x) { return x / (1.0f + std::exp(-x)); }
inline float gelu_scalar(float x) {
  const float phi = 0.5f * std::erfc(-x * 0.70710678118654752f);
  return x * phi;
}
inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
template <class T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline c10::BFloat16 from_float<c10::BFloat16>(float v) { return c10::BFloat16(v); }  // RNE

// ---------------------------------------------------------------- AVX-512
namespace avx512 {
using V = __m512;
constexpr int kWidth = 16;

FASTDIFF_INLINE_AVX512 __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}
FASTDIFF_INLINE_AVX512 V load(const float* p) { return _mm512_loadu_ps(p); }
FASTDIFF_INLINE_AVX512 V load(const c10::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
FASTDIFF_INLINE_AVX512 V load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
FASTDIFF_INLINE_AVX512 V load(const c10::BFloat16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// fp32 -> bf16, round to nearest even; NaN stays NaN.
FASTDIFF_INLINE_AVX512 __m256i to_bf16(V v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
FASTDIFF_INLINE_AVX512 void store(float* p, V v) { _mm512_storeu_ps(p, v); }
FASTDIFF_INLINE_AVX512 void store(c10::BFloat16* p, V v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v));
}
FASTDIFF_INLINE_AVX512 void store(float* p, V v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
FASTDIFF_INLINE_AVX512 void store(c10::BFloat16* p, V v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, to_bf16(v)); }

// kFull: fp32-accurate (~2 ulp). Otherwise ~5e-5 relative, for results rounded to bf16 anyway.
template <bool kFull = true>
FASTDIFF_INLINE_AVX512 V exp(V x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kExpMin)), _mm512_set1_ps(kExpMax));
  V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  if constexpr (kFull) r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  constexpr int first = kFull ? 0 : 2;  // drop the two highest-order terms
  V p = _mm512_set1_ps(kExpPoly[first]);
  for (int i = first + 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
// 2^x for x <= ~0 (clamped at -126): x = n + f, a polynomial for 2^f, vscalefps for the 2^n.
template <int kDegree>
FASTDIFF_INLINE_AVX512 V exp2(V x) {
  constexpr const float* c = exp2_coefficients<kDegree>();
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const V n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V f = _mm512_sub_ps(x, n);
  V poly = _mm512_set1_ps(c[kDegree]);
  for (int i = kDegree - 1; i >= 0; --i) poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(poly, n);
}
// 1/d: rcp14 (~6e-5), plus one Newton step (~1e-8) when kFull (vdivps is several times slower on Zen 4).
template <bool kFull = true>
FASTDIFF_INLINE_AVX512 V reciprocal(V d) {
  V r = _mm512_rcp14_ps(d);
  if constexpr (kFull) r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
  return r;
}
template <bool kFull = true>
FASTDIFF_INLINE_AVX512 V silu(V x) {
  V e = exp<kFull>(_mm512_sub_ps(_mm512_setzero_ps(), x));
  return _mm512_mul_ps(x, reciprocal<kFull>(_mm512_add_ps(e, _mm512_set1_ps(1.0f))));
}
template <bool kFull = true>
FASTDIFF_INLINE_AVX512 V gelu(V x) {
  V z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));
  V t = reciprocal<kFull>(_mm512_fmadd_ps(z, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.0f)));
  V p = _mm512_set1_ps(kErfcPoly[0]);
  for (int i = 1; i < 10; ++i) p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(kErfcPoly[i]));
  V arg;
  if constexpr (kFull) {
    // exp(p - x^2/2) with x^2 split into hi + lo (exact): the exponent is not limited by z's rounding.
    const V xx = _mm512_mul_ps(x, x), xx_lo = _mm512_fmsub_ps(x, x, xx);
    arg = _mm512_fmadd_ps(xx_lo, _mm512_set1_ps(-0.5f), _mm512_fmadd_ps(xx, _mm512_set1_ps(-0.5f), p));
  } else {
    arg = _mm512_fnmadd_ps(z, z, p);
  }
  V half_erfc = _mm512_mul_ps(_mm512_mul_ps(t, _mm512_set1_ps(0.5f)), exp<kFull>(arg));
  // Phi(x) = erfc(|x|/sqrt2)/2 for x < 0, 1 - that for x >= 0.
  __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  V phi = _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(1.0f), half_erfc), half_erfc);
  return _mm512_mul_ps(x, phi);
}
}  // namespace avx512

// ---------------------------------------------------------------- AVX2
namespace avx2 {
using V = __m256;
constexpr int kWidth = 8;

FASTDIFF_INLINE_AVX2 __m256i tail_mask(int64_t n) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 8 ? n : 8)), lanes);
}
FASTDIFF_INLINE_AVX2 V load(const float* p) { return _mm256_loadu_ps(p); }
FASTDIFF_INLINE_AVX2 V load(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
FASTDIFF_INLINE_AVX2 __m256i to_bf16_lanes(V v) {  // bf16 bits in the low half of each 32-bit lane
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}
FASTDIFF_INLINE_AVX2 void store(float* p, V v) { _mm256_storeu_ps(p, v); }
FASTDIFF_INLINE_AVX2 void store(c10::BFloat16* p, V v) {
  __m256i r = to_bf16_lanes(v);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
// Partial vectors go through a small stack buffer (AVX2 has no 16-bit masked moves).
template <class T>
FASTDIFF_INLINE_AVX2 V load(const T* p, int64_t n) {
  T buf[8] = {};
  std::memcpy(buf, p, n * sizeof(T));
  return load(buf);
}
template <class T>
FASTDIFF_INLINE_AVX2 void store(T* p, V v, int64_t n) {
  T buf[8];
  store(buf, v);
  std::memcpy(p, buf, n * sizeof(T));
}

template <bool kFull = true>
FASTDIFF_INLINE_AVX2 V exp(V x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpMin)), _mm256_set1_ps(kExpMax));
  V n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  V r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  if constexpr (kFull) r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  constexpr int first = kFull ? 0 : 2;
  V p = _mm256_set1_ps(kExpPoly[first]);
  for (int i = first + 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n built in the exponent field; the clamp keeps n + 127 within 1..254.
  __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
// 2^x for x <= ~0 (clamped at -126): the polynomial for the fraction, exponent bits built from n.
template <int kDegree>
FASTDIFF_INLINE_AVX2 V exp2(V x) {
  constexpr const float* c = exp2_coefficients<kDegree>();
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));
  const V n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V f = _mm256_sub_ps(x, n);
  V poly = _mm256_set1_ps(c[kDegree]);
  for (int i = kDegree - 1; i >= 0; --i) poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(c[i]));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(poly, _mm256_castsi256_ps(bits));
}
template <bool kFull = true>
FASTDIFF_INLINE_AVX2 V reciprocal(V d) {
  V r = _mm256_rcp_ps(d);  // 12 bits; one Newton step for bf16 results, two for fp32
  r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
  if constexpr (kFull) r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
  return r;
}
template <bool kFull = true>
FASTDIFF_INLINE_AVX2 V silu(V x) {
  V e = exp<kFull>(_mm256_sub_ps(_mm256_setzero_ps(), x));
  return _mm256_mul_ps(x, reciprocal<kFull>(_mm256_add_ps(e, _mm256_set1_ps(1.0f))));
}
template <bool kFull = true>
FASTDIFF_INLINE_AVX2 V gelu(V x) {
  V z = _mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), _mm256_set1_ps(0.70710678118654752f));
  V t = reciprocal<kFull>(_mm256_fmadd_ps(z, _mm256_set1_ps(0.5f), _mm256_set1_ps(1.0f)));
  V p = _mm256_set1_ps(kErfcPoly[0]);
  for (int i = 1; i < 10; ++i) p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(kErfcPoly[i]));
  V arg;
  if constexpr (kFull) {
    const V xx = _mm256_mul_ps(x, x), xx_lo = _mm256_fmsub_ps(x, x, xx);
    arg = _mm256_fmadd_ps(xx_lo, _mm256_set1_ps(-0.5f), _mm256_fmadd_ps(xx, _mm256_set1_ps(-0.5f), p));
  } else {
    arg = _mm256_fnmadd_ps(z, z, p);
  }
  V half_erfc = _mm256_mul_ps(_mm256_mul_ps(t, _mm256_set1_ps(0.5f)), exp<kFull>(arg));
  V negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  V phi = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), half_erfc), half_erfc, negative);
  return _mm256_mul_ps(x, phi);
}
}  // namespace avx2

// ---------------------------------------------------------------- Vec traits
// Reg: a vector of kWidth fp32 lanes. Tail: the lanes of a partial vector (tail(n): the first
// min(n, kWidth)); loads with a Tail read only those elements and zero the other lanes, stores
// write only those. load/store take fp32 or bf16 memory (converted to / rounded from fp32).

struct Avx512 {
  using Reg = __m512;
  using Tail = __mmask16;
  static constexpr int kWidth = 16;
  FASTDIFF_AVX512 static inline Tail tail(int64_t n) { return avx512::tail_mask(n); }
  FASTDIFF_AVX512 static inline Reg zero() { return _mm512_setzero_ps(); }
  FASTDIFF_AVX512 static inline Reg set1(float x) { return _mm512_set1_ps(x); }
  template <class T> FASTDIFF_AVX512 static inline Reg load(const T* p) { return avx512::load(p); }
  template <class T> FASTDIFF_AVX512 static inline Reg load(const T* p, Tail m) { return avx512::load(p, m); }
  template <class T> FASTDIFF_AVX512 static inline void store(T* p, Reg v) { avx512::store(p, v); }
  template <class T> FASTDIFF_AVX512 static inline void store(T* p, Reg v, Tail m) { avx512::store(p, v, m); }
  FASTDIFF_AVX512 static inline Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  FASTDIFF_AVX512 static inline Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  FASTDIFF_AVX512 static inline Reg sub(Reg a, Reg b, Tail m) { return _mm512_maskz_sub_ps(m, a, b); }  // 0 outside m
  FASTDIFF_AVX512 static inline Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  FASTDIFF_AVX512 static inline Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }  // a·b + c
  FASTDIFF_AVX512 static inline Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }
  FASTDIFF_AVX512 static inline float reduce_add(Reg a) { return _mm512_reduce_add_ps(a); }
  FASTDIFF_AVX512 static inline float reduce_max(Reg a) { return _mm512_reduce_max_ps(a); }
  template <int kDegree> FASTDIFF_AVX512 static inline Reg exp2(Reg x) { return avx512::exp2<kDegree>(x); }
  template <bool kFull> FASTDIFF_AVX512 static inline Reg silu(Reg x) { return avx512::silu<kFull>(x); }
  template <bool kFull> FASTDIFF_AVX512 static inline Reg gelu(Reg x) { return avx512::gelu<kFull>(x); }
};

struct Avx2 {
  using Reg = __m256;
  using Tail = int64_t;  // AVX2 has no 16-bit masked moves: partial vectors go through a stack buffer
  static constexpr int kWidth = 8;
  FASTDIFF_AVX2 static inline Tail tail(int64_t n) { return n < kWidth ? n : kWidth; }
  FASTDIFF_AVX2 static inline Reg zero() { return _mm256_setzero_ps(); }
  FASTDIFF_AVX2 static inline Reg set1(float x) { return _mm256_set1_ps(x); }
  template <class T> FASTDIFF_AVX2 static inline Reg load(const T* p) { return avx2::load(p); }
  template <class T> FASTDIFF_AVX2 static inline Reg load(const T* p, Tail n) {
    return n == kWidth ? avx2::load(p) : avx2::load(p, n);
  }
  template <class T> FASTDIFF_AVX2 static inline void store(T* p, Reg v) { avx2::store(p, v); }
  template <class T> FASTDIFF_AVX2 static inline void store(T* p, Reg v, Tail n) {
    if (n == kWidth) avx2::store(p, v);
    else avx2::store(p, v, n);
  }
  FASTDIFF_AVX2 static inline Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  FASTDIFF_AVX2 static inline Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  FASTDIFF_AVX2 static inline Reg sub(Reg a, Reg b, Tail n) {  // 0 outside the first n lanes
    return _mm256_and_ps(_mm256_sub_ps(a, b), _mm256_castsi256_ps(avx2::tail_mask(n)));
  }
  FASTDIFF_AVX2 static inline Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  FASTDIFF_AVX2 static inline Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  FASTDIFF_AVX2 static inline Reg max(Reg a, Reg b) { return _mm256_max_ps(a, b); }
  FASTDIFF_AVX2 static inline float reduce_add(Reg a) {
    const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
  }
  FASTDIFF_AVX2 static inline float reduce_max(Reg a) {
    const __m128 quad = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 pair = _mm_max_ps(quad, _mm_movehl_ps(quad, quad));
    return _mm_cvtss_f32(_mm_max_ss(pair, _mm_movehdup_ps(pair)));
  }
  template <int kDegree> FASTDIFF_AVX2 static inline Reg exp2(Reg x) { return avx2::exp2<kDegree>(x); }
  template <bool kFull> FASTDIFF_AVX2 static inline Reg silu(Reg x) { return avx2::silu<kFull>(x); }
  template <bool kFull> FASTDIFF_AVX2 static inline Reg gelu(Reg x) { return avx2::gelu<kFull>(x); }
};

// ---------------------------------------------------------------- int8 dot-product traits
// Acc: kWidth int32 sums. dot4(acc, a, w) adds to lane i the four products of bytes 4i..4i+3 of
// a (the same four activation bytes broadcast to every lane) and of w (signed weights, |w| <= 127).
// quantize(dst, v, tail) rounds the fp32 lanes of v (F::Reg, already in [-127, 127]) to the
// nearest integer, ties to even, and stores them as bytes in the traits' activation encoding.
//
// Avx512Vnni: vpdpbusd multiplies unsigned by signed bytes, so activations are stored as
// a + 128 (u8) and each sum carries 128 * sum(w) too, which the caller subtracts (kUnsignedA).
// Avx2Int8: vpmaddubsw also takes u8 x s8, but its 16-bit pair sums saturate at 2 * 255 * 127;
// with signed activations it takes |a| x (w with a's sign) instead (vpsignb): pair sums at most
// 2 * 127 * 127 < 2^15, so no saturation, then vpmaddwd by ones widens them to int32. Exact.

struct Avx512Vnni {
  using F = Avx512;
  using Acc = __m512i;
  static constexpr int kWidth = 16;
  static constexpr bool kUnsignedA = true;
  FASTDIFF_AVX512VNNI static inline Acc zero() { return _mm512_setzero_si512(); }
  FASTDIFF_AVX512VNNI static inline Acc load(const void* p) { return _mm512_loadu_si512(p); }
  FASTDIFF_AVX512VNNI static inline void store(void* p, Acc a) { _mm512_storeu_si512(p, a); }
  FASTDIFF_AVX512VNNI static inline Acc broadcast4(const int8_t* a) {
    int32_t four;
    std::memcpy(&four, a, 4);
    return _mm512_set1_epi32(four);
  }
  FASTDIFF_AVX512VNNI static inline Acc dot4(Acc acc, Acc a, Acc w) { return _mm512_dpbusd_epi32(acc, a, w); }
  FASTDIFF_AVX512VNNI static inline Acc sub(Acc a, Acc b) { return _mm512_sub_epi32(a, b); }
  FASTDIFF_AVX512VNNI static inline F::Reg to_float(Acc a) { return _mm512_cvtepi32_ps(a); }
  FASTDIFF_AVX512VNNI static inline void quantize(int8_t* dst, F::Reg v, F::Tail m) {
    const __m512i q = _mm512_cvtps_epi32(v);  // MXCSR's default rounding: nearest, ties to even
    const __m128i bytes = _mm_xor_si128(_mm512_cvtsepi32_epi8(q), _mm_set1_epi8(char(0x80)));  // a + 128
    _mm_mask_storeu_epi8(dst, m, bytes);
  }
};

struct Avx2Int8 {
  using F = Avx2;
  using Acc = __m256i;
  static constexpr int kWidth = 8;
  static constexpr bool kUnsignedA = false;
  FASTDIFF_AVX2 static inline Acc zero() { return _mm256_setzero_si256(); }
  FASTDIFF_AVX2 static inline Acc load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  FASTDIFF_AVX2 static inline void store(void* p, Acc a) { _mm256_storeu_si256(static_cast<__m256i*>(p), a); }
  FASTDIFF_AVX2 static inline Acc broadcast4(const int8_t* a) {
    int32_t four;
    std::memcpy(&four, a, 4);
    return _mm256_set1_epi32(four);
  }
  FASTDIFF_AVX2 static inline Acc dot4(Acc acc, Acc a, Acc w) {
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(w, a));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  FASTDIFF_AVX2 static inline Acc sub(Acc a, Acc b) { return _mm256_sub_epi32(a, b); }
  FASTDIFF_AVX2 static inline F::Reg to_float(Acc a) { return _mm256_cvtepi32_ps(a); }
  FASTDIFF_AVX2 static inline void quantize(int8_t* dst, F::Reg v, F::Tail n) {
    const __m256i q = _mm256_cvtps_epi32(v);
    const __m256i words = _mm256_packs_epi32(q, q);            // per 128-bit half: 4 int16, twice
    const __m256i bytes = _mm256_packs_epi16(words, words);    // per half: 4 int8 in its low 32 bits
    const int32_t low = _mm_cvtsi128_si32(_mm256_castsi256_si128(bytes));
    const int32_t high = _mm_cvtsi128_si32(_mm256_extracti128_si256(bytes, 1));
    int8_t buf[8];
    std::memcpy(buf, &low, 4);
    std::memcpy(buf + 4, &high, 4);
    std::memcpy(dst, buf, n);
  }
};

}  // namespace fastdiff::vec
