// Separable conv, fused: out = pointwise_1x1(depthwise_3x3(x) + dw_bias) + pw_bias.
// x (N, C, H, W) in either memory format; depthwise 3x3, stride 1, padding 1; pointwise (C_out, C).
// Output (N, C_out, H, W) channels_last, x's dtype.
//
// Pixels (n, h, w) are flattened and split evenly over threads; each thread walks its pixels in
// tiles of kTilePixels. Per tile: the depthwise result is written to a per-thread buffer
// A (pixels x C, L2-resident), then A times the packed pointwise weight B (C x C_out, in panels
// of 64 output channels) is computed by a register-blocked microkernel (6 pixels x 64 channels
// of fp32 accumulators; 6 x 16 on AVX2) and stored with the bias. The depthwise result never reaches memory at
// full size. Memory traffic: x read ~once (3 rows per tile from cache), out written once, B
// streamed from L2/L3 once per tile.
//
// Precision: fp32 in, fp32 everywhere. bf16 in: the depthwise is computed in fp32 and rounded
// to bf16 (as torch's bf16 depthwise conv does), the pointwise GEMM uses vdpbf16ps (bf16
// products, fp32 accumulation); without AVX512-BF16 the bf16 path runs the fp32 GEMM instead.
#include "common.h"
#include "cpu_features.h"
#include "registry.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastdiff {
namespace {

using c10::BFloat16;

constexpr int64_t kPanel = 64;        // output channels per packed weight panel (four zmm)
constexpr int64_t kMicroRows = 6;     // pixels per AVX-512 microkernel call: 6 x 4 zmm accumulators
constexpr int64_t kTilePixels = 96;   // pixels per tile: A = 96 x C stays in L2 up to C ~ 2048

struct Geometry {
  int64_t N, C, H, W, Cout;
  int64_t sN, sC, sH, sW;  // x strides, in elements
  int64_t Kp;              // row length of A: C rounded up to whole vectors (SIMD paths), else C
};

// ------------------------------------------------------------------------------------------
// Depthwise 3x3 of pixels [q0, q0 + rows) into A (rows x Kp). dw_k is (9, Kp) fp32 (tap-major,
// zero beyond C) and dw_b (Kp) fp32, so the padded channels of A come out as zeros.

// Neighbour taps that fall inside the image, as a 9-bit mask (bit 3 * (dh + 1) + (dw + 1)).
inline unsigned valid_taps(int64_t h, int64_t w, int64_t H, int64_t W) {
  unsigned rows = (h > 0 ? 1u : 0u) | 2u | (h + 1 < H ? 4u : 0u);
  unsigned cols = (w > 0 ? 1u : 0u) | 2u | (w + 1 < W ? 4u : 0u);
  unsigned mask = 0;
  for (int r = 0; r < 3; ++r)
    if (rows >> r & 1) mask |= cols << (3 * r);
  return mask;
}

// NHWC input: channels outer (the 9 taps of a channel vector stay in registers), pixels inner.
template <class V, class T, class AT>
inline void depthwise_nhwc(const T* x, const Geometry& g, const float* dw_k, const float* dw_b, int64_t q0,
                           int64_t rows, AT* A) {
  int64_t offsets[kTilePixels];
  unsigned taps[kTilePixels];
  for (int64_t p = 0; p < rows; ++p) {
    const int64_t q = q0 + p, w = q % g.W, h = (q / g.W) % g.H, n = q / (g.W * g.H);
    offsets[p] = n * g.sN + h * g.sH + w * g.sW;
    taps[p] = valid_taps(h, w, g.H, g.W);
  }
  int64_t tap_offset[9];
  for (int t = 0; t < 9; ++t) tap_offset[t] = (t / 3 - 1) * g.sH + (t % 3 - 1) * g.sW;
  for (int64_t c = 0; c < g.Kp; c += V::kWidth) {  // Kp: whole vectors, zeros past C
    const auto in_x = V::tail(g.C - c);  // channels that exist in x
    typename V::Reg k[9];
    for (int t = 0; t < 9; ++t) k[t] = V::load(dw_k + t * g.Kp + c);
    const auto bias = V::load(dw_b + c);
    for (int64_t p = 0; p < rows; ++p) {
      const T* centre = x + offsets[p] + c;
      auto acc = bias;
      if (taps[p] == 0x1FF) {
        for (int t = 0; t < 9; ++t) acc = V::fma(V::load(centre + tap_offset[t], in_x), k[t], acc);
      } else {
        for (int t = 0; t < 9; ++t)
          if (taps[p] >> t & 1) acc = V::fma(V::load(centre + tap_offset[t], in_x), k[t], acc);
      }
      V::store(A + p * g.Kp + c, acc);
    }
  }
}

template <class T, class AT>
FASTDIFF_AVX512 FASTDIFF_FLATTEN void depthwise_nhwc_avx512(const T* x, const Geometry& g, const float* dw_k,
                                                            const float* dw_b, int64_t q0, int64_t rows, AT* A) {
  depthwise_nhwc<vec::Avx512>(x, g, dw_k, dw_b, q0, rows, A);
}
template <class T>
FASTDIFF_AVX2 FASTDIFF_FLATTEN void depthwise_nhwc_avx2(const T* x, const Geometry& g, const float* dw_k,
                                                        const float* dw_b, int64_t q0, int64_t rows, float* A) {
  depthwise_nhwc<vec::Avx2>(x, g, dw_k, dw_b, q0, rows, A);
}

// Any strides (NCHW input, or the scalar path): one channel at a time along the pixel run.
template <class T, class AT>
__attribute__((always_inline)) inline void depthwise_strided_body(const T* x, const Geometry& g, const float* dw_k,
                                                                  const float* dw_b, int64_t q0, int64_t rows, AT* A) {
  for (int64_t p0 = 0; p0 < rows;) {  // runs of pixels within one image row
    const int64_t q = q0 + p0, w0 = q % g.W, h = (q / g.W) % g.H, n = q / (g.W * g.H);
    const int64_t run = std::min(rows - p0, g.W - w0);
    for (int64_t c = 0; c < g.Kp; ++c) {
      AT* a_col = A + p0 * g.Kp + c;
      if (c >= g.C) {
        for (int64_t i = 0; i < run; ++i) a_col[i * g.Kp] = vec::from_float<AT>(0.0f);
        continue;
      }
      const T* plane = x + n * g.sN + c * g.sC;
      for (int64_t i = 0; i < run; ++i) {
        const int64_t w = w0 + i;
        float acc = dw_b[c];
        for (int64_t dh = -1; dh <= 1; ++dh) {
          if (h + dh < 0 || h + dh >= g.H) continue;
          for (int64_t dw = -1; dw <= 1; ++dw) {
            if (w + dw < 0 || w + dw >= g.W) continue;
            acc += vec::to_float(plane[(h + dh) * g.sH + (w + dw) * g.sW]) * dw_k[((dh + 1) * 3 + dw + 1) * g.Kp + c];
          }
        }
        a_col[i * g.Kp] = vec::from_float<AT>(acc);
      }
    }
    p0 += run;
  }
}

template <class T, class AT>
FASTDIFF_AVX512 void depthwise_strided_avx512(const T* x, const Geometry& g, const float* dw_k, const float* dw_b,
                                              int64_t q0, int64_t rows, AT* A) {
  depthwise_strided_body(x, g, dw_k, dw_b, q0, rows, A);
}
template <class T>
FASTDIFF_AVX2 void depthwise_strided_avx2(const T* x, const Geometry& g, const float* dw_k, const float* dw_b,
                                          int64_t q0, int64_t rows, float* A) {
  depthwise_strided_body(x, g, dw_k, dw_b, q0, rows, A);
}
template <class T>
void depthwise_strided_scalar(const T* x, const Geometry& g, const float* dw_k, const float* dw_b, int64_t q0,
                              int64_t rows, float* A) {
  depthwise_strided_body(x, g, dw_k, dw_b, q0, rows, A);
}

// ------------------------------------------------------------------------------------------
// Pointwise GEMM of one tile: out[p, o] = sum_k A[p, k] B[k, o] + bias[o] for rows pixels.
// B panels: fp32 [Cout/64][Kp][64]; bf16 (VNNI pairs) [Cout/64][Kp/2][64][2].

// Output-channel vectors per microkernel call: MR x kGemmVecs accumulators, kGemmVecs weight loads
// and one broadcast in registers (AVX-512: 6 x 4 + 4 + 1 of 32 zmm, a whole 64-channel panel;
// AVX2: 6 x 2 + 2 + 1 of 16 ymm, a quarter panel).
template <class V>
constexpr int kGemmVecs = V::kWidth == 16 ? 4 : 2;

// Rows [0, MR) of the result: out[i, :] = A[i, :K] · B (panel rows kPanel apart) + bias, only the
// lanes in `tails` (output channels that exist) stored. Only MR row pointers of A are live (12 rows
// would spill general-purpose registers).
template <class V, int MR, class T>
inline void micro_f32(const float* A, int64_t lda, int64_t K, const float* B, const float* bias, T* out, int64_t ldo,
                      const typename V::Tail* tails) {
  constexpr int NV = kGemmVecs<V>;
  typename V::Reg acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    typename V::Reg b[NV];
    for (int v = 0; v < NV; ++v) b[v] = V::load(B + k * kPanel + V::kWidth * v);
    for (int i = 0; i < MR; ++i) {
      const auto a = V::set1(A[i * lda + k]);
      for (int v = 0; v < NV; ++v) acc[i][v] = V::fma(a, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      V::store(out + i * ldo + V::kWidth * v, V::add(acc[i][v], V::load(bias + V::kWidth * v, tails[v])), tails[v]);
}

// Runtime row count (1..kMicroRows) -> compile-time microkernel (direct calls, so they inline).
template <class V, class T, int MR = kMicroRows>
inline void micro_f32_rows(int rows, const float* A, int64_t lda, int64_t K, const float* B, const float* bias, T* out,
                           int64_t ldo, const typename V::Tail* tails) {
  if constexpr (MR > 1)
    if (rows < MR) return micro_f32_rows<V, T, MR - 1>(rows, A, lda, K, B, bias, out, ldo, tails);
  micro_f32<V, MR, T>(A, lda, K, B, bias, out, ldo, tails);
}

template <class V, class T>
inline void gemm_tile_f32(const float* A, int64_t rows, const Geometry& g, const float* B, const float* bias, T* out) {
  constexpr int NV = kGemmVecs<V>;
  constexpr int64_t kCols = NV * V::kWidth;  // output channels per microkernel call
  for (int64_t o = 0; o < g.Cout; o += kCols) {
    typename V::Tail tails[NV];  // output channels of this call that exist
    for (int v = 0; v < NV; ++v) tails[v] = V::tail(std::clamp<int64_t>(g.Cout - o - V::kWidth * v, 0, V::kWidth));
    const float* panel = B + (o / kPanel) * g.Kp * kPanel + o % kPanel;
    for (int64_t p = 0; p < rows; p += kMicroRows) {
      const int mr = static_cast<int>(std::min(kMicroRows, rows - p));
      micro_f32_rows<V>(mr, A + p * g.Kp, g.Kp, g.Kp, panel, bias + o, out + p * g.Cout + o, g.Cout, tails);
    }
  }
}

template <class T>
FASTDIFF_AVX512 FASTDIFF_FLATTEN void gemm_tile_f32_avx512(const float* A, int64_t rows, const Geometry& g,
                                                           const float* B, const float* bias, T* out) {
  gemm_tile_f32<vec::Avx512>(A, rows, g, B, bias, out);
}
template <class T>
FASTDIFF_AVX2 FASTDIFF_FLATTEN void gemm_tile_f32_avx2(const float* A, int64_t rows, const Geometry& g, const float* B,
                                                       const float* bias, T* out) {
  gemm_tile_f32<vec::Avx2>(A, rows, g, B, bias, out);
}

// bf16 A and B (VNNI pairs) with vdpbf16ps: AVX-512 BF16 only (elsewhere bf16 runs the fp32 GEMM).
// Stores one 16-channel vector of a result row with the bias, masked past C_out.
template <class T>
FASTDIFF_INLINE_AVX512 void store_out(T* out, __m512 acc, const float* bias, __mmask16 m) {
  vec::avx512::store(out, _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, bias)), m);
}

template <int MR, class T>
FASTDIFF_AVX512BF16 void micro_bf16_avx512(const BFloat16* A, int64_t lda, int64_t K, const BFloat16* B,
                                           const float* bias, T* out, int64_t ldo, const __mmask16* masks) {
  __m512 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
#pragma GCC unroll 2
  for (int64_t k2 = 0; k2 < pairs; ++k2) {
    __m512bh b[4];
    for (int v = 0; v < 4; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + k2 * 2 * kPanel + 32 * v);
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, A + i * lda + 2 * k2, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, b[v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < 4; ++v) store_out(out + i * ldo + 16 * v, acc[i][v], bias + 16 * v, masks[v]);
}

template <class T>
using MicroBf16Fn = void (*)(const BFloat16*, int64_t, int64_t, const BFloat16*, const float*, T*, int64_t,
                             const __mmask16*);

template <class T, int... MR>
constexpr std::array<MicroBf16Fn<T>, sizeof...(MR)> micro_bf16_table(std::integer_sequence<int, MR...>) {
  return {micro_bf16_avx512<MR + 1, T>...};
}

template <class T>
void gemm_tile_bf16_avx512(const BFloat16* A, int64_t rows, const Geometry& g, const BFloat16* B, const float* bias,
                           T* out) {
  static constexpr auto micro = micro_bf16_table<T>(std::make_integer_sequence<int, kMicroRows>{});
  const int64_t panel_stride = g.Kp * kPanel;
  for (int64_t o = 0; o < g.Cout; o += kPanel) {
    __mmask16 masks[4];  // output channels of this panel that exist
    for (int v = 0; v < 4; ++v) {
      const int64_t left = std::clamp<int64_t>(g.Cout - o - 16 * v, 0, 16);
      masks[v] = static_cast<__mmask16>((1u << left) - 1);
    }
    const BFloat16* panel = B + (o / kPanel) * panel_stride;
    for (int64_t p = 0; p < rows; p += kMicroRows) {
      const int64_t mr = std::min(kMicroRows, rows - p);
      micro[mr - 1](A + p * g.Kp, g.Kp, g.Kp, panel, bias + o, out + p * g.Cout + o, g.Cout, masks);
    }
  }
}

template <class T>
void gemm_tile_scalar(const float* A, int64_t rows, const Geometry& g, const float* B, const float* bias, T* out) {
  std::vector<float> row(g.Cout);
  for (int64_t p = 0; p < rows; ++p) {
    for (int64_t o = 0; o < g.Cout; ++o) row[o] = bias[o];
    for (int64_t k = 0; k < g.Kp; ++k) {
      const float a = A[p * g.Kp + k];
      for (int64_t o = 0; o < g.Cout; ++o) row[o] += a * B[(o / kPanel) * g.Kp * kPanel + k * kPanel + o % kPanel];
    }
    for (int64_t o = 0; o < g.Cout; ++o) out[p * g.Cout + o] = vec::from_float<T>(row[o]);
  }
}

// ------------------------------------------------------------------------------------------
// Weight preparation.

// pw (Cout, C) -> panels [Cout/64][Kp][64] fp32, zero-padded.
template <class T>
void pack_pointwise_f32(const T* pw, const Geometry& g, float* B) {
  const int64_t panels = (g.Cout + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j)
      for (int64_t n = 0; n < kPanel && j * kPanel + n < g.Cout; ++n) {
        const T* src = pw + (j * kPanel + n) * g.C;
        float* dst = B + j * g.Kp * kPanel + n;
        for (int64_t k = 0; k < g.C; ++k) dst[k * kPanel] = vec::to_float(src[k]);
      }
  });
}

