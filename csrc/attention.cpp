// attention(q, k, v, scale, relu): multi-head attention on the CPU, flash style.
//
//   out[b, i, h] = Σ_j w(q_i · k_j) v_j  with  w = softmax_j(scale · q_i · k_j)
//                                          or  w = relu(scale · q_i · k_j) / Lk   (relu=true)
//
// q: (B, Lq, H, D), k, v: (B, Lk, H, D), any strides with a unit last one (slices of a fused QKV
// projection are read in place); v absent = shared K/V. Output (B, Lq, H, D) contiguous.
//
// Work items are (batch, head, block of BQ queries), split over threads with at::parallel_for.
// A block keeps its queries' running max / sum and a D x BQ fp32 accumulator in L1 and streams
// K and V in blocks of BK keys (online softmax; no Lq x Lk matrix anywhere). Lk <= 256 (e.g. 77
// text tokens) is a single block: the exact softmax in one pass, no rescaling. Memory traffic:
// Q and out once, K and V once per query block (L2-resident for the SD / MobileDiffusion sizes).
//
// Paths, chosen at run time (fastdiff::simd()):
//   AVX-512 + BF16, bf16 inputs: S = Q·Kᵀ and O += P·V with vdpbf16ps (fp32 accumulation); Q and
//     V are packed into VNNI pairs (Q per block, V about once per head, in per-thread scratch), K
//     is read in place because its pairs run along D; P is rounded to bf16 for the second product,
//     like FlashAttention.
//   AVX-512 / AVX2, fp32 (and bf16 inputs converted to fp32 up front): flash_f32, written once
//     over vec.h's Vec traits. A long, head-interleaved K/V is first copied per head (rows D apart
//     stream faster from L2).
//   Scalar (CPUs without AVX2): one query row at a time.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_features.h"
#include "registry.h"
#include "vec.h"

namespace fastdiff {
namespace {

using bf16 = at::BFloat16;

// Shapes, strides (in elements) and the scalars the kernels need; shared by every path.
struct Problem {
  int64_t B, Lq, Lk, H, D;
  const void* q;
  int64_t q_sb, q_sl, q_sh;
  void* out;           // (B, Lq, H, D), contiguous
  float exp2_scale;    // |scale|·log2(e): softmax weights are 2^((s - max s)·exp2_scale)
  float relu_scale;    // |scale| / Lk
  bool negate_q;       // scale < 0: Q is negated while packed (exact), so kernels see |scale|
  bool relu;
  int64_t block_k;     // keys per block: Lk when Lk <= kSinglePassKeys (one exact pass), else even
  int64_t q_blocks;    // ceil(Lq / BQ) for the path's BQ
  bool heads_inner;    // work item order (b, q block, h) when every head's K/V fits in L2 together:
                       // neighbouring items then read neighbouring Q rows; else (b, h, q block)

