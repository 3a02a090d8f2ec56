// Flash attention, fp32 arithmetic, written once over a SIMD vector type and compiled once per
// instruction set: attention.cpp includes this file inside `namespace avx512` and `namespace avx2`,
// each under its own `#pragma GCC target`, after defining `Vec` there (so: no include guard, no
// includes). Everything here is vectorised over queries, which makes the softmax purely vertical:
//
//   Qt  (D x BQ)      the query block, transposed once per block          (L1)
//   S   (BK x BQ)     S[j][i] = k_j · q_i for one block of BK keys          (L1/L2)
//   O   (D x BQ)      O[d][i] += Σ_j v_j[d] · P[j][i], rescaled by the online-softmax alpha
//
// The two products are the same register-blocked microkernel: R rows of broadcast A elements
// (keys for S, head-dim entries of V for O) times BQ/W query vectors of B, R x BQ/W accumulators.
// K and V are read through their strides (attention.cpp hands over the inputs themselves, or for a
// long key set with heads interleaved a per-head fp32 copy made once per call); each query block
// streams them once from L2: Lk·D·(sizeof K + sizeof V) per block, plus Lq·D in and out in total.

constexpr int kQueryVecs = 2;
constexpr int kBlockQ = Vec::kWidth * kQueryVecs;
using Reg = Vec::Reg;

// C[r][:] (=|+=) Σ_t A(r, t) · B[t][:] for r < R, with A(r, t) = a[r·a_row + t·a_step] broadcast
// and B rows of kBlockQ floats. kAccumulate: C = C·alpha + Σ (alpha per query lane).
template <int R, bool kAccumulate>
inline void tile_f32(const float* a, int64_t a_row, int64_t a_step, const float* b, int64_t steps,
                     float* c, const Reg* alpha) {
  Reg acc[R][kQueryVecs];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < kQueryVecs; ++q) acc[r][q] = Vec::zero();
  for (int64_t t = 0; t < steps; ++t) {
    Reg bv[kQueryVecs];
    for (int q = 0; q < kQueryVecs; ++q) bv[q] = Vec::load(b + t * kBlockQ + q * Vec::kWidth);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const Reg av = Vec::broadcast(a + r * a_row + t * a_step);
      for (int q = 0; q < kQueryVecs; ++q) acc[r][q] = Vec::fma(av, bv[q], acc[r][q]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < kQueryVecs; ++q) {
      float* dst = c + r * kBlockQ + q * Vec::kWidth;
      Vec::store(dst, kAccumulate ? Vec::fma(Vec::load(dst), alpha[q], acc[r][q]) : acc[r][q]);
    }
}

