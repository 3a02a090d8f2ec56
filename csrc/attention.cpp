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
//   AVX-512 / AVX2, fp32 (and bf16 inputs converted to fp32 up front): attention_flash.h. A long,
//     head-interleaved K/V is first copied per head (rows D apart stream faster from L2).
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
#include <vector>

#include "common.h"
#include "cpu_features.h"
#include "registry.h"

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

// 2^f on [-0.5, 0.5] (least squares on Chebyshev nodes): degree 5, relative error 1.1e-7, for
// fp32 results; degree 3, 1.2e-4, where P is rounded to bf16 (2^-9) right after.
constexpr float kExp2Deg5[] = {1.f, 0.6931468844f, 0.2402223796f, 0.0555089302f, 0.0096717076f, 0.0013218677f};
constexpr float kExp2Deg3[] = {1.f, 0.6933686733f, 0.2422183752f, 0.0545928292f};

template <int kDegree>
constexpr const float* exp2_coefficients() {
  static_assert(kDegree == 3 || kDegree == 5);
  return kDegree == 5 ? kExp2Deg5 : kExp2Deg3;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Each SIMD level is a `#pragma GCC target` region of its own (no -march flags: one binary for
// every x86-64 CPU); attention_flash.h is included once per region with that region's Vec.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace avx512 {
namespace {

struct Vec {
  using Reg = __m512;
  static constexpr int kWidth = 16;
  static constexpr int kMaxRows = 12;  // 12 x 2 accumulators + 2 B vectors + 1 broadcast of 32 zmm
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg set1(float x) { return _mm512_set1_ps(x); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Reg x) { _mm512_storeu_ps(p, x); }
  static Reg broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }
  // 2^x for x <= ~0: split x = n + f, polynomial for 2^f, vscalefps for the 2^n.
  template <int kDegree = 5>
  static Reg exp2(Reg x) {
    constexpr const float* c = exp2_coefficients<kDegree>();
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
    const Reg n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const Reg f = _mm512_sub_ps(x, n);
    Reg poly = _mm512_set1_ps(c[kDegree]);
    for (int i = kDegree - 1; i >= 0; --i) poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(poly, n);
  }
};

// Vectorised overloads of the header's scalar pack / store for fp32 (picked by overload resolution).
void pack_q_f32(const Problem& p, const float* q, int64_t valid, float* qt);
void store_output(const Problem& p, const float* o, const float* l, int64_t valid, float* out);

#include "attention_flash.h"

// In-register transpose of a 16 x 16 block of 32-bit elements (fp32, or pairs of bf16).
__attribute__((always_inline)) inline void transpose16(__m512 r[16]) {
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
// block: dst[w·kBlockQ + i] = src_i[w] ^ sign; queries past `valid` become zeros.
inline void transpose_in(const float* src, int64_t row_stride, int64_t words, int64_t valid, uint32_t sign, float* dst) {
  const __m512 flip = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(sign)));
  for (int half = 0; half < kQueryVecs; ++half) {
    const int64_t i0 = half * Vec::kWidth, rows = std::clamp<int64_t>(valid - i0, 0, Vec::kWidth);
    for (int64_t w0 = 0; w0 < words; w0 += 16) {
      const int64_t cols = std::min<int64_t>(16, words - w0);
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_maskz_loadu_ps(first_lanes(cols), src + (i0 + i) * row_stride + w0) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t c = 0; c < cols; ++c) _mm512_storeu_ps(dst + (w0 + c) * kBlockQ + i0, _mm512_xor_ps(r[c], flip));
    }
  }
}

