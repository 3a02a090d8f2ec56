// GroupNorm with optional fused SiLU over x (N, C, H, W), contiguous (NCHW) or channels_last
// (NHWC), each handled in its own layout (no copy); the output keeps x's layout and dtype.
//
// Two passes over x: (1) per-channel shifted sums S1 = sum(x - s_c), S2 = sum((x - s_c)^2) with
// s_c = x[n, c, 0, 0] (fp32 vector accumulators over short runs, combined in double), merged
// per group exactly: mean = m, var = (sum_c S2 + 2 (s_c - m) S1 + HW (s_c - m)^2) / count;
// (2) y = (x - s_c) * a_c + b_c (a_c = rstd * weight_c, b_c = bias_c + (s_c - m) * a_c), then SiLU.
// The shift removes the cancellation of E[x^2] - E[x]^2, and of x * a - mean * a in pass 2, for
// inputs with a large mean (randn + 30 stays at ~1e-7 relative error in fp32).
// Memory traffic: x read twice, y written once; on SD sizes x stays in L3 between the passes.
#include "common.h"
#include "cpu_features.h"
#include "registry.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <vector>

namespace fastdiff {
namespace {

using c10::BFloat16;

// Pixels per stats task in NHWC: short enough that fp32 per-channel partial sums stay accurate.
constexpr int64_t kStatsRun = 256;

// ------------------------------------------------------------------------------------------
// Kernels, each loop written once over Vec (vec.h) with an entry point per ISA. sums_rows:
// acc1[c] = sum_p (x[p, c] - shift[c]), acc2 likewise squared, over `rows` pixels of `channels`
// contiguous values. sums_run: one contiguous run (an NCHW channel plane). affine_rows /
// affine_run: y = (x - shift) * a + b (+ SiLU).

template <class V, class T>
inline void sums_rows(const T* x, int64_t rows, int64_t channels, const float* shift, float* acc1, float* acc2) {
  for (int64_t c = 0; c < channels; c += V::kWidth) {
    const auto m = V::tail(channels - c);
    const auto s = V::load(shift + c, m);
    auto s1a = V::zero(), s1b = s1a, s2a = s1a, s2b = s1a;  // two rows at a time, two accumulator chains
    const T* p = x + c;
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2, p += 2 * channels) {
      const auto d0 = V::sub(V::load(p, m), s), d1 = V::sub(V::load(p + channels, m), s);
      s1a = V::add(s1a, d0);
      s2a = V::fma(d0, d0, s2a);
      s1b = V::add(s1b, d1);
      s2b = V::fma(d1, d1, s2b);
    }
    if (r < rows) {
      const auto d = V::sub(V::load(p, m), s, m);
      s1a = V::add(s1a, d);
      s2a = V::fma(d, d, s2a);
    }
    V::store(acc1 + c, V::add(s1a, s1b), m);
    V::store(acc2 + c, V::add(s2a, s2b), m);
  }
}

template <class V, class T>
inline void sums_run(const T* x, int64_t len, float shift, double* s1, double* s2) {
  const auto s = V::set1(shift);
  double t1 = 0, t2 = 0;
  for (int64_t start = 0; start < len; start += kStatsRun * V::kWidth) {  // flush fp32 lanes to double
    const int64_t stop = std::min(len, start + kStatsRun * V::kWidth);
    auto a1 = V::zero(), a2 = a1;
    int64_t i = start;
    for (; i + V::kWidth <= stop; i += V::kWidth) {
      const auto d = V::sub(V::load(x + i), s);
      a1 = V::add(a1, d);
      a2 = V::fma(d, d, a2);
    }
    if (i < stop) {
      const auto m = V::tail(stop - i);
      const auto d = V::sub(V::load(x + i, m), s, m);
      a1 = V::add(a1, d);
      a2 = V::fma(d, d, a2);
    }
    t1 += V::reduce_add(a1);
    t2 += V::reduce_add(a2);
  }
  *s1 = t1;
  *s2 = t2;
}

template <class V, class T, bool kSilu>
inline void affine_rows(const T* x, T* y, int64_t rows, int64_t channels, const float* shift, const float* a,
                        const float* b) {
  constexpr bool kFull = std::is_same_v<T, float>;  // bf16 results need less
  for (int64_t r = 0; r < rows; ++r, x += channels, y += channels) {
    int64_t c = 0;
    for (; c + V::kWidth <= channels; c += V::kWidth) {
      const auto v = V::fma(V::sub(V::load(x + c), V::load(shift + c)), V::load(a + c), V::load(b + c));
      V::store(y + c, kSilu ? V::template silu<kFull>(v) : v);
    }
    if (c < channels) {
      const auto m = V::tail(channels - c);
      const auto v = V::fma(V::sub(V::load(x + c, m), V::load(shift + c, m)), V::load(a + c, m), V::load(b + c, m));
      V::store(y + c, kSilu ? V::template silu<kFull>(v) : v, m);
    }
  }
}

template <class V, class T, bool kSilu>
inline void affine_run(const T* x, T* y, int64_t len, float shift, float a, float b) {
  constexpr bool kFull = std::is_same_v<T, float>;  // bf16 results need less
  const auto vs = V::set1(shift), va = V::set1(a), vb = V::set1(b);
  int64_t i = 0;
  for (; i + V::kWidth <= len; i += V::kWidth) {
    const auto v = V::fma(V::sub(V::load(x + i), vs), va, vb);
    V::store(y + i, kSilu ? V::template silu<kFull>(v) : v);
  }
  if (i < len) {
    const auto m = V::tail(len - i);
    const auto v = V::fma(V::sub(V::load(x + i, m), vs), va, vb);
    V::store(y + i, kSilu ? V::template silu<kFull>(v) : v, m);
  }
}

// The entry points: the loops above compiled for one ISA each.
#define FASTDIFF_GROUP_NORM_ENTRY_POINTS(isa, Vec, TARGET)                                                          \
  template <class T>                                                                                                \
  TARGET FASTDIFF_FLATTEN void sums_rows_##isa(const T* x, int64_t rows, int64_t channels, const float* shift,     \
                                               float* acc1, float* acc2) {                                          \
    sums_rows<Vec>(x, rows, channels, shift, acc1, acc2);                                                           \
  }                                                                                                                 \
  template <class T>                                                                                                \
  TARGET FASTDIFF_FLATTEN void sums_run_##isa(const T* x, int64_t len, float shift, double* s1, double* s2) {       \
    sums_run<Vec>(x, len, shift, s1, s2);                                                                           \
  }                                                                                                                 \
  template <class T, bool kSilu>                                                                                    \
  TARGET FASTDIFF_FLATTEN void affine_rows_##isa(const T* x, T* y, int64_t rows, int64_t channels,                 \
                                                 const float* shift, const float* a, const float* b) {              \
    affine_rows<Vec, T, kSilu>(x, y, rows, channels, shift, a, b);                                                  \
  }                                                                                                                 \
  template <class T, bool kSilu>                                                                                    \
  TARGET FASTDIFF_FLATTEN void affine_run_##isa(const T* x, T* y, int64_t len, float shift, float a, float b) {    \
    affine_run<Vec, T, kSilu>(x, y, len, shift, a, b);                                                              \
  }
