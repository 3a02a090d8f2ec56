// Shared helpers for the op files: output allocation (optionally poisoned with NaN so tests
// catch elements a kernel never writes) and argument checks for direct callers of fastdiff._C.
#pragma once
#include <torch/extension.h>

#include <atomic>
#include <limits>

namespace fastdiff {

inline std::atomic<bool>& poison_outputs_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

// Every kernel allocates its result through here.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                             at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  at::Tensor out = at::empty(sizes, options.memory_format(format));
  if (poison_outputs_flag().load(std::memory_order_relaxed))
    out.fill_(std::numeric_limits<float>::quiet_NaN());
  return out;
}

#define FASTDIFF_CHECK_CPU_FLOAT(t)                                                           \
  TORCH_CHECK((t).device().is_cpu(), #t ": expected a CPU tensor, got ", (t).device());      \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kBFloat16,         \
              #t ": expected float32 or bfloat16, got ", (t).scalar_type())

}  // namespace fastdiff
