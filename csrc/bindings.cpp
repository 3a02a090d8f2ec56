// fastdiff._C: thin pybind11 bindings. Each op file registers itself (registry.h); this file
// adds what the whole module reports about the CPU it runs on.
#include "common.h"
#include "cpu_features.h"
#include "registry.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff C++ CPU kernels (attention, separable_conv2d, group_norm, glu, int8_linear)";
  m.def("simd", [] { return std::string(fastdiff::simd_name(fastdiff::simd())); },
        "The SIMD level the kernels use on this CPU: avx512_bf16, avx512, avx2 or scalar.");
  m.def("set_poison_outputs", [](bool on) { fastdiff::poison_outputs_flag() = on; },
        "Fill every output with NaN before the kernel writes it (tests use this).");
  for (auto binder : fastdiff::binders()) binder(m);
}