  struct Item {
    int64_t b, h, qb;
  };
  Item item(int64_t index) const {
    if (heads_inner) return {index / (q_blocks * H), index % H, (index / H) % q_blocks};
    return {index / (q_blocks * H), (index / q_blocks) % H, index % q_blocks};
  }
};

// Bytes of K and V (as the kernels read them) of all heads together that still leave L2 room.
constexpr int64_t kHeadsInnerBytes = 512 * 1024;

constexpr int64_t kSinglePassKeys = 256;
constexpr int64_t kFlashBlockKeys = 128;

// 64-byte aligned scratch, one per thread chunk.
template <class T>
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : ptr_(static_cast<T*>(std::aligned_alloc(64, ((n * sizeof(T) + 63) / 64) * 64))) {
    TORCH_CHECK(ptr_ != nullptr, "attention: out of memory for ", n * sizeof(T), " bytes of scratch");
  }
  T* data() { return ptr_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr_;
};
using ScratchF32 = Scratch<float>;

// ---------------------------------------------------------------------------------------------
// Flash attention in fp32 arithmetic, each loop written once over Vec (vec.h: vec::Avx512,
// vec::Avx2) and compiled per ISA through the entry points further down. Everything is
// vectorised over queries, which makes the softmax purely vertical:
//
//   Qt  (D x BQ)      the query block, transposed once per block          (L1)
//   S   (BK x BQ)     S[j][i] = k_j · q_i for one block of BK keys          (L1/L2)
//   O   (D x BQ)      O[d][i] += Σ_j v_j[d] · P[j][i], rescaled by the online-softmax alpha
//
// The two products are the same register-blocked microkernel: R rows of broadcast A elements
// (keys for S, head-dim entries of V for O) times BQ/W query vectors of B, R x BQ/W accumulators.
// K and V are read through their strides (the inputs themselves, or for a long key set with heads
// interleaved a per-head fp32 copy made once per call); each query block streams them once from
// L2: Lk·D·(sizeof K + sizeof V) per block, plus Lq·D in and out in total.

constexpr int kQueryVecs = 2;
template <class V>
constexpr int64_t kBlockQ = V::kWidth * kQueryVecs;  // BQ: queries per block
// Rows of the microkernel: 12 x 2 accumulators + 2 B vectors + 1 broadcast of 32 zmm; 6 x 2 + 2 + 1 of 16 ymm.
template <class V>
constexpr int kMaxRows = std::is_same_v<V, vec::Avx512> ? 12 : 6;

// C[r][:] (=|+=) Σ_t A(r, t) · B[t][:] for r < R, with A(r, t) = a[r·a_row + t·a_step] broadcast
// and B rows of BQ floats. kAccumulate: C = C·alpha + Σ (alpha per query lane).
template <class V, int R, bool kAccumulate>
inline void tile_f32(const float* a, int64_t a_row, int64_t a_step, const float* b, int64_t steps, float* c,
                     const typename V::Reg* alpha) {
  using Reg = typename V::Reg;
  Reg acc[R][kQueryVecs];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < kQueryVecs; ++q) acc[r][q] = V::zero();
  for (int64_t t = 0; t < steps; ++t) {
    Reg bv[kQueryVecs];
    for (int q = 0; q < kQueryVecs; ++q) bv[q] = V::load(b + t * kBlockQ<V> + q * V::kWidth);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const Reg av = V::set1(a[r * a_row + t * a_step]);
      for (int q = 0; q < kQueryVecs; ++q) acc[r][q] = V::fma(av, bv[q], acc[r][q]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < kQueryVecs; ++q) {
      float* dst = c + r * kBlockQ<V> + q * V::kWidth;
      V::store(dst, kAccumulate ? V::fma(V::load(dst), alpha[q], acc[r][q]) : acc[r][q]);
    }
}

// Runtime row count (1..kMaxRows) -> compile-time tile.
template <class V, bool kAccumulate, int R = kMaxRows<V>>
inline void tile_f32_rows(int rows, const float* a, int64_t a_row, int64_t a_step, const float* b, int64_t steps,
                          float* c, const typename V::Reg* alpha) {
  if constexpr (R > 1)
    if (rows < R) return tile_f32_rows<V, kAccumulate, R - 1>(rows, a, a_row, a_step, b, steps, c, alpha);
  tile_f32<V, R, kAccumulate>(a, a_row, a_step, b, steps, c, alpha);
}

// Splits n rows into ceil(n / max_rows) tiles of near-equal height (77 keys -> 7 x 11, not 6 x 12 + 5).
template <class Fn>
inline void for_each_row_tile(int64_t n, int max_rows, Fn&& fn) {
  const int64_t tiles = (n + max_rows - 1) / max_rows;
  const int64_t base = n / tiles, extra = n % tiles;
  for (int64_t t = 0, start = 0; t < tiles; ++t) {
    const int rows = static_cast<int>(base + (t < extra));
    fn(start, rows);
    start += rows;
  }
}

// Online softmax over one S block, in place: S becomes P = 2^((s - m)·c); m, l, alpha per query.
// c = |scale|·log2(e): Q carries the sign of the scale, so the exponent is never positive.
// kExpDegree: polynomial degree of 2^x (vec.h's exp2).
template <class V, int kExpDegree>
inline void softmax_block(float* s, int64_t nk, float* m, float* l, typename V::Reg* alpha, bool first, float c) {
  using Reg = typename V::Reg;
  const Reg cv = V::set1(c);
  for (int q = 0; q < kQueryVecs; ++q) {
    float* col = s + q * V::kWidth;
    const Reg m_old = V::load(m + q * V::kWidth);
    Reg mx = first ? V::set1(-std::numeric_limits<float>::infinity()) : m_old;
    for (int64_t j = 0; j < nk; ++j) mx = V::max(mx, V::load(col + j * kBlockQ<V>));
    const Reg neg_mc = V::mul(mx, V::set1(-c));
    Reg sum0 = V::zero(), sum1 = V::zero();
    int64_t j = 0;
    for (; j + 1 < nk; j += 2) {  // two independent exp chains
      const Reg p0 = V::template exp2<kExpDegree>(V::fma(V::load(col + j * kBlockQ<V>), cv, neg_mc));
      const Reg p1 = V::template exp2<kExpDegree>(V::fma(V::load(col + (j + 1) * kBlockQ<V>), cv, neg_mc));
      sum0 = V::add(sum0, p0);
      sum1 = V::add(sum1, p1);
      V::store(col + j * kBlockQ<V>, p0);
      V::store(col + (j + 1) * kBlockQ<V>, p1);
    }
    if (j < nk) {
      const Reg p0 = V::template exp2<kExpDegree>(V::fma(V::load(col + j * kBlockQ<V>), cv, neg_mc));
      sum0 = V::add(sum0, p0);
      V::store(col + j * kBlockQ<V>, p0);
    }
    const Reg sum = V::add(sum0, sum1);
    if (first) {
      V::store(l + q * V::kWidth, sum);
    } else {
      alpha[q] = V::template exp2<kExpDegree>(V::mul(V::sub(m_old, mx), cv));
      V::store(l + q * V::kWidth, V::fma(V::load(l + q * V::kWidth), alpha[q], sum));
    }
    V::store(m + q * V::kWidth, mx);
  }
}

// ReLU attention weights in place: P = max(s, 0)·|scale|/Lk (Q carries the sign of the scale).
template <class V>
inline void relu_block(float* s, int64_t nk, float weight, typename V::Reg* alpha) {
  const auto w = V::set1(weight);
  for (int64_t j = 0; j < nk * kQueryVecs; ++j)
    V::store(s + j * V::kWidth, V::mul(V::max(V::load(s + j * V::kWidth), V::zero()), w));
  for (int q = 0; q < kQueryVecs; ++q) alpha[q] = V::set1(1.f);
}

// ---------------------------------------------------------------------------------------------
// AVX-512 only: the query block moved in and out through 16 x 16 in-register transposes (fp32
// queries and outputs of both AVX-512 paths; pairs of bf16 queries of the BF16 path).
constexpr int64_t kBlockQ512 = kBlockQ<vec::Avx512>;

// In-register transpose of a 16 x 16 block of 32-bit elements (fp32, or pairs of bf16).
FASTDIFF_INLINE_AVX512 void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

// Rows of `words` 32-bit elements (one per query, row stride `row_stride`) -> columns of the
// block: dst[w·BQ + i] = src_i[w] ^ sign; queries past `valid` become zeros.
FASTDIFF_AVX512 inline void transpose_in(const float* src, int64_t row_stride, int64_t words, int64_t valid,
                                         uint32_t sign, float* dst) {
  const __m512 flip = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(sign)));
  for (int half = 0; half < kQueryVecs; ++half) {
    const int64_t i0 = half * 16, rows = std::clamp<int64_t>(valid - i0, 0, 16);
    for (int64_t w0 = 0; w0 < words; w0 += 16) {
      const int64_t cols = std::min<int64_t>(16, words - w0);
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_maskz_loadu_ps(first_lanes(cols), src + (i0 + i) * row_stride + w0) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t c = 0; c < cols; ++c) _mm512_storeu_ps(dst + (w0 + c) * kBlockQ512 + i0, _mm512_xor_ps(r[c], flip));
    }
  }
}

