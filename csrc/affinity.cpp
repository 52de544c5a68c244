// Blockwise spatial-affinity (FAKD) L1 loss and its gradient on the CPU, never materialising the
// N x N affinity matrices (SPEC §4). Python (dsclora_kernels/affinity.py) normalises the features
// and applies the loss scale and the normalisation backward; this module does the O(C·N²) part.
//
// Inputs: x̂_s (B, Cs, ld) and x̂_t (B, Ct, ld), channel-major, zero beyond N pixels; the row
// stride ld = leading_dimension(N) covers whole row blocks and is not a multiple of 4 KiB.
// For each image and row block I, one thread sweeps all column tiles J:
//   D_IJ = x̂_s[:, I]ᵀ x̂_s[:, J] − x̂_t[:, I]ᵀ x̂_t[:, J]   (micro-tiles in registers)
//   loss += Σ|D_IJ|;   sign(D_IJ) -> a small tile (L1);   G[:, I] += x̂[:, J] sign(D_IJ)ᵀ
// so that ∂Σ|D|/∂x̂_s = 2 G_s and ∂Σ|D|/∂x̂_t = −2 G_t (D is symmetric). Zero (padding) pixels
// contribute nothing. Without gradients only the upper triangle of tiles is visited.
//
// SIMD: the tile code (affinity_tiles.h) is compiled for SSE2, AVX2+FMA and AVX-512 and chosen at
// run time; no -march flags are needed.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"

namespace py = pybind11;

