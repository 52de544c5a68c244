// How tensors cross the Python boundary, in every module: a TensorArg
//   (address, dtype name, shape, strides in elements)
// built only by dsclora_kernels/_native.py, after it checked that the memory is CPU memory of that
// dtype and layout. view<T, N>() checks dtype and rank again (a module can be called directly) and
// each kernel checks the shapes and layout it needs with expect_shape / expect_contiguous.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace dsclora {

using TensorArg = std::tuple<uintptr_t, std::string, std::vector<int64_t>, std::vector<int64_t>>;

template <typename T> constexpr const char* dtype_name();
template <> constexpr const char* dtype_name<float>() { return "float32"; }
template <> constexpr const char* dtype_name<double>() { return "float64"; }

inline const std::string& dtype_of(const TensorArg& arg) { return std::get<1>(arg); }

template <size_t N>
std::string shape_string(const std::array<int64_t, N>& shape) {
  std::string s = "(";
  for (size_t d = 0; d < N; ++d) s += (d ? ", " : "") + std::to_string(shape[d]);
  return s + (N == 1 ? ",)" : ")");
}

// An N-dimensional tensor of T: element (i0, i1, ...) at data[i0 * strides[0] + i1 * strides[1] + ...].
template <typename T, size_t N>
struct TensorView {
  T* data = nullptr;
  std::array<int64_t, N> shape{}, strides{};

  bool contiguous() const {
    int64_t expected = 1;
    for (size_t d = N; d-- > 0;) {
      if (shape[d] != 1 && strides[d] != expected) return false;
      expected *= shape[d];
    }
    return true;
  }
};

// The view of `arg`, which must hold an N-dimensional tensor of T; `name` ("module: tensor") for errors.
template <typename T, size_t N>
TensorView<T, N> view(const TensorArg& arg, const std::string& name) {
  const auto& [address, dtype, shape, strides] = arg;
  if (dtype != dtype_name<T>())
    throw std::invalid_argument(name + " must be " + dtype_name<T>() + ", got " + dtype);
  if (shape.size() != N || strides.size() != N)
    throw std::invalid_argument(name + " must have " + std::to_string(N) + " dimensions, got " +
                                std::to_string(shape.size()) + " sizes and " + std::to_string(strides.size()) +
                                " strides");
  TensorView<T, N> v;
  v.data = reinterpret_cast<T*>(address);
  for (size_t d = 0; d < N; ++d) {
    if (shape[d] < 0) throw std::invalid_argument(name + " has a negative size");
    v.shape[d] = shape[d];
    v.strides[d] = strides[d];
  }
  if (!v.data) {
    for (int64_t size : v.shape)
      if (size == 0) return v;  // an empty tensor may have no storage
    throw std::invalid_argument(name + " has a null address");
  }
  return v;
}

template <typename T, size_t N>
void expect_shape(const TensorView<T, N>& v, const std::array<int64_t, N>& shape, const std::string& name) {
  if (v.shape != shape)
    throw std::invalid_argument(name + " must have shape " + shape_string(shape) + ", got " + shape_string(v.shape));
}

template <typename T, size_t N>
void expect_contiguous(const TensorView<T, N>& v, const std::string& name) {
  if (!v.contiguous()) throw std::invalid_argument(name + " must be contiguous");
}

// The data of `arg`, a contiguous tensor of T and `shape`; nullptr when the (optional) tensor is absent.
template <typename T, size_t N>
T* contiguous_data(const std::optional<TensorArg>& arg, const std::array<int64_t, N>& shape, const std::string& name) {
  if (!arg) return nullptr;
  const auto v = view<T, N>(*arg, name);
  expect_shape(v, shape, name);
  expect_contiguous(v, name);
  return v.data;
}

}  // namespace dsclora