// Columns of the block scaled per query -> rows: calls emit(i, d0, mask, row of 16 fp32), which
// carries the AVX-512 target itself (a lambda does not inherit its function's).
template <class Emit>
FASTDIFF_AVX512 inline void transpose_out(const float* o, const float* l, bool normalise, int64_t D, int64_t valid,
                                          Emit&& emit) {
  for (int half = 0; half < kQueryVecs; ++half) {
    const int64_t i0 = half * 16, rows = std::clamp<int64_t>(valid - i0, 0, 16);
    if (rows == 0) continue;
    const __m512 inv = normalise ? _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_loadu_ps(l + i0)) : _mm512_set1_ps(1.f);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int64_t cols = std::min<int64_t>(16, D - d0);
      __m512 r[16];
      for (int c = 0; c < 16; ++c)
        r[c] = c < cols ? _mm512_mul_ps(_mm512_loadu_ps(o + (d0 + c) * kBlockQ512 + i0), inv) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t i = 0; i < rows; ++i) emit(i0 + i, d0, first_lanes(cols), r[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The query block in and out of the fp32 paths: Qt[d][i] = ±q_i[d] for the valid queries, zeros
// for the padding ones; out row i = O[:, i] / l[i] (softmax) or O[:, i] (relu), rounded once to
// the output dtype. fp32 on AVX-512 goes through the transposes, the rest element by element.
template <class V, class In>
inline void pack_q_f32(const Problem& p, const In* q, int64_t valid, float* qt) {
  if constexpr (std::is_same_v<V, vec::Avx512> && std::is_same_v<In, float>) {
    transpose_in(q, p.q_sl, p.D, valid, p.negate_q ? 0x80000000u : 0u, qt);
  } else {
    const float sign = p.negate_q ? -1.f : 1.f;
    for (int64_t d = 0; d < p.D; ++d) {
      for (int64_t i = 0; i < valid; ++i) qt[d * kBlockQ<V> + i] = sign * static_cast<float>(q[i * p.q_sl + d]);
      for (int64_t i = valid; i < kBlockQ<V>; ++i) qt[d * kBlockQ<V> + i] = 0.f;
    }
  }
}

template <class V, class Out>
inline void store_output(const Problem& p, const float* o, const float* l, int64_t valid, Out* out) {
  if constexpr (std::is_same_v<V, vec::Avx512> && std::is_same_v<Out, float>) {
    transpose_out(o, l, !p.relu, p.D, valid, [&](int64_t i, int64_t d0, __mmask16 mask, __m512 row) FASTDIFF_AVX512 {
      _mm512_mask_storeu_ps(out + i * p.H * p.D + d0, mask, row);
    });
  } else {
    for (int64_t i = 0; i < valid; ++i) {
      const float inv = p.relu ? 1.f : 1.f / l[i];
      Out* row = out + i * p.H * p.D;
      for (int64_t d = 0; d < p.D; ++d) row[d] = static_cast<Out>(o[d * kBlockQ<V> + i] * inv);
    }
  }
}

// Work items [begin, end) of (batch, head, query block); K and V are fp32 (converted beforehand
// when the inputs are bf16), Q and the output have the input dtype.
template <class V, class In>
inline void flash_f32(const Problem& p, const float* k, const float* v, int64_t k_sb, int64_t k_sl, int64_t k_sh,
                      int64_t v_sb, int64_t v_sl, int64_t v_sh, int64_t begin, int64_t end) {
  constexpr int64_t BQ = kBlockQ<V>;
  ScratchF32 qt(p.D * BQ), s(p.block_k * BQ), o(p.D * BQ), m(BQ), l(BQ);
  for (int64_t item = begin; item < end; ++item) {
    const auto [b, h, qb] = p.item(item);
    const int64_t q0 = qb * BQ, valid = std::min<int64_t>(BQ, p.Lq - q0);
    pack_q_f32<V>(p, static_cast<const In*>(p.q) + b * p.q_sb + q0 * p.q_sl + h * p.q_sh, valid, qt.data());
    const float* kbh = k + b * k_sb + h * k_sh;
    const float* vbh = v + b * v_sb + h * v_sh;
    for (int64_t j0 = 0; j0 < p.Lk; j0 += p.block_k) {
      const int64_t nk = std::min(p.block_k, p.Lk - j0);
      const bool first = j0 == 0;
      for_each_row_tile(nk, kMaxRows<V>, [&](int64_t r0, int rows) {
        tile_f32_rows<V, false>(rows, kbh + (j0 + r0) * k_sl, k_sl, 1, qt.data(), p.D, s.data() + r0 * BQ, nullptr);
      });
      typename V::Reg alpha[kQueryVecs];
      if (p.relu) relu_block<V>(s.data(), nk, p.relu_scale, alpha);
      else softmax_block<V, 5>(s.data(), nk, m.data(), l.data(), alpha, first, p.exp2_scale);
      for_each_row_tile(p.D, kMaxRows<V>, [&](int64_t d0, int rows) {
        const float* va = vbh + j0 * v_sl + d0;
        if (first) tile_f32_rows<V, false>(rows, va, 1, v_sl, s.data(), nk, o.data() + d0 * BQ, nullptr);
        else tile_f32_rows<V, true>(rows, va, 1, v_sl, s.data(), nk, o.data() + d0 * BQ, alpha);
      });
    }
    store_output<V>(p, o.data(), l.data(), valid, static_cast<In*>(p.out) + ((b * p.Lq + q0) * p.H + h) * p.D);
  }
}

template <class In>
FASTDIFF_AVX512 FASTDIFF_FLATTEN void flash_f32_avx512(const Problem& p, const float* k, const float* v, int64_t k_sb,
                                                       int64_t k_sl, int64_t k_sh, int64_t v_sb, int64_t v_sl,
                                                       int64_t v_sh, int64_t begin, int64_t end) {
  flash_f32<vec::Avx512, In>(p, k, v, k_sb, k_sl, k_sh, v_sb, v_sl, v_sh, begin, end);
}

template <class In>
FASTDIFF_AVX2 FASTDIFF_FLATTEN void flash_f32_avx2(const Problem& p, const float* k, const float* v, int64_t k_sb,
                                                   int64_t k_sl, int64_t k_sh, int64_t v_sb, int64_t v_sl, int64_t v_sh,
                                                   int64_t begin, int64_t end) {
  flash_f32<vec::Avx2, In>(p, k, v, k_sb, k_sl, k_sh, v_sb, v_sl, v_sh, begin, end);
}

// ---------------------------------------------------------------------------------------------
// bf16 x bf16 -> fp32 dot products (vdpbf16ps), AVX-512 BF16 only; softmax and ReLU weights as
// in the fp32 paths (vec::Avx512).
using Avx512 = vec::Avx512;

inline uint32_t load_pair(const uint16_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return bits;
}

// Like tile_f32, with B in VNNI pairs (B2[t][i] = {B[2t][i], B[2t+1][i]}, BQ pairs a row)
// and A(r, pair t) = the two bf16 at a[r·a_row + t·a_step]. odd_tail: one more step that uses
// only the first element of A's pair (head dim D odd; the packed Q has a zero there).
template <int R, bool kAccumulate>
FASTDIFF_AVX512BF16 inline void tile_bf16(const uint16_t* a, int64_t a_row, int64_t a_step, const uint16_t* b,
                                          int64_t pairs, bool odd_tail, float* c, const __m512* alpha) {
  __m512 acc[R][kQueryVecs];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < kQueryVecs; ++q) acc[r][q] = Avx512::zero();
  auto step = [&](int64_t t, auto load_a) FASTDIFF_AVX512BF16 {
    __m512i bv[kQueryVecs];
    for (int q = 0; q < kQueryVecs; ++q) bv[q] = _mm512_loadu_si512(b + (t * kBlockQ512 + q * Avx512::kWidth) * 2);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(load_a(a + r * a_row + t * a_step)));
      for (int q = 0; q < kQueryVecs; ++q) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], (__m512bh)av, (__m512bh)bv[q]);
    }
  };
  for (int64_t t = 0; t < pairs; ++t) step(t, load_pair);
  if (odd_tail) step(pairs, [](const uint16_t* p) { return uint32_t{*p}; });
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < kQueryVecs; ++q) {
      float* dst = c + r * kBlockQ512 + q * Avx512::kWidth;
      Avx512::store(dst, kAccumulate ? Avx512::fma(Avx512::load(dst), alpha[q], acc[r][q]) : acc[r][q]);
    }
}

