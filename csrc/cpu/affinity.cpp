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
// contribute nothing. Without gradients only the upper triangle of tiles is visited. With exact
// signs, a micro-tile with entries |D| < tie_bound has those rows recomputed in float64 from the
// raw features by the same tile code (affinity_tiles.h: refine_ties).
//
// SIMD: the tile code (affinity_tiles.h) is compiled for every instruction set of cpu_features.h
// (generic: SSE2 or NEON) by isa_copies.h and chosen at run time; no -march flags are needed.
// Tensors arrive as TensorArgs (tensor_view.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_features.h"
#include "parallel.h"
#include "tensor_view.h"

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

// One side's (student's or teacher's) channel-major operand of a micro-tile with rows from i0 and
// columns from j0: rows[k * row_ld + r] is channel k of row i0 + r (loaded as vectors), and
// columns[k * column_ld + m] channel k of column j0 + m (broadcast).
template <typename T>
struct Operand {
  const T* rows;
  int64_t row_ld;
  const T* columns;
  int64_t column_ld;
  int64_t channels;
};

// The operand of x (C, ld) for the micro-tile at rows i0, columns j0.
template <typename T>
Operand<T> tile_operand(const T* x, int64_t channels, int64_t ld, int64_t i0, int64_t j0) {
  return Operand<T>{x + i0, ld, x + j0, ld, channels};
}

#define DSCLORA_ISA_BODY "affinity_tiles.h"
#include "isa_copies.h"

// The Problem of affinity_l1's tensors in T (float or double); see there.
template <typename T>
Problem problem(const TensorArg& xs, const TensorArg& xt, const std::optional<TensorArg>& gs,
                const std::optional<TensorArg>& gt, const TensorArg& fs, const TensorArg& ft,
                const std::optional<TensorArg>& rs, const std::optional<TensorArg>& rt, double tie_bound, int threads) {
  const auto s = view<T, 3>(xs, "affinity_l1: xs"), f = view<T, 3>(fs, "affinity_l1: fs");
  const int64_t batch = s.shape[0], cs = s.shape[1], ld = s.shape[2], n = f.shape[2];
  const int64_t ct = view<T, 3>(xt, "affinity_l1: xt").shape[1];
  if (cs < 1 || ct < 1) throw std::invalid_argument("affinity_l1: need channels >= 1");
  if (ld < row_blocks(n) * kRowBlock)
    throw std::invalid_argument("affinity_l1: the rows of xs, xt (" + std::to_string(ld) +
                                ") must cover whole row blocks: use leading_dimension(n)");
  if (tie_bound > 0 && (!rs || !rt))
    throw std::invalid_argument("affinity_l1: tie_bound > 0 needs the inverse norms rs, rt");
  const auto operand = [&](const std::optional<TensorArg>& arg, int64_t channels, int64_t width, const char* name) {
    return contiguous_data<T>(arg, std::array<int64_t, 3>{batch, channels, width}, std::string("affinity_l1: ") + name);
  };
  const auto inverse_norms = [&](const std::optional<TensorArg>& arg, const char* name) {
    return contiguous_data<double>(arg, std::array<int64_t, 2>{batch, n}, std::string("affinity_l1: ") + name);
  };
  return Problem{operand(xs, cs, ld, "xs"), operand(xt, ct, ld, "xt"),
                 operand(gs, cs, ld, "gs"), operand(gt, ct, ld, "gt"),
                 operand(fs, cs, n, "fs"), operand(ft, ct, n, "ft"),
                 inverse_norms(rs, "rs"), inverse_norms(rt, "rt"),
                 batch, cs, ct, ld, n, tie_bound, std::max(1, threads)};
}

// Σ_b Σ_ij |D_ij| from x̂_s (B, Cs, ld), x̂_t (B, Ct, ld) and the raw features F_s (B, Cs, n), F_t (B, Ct, n),
// all float32 or all float64 and contiguous; fills G_s / G_t (zeroed by the caller, x̂'s shape) when given.
// With tie_bound > 0 (and gradients), entries with |D| < tie_bound are recomputed in float64 from
// the raw features and the inverse norms rs / rt (B, n) float64, so that every sign is exact.
double affinity_l1(const TensorArg& xs, const TensorArg& xt, const std::optional<TensorArg>& gs,
                   const std::optional<TensorArg>& gt, const TensorArg& fs, const TensorArg& ft,
                   const std::optional<TensorArg>& rs, const std::optional<TensorArg>& rt, double tie_bound,
                   int threads, const std::string& isa_name) {
  const cpu::Isa isa = cpu::resolve(isa_name, "affinity_l1");
  if (dtype_of(xs) == dtype_name<double>()) {
    const Problem p = problem<double>(xs, xt, gs, gt, fs, ft, rs, rt, tie_bound, threads);
    return DSCLORA_ISA_CALL(isa, run<double>(p));
  }
  const Problem p = problem<float>(xs, xt, gs, gt, fs, ft, rs, rt, tie_bound, threads);
  return DSCLORA_ISA_CALL(isa, run<float>(p));
}

}  // namespace dsclora::affinity

PYBIND11_MODULE(_affinity, m) {
  using namespace dsclora::affinity;
  m.doc() = "Blockwise spatial-affinity L1 loss and gradient (CPU, no N x N buffer). Tensors are TensorArgs "
            "(address, dtype, shape, strides) made by dsclora_kernels._native.";
  m.def("leading_dimension", &leading_dimension, py::arg("n"),
        "Row stride (elements) of the (B, C, ld) operands for n pixels; zero-fill beyond n");
  m.def("supported_isas", &dsclora::cpu::supported_names, "Instruction sets this CPU runs, best first.");
  m.def("affinity_l1", &affinity_l1, py::arg("xs"), py::arg("xt"), py::arg("gs"), py::arg("gt"), py::arg("fs"),
        py::arg("ft"), py::arg("rs"), py::arg("rt"), py::arg("tie_bound"), py::arg("threads"), py::arg("isa") = "auto",
        py::call_guard<py::gil_scoped_release>(),
        "Σ|S−T| over all images and pixel pairs from normalised channel-major features x̂ (B, C, ld), "
        "ld = leading_dimension(n), zero beyond the n pixels of the raw features fs / ft (B, C, n); fills "
        "G = Σ_j sign(D_ij) x̂_j into gs / gt (zeroed, x̂'s shape) unless None; tie_bound > 0 makes the signs "
        "exact (float64 recomputation from the raw features and the inverse norms rs / rt (B, n) float64). "
        "All float32 or all float64 (rs, rt float64), contiguous.");
}
