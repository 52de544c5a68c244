// Image-quality metrics on float64 planes (SPEC §7): the Y channel of BasicSR's benchmark
// convention and SSIM (Gaussian window, "valid" filtering, mean of the map).
//
// SSIM is computed row by row, in tiles of columns: a vertical pass of the separable window
// over the five moments (a, b, a², b², ab), a horizontal pass, then the map values are
// summed at once (the map is never stored). Rows are split over threads; per-row sums are
// reduced in row order, so the result does not depend on the thread count.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"

namespace py = pybind11;

// Compile the hot loops for AVX-512, AVX2+FMA and baseline x86-64; the loader picks one at
// run time (GCC function multi-versioning), so the build never assumes the host's ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DSCLORA_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DSCLORA_SIMD_CLONES
#endif

namespace {

// Y = 16 + 65.481 R + 128.553 G + 24.966 B with R, G, B = samples / 255 (ITU-R BT.601).
DSCLORA_SIMD_CLONES
void y_row(const double* src, int64_t width, int64_t col_stride, int64_t channel_stride, double* dst) {
  for (int64_t x = 0; x < width; ++x) {
    const double* p = src + x * col_stride;
    dst[x] = 16.0 + 65.481 * (p[0] / 255.0) + 128.553 * (p[channel_stride] / 255.0) +
             24.966 * (p[2 * channel_stride] / 255.0);
  }
}

// Output columns handled at once: the ten moment buffers (about 20 KiB) stay in L1.
constexpr int64_t kTile = 256;

struct Moments {
  std::vector<double> a, b, aa, bb, ab;
  explicit Moments(int64_t n) : a(n), b(n), aa(n), bb(n), ab(n) {}
};

// v += w * (ra, rb, ra², rb², ra·rb) over n columns (one tap of the vertical pass).
inline void add_row_tap(const double* __restrict ra, const double* __restrict rb, double w, int64_t n,
                        double* __restrict va, double* __restrict vb, double* __restrict vaa,
                        double* __restrict vbb, double* __restrict vab) {
  for (int64_t x = 0; x < n; ++x) {
    const double xa = ra[x], xb = rb[x];
    va[x] += w * xa;
    vb[x] += w * xb;
    vaa[x] += w * (xa * xa);
    vbb[x] += w * (xb * xb);
    vab[x] += w * (xa * xb);
  }
}

// h += w * v[shift:] for the five moments (one tap of the horizontal pass).
inline void add_column_tap(const Moments& v, int64_t shift, double w, int64_t n, double* __restrict ha,
                           double* __restrict hb, double* __restrict haa, double* __restrict hbb,
                           double* __restrict hab) {
  const double* __restrict va = v.a.data() + shift;
  const double* __restrict vb = v.b.data() + shift;
  const double* __restrict vaa = v.aa.data() + shift;
  const double* __restrict vbb = v.bb.data() + shift;
  const double* __restrict vab = v.ab.data() + shift;
  for (int64_t x = 0; x < n; ++x) {
    ha[x] += w * va[x];
    hb[x] += w * vb[x];
    haa[x] += w * vaa[x];
    hbb[x] += w * vbb[x];
    hab[x] += w * vab[x];
  }
}

void zero(Moments& m, int64_t n) {
  for (auto* v : {&m.a, &m.b, &m.aa, &m.bb, &m.ab}) std::fill_n(v->begin(), n, 0.0);
}

// Sum of the SSIM map over output columns [0, n) of one output row. a, b point at the
// first of the k input rows (and at the first input column); uses n + k - 1 input columns.
DSCLORA_SIMD_CLONES
double ssim_tile_sum(const double* a, int64_t a_row_stride, const double* b, int64_t b_row_stride, int64_t n,
                     const double* window, int k, double c1, double c2, Moments& vert, Moments& horz) {
  const int64_t in_width = n + k - 1;
  zero(vert, in_width);
  for (int t = 0; t < k; ++t)
    add_row_tap(a + t * a_row_stride, b + t * b_row_stride, window[t], in_width, vert.a.data(), vert.b.data(),
                vert.aa.data(), vert.bb.data(), vert.ab.data());
  zero(horz, n);
  for (int t = 0; t < k; ++t)
    add_column_tap(vert, t, window[t], n, horz.a.data(), horz.b.data(), horz.aa.data(), horz.bb.data(),
                   horz.ab.data());
  double *ha = horz.a.data(), *hb = horz.b.data(), *haa = horz.aa.data(), *hbb = horz.bb.data(),
         *hab = horz.ab.data();
  // The map overwrites ha; four partial sums keep the reduction short and deterministic.
  for (int64_t x = 0; x < n; ++x) {
    const double mu_a = ha[x], mu_b = hb[x];
    const double mu_aa = mu_a * mu_a, mu_bb = mu_b * mu_b, mu_ab = mu_a * mu_b;
    const double var_a = haa[x] - mu_aa, var_b = hbb[x] - mu_bb, cov = hab[x] - mu_ab;
    ha[x] = ((2.0 * mu_ab + c1) * (2.0 * cov + c2)) / ((mu_aa + mu_bb + c1) * (var_a + var_b + c2));
  }
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t x = 0;
  for (; x + 4 <= n; x += 4)
    for (int j = 0; j < 4; ++j) s[j] += ha[x + j];
  for (; x < n; ++x) s[0] += ha[x];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

void rgb_to_y(uintptr_t src_ptr, int64_t height, int64_t width, int64_t row_stride, int64_t col_stride,
              int64_t channel_stride, uintptr_t dst_ptr, int num_threads) {
  const double* src = reinterpret_cast<const double*>(src_ptr);
  double* dst = reinterpret_cast<double*>(dst_ptr);
  dsclora::parallel_for(height, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t y = begin; y < end; ++y)
      y_row(src + y * row_stride, width, col_stride, channel_stride, dst + y * width);
  });
}