template <bool kAccumulate, int R = kMaxRows<Avx512>>
FASTDIFF_AVX512BF16 inline void tile_bf16_rows(int rows, const uint16_t* a, int64_t a_row, int64_t a_step,
                                               const uint16_t* b, int64_t pairs, bool odd_tail, float* c,
                                               const __m512* alpha) {
  if constexpr (R > 1)
    if (rows < R)
      return tile_bf16_rows<kAccumulate, R - 1>(rows, a, a_row, a_step, b, pairs, odd_tail, c, alpha);
  tile_bf16<R, kAccumulate>(a, a_row, a_step, b, pairs, odd_tail, c, alpha);
}

// Qt2[d / 2][i][d % 2] = ±q_i[d]: a transpose of 32-bit pairs; zeros for padding queries and
// the odd-D tail (done element by element: a pair load would read past the row).
FASTDIFF_AVX512 inline void pack_q_bf16(const Problem& p, const uint16_t* q, int64_t valid, uint16_t* qt) {
  if (!(p.D & 1) && !(p.q_sl & 1)) {
    transpose_in(reinterpret_cast<const float*>(q), p.q_sl / 2, p.D / 2, valid, p.negate_q ? 0x80008000u : 0u,
                 reinterpret_cast<float*>(qt));
    return;
  }
  const uint16_t sign = p.negate_q ? 0x8000 : 0;
  std::memset(qt, 0, (p.D + 1) / 2 * kBlockQ512 * 2 * sizeof(uint16_t));
  for (int64_t i = 0; i < valid; ++i)
    for (int64_t d = 0; d < p.D; ++d) qt[((d >> 1) * kBlockQ512 + i) * 2 + (d & 1)] = q[i * p.q_sl + d] ^ sign;
}

