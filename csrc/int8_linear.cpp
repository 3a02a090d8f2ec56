// int8 linear, W8A8: out[m, n] = sa[m] * sw[n] * sum_k qa[m, k] * qw[n, k] + bias[n], in fp32.
//
// qw: the weight quantized once, per output channel, symmetric (qw = round(w / sw), |qw| <= 127,
// sw = max|w[n, :]| / 127; fastdiff.ops.reference.quantize_weight_int8), packed here into the
// layout below. qa: each row of x quantized on the fly, symmetric: absmax = max|x[m, :]|,
// qa = round(x * (127 / absmax)) (fp32 product, ties to even), sa = absmax / 127 (a zero row: all
// 0, sa = 0; so is a row with max|x| <= 1e-30). The int32 sums are exact (|sum| <= 255 * 127 * K < 2^31 for K <= 65536), so the only
// rounding after quantization is fp32's: float(sum) * (sa * sw) + bias, one fma.
// (fastdiff.ops.reference.linear_int8 is the twin, in float64.)
//
// Packed weight: panels of kPanel = 64 output channels (zero rows past N), K padded to Kp (a
// multiple of 4) with zeros; within a panel, for each group of 4 k, the 64 channels' 4 bytes:
// packed[panel][k / 4][channel % 64][k % 4]. One 64-byte vector of a group is 16 channels x 4 k,
// the operand of vpdpbusd (and of two vpmaddubsw on AVX2 halves). Alongside: 128 * sum_k qw[n, k],
// the correction of the VNNI path (activations there are stored as qa + 128: vec::Avx512Vnni).
//
// Work: activations quantized once, row by row, into a scratch (M x Kp bytes) with their scales,
// then tiles of kTileRows rows x one panel in parallel (at::parallel_for over rows x panels). A
// tile walks K in blocks of at most kMaxKc so the panel's block stays in L1 while all its rows
// pass, each kRows rows x 64 (VNNI) or 32 (AVX2) channels by a register-blocked microkernel
// whose int32 sums stay in registers for the block (the GEMM section below).
// Memory traffic: x read once (4 MK bytes) and the scratch written once (MK), the packed weight
// (NK bytes, a quarter of fp32's) read once per tile row (from L2/L3), the scratch's tile
// (kTileRows x Kp) read once per panel from L2, out written once (4 MN bytes). 1 byte x 4 k per
// lane per instruction against fp32's 1 FMA: 4x the products per vpdpbusd; AVX2's four
// instructions per 32 products halve that.
// Which path runs: vec::Avx512Vnni where simd() is AVX-512 and the CPU has AVX512-VNNI, else
// vec::Avx2Int8 at AVX2 and above (so FASTDIFF_SIMD=avx2 tests it here), else plain loops.
// NaN or inf in a row of x are not propagated (they saturate in quantization).
#include "common.h"
#include "cpu_features.h"
#include "registry.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

