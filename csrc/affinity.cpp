// Blockwise spatial-affinity (FAKD) L1 loss and its gradient on the CPU, never materialising the
// N x N affinity matrices (SPEC §4). Python (dsclora_kernels/affinity.py) normalises the features
// and applies the loss scale and the normalisation backward; this module does the O(C·N²) part.
//
// Inputs: x̂_s (B, Cs, ld) and x̂_t (B, Ct, ld), channel-major, zero beyond N pixels, ld a multiple
// of ROW_BLOCK. For each image and row block I, one thread sweeps all column tiles J:
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
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"

namespace py = pybind11;

namespace dsclora::affinity {

constexpr int64_t kRowBlock = 64;      // rows per work item: a multiple of every micro-tile's rows
constexpr int64_t kColumnTile = 128;   // columns per sign tile (128 x 64 floats = 32 KiB)

struct Problem {
  const void* xs;
  const void* xt;
  void* gs;  // null: no student gradient
  void* gt;  // null: no teacher gradient
  int64_t batch, cs, ct, ld;
  int threads;
};

namespace generic {
constexpr int kVectorBytes = 16, kTileColumns = 3, kTileChannels = 6;
#include "affinity_tiles.h"
}  // namespace generic

#if defined(__x86_64__) && defined(__GNUC__)
#define DSCLORA_AFFINITY_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int kVectorBytes = 32, kTileColumns = 3, kTileChannels = 6;
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
double affinity_l1(uintptr_t xs, uintptr_t xt, uintptr_t gs, uintptr_t gt, int64_t batch, int64_t cs,
                   int64_t ct, int64_t ld, bool is_double, int threads, const std::string& isa) {
  if (ld % kRowBlock != 0) throw std::invalid_argument("affinity_l1: ld must be a multiple of ROW_BLOCK");
  if (batch < 0 || cs < 1 || ct < 1) throw std::invalid_argument("affinity_l1: need batch >= 0 and channels >= 1");
  const auto isas = supported_isas();
  const std::string chosen = isa.empty() ? isas.front() : isa;
  if (std::find(isas.begin(), isas.end(), chosen) == isas.end())
    throw std::invalid_argument("affinity_l1: instruction set '" + chosen + "' is not supported by this CPU");
  const Problem p{reinterpret_cast<const void*>(xs), reinterpret_cast<const void*>(xt), reinterpret_cast<void*>(gs),
                  reinterpret_cast<void*>(gt), batch, cs, ct, ld, std::max(1, threads)};
  return is_double ? run<double>(p, chosen) : run<float>(p, chosen);
}

}  // namespace dsclora::affinity

PYBIND11_MODULE(_affinity, m) {
  using namespace dsclora::affinity;
  m.doc() = "Blockwise spatial-affinity L1 loss and gradient (CPU, no N x N buffer)";
  m.attr("ROW_BLOCK") = kRowBlock;
  m.def("supported_isas", &supported_isas, "Instruction sets usable on this CPU, best first");
  m.def("affinity_l1", &affinity_l1, py::arg("xs"), py::arg("xt"), py::arg("gs"), py::arg("gt"), py::arg("batch"),
        py::arg("cs"), py::arg("ct"), py::arg("ld"), py::arg("is_double"), py::arg("threads"), py::arg("isa") = "",
        py::call_guard<py::gil_scoped_release>(),
        "Σ|S−T| over all images and pixel pairs from normalised channel-major features x̂ (B, C, ld), "
        "zero beyond N; fills G = Σ_j sign(D_ij) x̂_j into gs / gt (zeroed, same layout) when non-zero. "
        "isa='' picks the best supported instruction set.");
}