FASTDIFF_AVX512BF16 inline void store_output_bf16(const Problem& p, const float* o, const float* l, int64_t valid,
                                                  uint16_t* out) {
  transpose_out(o, l, !p.relu, p.D, valid, [&](int64_t i, int64_t d0, __mmask16 mask, __m512 row) FASTDIFF_AVX512BF16 {
    _mm256_mask_storeu_epi16(out + i * p.H * p.D + d0, mask, (__m256i)_mm512_cvtneps_pbh(row));
  });
}

// P (nk x BQ fp32) -> bf16 pairs, Pw[j / 2][i][j % 2]; an odd last key is paired with zeros.
FASTDIFF_AVX512BF16 inline void pack_p_pairs(const float* s, int64_t nk, uint16_t* pw) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t j = 0; j < nk; j += 2)
    for (int q = 0; q < kQueryVecs; ++q) {
      const __m512 p0 = Avx512::load(s + j * kBlockQ512 + q * Avx512::kWidth);
      const __m512 p1 = j + 1 < nk ? Avx512::load(s + (j + 1) * kBlockQ512 + q * Avx512::kWidth) : Avx512::zero();
      const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);  // p0 in the low 16, p1 in the high 16
      _mm512_storeu_si512(pw + (j * kBlockQ512 + q * Avx512::kWidth * 2), _mm512_permutexvar_epi16(interleave, halves));
    }
}