namespace dsclora::affinity {

constexpr int64_t kRowBlock = 64;      // rows per work item: a multiple of every micro-tile's rows
constexpr int64_t kColumnTile = 128;   // columns per sign tile (128 x 64 floats = 32 KiB)

int64_t row_blocks(int64_t n) { return (n + kRowBlock - 1) / kRowBlock; }

// Row stride of the channel-major operands: whole row blocks plus one cache line, so that the
// channel rows of a tile do not all map to the same L1 set (a power-of-two N would: 4 KiB apart).
int64_t leading_dimension(int64_t n) { return row_blocks(n) * kRowBlock + 16; }

struct Problem {
  const void *xs, *xt;  // x̂ (B, C, ld)
  void *gs, *gt;        // G (B, C, ld) or null: gradient not wanted
  const void *fs, *ft;  // raw F (B, C, n), for exact signs
  const double *rs, *rt;  // 1 / (‖F_i‖ + eps) (B, n)
  int64_t batch, cs, ct, ld, n;
  double tie_bound;  // see Image::tie_bound
  int threads;
};

// One image's operands: x̂ (C, ld) zero beyond n, optional gradient outputs, and for exact signs
// the raw features F (C, n) with the inverse norms 1 / (‖F_i‖ + eps) in float64.
template <typename T>
struct Image {
  const T *xs, *xt;
  T *gs, *gt;
  const T *fs, *ft;
  const double *rs, *rt;
  int64_t cs, ct, ld, n, width;  // width: pixels visited (whole row blocks, zero beyond n)
  T tie_bound;  // |D| below this may have the wrong sign in T; 0: no refinement
};

template <typename T>
Image<T> image(const Problem& p, int64_t b) {
  auto at = [b](const void* base, int64_t per_image) {
    return base ? static_cast<const T*>(base) + b * per_image : nullptr;
  };
  const bool exact = p.tie_bound > 0;
  return Image<T>{at(p.xs, p.cs * p.ld),
                  at(p.xt, p.ct * p.ld),
                  const_cast<T*>(at(p.gs, p.cs * p.ld)),
                  const_cast<T*>(at(p.gt, p.ct * p.ld)),
                  exact ? at(p.fs, p.cs * p.n) : nullptr,
                  exact ? at(p.ft, p.ct * p.n) : nullptr,
                  exact ? p.rs + b * p.n : nullptr,
                  exact ? p.rt + b * p.n : nullptr,
                  p.cs, p.ct, p.ld, p.n, row_blocks(p.n) * kRowBlock, static_cast<T>(p.tie_bound)};
}

// D_ij in float64 from the raw features and inverse norms. S and T go through identical
// operations (scaled operands, FMA chain, one subtraction), so identical features give exactly 0.
template <typename T>
double exact_difference(const Image<T>& im, int64_t i, int64_t j) {
  auto affinity = [&](const T* f, const double* r, int64_t channels) {
    double sum = 0;
    for (int64_t c = 0; c < channels; ++c) sum += (f[c * im.n + i] * r[i]) * (f[c * im.n + j] * r[j]);
    return sum;
  };
  return affinity(im.fs, im.rs, im.cs) - affinity(im.ft, im.rt, im.ct);
}

namespace generic {
constexpr int kVectorBytes = 16, kTileColumns = 6, kTileChannels = 6;
#include "affinity_tiles.h"
}  // namespace generic

#if defined(__x86_64__) && defined(__GNUC__)
#define DSCLORA_AFFINITY_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int kVectorBytes = 32, kTileColumns = 6, kTileChannels = 6;
#include "affinity_tiles.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
namespace avx512 {
constexpr int kVectorBytes = 64, kTileColumns = 6, kTileChannels = 12;
#include "affinity_tiles.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

// Instruction sets this CPU can run, best first.
std::vector<std::string> supported_isas() {
  std::vector<std::string> isas;
#ifdef DSCLORA_AFFINITY_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    isas.push_back("avx512");
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas.push_back("avx2");
#endif
  isas.push_back("generic");
  return isas;
}

template <typename T>
double run(const Problem& p, const std::string& isa) {
#ifdef DSCLORA_AFFINITY_X86
  if (isa == "avx512") return avx512::run<T>(p);
  if (isa == "avx2") return avx2::run<T>(p);
#endif
  return generic::run<T>(p);
}

// Σ_b Σ_ij |D_ij|; fills G_s / G_t (zeroed by the caller) where their pointers are non-zero.
// With tie_bound > 0 (and gradients), entries with |D| < tie_bound are recomputed in float64 from
// the raw features fs / ft and the inverse norms rs / rt, so that every sign is exact.
double affinity_l1(uintptr_t xs, uintptr_t xt, uintptr_t gs, uintptr_t gt, uintptr_t fs, uintptr_t ft, uintptr_t rs,
                   uintptr_t rt, int64_t batch, int64_t cs, int64_t ct, int64_t ld, int64_t n, double tie_bound,
                   bool is_double, int threads, const std::string& isa) {
  if (ld < row_blocks(n) * kRowBlock) throw std::invalid_argument("affinity_l1: ld must cover whole row blocks: use leading_dimension(n)");
  if (batch < 0 || cs < 1 || ct < 1) throw std::invalid_argument("affinity_l1: need batch >= 0 and channels >= 1");
  if (tie_bound > 0 && (!fs || !ft || !rs || !rt))
    throw std::invalid_argument("affinity_l1: tie_bound > 0 needs the raw features and inverse norms");
  const auto isas = supported_isas();
  const std::string chosen = isa.empty() ? isas.front() : isa;
  if (std::find(isas.begin(), isas.end(), chosen) == isas.end())
    throw std::invalid_argument("affinity_l1: instruction set '" + chosen + "' is not supported by this CPU");
  auto ptr = [](uintptr_t address) { return reinterpret_cast<void*>(address); };
  const Problem p{ptr(xs), ptr(xt), ptr(gs), ptr(gt), ptr(fs), ptr(ft),
                  static_cast<const double*>(ptr(rs)), static_cast<const double*>(ptr(rt)),
                  batch, cs, ct, ld, n, tie_bound, std::max(1, threads)};
  return is_double ? run<double>(p, chosen) : run<float>(p, chosen);
}

}  // namespace dsclora::affinity

PYBIND11_MODULE(_affinity, m) {
  using namespace dsclora::affinity;
  m.doc() = "Blockwise spatial-affinity L1 loss and gradient (CPU, no N x N buffer)";
  m.def("leading_dimension", &leading_dimension, py::arg("n"),
        "Row stride (elements) of the (B, C, ld) operands for n pixels; zero-fill beyond n");
  m.def("supported_isas", &supported_isas, "Instruction sets usable on this CPU, best first");
  m.def("affinity_l1", &affinity_l1, py::arg("xs"), py::arg("xt"), py::arg("gs"), py::arg("gt"), py::arg("fs"),
        py::arg("ft"), py::arg("rs"), py::arg("rt"), py::arg("batch"), py::arg("cs"), py::arg("ct"), py::arg("ld"),
        py::arg("n"), py::arg("tie_bound"), py::arg("is_double"), py::arg("threads"), py::arg("isa") = "",
        py::call_guard<py::gil_scoped_release>(),
        "Σ|S−T| over all images and pixel pairs from normalised channel-major features x̂ (B, C, ld), "
        "ld = leading_dimension(n), zero beyond n; fills G = Σ_j sign(D_ij) x̂_j into gs / gt (zeroed, same "
        "layout) when non-zero; "
        "tie_bound > 0 makes the signs exact (float64 recomputation from the raw features fs / ft (B, C, n) "
        "and inverse norms rs / rt (B, n) float64). Addresses are data_ptr()s, 0 for none. "
        "isa='' picks the best supported instruction set.");
}