FASTDIFF_GROUP_NORM_ENTRY_POINTS(avx512, vec::Avx512, FASTDIFF_AVX512)
FASTDIFF_GROUP_NORM_ENTRY_POINTS(avx2, vec::Avx2, FASTDIFF_AVX2)
#undef FASTDIFF_GROUP_NORM_ENTRY_POINTS

template <class T>
void sums_rows_scalar(const T* x, int64_t rows, int64_t channels, const float* shift, float* acc1, float* acc2) {
  for (int64_t c = 0; c < channels; ++c) acc1[c] = acc2[c] = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < channels; ++c) {
      const float d = vec::to_float(x[r * channels + c]) - shift[c];
      acc1[c] += d;
      acc2[c] += d * d;
    }
}

template <class T>
void sums_run_scalar(const T* x, int64_t len, float shift, double* s1, double* s2) {
  double t1 = 0, t2 = 0;
  for (int64_t i = 0; i < len; ++i) {
    const double d = vec::to_float(x[i]) - shift;
    t1 += d;
    t2 += d * d;
  }
  *s1 = t1;
  *s2 = t2;
}

template <class T, bool kSilu>
void affine_rows_scalar(const T* x, T* y, int64_t rows, int64_t channels, const float* shift, const float* a,
                        const float* b) {
  for (int64_t i = 0; i < rows * channels; ++i) {
    const int64_t c = i % channels;
    const float v = (vec::to_float(x[i]) - shift[c]) * a[c] + b[c];
    y[i] = vec::from_float<T>(kSilu ? vec::silu_scalar(v) : v);
  }
}