namespace fastdiff {
namespace {

constexpr int64_t kPanel = 64;      // output channels per packed panel
constexpr int64_t kTileRows = 96;   // rows per tile: their scratch (96 x Kp bytes) stays in L2
constexpr int64_t kMaxK = 65536;    // keeps |255 * 127 * K| < 2^31

enum class Int8Path { kScalar, kAvx2, kAvx512Vnni };

Int8Path int8_path() {
  static const Int8Path path = [] {
    if (simd() >= Simd::kAvx512 && __builtin_cpu_supports("avx512vnni")) return Int8Path::kAvx512Vnni;
    if (simd() >= Simd::kAvx2) return Int8Path::kAvx2;
    return Int8Path::kScalar;
  }();
  return path;
}

const char* int8_path_name() {
  switch (int8_path()) {
    case Int8Path::kAvx512Vnni: return "avx512_vnni";
    case Int8Path::kAvx2: return "avx2";
    default: return "scalar";
  }
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// ------------------------------------------------------------------------------------------
// activations: one row of x -> Kp bytes (zeros past K) and its scale

// Rows with max|x| <= kZeroRow quantize to zeros (127 / absmax would overflow fp32 further down).
constexpr float kZeroRow = 1e-30f;
inline float inverse_scale(float absmax) { return absmax > kZeroRow ? 127.f / absmax : 0.f; }

template <class I>
inline float quantize_row(const float* x, int64_t K, int64_t Kp, int8_t* q) {
  using V = typename I::F;
  auto m = V::zero();
  int64_t k = 0;
  for (; k + V::kWidth <= K; k += V::kWidth) {
    const auto v = V::load(x + k);
    m = V::max(m, V::max(v, V::sub(V::zero(), v)));
  }
  if (k < K) {
    const auto v = V::load(x + k, V::tail(K - k));
    m = V::max(m, V::max(v, V::sub(V::zero(), v)));
  }
  const float absmax = V::reduce_max(m);
  const auto inv = V::set1(inverse_scale(absmax));
  for (k = 0; k + V::kWidth <= K; k += V::kWidth) I::quantize(q + k, V::mul(V::load(x + k), inv), V::tail(V::kWidth));
  if (k < K) {
    const auto t = V::tail(K - k);
    I::quantize(q + k, V::mul(V::load(x + k, t), inv), t);
  }
  std::fill(q + K, q + Kp, int8_t(I::kUnsignedA ? -128 : 0));  // a zero in the row's encoding
  return absmax / 127.f;
}

inline float quantize_row_scalar(const float* x, int64_t K, int64_t Kp, int8_t* q) {
  float absmax = 0.f;
  for (int64_t k = 0; k < K; ++k) absmax = std::max(absmax, std::fabs(x[k]));
  const float inv = inverse_scale(absmax);
  for (int64_t k = 0; k < K; ++k) q[k] = int8_t(std::clamp(std::nearbyint(x[k] * inv), -127.f, 127.f));
  std::fill(q + K, q + Kp, int8_t(0));
  return absmax / 127.f;
}

// ------------------------------------------------------------------------------------------
// GEMM: a tile is up to kTileRows rows x one panel. Its K is cut into blocks of at most kMaxKc
// (the panel's block, 64 x Kc bytes <= 24 KiB, stays in L1 while every row block of the tile
// passes over it; the tile's activations, kTileRows x Kc bytes, stay in L2 across panels). Per K
// block, a register-blocked microkernel: kRows rows x kAccs vectors of channels, every int32 sum
// in a register for the whole block (AVX-512 VNNI: 6 x 64 channels, 24 zmm; AVX2: 2 x 32, 8 ymm);
// between blocks the sums wait in an int32 buffer of the tile (kTileRows x 64: 24 KiB), and after
// the last block the epilogue turns them into fp32 straight from the registers. Every loop over
// rows or accumulators has a constant trip count and is unrolled, so no sum lives in memory.

constexpr int64_t kMaxKc = 384;  // bytes of K per block: 64 x 384 = 24 KiB of the panel

struct Epilogue {
  const float* row_scale;  // sa, indexed by row
  const float* w_scale;    // sw, length N
  const float* bias;       // length N or nullptr
  const int32_t* correction;  // 128 * sum(qw), padded to whole panels
  float* out;
  int64_t N;
};

// The block's sums for rows [m, m + kRows) x channels [n, n + kAccs * kWidth): a (row stride Kp)
// and w (the first group of the channels, groups kPanel * 4 bytes apart) over `groups` 4-k groups;
// partial (row stride kPanel): the sums so far, read unless first, written unless last.
template <class I, int kRows, int kAccs>
inline void microkernel(const int8_t* a, int64_t Kp, const int8_t* w, int64_t groups, int32_t* partial, bool first,
                        bool last, int64_t m, int64_t n, const Epilogue& e) {
  using V = typename I::F;
  typename I::Acc acc[kRows][kAccs];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < kAccs; ++j)
      acc[r][j] = first ? I::zero() : I::load(partial + r * kPanel + j * I::kWidth);
  for (int64_t g = 0; g < groups; ++g, a += 4, w += kPanel * 4) {
    typename I::Acc wv[kAccs];
#pragma GCC unroll 8
    for (int j = 0; j < kAccs; ++j) wv[j] = I::load(w + j * I::kWidth * 4);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const auto av = I::broadcast4(a + r * Kp);
#pragma GCC unroll 8
      for (int j = 0; j < kAccs; ++j) acc[r][j] = I::dot4(acc[r][j], av, wv[j]);
    }
  }
  if (!last) {
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < kAccs; ++j) I::store(partial + r * kPanel + j * I::kWidth, acc[r][j]);
    return;
  }
#pragma GCC unroll 8
  for (int j = 0; j < kAccs; ++j) {
    const int64_t nj = n + j * I::kWidth;
    if (nj < e.N) {  // a guard, not a break: the loop stays unrolled and acc in registers
      const auto t = V::tail(e.N - nj);
      const auto sw = V::load(e.w_scale + nj, t);
      const auto bias = e.bias ? V::load(e.bias + nj, t) : V::zero();
      const auto correction = I::load(e.correction + nj);
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const auto sum = I::kUnsignedA ? I::sub(acc[r][j], correction) : acc[r][j];
        const auto scale = V::mul(V::set1(e.row_scale[m + r]), sw);
        V::store(e.out + (m + r) * e.N + nj, V::fma(I::to_float(sum), scale, bias), t);
      }
    }
  }
}