// pw (Cout, C) bf16 -> VNNI panels [Cout/64][Kp/2][64][2], zero-padded.
void pack_pointwise_vnni(const BFloat16* pw, const Geometry& g, BFloat16* B) {
  const int64_t panels = (g.Cout + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j)
      for (int64_t n = 0; n < kPanel && j * kPanel + n < g.Cout; ++n) {
        const BFloat16* src = pw + (j * kPanel + n) * g.C;
        BFloat16* dst = B + j * g.Kp * kPanel + 2 * n;
        for (int64_t k = 0; k < g.C; ++k) dst[(k / 2) * 2 * kPanel + (k % 2)] = src[k];
      }
  });
}

// Packed pointwise weights are kept between calls (packing costs a transposed copy of the weight,
// up to ~10% of a call at 1280 channels). An entry is keyed by the weight's storage, held weakly
// so the address cannot be reused while cached (the entry expires with the storage), its offset,
// shape, strides and version counter, so in-place updates repack. Inference tensors have no
// version counter: updating one in place under inference_mode is not seen here.
struct PackedWeight {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  int64_t offset, rows, cols, row_stride, col_stride, Kp;
  at::ScalarType dtype, packed_dtype;
  uint32_t version;
  at::Tensor packed;
};

at::Tensor packed_pointwise(const at::Tensor& pw, const Geometry& g, at::ScalarType packed_dtype) {
  static std::mutex mutex;
  static std::vector<PackedWeight> cache;
  constexpr size_t kCapacity = 128;
  auto* impl = pw.unsafeGetTensorImpl();
  const uint32_t version = impl->version_counter().enabled() ? impl->version_counter().current_version() : 0;
  PackedWeight key{pw.storage().getWeakStorageImpl(), pw.storage_offset(), pw.size(0), pw.size(1), pw.stride(0),
                   pw.stride(1), g.Kp, pw.scalar_type(), packed_dtype, version, at::Tensor()};
  auto same = [&](const PackedWeight& e) {
    return e.storage == key.storage && e.offset == key.offset && e.rows == key.rows && e.cols == key.cols &&
           e.row_stride == key.row_stride && e.col_stride == key.col_stride && e.Kp == key.Kp &&
           e.dtype == key.dtype && e.packed_dtype == key.packed_dtype && e.version == key.version;
  };
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (const PackedWeight& e : cache)
      if (!e.storage.expired() && same(e)) return e.packed;
  }
  const int64_t panels = (g.Cout + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({panels * g.Kp * kPanel}, pw.options().dtype(packed_dtype));
  const at::Tensor w = pw.contiguous();
  if (packed_dtype == at::kBFloat16) pack_pointwise_vnni(w.const_data_ptr<BFloat16>(), g, packed.data_ptr<BFloat16>());
  else if (w.scalar_type() == at::kFloat) pack_pointwise_f32(w.const_data_ptr<float>(), g, packed.data_ptr<float>());
  else pack_pointwise_f32(w.const_data_ptr<BFloat16>(), g, packed.data_ptr<float>());
  key.packed = packed;
  std::lock_guard<std::mutex> lock(mutex);
  std::erase_if(cache, [&](const PackedWeight& e) { return e.storage.expired() || same(e); });
  if (cache.size() >= kCapacity) cache.erase(cache.begin());  // oldest first
  cache.push_back(std::move(key));
  return packed;
}

