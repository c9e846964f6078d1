// Python sequences and numpy arrays to the core's vectors: the conversions both extensions'
// bindings take (controlplane._core: csrc/bindings.cpp; sim._native: csrc/sim/bindings.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "common.h"

namespace tandem {

// Integer token ids from any sequence or integer ndarray; floats and bools are refused.
inline std::vector<int64_t> to_int_vector(pybind11::handle obj, const char* what) {
  namespace py = pybind11;
  py::array arr = py::array::ensure(obj);
  if (!arr) throw InvalidInput(std::string(what) + " must be a sequence of integers");
  if (arr.ndim() != 1) throw InvalidInput(std::string(what) + " must be one-dimensional");
  if (arr.size() == 0) return {};
  const char kind = arr.dtype().kind();
  if (kind != 'i' && kind != 'u') {
    throw InvalidInput(std::string(what) + " must hold integers, got dtype " + std::string(py::str(arr.dtype())));
  }
  auto ints = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
  return std::vector<int64_t>(ints.data(), ints.data() + ints.size());
}

}  // namespace tandem
