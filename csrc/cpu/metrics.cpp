// Image-quality metrics on float64 planes (SPEC §7): the Y channel of BasicSR's benchmark
// convention and SSIM (Gaussian window, "valid" filtering, mean of the map).
//
// SSIM is computed row by row, in tiles of columns: a vertical pass of the separable window
// over the five moments (a, b, a², b², ab), a horizontal pass, then the map values are
// summed at once (the map is never stored). Rows are split over threads; per-row sums are
// reduced in row order, so the result does not depend on the thread count.
// The row loops (metrics_rows.h) are compiled for every instruction set of cpu_features.h by
// isa_copies.h and chosen at run time. Tensors arrive as TensorArgs (tensor_view.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "parallel.h"
#include "tensor_view.h"

namespace py = pybind11;

namespace dsclora::metrics {

// Output columns handled at once: the ten moment buffers (about 20 KiB) stay in L1.
constexpr int64_t kTile = 256;

struct Moments {
  std::vector<double> a, b, aa, bb, ab;
  explicit Moments(int64_t n) : a(n), b(n), aa(n), bb(n), ab(n) {}
  void zero(int64_t n) {
    for (auto* v : {&a, &b, &aa, &bb, &ab}) std::fill_n(v->begin(), n, 0.0);
  }
};

#define DSCLORA_ISA_BODY "metrics_rows.h"
#include "isa_copies.h"

// src (H, W, 3) float64 RGB with 0-255 samples, any strides -> dst (H, W) float64 contiguous.
void rgb_to_y(const TensorArg& src_arg, const TensorArg& dst_arg, int threads, const std::string& isa) {
  const auto src = view<double, 3>(src_arg, "rgb_to_y: src");
  const int64_t height = src.shape[0], width = src.shape[1];
  expect_shape(src, {height, width, 3}, "rgb_to_y: src");
  double* dst = contiguous_data<double>(dst_arg, std::array<int64_t, 2>{height, width}, "rgb_to_y: dst");
  const auto y_row = DSCLORA_ISA_CALL(cpu::resolve(isa, "rgb_to_y"), y_row);
  parallel_for(height, threads, [&](int64_t begin, int64_t end) {
    for (int64_t y = begin; y < end; ++y)
      y_row(src.data + y * src.strides[0], width, src.strides[1], src.strides[2], dst + y * width);
  });
}

// An (H, W) float64 plane with unit column stride.
TensorView<double, 2> plane(const TensorArg& arg, const char* name) {
  const auto v = view<double, 2>(arg, std::string("ssim: ") + name);
  if (v.shape[1] > 1 && v.strides[1] != 1)
    throw std::invalid_argument(std::string("ssim: ") + name + " must have unit column stride");
  return v;
}

double ssim_mean(const TensorArg& a_arg, const TensorArg& b_arg, const TensorArg& window_arg, double c1, double c2,
                 int threads, const std::string& isa) {
  const auto a = plane(a_arg, "a"), b = plane(b_arg, "b");
  expect_shape(b, a.shape, "ssim: b");
  const int64_t height = a.shape[0], width = a.shape[1];
  const auto window = view<double, 1>(window_arg, "ssim: window");
  expect_contiguous(window, "ssim: window");
  const int k = int(window.shape[0]);
  if (k < 1 || height < k || width < k)
    throw std::invalid_argument("ssim: image of " + std::to_string(height) + "x" + std::to_string(width) +
                                " is smaller than the " + std::to_string(k) + "x" + std::to_string(k) +
                                " window");
  const auto ssim_tile_sum = DSCLORA_ISA_CALL(cpu::resolve(isa, "ssim"), ssim_tile_sum);
  const int64_t out_height = height - k + 1, out_width = width - k + 1;
  std::vector<double> row_sums(out_height);
  parallel_for(out_height, threads, [&](int64_t begin, int64_t end) {
    Moments vert(kTile + k - 1), horz(kTile);
    for (int64_t y = begin; y < end; ++y) {
      double sum = 0.0;
      for (int64_t x0 = 0; x0 < out_width; x0 += kTile)
        sum += ssim_tile_sum(a.data + y * a.strides[0] + x0, a.strides[0], b.data + y * b.strides[0] + x0,
                             b.strides[0], std::min(kTile, out_width - x0), window.data, k, c1, c2, vert, horz);
      row_sums[y] = sum;
    }
  });
  double total = 0.0;
  for (double s : row_sums) total += s;
  return total / static_cast<double>(out_height * out_width);
}

// Test hook for parallel_for's error path (tests/test_portability.py): runs items [0, n) on
// `threads` threads, item `fail_at` throwing std::runtime_error; returns how many items ran.
int64_t test_parallel_for_failure(int64_t n, int threads, int64_t fail_at) {
  std::vector<char> ran(std::max<int64_t>(n, 0), 0);
  parallel_for(n, threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (i == fail_at) throw std::runtime_error("parallel_for test: item " + std::to_string(i) + " failed");
      ran[i] = 1;
    }
  });
  return std::count(ran.begin(), ran.end(), 1);
}

}  // namespace dsclora::metrics

PYBIND11_MODULE(_metrics, m) {
  namespace k = dsclora::metrics;
  m.doc() = "float64 Y conversion and SSIM (dsclora_kernels.metrics wraps these). Tensors are TensorArgs "
            "(address, dtype, shape, strides) made by dsclora_kernels._native.";
  m.def("supported_isas", &dsclora::cpu::supported_names, "Instruction sets this CPU runs, best first.");
  m.def("rgb_to_y", &k::rgb_to_y, py::arg("src"), py::arg("dst"), py::arg("threads"), py::arg("isa") = "auto",
        "Y plane dst (H, W) float64 contiguous of an RGB image src (H, W, 3) float64 with 0-255 samples.",
        py::call_guard<py::gil_scoped_release>());
  m.def("ssim_mean", &k::ssim_mean, py::arg("a"), py::arg("b"), py::arg("window"), py::arg("c1"), py::arg("c2"),
        py::arg("threads"), py::arg("isa") = "auto",
        "Mean SSIM map of two (H, W) float64 planes (unit column stride) with the separable window (k,).",
        py::call_guard<py::gil_scoped_release>());
  m.def("_test_parallel_for_failure", &k::test_parallel_for_failure, py::arg("n"), py::arg("threads"),
        py::arg("fail_at"), "Test only: parallel_for over n items where item fail_at throws.",
        py::call_guard<py::gil_scoped_release>());
}