// One head's V (rows `row_stride` apart) in VNNI pairs: out[j / 2][d][j % 2], an odd Lk padded
// with a zero key. Interleaves two rows 32 head-dim entries at a time.
FASTDIFF_AVX512 inline void pack_v_pairs_head(const uint16_t* v, int64_t row_stride, int64_t Lk, int64_t D,
                                              uint16_t* out) {
  alignas(64) uint16_t low_index[32], high_index[32];
  for (int i = 0; i < 16; ++i) {
    low_index[2 * i] = i, low_index[2 * i + 1] = 32 + i;
    high_index[2 * i] = 16 + i, high_index[2 * i + 1] = 48 + i;
  }
  const __m512i low = _mm512_load_si512(low_index), high = _mm512_load_si512(high_index);
  auto mask = [](int64_t n) { return static_cast<__mmask32>((uint64_t{1} << n) - 1); };
  for (int64_t j = 0; j < Lk; j += 2) {
    const uint16_t* row0 = v + j * row_stride;
    const uint16_t* row1 = row0 + row_stride;
    uint16_t* dst = out + j * D;
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      const int64_t n = std::min<int64_t>(32, D - d0);
      const __m512i a = _mm512_maskz_loadu_epi16(mask(n), row0 + d0);
      const __m512i b = j + 1 < Lk ? _mm512_maskz_loadu_epi16(mask(n), row1 + d0) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi16(dst + 2 * d0, mask(2 * std::min<int64_t>(n, 16)), _mm512_permutex2var_epi16(a, low, b));
      if (n > 16) _mm512_mask_storeu_epi16(dst + 2 * d0 + 32, mask(2 * (n - 16)), _mm512_permutex2var_epi16(a, high, b));
    }
  }
}

// k, v: bf16 with their (batch, key, head) strides; K is read in place. Each thread packs V into
// VNNI pairs in its own scratch when its items reach a new head (heads outer) or a new batch
// (heads inner: all heads at once), so V is packed about once, inside the same parallel region.
FASTDIFF_AVX512BF16 FASTDIFF_FLATTEN void flash_bf16(const Problem& p, const uint16_t* k, int64_t k_sb, int64_t k_sl,
                                                     int64_t k_sh, const uint16_t* v, int64_t v_sb, int64_t v_sl,
                                                     int64_t v_sh, int64_t begin, int64_t end) {
  const int64_t d_pairs = (p.D + 1) / 2, head_pairs_size = (p.Lk + 1) / 2 * p.D * 2;
  const int64_t packed_heads = p.heads_inner ? p.H : 1;
  Scratch<uint16_t> qt(d_pairs * kBlockQ512 * 2), pw((p.block_k + 1) / 2 * kBlockQ512 * 2),
      vp(packed_heads * head_pairs_size);
  ScratchF32 s(p.block_k * kBlockQ512), o(p.D * kBlockQ512), m(kBlockQ512), l(kBlockQ512);
  int64_t packed_unit = -1;  // b (heads inner) or b·H + h whose V is in vp
  for (int64_t item = begin; item < end; ++item) {
    const auto [b, h, qb] = p.item(item);
    const int64_t unit = p.heads_inner ? b : b * p.H + h;
    if (unit != packed_unit) {
      const int64_t h0 = p.heads_inner ? 0 : h;
      for (int64_t i = 0; i < packed_heads; ++i)
        pack_v_pairs_head(v + b * v_sb + (h0 + i) * v_sh, v_sl, p.Lk, p.D, vp.data() + i * head_pairs_size);
      packed_unit = unit;
    }
    const int64_t q0 = qb * kBlockQ512, valid = std::min<int64_t>(kBlockQ512, p.Lq - q0);
    pack_q_bf16(p, static_cast<const uint16_t*>(p.q) + b * p.q_sb + q0 * p.q_sl + h * p.q_sh, valid, qt.data());
    const uint16_t* kbh = k + b * k_sb + h * k_sh;
    const uint16_t* vbh = vp.data() + (p.heads_inner ? h : 0) * head_pairs_size;
    for (int64_t j0 = 0; j0 < p.Lk; j0 += p.block_k) {
      const int64_t nk = std::min(p.block_k, p.Lk - j0);
      const bool first = j0 == 0;
      for_each_row_tile(nk, kMaxRows<Avx512>, [&](int64_t r0, int rows) {
        tile_bf16_rows<false>(rows, kbh + (j0 + r0) * k_sl, k_sl, 2, qt.data(), p.D / 2, p.D & 1,
                              s.data() + r0 * kBlockQ512, nullptr);
      });
      __m512 alpha[kQueryVecs];
      if (p.relu) relu_block<Avx512>(s.data(), nk, p.relu_scale, alpha);
      else softmax_block<Avx512, 3>(s.data(), nk, m.data(), l.data(), alpha, first, p.exp2_scale);
      pack_p_pairs(s.data(), nk, pw.data());
      for_each_row_tile(p.D, kMaxRows<Avx512>, [&](int64_t d0, int rows) {
        const uint16_t* va = vbh + ((j0 / 2) * p.D + d0) * 2;
        const int64_t pairs = (nk + 1) / 2;
        if (first) tile_bf16_rows<false>(rows, va, 2, 2 * p.D, pw.data(), pairs, false, o.data() + d0 * kBlockQ512, nullptr);
        else tile_bf16_rows<true>(rows, va, 2, 2 * p.D, pw.data(), pairs, false, o.data() + d0 * kBlockQ512, alpha);
      });
    }
    store_output_bf16(p, o.data(), l.data(), valid, static_cast<uint16_t*>(p.out) + ((b * p.Lq + q0) * p.H + h) * p.D);
  }
}