// ------------------------------------------------------------------------------------------

template <class T, class AT>
void separable_conv_impl(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& dw_bias,
                         const at::Tensor& pw_weight, const at::Tensor& pw_bias, at::Tensor& out, Simd level) {
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), pw_weight.size(0),
             x.stride(0), x.stride(1), x.stride(2), x.stride(3), 0};
  const bool vnni = std::is_same_v<AT, BFloat16>;
  const int64_t width = level >= Simd::kAvx512 ? vec::Avx512::kWidth : level == Simd::kAvx2 ? vec::Avx2::kWidth : 1;
  g.Kp = (g.C + width - 1) / width * width;  // whole vectors per row of A on the SIMD paths
  const bool nhwc = g.sC == 1 && level >= Simd::kAvx2;

  // Depthwise taps (9, Kp) and bias (Kp) in fp32, zero beyond C.
  std::vector<float> dw_k(9 * g.Kp, 0.0f), dw_b(g.Kp, 0.0f);
  const at::Tensor dwk = dw_weight.reshape({g.C, 9}).to(at::kFloat).contiguous();
  for (int64_t c = 0; c < g.C; ++c)
    for (int t = 0; t < 9; ++t) dw_k[t * g.Kp + c] = dwk.const_data_ptr<float>()[c * 9 + t];
  if (dw_bias.defined()) {
    const at::Tensor b = dw_bias.to(at::kFloat).contiguous();
    std::copy_n(b.const_data_ptr<float>(), g.C, dw_b.begin());
  }
  std::vector<float> pw_b(g.Cout + kPanel, 0.0f);  // padded so masked panel loads stay in bounds
  if (pw_bias.defined()) {
    const at::Tensor b = pw_bias.to(at::kFloat).contiguous();
    std::copy_n(b.const_data_ptr<float>(), g.Cout, pw_b.begin());
  }
  const at::Tensor packed = packed_pointwise(pw_weight, g, vnni ? at::kBFloat16 : at::kFloat);
  const AT* B = packed.const_data_ptr<AT>();

  const T* xp = x.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t pixels = g.N * g.H * g.W;
  at::parallel_for(0, pixels, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<AT> tile;
    tile.resize(kTilePixels * g.Kp);
    AT* A = tile.data();
    for (int64_t q0 = begin; q0 < end; q0 += kTilePixels) {
      const int64_t rows = std::min(kTilePixels, end - q0);
      T* dst = op + q0 * g.Cout;
      if (level >= Simd::kAvx512) {
        if (nhwc) depthwise_nhwc_avx512(xp, g, dw_k.data(), dw_b.data(), q0, rows, A);
        else depthwise_strided_avx512(xp, g, dw_k.data(), dw_b.data(), q0, rows, A);
        if constexpr (vnni) gemm_tile_bf16_avx512(A, rows, g, B, pw_b.data(), dst);
        else gemm_tile_f32_avx512(A, rows, g, B, pw_b.data(), dst);
      } else if constexpr (!vnni) {
        if (level == Simd::kAvx2) {
          if (nhwc) depthwise_nhwc_avx2(xp, g, dw_k.data(), dw_b.data(), q0, rows, A);
          else depthwise_strided_avx2(xp, g, dw_k.data(), dw_b.data(), q0, rows, A);
          gemm_tile_f32_avx2(A, rows, g, B, pw_b.data(), dst);
        } else {
          depthwise_strided_scalar(xp, g, dw_k.data(), dw_b.data(), q0, rows, A);
          gemm_tile_scalar(A, rows, g, B, pw_b.data(), dst);
        }
      }
    }
  });
}