// One K block of the last rows [m, m1), kRows of them or fewer, by the microkernel of their count.
template <class I, int kRows, int kAccs>
inline void last_rows(const int8_t* a, int64_t Kp, const int8_t* w, int64_t groups, int32_t* partial, bool first,
                      bool last, int64_t m, int64_t m1, int64_t n, const Epilogue& e) {
  if (m1 - m == kRows) return microkernel<I, kRows, kAccs>(a, Kp, w, groups, partial, first, last, m, n, e);
  if constexpr (kRows > 1) last_rows<I, kRows - 1, kAccs>(a, Kp, w, groups, partial, first, last, m, m1, n, e);
}

// Rows [m0, m1) (at most kTileRows) x the panel of channels [n0, n0 + kPanel), K block by K block.
template <class I, int kRows, int kAccs>
inline void tile(const int8_t* scratch, int64_t Kp, int64_t Kc, const int8_t* panel, int64_t m0, int64_t m1,
                 int64_t n0, const Epilogue& e) {
  constexpr int64_t kCols = kAccs * I::kWidth;
  static_assert(kPanel % kCols == 0);
  alignas(64) int32_t partial[kTileRows * kPanel];
  for (int64_t k0 = 0; k0 < Kp; k0 += Kc) {
    const int64_t groups = std::min(Kc, Kp - k0) / 4;
    const bool first = k0 == 0, last = k0 + Kc >= Kp;
    for (int64_t c = 0; c < kPanel && n0 + c < e.N; c += kCols) {
      const int8_t* w = panel + k0 * kPanel + c * 4;
      int64_t m = m0;
      for (; m + kRows <= m1; m += kRows)
        microkernel<I, kRows, kAccs>(scratch + m * Kp + k0, Kp, w, groups, partial + (m - m0) * kPanel + c, first,
                                     last, m, n0 + c, e);
      if (m < m1)
        last_rows<I, kRows - 1, kAccs>(scratch + m * Kp + k0, Kp, w, groups, partial + (m - m0) * kPanel + c, first,
                                       last, m, m1, n0 + c, e);
    }
  }
}

// ------------------------------------------------------------------------------------------
// the GEMM's rows: a row of x, or (int8_conv2d) an output pixel's patch of a channels-last map

// Row m's K floats. For a convolution (kh > 0) the patch is gathered into `buffer` in
// (ky, kx, c) order, zeros where the kernel hangs over the padding: the implicit im2col, one row
// at a time, so no float patch matrix is ever made (F.unfold's is kh*kw times x's size).
struct Rows {
  const float* x;
  int64_t K;
  int64_t H = 0, W = 0, C = 0, OH = 0, OW = 0, kh = 0, kw = 0, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;

  const float* row(int64_t m, float* buffer) const {
    if (kh == 0) return x + m * K;
    const int64_t b = m / (OH * OW), oy = m % (OH * OW) / OW, ox = m % OW;
    float* dst = buffer;
    for (int64_t ky = 0; ky < kh; ++ky) {
      const int64_t iy = oy * sh - ph + ky * dh;
      for (int64_t kx = 0; kx < kw; ++kx, dst += C) {
        const int64_t ix = ox * sw - pw + kx * dw;
        if (iy >= 0 && iy < H && ix >= 0 && ix < W)
          std::memcpy(dst, x + ((b * H + iy) * W + ix) * C, C * sizeof(float));
        else
          std::fill(dst, dst + C, 0.f);
      }
    }
    return buffer;
  }
};

