// Each op file (one per op) registers its own Python bindings with FASTDIFF_BIND; bindings.cpp
// runs them all when fastdiff._C is imported. Keeps ops independent of one another.
#pragma once
#include <torch/extension.h>

#include <functional>
#include <vector>

namespace fastdiff {

using Binder = void (*)(pybind11::module_&);

inline std::vector<Binder>& binders() {
  static std::vector<Binder> registry;
  return registry;
}

struct RegisterBinder {
  explicit RegisterBinder(Binder binder) { binders().push_back(binder); }
};

}  // namespace fastdiff

#define FASTDIFF_CONCAT_INNER(a, b) a##b
#define FASTDIFF_CONCAT(a, b) FASTDIFF_CONCAT_INNER(a, b)
#define FASTDIFF_BIND(fn) static ::fastdiff::RegisterBinder FASTDIFF_CONCAT(fastdiff_binder_, __LINE__)(fn)