// Runtime row count (1..kMaxRows) -> compile-time tile.
template <bool kAccumulate, int R = Vec::kMaxRows>
inline void tile_f32_rows(int rows, const float* a, int64_t a_row, int64_t a_step, const float* b,
                          int64_t steps, float* c, const Reg* alpha) {
  if constexpr (R > 1)
    if (rows < R) return tile_f32_rows<kAccumulate, R - 1>(rows, a, a_row, a_step, b, steps, c, alpha);
  tile_f32<R, kAccumulate>(a, a_row, a_step, b, steps, c, alpha);
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
// kExpDegree: polynomial degree of 2^x (see exp2_coefficients).
template <int kExpDegree>
inline void softmax_block(float* s, int64_t nk, float* m, float* l, Reg* alpha, bool first, float c) {
  const Reg cv = Vec::set1(c);
  for (int q = 0; q < kQueryVecs; ++q) {
    float* col = s + q * Vec::kWidth;
    const Reg m_old = Vec::load(m + q * Vec::kWidth);
    Reg mx = first ? Vec::set1(-std::numeric_limits<float>::infinity()) : m_old;
    for (int64_t j = 0; j < nk; ++j) mx = Vec::max(mx, Vec::load(col + j * kBlockQ));
    const Reg neg_mc = Vec::mul(mx, Vec::set1(-c));
    Reg sum0 = Vec::zero(), sum1 = Vec::zero();
    int64_t j = 0;
    for (; j + 1 < nk; j += 2) {  // two independent exp chains
      const Reg p0 = Vec::exp2<kExpDegree>(Vec::fma(Vec::load(col + j * kBlockQ), cv, neg_mc));
      const Reg p1 = Vec::exp2<kExpDegree>(Vec::fma(Vec::load(col + (j + 1) * kBlockQ), cv, neg_mc));
      sum0 = Vec::add(sum0, p0);
      sum1 = Vec::add(sum1, p1);
      Vec::store(col + j * kBlockQ, p0);
      Vec::store(col + (j + 1) * kBlockQ, p1);
    }
    if (j < nk) {
      const Reg p0 = Vec::exp2<kExpDegree>(Vec::fma(Vec::load(col + j * kBlockQ), cv, neg_mc));
      sum0 = Vec::add(sum0, p0);
      Vec::store(col + j * kBlockQ, p0);
    }
    const Reg sum = Vec::add(sum0, sum1);
    if (first) {
      Vec::store(l + q * Vec::kWidth, sum);
    } else {
      alpha[q] = Vec::exp2<kExpDegree>(Vec::mul(Vec::sub(m_old, mx), cv));
      Vec::store(l + q * Vec::kWidth, Vec::fma(Vec::load(l + q * Vec::kWidth), alpha[q], sum));
    }
    Vec::store(m + q * Vec::kWidth, mx);
  }
}

// ReLU attention weights in place: P = max(s, 0)·|scale|/Lk (Q carries the sign of the scale).
inline void relu_block(float* s, int64_t nk, float weight, Reg* alpha) {
  const Reg w = Vec::set1(weight);
  for (int64_t j = 0; j < nk * kQueryVecs; ++j)
    Vec::store(s + j * Vec::kWidth, Vec::mul(Vec::max(Vec::load(s + j * Vec::kWidth), Vec::zero()), w));
  for (int q = 0; q < kQueryVecs; ++q) alpha[q] = Vec::set1(1.f);
}

// Qt[d][i] = ±q_i[d] for the valid queries of the block, zeros for the padding ones.
template <class In>
inline void pack_q_f32(const Problem& p, const In* q, int64_t valid, float* qt) {
  const float sign = p.negate_q ? -1.f : 1.f;
  for (int64_t d = 0; d < p.D; ++d) {
    for (int64_t i = 0; i < valid; ++i) qt[d * kBlockQ + i] = sign * static_cast<float>(q[i * p.q_sl + d]);
    for (int64_t i = valid; i < kBlockQ; ++i) qt[d * kBlockQ + i] = 0.f;
  }
}

// out row i = O[:, i] / l[i] (softmax) or O[:, i] (relu), rounded once to the output dtype.
template <class Out>
inline void store_output(const Problem& p, const float* o, const float* l, int64_t valid, Out* out) {
  for (int64_t i = 0; i < valid; ++i) {
    const float inv = p.relu ? 1.f : 1.f / l[i];
    Out* row = out + i * p.H * p.D;
    for (int64_t d = 0; d < p.D; ++d) row[d] = static_cast<Out>(o[d * kBlockQ + i] * inv);
  }
}

// Work items [begin, end) of (batch, head, query block); K and V are fp32 (converted beforehand
// when the inputs are bf16), Q and the output have the input dtype.
template <class In>
void flash_f32(const Problem& p, const float* k, const float* v, int64_t k_sb, int64_t k_sl,
               int64_t k_sh, int64_t v_sb, int64_t v_sl, int64_t v_sh, int64_t begin, int64_t end) {
  ScratchF32 qt(p.D * kBlockQ), s(p.block_k * kBlockQ), o(p.D * kBlockQ), m(kBlockQ), l(kBlockQ);
  for (int64_t item = begin; item < end; ++item) {
    const auto [b, h, qb] = p.item(item);
    const int64_t q0 = qb * kBlockQ, valid = std::min<int64_t>(kBlockQ, p.Lq - q0);
    pack_q_f32(p, static_cast<const In*>(p.q) + b * p.q_sb + q0 * p.q_sl + h * p.q_sh, valid, qt.data());
    const float* kbh = k + b * k_sb + h * k_sh;
    const float* vbh = v + b * v_sb + h * v_sh;
    for (int64_t j0 = 0; j0 < p.Lk; j0 += p.block_k) {
      const int64_t nk = std::min(p.block_k, p.Lk - j0);
      const bool first = j0 == 0;
      for_each_row_tile(nk, Vec::kMaxRows, [&](int64_t r0, int rows) {
        tile_f32_rows<false>(rows, kbh + (j0 + r0) * k_sl, k_sl, 1, qt.data(), p.D, s.data() + r0 * kBlockQ, nullptr);
      });
      Reg alpha[kQueryVecs];
      if (p.relu) relu_block(s.data(), nk, p.relu_scale, alpha);
      else softmax_block<5>(s.data(), nk, m.data(), l.data(), alpha, first, p.exp2_scale);
      for_each_row_tile(p.D, Vec::kMaxRows, [&](int64_t d0, int rows) {
        const float* va = vbh + j0 * v_sl + d0;
        if (first) tile_f32_rows<false>(rows, va, 1, v_sl, s.data(), nk, o.data() + d0 * kBlockQ, nullptr);
        else tile_f32_rows<true>(rows, va, 1, v_sl, s.data(), nk, o.data() + d0 * kBlockQ, alpha);
      });
    }
    store_output(p, o.data(), l.data(), valid,
                 static_cast<In*>(p.out) + ((b * p.Lq + q0) * p.H + h) * p.D);
  }
}