// ---------------------------------------------------------------------------------------------
// No SIMD: one query row at a time, exact softmax over a row of Lk scores.
template <class T>
void attention_scalar(const Problem& p, const T* k, int64_t k_sb, int64_t k_sl, int64_t k_sh, const T* v,
                      int64_t v_sb, int64_t v_sl, int64_t v_sh, int64_t begin, int64_t end) {
  std::vector<float> scores(p.Lk), acc(p.D), qrow(p.D);
  const float sign = p.negate_q ? -1.f : 1.f;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t i = row % p.Lq, bh = row / p.Lq, b = bh / p.H, h = bh % p.H;
    const T* q = static_cast<const T*>(p.q) + b * p.q_sb + i * p.q_sl + h * p.q_sh;
    for (int64_t d = 0; d < p.D; ++d) qrow[d] = sign * static_cast<float>(q[d]);
    float max_score = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < p.Lk; ++j) {
      const T* kj = k + b * k_sb + j * k_sl + h * k_sh;
      float dot = 0.f;
      for (int64_t d = 0; d < p.D; ++d) dot += qrow[d] * static_cast<float>(kj[d]);
      scores[j] = dot;
      max_score = std::max(max_score, dot);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < p.Lk; ++j) {
      scores[j] = p.relu ? std::max(scores[j], 0.f) * p.relu_scale : std::exp2((scores[j] - max_score) * p.exp2_scale);
      sum += scores[j];
    }
    const float norm = p.relu ? 1.f : 1.f / sum;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j = 0; j < p.Lk; ++j) {
      const T* vj = v + b * v_sb + j * v_sl + h * v_sh;
      for (int64_t d = 0; d < p.D; ++d) acc[d] += scores[j] * static_cast<float>(vj[d]);
    }
    T* out = static_cast<T*>(p.out) + ((b * p.Lq + i) * p.H + h) * p.D;
    for (int64_t d = 0; d < p.D; ++d) out[d] = static_cast<T>(acc[d] * norm);
  }
}

// K or V as the fp32 kernels read it: rows of D floats, strides per (batch, key, head).
struct KeysF32 {
  at::Tensor storage;
  const float* data;
  int64_t sb, sl, sh;
};

// In place when fp32 and either short (streamed by each query block's single pass) or dense per
// head; otherwise one parallel pass into (B, H, Lk, D) fp32. A long key set is streamed once per
// query block, and rows D apart stream faster than rows H·D apart (-14% time at 4096 x 40 fp32).
KeysF32 keys_f32(const at::Tensor& x) {
  const int64_t B = x.size(0), Lk = x.size(1), H = x.size(2), D = x.size(3);
  const bool is_f32 = x.scalar_type() == at::kFloat;
  if (is_f32 && (Lk <= kSinglePassKeys || x.stride(1) == D))
    return {x, x.data_ptr<float>(), x.stride(0), x.stride(1), x.stride(2)};
  at::Tensor packed = at::empty({B, H, Lk, D}, x.options().dtype(at::kFloat));
  float* dst = packed.data_ptr<float>();
  const float* src_f32 = is_f32 ? x.data_ptr<float>() : nullptr;
  const bf16* src_bf16 = is_f32 ? nullptr : x.data_ptr<bf16>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh)
      for (int64_t j = 0; j < Lk; ++j) {
        float* row = dst + (bh * Lk + j) * D;
        const int64_t offset = (bh / H) * x.stride(0) + j * x.stride(1) + (bh % H) * x.stride(2);
        if (is_f32) std::memcpy(row, src_f32 + offset, D * sizeof(float));
        else for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(src_bf16[offset + d]);
      }
  });
  return {packed, dst, H * Lk * D, D, Lk * D};
}

void check_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  TORCH_CHECK(t.dim() == 4, name, ": expected a rank-4 (batch, seqlen, heads, headdim) tensor, got shape ",
              t.sizes());
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              ": expected float32 or bfloat16, got ", t.scalar_type());
}