// The per-ISA entry points: quantize rows [m0, m1), or run one (tile, panel).
template <class I>
inline void quantize_rows(const Rows& rows, int64_t Kp, int64_t m0, int64_t m1, int8_t* scratch, float* scale) {
  std::vector<float> patch(rows.kh ? rows.K : 0);
  for (int64_t m = m0; m < m1; ++m)
    scale[m] = quantize_row<I>(rows.row(m, patch.data()), rows.K, Kp, scratch + m * Kp);
}

FASTDIFF_AVX512VNNI FASTDIFF_FLATTEN void quantize_rows_vnni(const Rows& rows, int64_t Kp, int64_t m0, int64_t m1,
                                                           int8_t* scratch, float* scale) {
  quantize_rows<vec::Avx512Vnni>(rows, Kp, m0, m1, scratch, scale);
}
FASTDIFF_AVX2 FASTDIFF_FLATTEN void quantize_rows_avx2(const Rows& rows, int64_t Kp, int64_t m0, int64_t m1,
                                                     int8_t* scratch, float* scale) {
  quantize_rows<vec::Avx2Int8>(rows, Kp, m0, m1, scratch, scale);
}
void quantize_rows_scalar(const Rows& rows, int64_t Kp, int64_t m0, int64_t m1, int8_t* scratch, float* scale) {
  std::vector<float> patch(rows.kh ? rows.K : 0);
  for (int64_t m = m0; m < m1; ++m)
    scale[m] = quantize_row_scalar(rows.row(m, patch.data()), rows.K, Kp, scratch + m * Kp);
}

FASTDIFF_AVX512VNNI FASTDIFF_FLATTEN void tile_vnni(const int8_t* scratch, int64_t Kp, int64_t Kc, const int8_t* panel,
                                                  int64_t m0, int64_t m1, int64_t n0, const Epilogue& e) {
  tile<vec::Avx512Vnni, 6, 4>(scratch, Kp, Kc, panel, m0, m1, n0, e);
}
FASTDIFF_AVX2 FASTDIFF_FLATTEN void tile_avx2(const int8_t* scratch, int64_t Kp, int64_t Kc, const int8_t* panel,
                                            int64_t m0, int64_t m1, int64_t n0, const Epilogue& e) {
  tile<vec::Avx2Int8, 2, 4>(scratch, Kp, Kc, panel, m0, m1, n0, e);
}
void tile_scalar(const int8_t* scratch, int64_t Kp, int64_t /*Kc: one pass*/, const int8_t* panel, int64_t m0,
                 int64_t m1, int64_t n0, const Epilogue& e) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t c = 0; c < kPanel && n0 + c < e.N; ++c) {
      int32_t sum = 0;
      for (int64_t k = 0; k < Kp; ++k) sum += int32_t(scratch[m * Kp + k]) * int32_t(panel[(k / 4) * kPanel * 4 + c * 4 + k % 4]);
      const int64_t n = n0 + c;
      e.out[m * e.N + n] = std::fma(float(sum), e.row_scale[m] * e.w_scale[n], e.bias ? e.bias[n] : 0.f);
    }
}

// ------------------------------------------------------------------------------------------
// bindings

std::tuple<at::Tensor, at::Tensor> int8_pack_weight(const at::Tensor& qweight) {
  TORCH_CHECK(qweight.device().is_cpu(), "qweight: expected a CPU tensor, got ", qweight.device());
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "qweight: expected int8, got ", qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(0) > 0 && qweight.size(1) > 0,
              "qweight: expected a non-empty (out_features, in_features) matrix, got shape ", qweight.sizes());
  TORCH_CHECK(qweight.size(1) <= kMaxK, "qweight: in_features must be at most ", kMaxK, " (int32 sums), got ",
              qweight.size(1));
  const at::Tensor q = qweight.contiguous();
  const int64_t N = q.size(0), K = q.size(1), Kp = round_up(K, 4), panels = round_up(N, kPanel) / kPanel;
  TORCH_CHECK(q.min().item<int>() >= -127, "qweight: expected values in [-127, 127] (symmetric), got -128");
  at::Tensor packed = at::zeros({panels, Kp / 4, kPanel, 4}, q.options());
  at::Tensor correction = at::zeros({panels * kPanel}, q.options().dtype(at::kInt));
  const int8_t* src = q.const_data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  int32_t* corr = correction.data_ptr<int32_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int8_t* panel = dst + (n / kPanel) * (Kp / 4) * kPanel * 4 + (n % kPanel) * 4;
      int32_t sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        panel[(k / 4) * kPanel * 4 + k % 4] = src[n * K + k];
        sum += src[n * K + k];
      }
      corr[n] = 128 * sum;
    }
  });
  return {packed, correction};
}