double ssim_mean(uintptr_t a_ptr, int64_t a_row_stride, uintptr_t b_ptr, int64_t b_row_stride, int64_t height,
                 int64_t width, uintptr_t window_ptr, int k, double c1, double c2, int num_threads) {
  if (k < 1 || height < k || width < k)
    throw std::invalid_argument("ssim: image of " + std::to_string(height) + "x" + std::to_string(width) +
                                " is smaller than the " + std::to_string(k) + "x" + std::to_string(k) +
                                " window");
  const double* a = reinterpret_cast<const double*>(a_ptr);
  const double* b = reinterpret_cast<const double*>(b_ptr);
  const double* window = reinterpret_cast<const double*>(window_ptr);
  const int64_t out_height = height - k + 1, out_width = width - k + 1;
  std::vector<double> row_sums(out_height);
  dsclora::parallel_for(out_height, num_threads, [&](int64_t begin, int64_t end) {
    Moments vert(kTile + k - 1), horz(kTile);
    for (int64_t y = begin; y < end; ++y) {
      double sum = 0.0;
      for (int64_t x0 = 0; x0 < out_width; x0 += kTile)
        sum += ssim_tile_sum(a + y * a_row_stride + x0, a_row_stride, b + y * b_row_stride + x0, b_row_stride,
                             std::min(kTile, out_width - x0), window, k, c1, c2, vert, horz);
      row_sums[y] = sum;
    }
  });
  double total = 0.0;
  for (double s : row_sums) total += s;
  return total / static_cast<double>(out_height * out_width);
}

}  // namespace

PYBIND11_MODULE(_metrics, m) {
  m.doc() = "float64 Y conversion and SSIM (dsclora_kernels.metrics_ops wraps these)";
  m.def("rgb_to_y", &rgb_to_y, py::arg("src"), py::arg("height"), py::arg("width"), py::arg("row_stride"),
        py::arg("col_stride"), py::arg("channel_stride"), py::arg("dst"), py::arg("num_threads"),
        "Y plane (contiguous H x W float64 at dst) of an RGB float64 image with 0-255 samples; strides in "
        "elements.",
        py::call_guard<py::gil_scoped_release>());
  m.def("ssim_mean", &ssim_mean, py::arg("a"), py::arg("a_row_stride"), py::arg("b"), py::arg("b_row_stride"),
        py::arg("height"), py::arg("width"), py::arg("window"), py::arg("k"), py::arg("c1"), py::arg("c2"),
        py::arg("num_threads"),
        "Mean SSIM map of two H x W float64 planes (unit column stride) with a separable k-tap window.",
        py::call_guard<py::gil_scoped_release>());
}