at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_in, const std::optional<at::Tensor>& v_opt,
                     double scale, bool relu) {
  check_operand(q_in, "q");
  check_operand(k_in, "k");
  const bool shared_kv = !v_opt.has_value() || !v_opt->defined();
  if (!shared_kv) check_operand(*v_opt, "v");
  const int64_t B = q_in.size(0), Lq = q_in.size(1), H = q_in.size(2), D = q_in.size(3), Lk = k_in.size(1);
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type(), "k: dtype ", k_in.scalar_type(), " differs from q's ",
              q_in.scalar_type());
  TORCH_CHECK(k_in.size(0) == B && k_in.size(2) == H && k_in.size(3) == D, "k: expected (batch=", B,
              ", seqlen_k, heads=", H, ", headdim=", D, ") to match q ", q_in.sizes(), ", got ", k_in.sizes());
  if (!shared_kv) {
    TORCH_CHECK(v_opt->scalar_type() == q_in.scalar_type(), "v: dtype ", v_opt->scalar_type(), " differs from q's ",
                q_in.scalar_type());
    TORCH_CHECK(v_opt->sizes() == k_in.sizes(), "v: expected the shape of k ", k_in.sizes(), ", got ", v_opt->sizes());
  }
  TORCH_CHECK(D >= 8 && D <= 256, "q: head dim must be in 8..256, got ", D);
  TORCH_CHECK(B >= 1 && H >= 1 && Lq >= 1 && Lk >= 1, "q, k: batch, heads and sequence lengths must be >= 1, got q ",
              q_in.sizes(), ", k ", k_in.sizes());
  TORCH_CHECK(std::isfinite(scale), "scale: expected a finite number, got ", scale);

  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in);
  const at::Tensor v = shared_kv ? k : unit_last_stride(*v_opt);
  at::Tensor out = new_output({B, Lq, H, D}, q.options());
  const bool is_bf16 = q.scalar_type() == at::kBFloat16;

  Problem p{};
  p.B = B, p.Lq = Lq, p.Lk = Lk, p.H = H, p.D = D;
  p.q = q.data_ptr(), p.q_sb = q.stride(0), p.q_sl = q.stride(1), p.q_sh = q.stride(2);
  p.out = out.data_ptr();
  p.exp2_scale = static_cast<float>(std::fabs(scale) * M_LOG2E);
  p.relu_scale = static_cast<float>(std::fabs(scale) / static_cast<double>(Lk));
  p.negate_q = scale < 0;
  p.relu = relu;
  p.block_k = Lk <= kSinglePassKeys ? Lk : kFlashBlockKeys;
  p.heads_inner = 2 * H * Lk * D * (is_bf16 && simd() == Simd::kAvx512Bf16 ? 2 : 4) <= kHeadsInnerBytes;

  const Simd level = simd();
  if (level == Simd::kScalar) {
    at::parallel_for(0, B * H * Lq, 1, [&](int64_t begin, int64_t end) {
      if (is_bf16)
        attention_scalar(p, k.data_ptr<bf16>(), k.stride(0), k.stride(1), k.stride(2), v.data_ptr<bf16>(),
                         v.stride(0), v.stride(1), v.stride(2), begin, end);
      else
        attention_scalar(p, k.data_ptr<float>(), k.stride(0), k.stride(1), k.stride(2), v.data_ptr<float>(),
                         v.stride(0), v.stride(1), v.stride(2), begin, end);
    });
    return out;
  }

  if (is_bf16 && level == Simd::kAvx512Bf16) {
    p.q_blocks = (Lq + kBlockQ512 - 1) / kBlockQ512;
    const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<bf16>());
    const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<bf16>());
    at::parallel_for(0, B * H * p.q_blocks, 1, [&](int64_t begin, int64_t end) {
      flash_bf16(p, kp, k.stride(0), k.stride(1), k.stride(2), vp, v.stride(0), v.stride(1), v.stride(2),
                         begin, end);
    });
    return out;
  }

  // fp32 SIMD paths; bf16 inputs without BF16 dot products are converted to fp32 first.
  const KeysF32 kf = keys_f32(k);
  const KeysF32 vf = shared_kv ? kf : keys_f32(v);
  const bool wide = level >= Simd::kAvx512;
  const int64_t block_q = wide ? kBlockQ<vec::Avx512> : kBlockQ<vec::Avx2>;
  p.q_blocks = (Lq + block_q - 1) / block_q;
  at::parallel_for(0, B * H * p.q_blocks, 1, [&](int64_t begin, int64_t end) {
    if (wide && is_bf16) flash_f32_avx512<bf16>(p, kf.data, vf.data, kf.sb, kf.sl, kf.sh, vf.sb, vf.sl, vf.sh, begin, end);
    else if (wide) flash_f32_avx512<float>(p, kf.data, vf.data, kf.sb, kf.sl, kf.sh, vf.sb, vf.sl, vf.sh, begin, end);
    else if (is_bf16) flash_f32_avx2<bf16>(p, kf.data, vf.data, kf.sb, kf.sl, kf.sh, vf.sb, vf.sl, vf.sh, begin, end);
    else flash_f32_avx2<float>(p, kf.data, vf.data, kf.sb, kf.sl, kf.sh, vf.sb, vf.sl, vf.sh, begin, end);
  });
  return out;
}

void bind(pybind11::module_& m) {
  m.def("attention", &attention,
        "attention(q, k, v_or_None, scale, relu) -> (B, Lq, H, D): softmax(scale·q·kᵀ)·v, or "
        "relu(scale·q·kᵀ)·v / Lk; q (B, Lq, H, D), k and v (B, Lk, H, D), v=None for shared K/V.",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("scale"), pybind11::arg("relu"));
}
FASTDIFF_BIND(bind);

}  // namespace
}  // namespace fastdiff