// Columns of the block scaled per query -> rows: calls emit(i, d0, mask, row of 16 fp32).
template <class Emit>
inline void transpose_out(const float* o, const float* l, bool normalise, int64_t D, int64_t valid, Emit&& emit) {
  for (int half = 0; half < kQueryVecs; ++half) {
    const int64_t i0 = half * Vec::kWidth, rows = std::clamp<int64_t>(valid - i0, 0, Vec::kWidth);
    if (rows == 0) continue;
    const __m512 inv = normalise ? _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_loadu_ps(l + i0)) : _mm512_set1_ps(1.f);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int64_t cols = std::min<int64_t>(16, D - d0);
      __m512 r[16];
      for (int c = 0; c < 16; ++c) r[c] = c < cols ? _mm512_mul_ps(_mm512_loadu_ps(o + (d0 + c) * kBlockQ + i0), inv) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t i = 0; i < rows; ++i) emit(i0 + i, d0, first_lanes(cols), r[i]);
    }
  }
}

void pack_q_f32(const Problem& p, const float* q, int64_t valid, float* qt) {
  transpose_in(q, p.q_sl, p.D, valid, p.negate_q ? 0x80000000u : 0u, qt);
}

void store_output(const Problem& p, const float* o, const float* l, int64_t valid, float* out) {
  transpose_out(o, l, !p.relu, p.D, valid, [&](int64_t i, int64_t d0, __mmask16 mask, __m512 row) {
    _mm512_mask_storeu_ps(out + i * p.H * p.D + d0, mask, row);
  });
}

}  // namespace
}  // namespace avx512
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// bf16 x bf16 -> fp32 dot products (vdpbf16ps). Reuses the AVX-512 softmax / store helpers.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
namespace avx512 {
namespace {

inline __m512bh as_pairs(__m512i x) { return (__m512bh)x; }

inline uint32_t load_pair(const uint16_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return bits;
}

// Like tile_f32, with B in VNNI pairs (B2[t][i] = {B[2t][i], B[2t+1][i]}, kBlockQ pairs a row)
// and A(r, pair t) = the two bf16 at a[r·a_row + t·a_step]. odd_tail: one more step that uses
// only the first element of A's pair (head dim D odd; the packed Q has a zero there).
template <int R, bool kAccumulate>
inline void tile_bf16(const uint16_t* a, int64_t a_row, int64_t a_step, const uint16_t* b, int64_t pairs,
                      bool odd_tail, float* c, const Reg* alpha) {
  Reg acc[R][kQueryVecs];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < kQueryVecs; ++q) acc[r][q] = Vec::zero();
  auto step = [&](int64_t t, auto load_a) {
    __m512i bv[kQueryVecs];
    for (int q = 0; q < kQueryVecs; ++q) bv[q] = _mm512_loadu_si512(b + (t * kBlockQ + q * Vec::kWidth) * 2);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(load_a(a + r * a_row + t * a_step)));
      for (int q = 0; q < kQueryVecs; ++q) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], as_pairs(av), as_pairs(bv[q]));
    }
  };
  for (int64_t t = 0; t < pairs; ++t) step(t, load_pair);
  if (odd_tail) step(pairs, [](const uint16_t* p) { return uint32_t{*p}; });
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < kQueryVecs; ++q) {
      float* dst = c + r * kBlockQ + q * Vec::kWidth;
      Vec::store(dst, kAccumulate ? Vec::fma(Vec::load(dst), alpha[q], acc[r][q]) : acc[r][q]);
    }
}

template <bool kAccumulate, int R = Vec::kMaxRows>
inline void tile_bf16_rows(int rows, const uint16_t* a, int64_t a_row, int64_t a_step, const uint16_t* b,
                           int64_t pairs, bool odd_tail, float* c, const Reg* alpha) {
  if constexpr (R > 1)
    if (rows < R)
      return tile_bf16_rows<kAccumulate, R - 1>(rows, a, a_row, a_step, b, pairs, odd_tail, c, alpha);
  tile_bf16<R, kAccumulate>(a, a_row, a_step, b, pairs, odd_tail, c, alpha);
}

