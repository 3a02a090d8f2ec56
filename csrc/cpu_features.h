// Run-time SIMD choice: kernels are compiled for several targets in one binary (GCC target
// attributes) and pick the widest one this CPU supports. FASTDIFF_SIMD=scalar|avx2|avx512 caps
// it, so the AVX2 path can be tested on an AVX-512 machine; any other non-empty value throws
// std::invalid_argument (ValueError in Python) rather than being ignored.
#pragma once
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fastdiff {

enum class Simd { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

inline Simd detect_simd() {
  __builtin_cpu_init();
  Simd best = Simd::kScalar;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Simd::kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Simd::kAvx512;
  if (best == Simd::kAvx512 && __builtin_cpu_supports("avx512bf16")) best = Simd::kAvx512Bf16;
  const char* cap = std::getenv("FASTDIFF_SIMD");
  if (cap != nullptr && *cap != '\0') {
    Simd limit;
    if (!std::strcmp(cap, "scalar")) limit = Simd::kScalar;
    else if (!std::strcmp(cap, "avx2")) limit = Simd::kAvx2;
    else if (!std::strcmp(cap, "avx512")) limit = Simd::kAvx512;
    else
      throw std::invalid_argument(std::string("FASTDIFF_SIMD='") + cap +
                                  "': expected one of scalar, avx2, avx512 (a cap on the kernels' SIMD level), or unset");
    if (limit < best) best = limit;
  }
  return best;
}

// Read once: the CPU does not change under a running process.
inline Simd simd() {
  static const Simd level = detect_simd();
  return level;
}

inline const char* simd_name(Simd s) {
  switch (s) {
    case Simd::kAvx512Bf16: return "avx512_bf16";
    case Simd::kAvx512: return "avx512";
    case Simd::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace fastdiff