// The (M, N) product of `rows` (M rows of rows.K floats) and the packed weight, after checking the
// weight's tensors against K and N (`what` names x's features in the error).
at::Tensor gemm(const Rows& rows, int64_t M, const at::Tensor& packed, const at::Tensor& correction,
                const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, int64_t N, const char* what) {
  const int64_t K = rows.K, Kp = round_up(K, 4), panels = round_up(N, kPanel) / kPanel;
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kChar && packed.is_contiguous(),
              "packed: expected a contiguous int8 CPU tensor (int8_pack_weight's)");
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) == panels && packed.size(1) == Kp / 4 && packed.size(2) == kPanel &&
                  packed.size(3) == 4,
              "packed: expected shape (", panels, ", ", Kp / 4, ", ", kPanel, ", 4) for x with ", K, " ", what,
              " and ", N, " outputs, got ", packed.sizes());
  TORCH_CHECK(correction.device().is_cpu() && correction.scalar_type() == at::kInt && correction.is_contiguous() &&
                  correction.dim() == 1 && correction.size(0) == panels * kPanel,
              "correction: expected a contiguous int32 CPU vector of ", panels * kPanel, " (int8_pack_weight's)");
  TORCH_CHECK(w_scale.device().is_cpu() && w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1 &&
                  w_scale.size(0) == N,
              "w_scale: expected a float32 CPU vector of ", N, ", got ", w_scale.scalar_type(), " ", w_scale.sizes());
  if (bias)
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N,
                "bias: expected a float32 CPU vector of ", N, ", got ", bias->scalar_type(), " ", bias->sizes());
  at::Tensor out = new_output({M, N}, at::TensorOptions().dtype(at::kFloat));
  if (M == 0) return out;
  const at::Tensor sw = w_scale.contiguous();
  std::optional<at::Tensor> b;
  if (bias) b = bias->contiguous();

  at::Tensor scratch = at::empty({M, Kp}, at::TensorOptions().dtype(at::kChar));
  at::Tensor row_scale = at::empty({M}, at::TensorOptions().dtype(at::kFloat));
  const Int8Path path = int8_path();
  auto quantize = path == Int8Path::kAvx512Vnni ? quantize_rows_vnni
                  : path == Int8Path::kAvx2     ? quantize_rows_avx2
                                                : quantize_rows_scalar;
  auto tile = path == Int8Path::kAvx512Vnni ? tile_vnni : path == Int8Path::kAvx2 ? tile_avx2 : tile_scalar;
  int8_t* sp = scratch.data_ptr<int8_t>();
  float* rs = row_scale.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t begin, int64_t end) {
    quantize(rows, Kp, begin, end, sp, rs);
  });

  const Epilogue e{rs, sw.const_data_ptr<float>(), b ? b->const_data_ptr<float>() : nullptr,
                   correction.const_data_ptr<int32_t>(), out.data_ptr<float>(), N};
  const int8_t* wp = packed.const_data_ptr<int8_t>();
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  const int64_t k_blocks = (Kp + kMaxKc - 1) / kMaxKc, Kc = round_up((Kp + k_blocks - 1) / k_blocks, 4);
  at::parallel_for(0, tiles * panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = (t / panels) * kTileRows, p = t % panels;
      tile(sp, Kp, Kc, wp + p * (Kp / 4) * kPanel * 4, m0, std::min(M, m0 + kTileRows), p * kPanel, e);
    }
  });
  return out;
}