// Qt2[d / 2][i][d % 2] = ±q_i[d]: a transpose of 32-bit pairs; zeros for padding queries and
// the odd-D tail (done element by element: a pair load would read past the row).
inline void pack_q_bf16(const Problem& p, const uint16_t* q, int64_t valid, uint16_t* qt) {
  if (!(p.D & 1) && !(p.q_sl & 1)) {
    transpose_in(reinterpret_cast<const float*>(q), p.q_sl / 2, p.D / 2, valid, p.negate_q ? 0x80008000u : 0u,
                 reinterpret_cast<float*>(qt));
    return;
  }
  const uint16_t sign = p.negate_q ? 0x8000 : 0;
  std::memset(qt, 0, (p.D + 1) / 2 * kBlockQ * 2 * sizeof(uint16_t));
  for (int64_t i = 0; i < valid; ++i)
    for (int64_t d = 0; d < p.D; ++d) qt[((d >> 1) * kBlockQ + i) * 2 + (d & 1)] = q[i * p.q_sl + d] ^ sign;
}

inline void store_output_bf16(const Problem& p, const float* o, const float* l, int64_t valid, uint16_t* out) {
  transpose_out(o, l, !p.relu, p.D, valid, [&](int64_t i, int64_t d0, __mmask16 mask, __m512 row) {
    _mm256_mask_storeu_epi16(out + i * p.H * p.D + d0, mask, (__m256i)_mm512_cvtneps_pbh(row));
  });
}

// P (nk x kBlockQ fp32) -> bf16 pairs, Pw[j / 2][i][j % 2]; an odd last key is paired with zeros.
inline void pack_p_pairs(const float* s, int64_t nk, uint16_t* pw) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t j = 0; j < nk; j += 2)
    for (int q = 0; q < kQueryVecs; ++q) {
      const Reg p0 = Vec::load(s + j * kBlockQ + q * Vec::kWidth);
      const Reg p1 = j + 1 < nk ? Vec::load(s + (j + 1) * kBlockQ + q * Vec::kWidth) : Vec::zero();
      const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);  // p0 in the low 16, p1 in the high 16
      _mm512_storeu_si512(pw + (j * kBlockQ + q * Vec::kWidth * 2), _mm512_permutexvar_epi16(interleave, halves));
    }
}

