// fma_peak: this CPU's fp32 FMA throughput, measured: the ceiling the "% of peak" columns of the
// kernel and UNet tables (fastdiff/bench/peak.py) divide by.
//
// Each thread runs 12 independent accumulator chains of vector FMAs on registers only (no memory
// traffic): 12 chains hide the FMA latency (4 cycles) on two FMA ports, so the loop is bound by
// issue width alone. One FMA on a W-lane register is 2W FLOPs (W = 16 on AVX-512, 8 on AVX2; the
// SIMD level is fastdiff::simd(), so FASTDIFF_SIMD=avx2 measures the AVX2 ceiling on an AVX-512
// CPU). All threads of at::parallel_for run at once, so the figure is the whole machine's.
#include <chrono>
#include <cmath>
#include <vector>

#include "common.h"
#include "cpu_features.h"
#include "registry.h"
#include "vec.h"

namespace fastdiff {
namespace {

constexpr int kChains = 12;

template <class Vec>
inline float fma_chains(int64_t iterations) {
  typename Vec::Reg acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = Vec::set1(1.0f + c * 1e-3f);
  const typename Vec::Reg scale = Vec::set1(0.999999f), shift = Vec::set1(1e-7f);
  for (int64_t i = 0; i < iterations; ++i) {
    for (int c = 0; c < kChains; ++c) acc[c] = Vec::fma(acc[c], scale, shift);  // not foldable: no fast-math
  }
  typename Vec::Reg sum = acc[0];
  for (int c = 1; c < kChains; ++c) sum = Vec::add(sum, acc[c]);
  return Vec::reduce_add(sum);
}

FASTDIFF_AVX512 FASTDIFF_FLATTEN float fma_chains_avx512(int64_t iterations) { return fma_chains<vec::Avx512>(iterations); }
FASTDIFF_AVX2 FASTDIFF_FLATTEN float fma_chains_avx2(int64_t iterations) { return fma_chains<vec::Avx2>(iterations); }

// GFLOP/s of `iterations` x 12 FMAs per thread on every torch thread; (rate, lanes, threads).
std::tuple<double, int64_t, int64_t> fma_peak(int64_t iterations) {
  TORCH_CHECK(iterations > 0, "fma_peak: iterations must be positive, got ", iterations);
  const bool wide = simd() == Simd::kAvx512 || simd() == Simd::kAvx512Bf16;
  TORCH_CHECK(wide || simd() == Simd::kAvx2, "fma_peak: needs AVX2 + FMA or AVX-512 (SIMD level ", simd_name(simd()), ")");
  const int64_t lanes = wide ? 16 : 8, threads = at::get_num_threads();
  std::vector<float> sums(threads);  // read back, so no chain is dead code
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) sums[t] = wide ? fma_chains_avx512(iterations) : fma_chains_avx2(iterations);
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  for (float sum : sums) TORCH_CHECK(std::isfinite(sum), "fma_peak: accumulators are no longer finite");
  return {2.0 * lanes * kChains * iterations * threads / seconds / 1e9, lanes, threads};
}

void bind(pybind11::module_& m) {
  m.def("fma_peak", &fma_peak, pybind11::arg("iterations"),
        "fp32 FMA GFLOP/s of this CPU on torch's threads (12 register-only FMA chains per thread at the "
        "kernels' SIMD level): (gflops, lanes per FMA, threads).");
}
FASTDIFF_BIND(bind);

}  // namespace
}  // namespace fastdiff