void check_x(const at::Tensor& x, int64_t dim, const char* shape) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "x: expected a float32 CPU tensor, got ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() == dim, "x: expected ", shape, ", got shape ", x.sizes());
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& correction,
                       const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, int64_t out_features) {
  check_x(x_in, 2, "a (tokens, in_features) matrix");
  TORCH_CHECK(out_features > 0, "out_features: expected a positive int, got ", out_features);
  TORCH_CHECK(x_in.size(0) == 0 || x_in.size(1) > 0, "x: expected in_features > 0");
  const at::Tensor x = x_in.contiguous();
  return gemm(Rows{x.const_data_ptr<float>(), x.size(1)}, x.size(0), packed, correction, w_scale, bias, out_features,
              "features");
}

std::array<int64_t, 2> pair(const std::vector<int64_t>& value, const char* name, int64_t least) {
  TORCH_CHECK(value.size() == 2 && value[0] >= least && value[1] >= least, name, ": expected two ints >= ", least,
              ", got ", c10::IntArrayRef(value));
  return {value[0], value[1]};
}

// x: (B, H, W, C), a channels-last map's NHWC view; the packed weight's K in (ky, kx, c) order.
// Returns (B, OH, OW, out_channels).
at::Tensor int8_conv2d(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& correction,
                       const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, int64_t out_channels,
                       const std::vector<int64_t>& kernel_size, const std::vector<int64_t>& stride,
                       const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation) {
  check_x(x_in, 4, "a (batch, height, width, channels) map");
  TORCH_CHECK(out_channels > 0, "out_channels: expected a positive int, got ", out_channels);
  const auto [kh, kw] = pair(kernel_size, "kernel_size", 1);
  const auto [sh, sw] = pair(stride, "stride", 1);
  const auto [ph, pw] = pair(padding, "padding", 0);
  const auto [dh, dw] = pair(dilation, "dilation", 1);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  TORCH_CHECK(C > 0, "x: expected channels > 0");
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(H + 2 * ph >= dh * (kh - 1) + 1 && W + 2 * pw >= dw * (kw - 1) + 1, "x: a ", H, "x", W,
              " map padded by (", ph, ", ", pw, ") is smaller than the (", kh, ", ", kw, ") kernel");
  TORCH_CHECK(kh * kw * C <= kMaxK, "x: kh * kw * channels must be at most ", kMaxK, " (int32 sums), got ",
              kh * kw * C);
  const Rows rows{x.const_data_ptr<float>(), kh * kw * C, H, W, C, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw};
  return gemm(rows, B * OH * OW, packed, correction, w_scale, bias, out_channels, "kh * kw * channels")
      .view({B, OH, OW, out_channels});
}

FASTDIFF_BIND([](pybind11::module_& m) {
  m.def("int8_path", &int8_path_name,
        "The int8 GEMM path on this CPU: avx512_vnni, avx2 or scalar (capped by FASTDIFF_SIMD).");
  m.def("int8_pack_weight", &int8_pack_weight, pybind11::arg("qweight"),
        "qweight: (N, K) int8 in [-127, 127]. Returns (packed (ceil(N/64), ceil(K/4), 64, 4) int8, "
        "correction (ceil(N/64) * 64,) int32 = 128 * row sums).");
  m.def("int8_linear", &int8_linear, pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("correction"),
        pybind11::arg("w_scale"), pybind11::arg("bias"), pybind11::arg("out_features"),
        "x (M, K) fp32 quantized per row to int8, times the packed int8 weight, scaled by row scale x w_scale, "
        "plus bias: (M, out_features) fp32.");
  m.def("int8_conv2d", &int8_conv2d, pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("correction"),
        pybind11::arg("w_scale"), pybind11::arg("bias"), pybind11::arg("out_channels"), pybind11::arg("kernel_size"),
        pybind11::arg("stride"), pybind11::arg("padding"), pybind11::arg("dilation"),
        "x (B, H, W, C) fp32 (NHWC): a zero-padded convolution whose every output pixel's patch, gathered in "
        "(ky, kx, c) order, is quantized as a row (int8_linear's); the packed weight's K in that order. "
        "Returns (B, OH, OW, out_channels) fp32.");
});

}  // namespace
}  // namespace fastdiff