template <class T, bool kSilu>
void affine_run_scalar(const T* x, T* y, int64_t len, float shift, float a, float b) {
  for (int64_t i = 0; i < len; ++i) {
    const float v = (vec::to_float(x[i]) - shift) * a + b;
    y[i] = vec::from_float<T>(kSilu ? vec::silu_scalar(v) : v);
  }
}

template <class T>
struct Kernels {
  void (*sums_rows)(const T*, int64_t, int64_t, const float*, float*, float*);
  void (*sums_run)(const T*, int64_t, float, double*, double*);
  void (*affine_rows)(const T*, T*, int64_t, int64_t, const float*, const float*, const float*);
  void (*affine_run)(const T*, T*, int64_t, float, float, float);
};

template <class T>
Kernels<T> pick_kernels(bool silu) {
  switch (simd()) {
    case Simd::kAvx512Bf16:
    case Simd::kAvx512:
      return {sums_rows_avx512<T>, sums_run_avx512<T>,
              silu ? affine_rows_avx512<T, true> : affine_rows_avx512<T, false>,
              silu ? affine_run_avx512<T, true> : affine_run_avx512<T, false>};
    case Simd::kAvx2:
      return {sums_rows_avx2<T>, sums_run_avx2<T>, silu ? affine_rows_avx2<T, true> : affine_rows_avx2<T, false>,
              silu ? affine_run_avx2<T, true> : affine_run_avx2<T, false>};
    default:
      return {sums_rows_scalar<T>, sums_run_scalar<T>,
              silu ? affine_rows_scalar<T, true> : affine_rows_scalar<T, false>,
              silu ? affine_run_scalar<T, true> : affine_run_scalar<T, false>};
  }
}

// ------------------------------------------------------------------------------------------

template <class T>
void group_norm_impl(const at::Tensor& x, bool channels_last, int64_t groups, const at::Tensor& weight,
                     const at::Tensor& bias, double eps, bool silu, at::Tensor& y) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int64_t group_channels = C / groups;
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const Kernels<T> k = pick_kernels<T>(silu);

  // Pass 1: per-(n, c) shifted sums in double.
  std::vector<float> shift(N * C);
  std::vector<double> s1(N * C), s2(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      shift[n * C + c] = vec::to_float(channels_last ? xp[n * HW * C + c] : xp[(n * C + c) * HW]);
  if (channels_last) {
    const int64_t runs = (HW + kStatsRun - 1) / kStatsRun;
    std::vector<float> part1(N * runs * C), part2(N * runs * C);
    at::parallel_for(0, N * runs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / runs, p0 = (t % runs) * kStatsRun;
        k.sums_rows(xp + (n * HW + p0) * C, std::min(kStatsRun, HW - p0), C, &shift[n * C], &part1[t * C],
                    &part2[t * C]);
      }
    });
    for (int64_t n = 0; n < N; ++n)
      for (int64_t r = 0; r < runs; ++r)
        for (int64_t c = 0; c < C; ++c) {
          s1[n * C + c] += part1[(n * runs + r) * C + c];
          s2[n * C + c] += part2[(n * runs + r) * C + c];
        }
  } else {
    at::parallel_for(0, N * C, std::max<int64_t>(1, 4096 / HW), [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) k.sums_run(xp + nc * HW, HW, shift[nc], &s1[nc], &s2[nc]);
    });
  }

  // Group statistics, then the per-(n, c) affine map y = (x - shift) * a + b.
  std::vector<float> a(N * C), b(N * C);
  const float* w = weight.defined() ? weight.const_data_ptr<float>() : nullptr;
  const float* bi = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const double count = static_cast<double>(group_channels * HW);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = n * C + g * group_channels;
      double total = 0;
      for (int64_t c = c0; c < c0 + group_channels; ++c) total += s1[c] + HW * static_cast<double>(shift[c]);
      const double mean = total / count;
      double m2 = 0;
      for (int64_t c = c0; c < c0 + group_channels; ++c) {
        const double d = shift[c] - mean;
        m2 += s2[c] + 2 * d * s1[c] + HW * d * d;
      }
      const double rstd = 1.0 / std::sqrt(std::max(m2 / count, 0.0) + eps);
      for (int64_t c = c0; c < c0 + group_channels; ++c) {
        const int64_t ch = c - n * C;
        const double scale = rstd * (w ? w[ch] : 1.0);
        a[c] = static_cast<float>(scale);
        b[c] = static_cast<float>((bi ? bi[ch] : 0.0) + (shift[c] - mean) * scale);
      }
    }

  // Pass 2.
  if (channels_last) {
    at::parallel_for(0, N * HW, std::max<int64_t>(1, 8192 / C), [&](int64_t begin, int64_t end) {
      while (begin < end) {  // split at image boundaries: a and b change with n
        const int64_t n = begin / HW, stop = std::min(end, (n + 1) * HW);
        k.affine_rows(xp + begin * C, yp + begin * C, stop - begin, C, &shift[n * C], &a[n * C], &b[n * C]);
        begin = stop;
      }
    });
  } else {
    at::parallel_for(0, N * C, std::max<int64_t>(1, 8192 / HW), [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) k.affine_run(xp + nc * HW, yp + nc * HW, HW, shift[nc], a[nc], b[nc]);
    });
  }
}