// One head's V (rows `row_stride` apart) in VNNI pairs: out[j / 2][d][j % 2], an odd Lk padded
// with a zero key. Interleaves two rows 32 head-dim entries at a time.
void pack_v_pairs_head(const uint16_t* v, int64_t row_stride, int64_t Lk, int64_t D, uint16_t* out) {
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
void flash_bf16(const Problem& p, const uint16_t* k, int64_t k_sb, int64_t k_sl, int64_t k_sh, const uint16_t* v,
                int64_t v_sb, int64_t v_sl, int64_t v_sh, int64_t begin, int64_t end) {
  const int64_t d_pairs = (p.D + 1) / 2, head_pairs_size = (p.Lk + 1) / 2 * p.D * 2;
  const int64_t packed_heads = p.heads_inner ? p.H : 1;
  Scratch<uint16_t> qt(d_pairs * kBlockQ * 2), pw((p.block_k + 1) / 2 * kBlockQ * 2), vp(packed_heads * head_pairs_size);
  ScratchF32 s(p.block_k * kBlockQ), o(p.D * kBlockQ), m(kBlockQ), l(kBlockQ);
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
    const int64_t q0 = qb * kBlockQ, valid = std::min<int64_t>(kBlockQ, p.Lq - q0);
    pack_q_bf16(p, static_cast<const uint16_t*>(p.q) + b * p.q_sb + q0 * p.q_sl + h * p.q_sh, valid, qt.data());
    const uint16_t* kbh = k + b * k_sb + h * k_sh;
    const uint16_t* vbh = vp.data() + (p.heads_inner ? h : 0) * head_pairs_size;
    for (int64_t j0 = 0; j0 < p.Lk; j0 += p.block_k) {
      const int64_t nk = std::min(p.block_k, p.Lk - j0);
      const bool first = j0 == 0;
      for_each_row_tile(nk, Vec::kMaxRows, [&](int64_t r0, int rows) {
        tile_bf16_rows<false>(rows, kbh + (j0 + r0) * k_sl, k_sl, 2, qt.data(), p.D / 2, p.D & 1,
                              s.data() + r0 * kBlockQ, nullptr);
      });
      Reg alpha[kQueryVecs];
      if (p.relu) relu_block(s.data(), nk, p.relu_scale, alpha);
      else softmax_block<3>(s.data(), nk, m.data(), l.data(), alpha, first, p.exp2_scale);
      pack_p_pairs(s.data(), nk, pw.data());
      for_each_row_tile(p.D, Vec::kMaxRows, [&](int64_t d0, int rows) {
        const uint16_t* va = vbh + ((j0 / 2) * p.D + d0) * 2;
        const int64_t pairs = (nk + 1) / 2;
        if (first) tile_bf16_rows<false>(rows, va, 2, 2 * p.D, pw.data(), pairs, false, o.data() + d0 * kBlockQ, nullptr);
        else tile_bf16_rows<true>(rows, va, 2, 2 * p.D, pw.data(), pairs, false, o.data() + d0 * kBlockQ, alpha);
      });
    }
    store_output_bf16(p, o.data(), l.data(), valid, static_cast<uint16_t*>(p.out) + ((b * p.Lq + q0) * p.H + h) * p.D);
  }
}

}  // namespace
}  // namespace avx512
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
namespace {

struct Vec {
  using Reg = __m256;
  static constexpr int kWidth = 8;
  static constexpr int kMaxRows = 6;  // 6 x 2 accumulators + 2 B vectors + 1 broadcast of 16 ymm
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg set1(float x) { return _mm256_set1_ps(x); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Reg x) { _mm256_storeu_ps(p, x); }
  static Reg broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm256_max_ps(a, b); }
  // 2^x for x <= ~0: polynomial for the fraction, exponent bits built from the integer part.
  template <int kDegree = 5>
  static Reg exp2(Reg x) {
    constexpr const float* c = exp2_coefficients<kDegree>();
    x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));
    const Reg n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const Reg f = _mm256_sub_ps(x, n);
    Reg poly = _mm256_set1_ps(c[kDegree]);
    for (int i = kDegree - 1; i >= 0; --i) poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(c[i]));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(poly, _mm256_castsi256_ps(bits));
  }
};

#include "attention_flash.h"

}  // namespace
}  // namespace avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
namespace {

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
    p.q_blocks = (Lq + avx512::kBlockQ - 1) / avx512::kBlockQ;
    const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<bf16>());
    const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<bf16>());
    at::parallel_for(0, B * H * p.q_blocks, 1, [&](int64_t begin, int64_t end) {
      avx512::flash_bf16(p, kp, k.stride(0), k.stride(1), k.stride(2), vp, v.stride(0), v.stride(1), v.stride(2),
                         begin, end);
    });
    return out;
  }

  // fp32 SIMD paths; bf16 inputs without BF16 dot products are converted to fp32 first.
  const KeysF32 kf = keys_f32(k);
  const KeysF32 vf = shared_kv ? kf : keys_f32(v);
  const bool wide = level >= Simd::kAvx512;
  p.q_blocks = wide ? (Lq + avx512::kBlockQ - 1) / avx512::kBlockQ : (Lq + avx2::kBlockQ - 1) / avx2::kBlockQ;
  at::parallel_for(0, B * H * p.q_blocks, 1, [&](int64_t begin, int64_t end) {
    if (wide && is_bf16) avx512::flash_f32<bf16>(p, kf.data, vf.data, kf.sb, kf.sl, kf.sh, vf.sb, vf.sl, vf.sh, begin, end);
    else if (wide) avx512::flash_f32<float>(p, kf.data, vf.data, kf.sb, kf.sl, kf.sh, vf.sb, vf.sl, vf.sh, begin, end);
    else if (is_bf16) avx2::flash_f32<bf16>(p, kf.data, vf.data, kf.sb, kf.sl, kf.sh, vf.sb, vf.sl, vf.sh, begin, end);
    else avx2::flash_f32<float>(p, kf.data, vf.data, kf.sb, kf.sl, kf.sh, vf.sb, vf.sl, vf.sh, begin, end);
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