at::Tensor separable_conv2d(const at::Tensor& x, const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
                            const at::Tensor& pw_weight, const std::optional<at::Tensor>& pw_bias) {
  FASTDIFF_CHECK_CPU_FLOAT(x);
  TORCH_CHECK(x.dim() == 4, "x: expected (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, "x: expected a non-empty tensor, got shape ", x.sizes());
  const int64_t C = x.size(1);
  auto same_kind = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, ": dtype ", t.scalar_type(), " differs from x's ",
                x.scalar_type());
  };
  same_kind(dw_weight, "dw_weight");
  TORCH_CHECK(dw_weight.dim() == 4 && dw_weight.size(0) == C && dw_weight.size(1) == 1 && dw_weight.size(2) == 3 &&
                  dw_weight.size(3) == 3,
              "dw_weight: expected shape (", C, ", 1, 3, 3), got ", dw_weight.sizes());
  same_kind(pw_weight, "pw_weight");
  TORCH_CHECK(pw_weight.dim() == 2 && pw_weight.size(1) == C && pw_weight.size(0) > 0,
              "pw_weight: expected shape (C_out, ", C, "), got ", pw_weight.sizes());
  const int64_t Cout = pw_weight.size(0);
  auto optional_vector = [&](const std::optional<at::Tensor>& t, int64_t length, const char* name) -> at::Tensor {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    same_kind(*t, name);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == length, name, ": expected shape (", length, "), got ", t->sizes());
    return *t;
  };
  const at::Tensor dwb = optional_vector(dw_bias, C, "dw_bias"), pwb = optional_vector(pw_bias, Cout, "pw_bias");

  at::Tensor out = new_output({x.size(0), Cout, x.size(2), x.size(3)}, x.options(), at::MemoryFormat::ChannelsLast);
  const Simd level = simd();
  if (x.scalar_type() == at::kFloat) {
    separable_conv_impl<float, float>(x, dw_weight, dwb, pw_weight, pwb, out, level);
  } else if (level == Simd::kAvx512Bf16) {
    separable_conv_impl<BFloat16, BFloat16>(x, dw_weight, dwb, pw_weight, pwb, out, level);
  } else {
    separable_conv_impl<BFloat16, float>(x, dw_weight, dwb, pw_weight, pwb, out, level);
  }
  return out;
}

FASTDIFF_BIND([](pybind11::module_& m) {
  m.def("separable_conv2d", &separable_conv2d, pybind11::arg("x"), pybind11::arg("dw_weight"),
        pybind11::arg("dw_bias"), pybind11::arg("pw_weight"), pybind11::arg("pw_bias"),
        "Fused depthwise 3x3 (stride 1, padding 1) + pointwise 1x1. x (N, C, H, W) fp32/bf16, either layout; "
        "dw_weight (C, 1, 3, 3); pw_weight (C_out, C). Returns (N, C_out, H, W) channels_last.");
});

}  // namespace
}  // namespace fastdiff