at::Tensor group_norm(const at::Tensor& x_in, int64_t num_groups, const std::optional<at::Tensor>& weight_opt,
                      const std::optional<at::Tensor>& bias_opt, double eps, bool silu) {
  FASTDIFF_CHECK_CPU_FLOAT(x_in);
  TORCH_CHECK(x_in.dim() == 4, "x: expected (N, C, H, W), got shape ", x_in.sizes());
  TORCH_CHECK(x_in.numel() > 0, "x: expected a non-empty tensor, got shape ", x_in.sizes());
  const int64_t C = x_in.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, "num_groups: expected a positive divisor of C = ", C,
              ", got ", num_groups);
  TORCH_CHECK(eps > 0, "eps: expected a positive number, got ", eps);
  // Per-channel parameters are tiny: read them as fp32 whatever their dtype.
  auto param = [&](const std::optional<at::Tensor>& t, const char* name) -> at::Tensor {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, name, ": expected shape (", C, "), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x_in.scalar_type(), name, ": dtype ", t->scalar_type(), " differs from x's ",
                x_in.scalar_type());
    TORCH_CHECK(t->device().is_cpu(), name, ": expected a CPU tensor");
    return t->to(at::kFloat).contiguous();
  };
  const at::Tensor weight = param(weight_opt, "weight"), bias = param(bias_opt, "bias");
  // NCHW when x is plainly contiguous (also the layout-ambiguous cases), NHWC when channels_last;
  // anything else is copied to NCHW.
  const bool channels_last = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = channels_last || x_in.is_contiguous() ? x_in : x_in.contiguous();
  at::Tensor y = new_output(x.sizes(), x.options(),
                            channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (x.scalar_type() == at::kFloat) group_norm_impl<float>(x, channels_last, num_groups, weight, bias, eps, silu, y);
  else group_norm_impl<BFloat16>(x, channels_last, num_groups, weight, bias, eps, silu, y);
  return y;
}

FASTDIFF_BIND([](pybind11::module_& m) {
  m.def("group_norm", &group_norm, pybind11::arg("x"), pybind11::arg("num_groups"), pybind11::arg("weight"),
        pybind11::arg("bias"), pybind11::arg("eps"), pybind11::arg("silu"),
        "GroupNorm (+ SiLU if silu) of x (N, C, H, W), NCHW or channels_last, fp32/bf16; statistics in fp32. "
        "Returns x's layout and dtype.");
});

}  // namespace
}  // namespace fastdiff
