// Gated linear unit: out[..., j] = a[..., j] * act(gate[..., j]) with a, gate = h.chunk(2, -1);
// act = exact GELU (SD's GEGLU) or SiLU (MobileDiffusion's SwiGLU). Computes in fp32.
//
// Memory traffic: reads h once (2F per row) and writes out once (F per row): 3F elements per
// row, no intermediates. Leading dims may be any strided view (rows are addressed through their
// own offsets); only a last dim with stride != 1 forces a copy.
#include "common.h"
#include "cpu_features.h"
#include "registry.h"
#include "vec.h"

#include <ATen/Parallel.h>

namespace fastdiff {
namespace {

using c10::BFloat16;

// One row: out[j] = a[j] * act(gate[j]), whole vectors then one partial one.
template <class V, class T, bool kGelu>
inline void glu_row(const T* a, const T* gate, T* out, int64_t features) {
  constexpr bool kFull = std::is_same_v<T, float>;  // bf16 results need less
  int64_t j = 0;
  for (; j + V::kWidth <= features; j += V::kWidth) {
    const auto g = V::load(gate + j);
    V::store(out + j, V::mul(V::load(a + j), kGelu ? V::template gelu<kFull>(g) : V::template silu<kFull>(g)));
  }
  if (j < features) {
    const auto m = V::tail(features - j);
    const auto g = V::load(gate + j, m);
    V::store(out + j, V::mul(V::load(a + j, m), kGelu ? V::template gelu<kFull>(g) : V::template silu<kFull>(g)), m);
  }
}

template <class T, bool kGelu>
FASTDIFF_AVX512 FASTDIFF_FLATTEN void glu_row_avx512(const T* a, const T* gate, T* out, int64_t features) {
  glu_row<vec::Avx512, T, kGelu>(a, gate, out, features);
}

template <class T, bool kGelu>
FASTDIFF_AVX2 FASTDIFF_FLATTEN void glu_row_avx2(const T* a, const T* gate, T* out, int64_t features) {
  glu_row<vec::Avx2, T, kGelu>(a, gate, out, features);
}

template <class T, bool kGelu>
void glu_row_scalar(const T* a, const T* gate, T* out, int64_t features) {
  for (int64_t j = 0; j < features; ++j) {
    const float g = vec::to_float(gate[j]);
    out[j] = vec::from_float<T>(vec::to_float(a[j]) * (kGelu ? vec::gelu_scalar(g) : vec::silu_scalar(g)));
  }
}

template <class T>
using RowFn = void (*)(const T*, const T*, T*, int64_t);

template <class T, bool kGelu>
RowFn<T> pick_row_kernel() {
  switch (simd()) {
    case Simd::kAvx512Bf16:
    case Simd::kAvx512: return glu_row_avx512<T, kGelu>;
    case Simd::kAvx2: return glu_row_avx2<T, kGelu>;
    default: return glu_row_scalar<T, kGelu>;
  }
}

template <class T>
void glu_impl(const at::Tensor& h, at::Tensor& out, bool gelu) {
  const int64_t features = h.size(-1) / 2;
  const int64_t rows = out.numel() / features;
  const int64_t lead_dims = h.dim() - 1;
  const auto sizes = h.sizes();
  const auto strides = h.strides();
  const T* base = h.const_data_ptr<T>();
  T* dst = out.data_ptr<T>();
  const RowFn<T> row_fn = gelu ? pick_row_kernel<T, true>() : pick_row_kernel<T, false>();
  // ~64 KiB of input per task keeps the per-task overhead negligible for short rows.
  const int64_t grain = std::max<int64_t>(1, 16384 / features);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t offset = 0, rest = r;  // unravel r over the (possibly strided) leading dims
      for (int64_t d = lead_dims - 1; d >= 0; --d) {
        offset += (rest % sizes[d]) * strides[d];
        rest /= sizes[d];
      }
      const T* row = base + offset;
      row_fn(row, row + features, dst + r * features, features);
    }
  });
}

at::Tensor glu(const at::Tensor& h_in, bool gelu) {
  FASTDIFF_CHECK_CPU_FLOAT(h_in);
  TORCH_CHECK(h_in.dim() >= 1, "h: expected at least one dimension, got a scalar");
  TORCH_CHECK(h_in.size(-1) > 0 && h_in.size(-1) % 2 == 0,
              "h: expected a last dimension of even, non-zero size, got shape ", h_in.sizes());
  const at::Tensor h = h_in.stride(-1) == 1 ? h_in : h_in.contiguous();
  std::vector<int64_t> out_sizes(h.sizes().begin(), h.sizes().end());
  out_sizes.back() /= 2;
  at::Tensor out = new_output(out_sizes, h.options());
  if (out.numel() == 0) return out;
  if (h.scalar_type() == at::kFloat) glu_impl<float>(h, out, gelu);
  else glu_impl<BFloat16>(h, out, gelu);
  return out;
}

FASTDIFF_BIND([](pybind11::module_& m) {
  m.def("glu", &glu, pybind11::arg("h"), pybind11::arg("gelu"),
        "a * act(gate) with a, gate = h.chunk(2, -1); act = exact GELU if gelu else SiLU. "
        "h: (..., 2F) fp32/bf16, any leading strides. Returns contiguous (..., F).");
});

}  // namespace
}  // namespace fastdiff
