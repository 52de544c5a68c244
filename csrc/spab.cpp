// dsclora_kernels._spab: the fused SPAB block on the CPU (float32), SPEC §2.
//
// forward:   x -> (out, h1)
// recompute: (x, dL/dout) -> (h1, h2, silu'(a1), silu'(a2), dL/do3, residual share of dL/dx),
//            the intermediates the backward needs, so the forward saves only x.
// conv:      out = (conv3x3(in, w) + add) * mul, the backward's input-gradient steps (with the
//            transposed, flipped weights) and their pointwise tails in one pass.
// wgrad:     the weight and bias gradients of a 3x3 convolution.
// The convolution kernels are in spab_kernel.h, compiled once per instruction set (AVX-512,
// AVX2+FMA, portable scalar) and chosen at run time; the build needs no -march flag.
// Tensors arrive as raw pointers with element strides (pybind11 only, no torch headers);
// weights arrive pre-packed by `pack` for the ISA that runs (dsclora_kernels/spab.py caches them).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"
#include "spab_simd.h"

namespace py = pybind11;

namespace dsclora::spab {

// A (B, C, H, W) float tensor: data pointer and strides in elements.
struct View {
  float* data = nullptr;
  int64_t sn = 0, sc = 0, sh = 0, sw = 0;
  float* at(int n, int c, int y, int x) const { return data + n * sn + c * sc + y * sh + x * sw; }
};

struct ConvWeights {
  const float* packed;  // by pack_weights of the ISA that runs
  const float* bias;    // [co]
};

struct Problem {
  int B, C, H, W;
  ConvWeights conv[3];
  View x, out, h1;
  bool recompute = false;  // backward mode: reads g_out, writes h1, h2, d1, d2, g_o3, g_xres
  View g_out, h2, d1, d2, g_o3, g_xres;
};

// One 3x3 convolution with an optional pointwise tail: out = (conv(in, w) + add) * mul.
struct ConvStep {
  int B, C, H, W;
  ConvWeights conv;
  View in, add, mul, out;  // add, mul: data == nullptr when absent
};

// The weight gradient of a 3x3 convolution (padding 1): dw (C, C, 3, 3) = sum over pixels of
// g[co] * in[ci] shifted by the tap, db (C) = sum of g[co]; dw or db nullptr when not wanted.
struct WGradStep {
  int B, C, H, W;
  View g, in;
  float* dw = nullptr;
  float* db = nullptr;
};

// Scratch rows (of C x row_length floats) per thread: SPAB rings x 4, h1 3, h2 3, conv output,
// dL/dout; a ConvStep's input ring 3, conv output, add, mul; a WGradStep's chunk of
// WGRAD_ROWS rows of g and WGRAD_ROWS + 2 of the input.
constexpr int SPAB_SCRATCH_ROWS = 14, CONV_SCRATCH_ROWS = 6, WGRAD_ROWS = 4;

struct Tiling {
  int strip_width, strips, band_height, bands;
  int64_t row_length;  // floats per channel in a scratch row
};

// Buffer column of the strip's first output column (room for the 3-pixel halo + 1 read).
constexpr int OFF = 4;

// Output channels of the next register tile: max_block, or one less where that would leave a
// single channel for the last tile.
inline int block_size(int rem, int max_block) {
  if (rem <= max_block) return rem;
  return rem - max_block == 1 ? max_block - 1 : max_block;
}

// Image columns [ca, cb) of row (n, y) -> planar rows dst[c * L + i].
inline void load_row(const View& v, int n, int y, int ca, int cb, float* dst, int64_t L, int C) {
  for (int c = 0; c < C; ++c) {
    const float* src = v.at(n, c, y, ca);
    float* d = dst + c * L;
    if (v.sw == 1) std::copy(src, src + (cb - ca), d);
    else for (int i = 0; i < cb - ca; ++i) d[i] = src[i * v.sw];
  }
}

// Planar rows src[c * L + i], i < count -> image columns [c0, c0 + count) of row (n, y).
inline void store_row(const float* src, int64_t L, int C, const View& v, int n, int y, int c0, int count) {
  if (v.sc == 1) {  // channels-last: contiguous channels per pixel
    for (int i = 0; i < count; ++i) {
      float* d = v.at(n, 0, y, c0 + i);
      for (int c = 0; c < C; ++c) d[c] = src[c * L + i];
    }
    return;
  }
  for (int c = 0; c < C; ++c) {
    const float* s = src + c * L;
    float* d = v.at(n, c, y, c0);
    if (v.sw == 1) std::copy(s, s + count, d);
    else for (int i = 0; i < count; ++i) d[i * v.sw] = s[i];
  }
}

namespace scalar {
using V = Scalar;
#define SPAB_TARGET
#include "spab_kernel.h"
#undef SPAB_TARGET
}  // namespace scalar

namespace avx2 {
using V = Avx2;
#define SPAB_TARGET __attribute__((target("avx2,fma")))
#include "spab_kernel.h"
#undef SPAB_TARGET
}  // namespace avx2

// GCC 12's AVX-512 min/max intrinsics trip a false -Wmaybe-uninitialized (_mm512_undefined_ps).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {
using V = Avx512;
#define SPAB_TARGET __attribute__((target("avx512f,avx2,fma")))
#include "spab_kernel.h"
#undef SPAB_TARGET
}  // namespace avx512
#pragma GCC diagnostic pop

// Instruction sets this CPU runs, best first.
std::vector<std::string> isas() {
  __builtin_cpu_init();
  std::vector<std::string> out;
  if (__builtin_cpu_supports("avx512f")) out.push_back("avx512");
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back("avx2");
  out.push_back("scalar");
  return out;
}

std::string resolve_isa(const std::string& isa) {
  const auto supported = isas();
  if (isa == "auto") return supported.front();
  if (std::find(supported.begin(), supported.end(), isa) == supported.end())
    throw std::invalid_argument("spab: instruction set '" + isa + "' is not supported by this CPU");
  return isa;
}

int vector_width(const std::string& isa) {
  if (isa == "avx512") return Avx512::width;
  if (isa == "avx2") return Avx2::width;
  return Scalar::width;
}

// A thread's SPAB scratch should stay within ~384 KiB of L2: strips of at most 256 columns at
// C = 26, ~128 at C = 52. Bands give every thread about two items, at least 8 rows each.
Tiling make_tiling(int B, int C, int H, int W, int threads, int vw, int strip_width, int band_height) {
  Tiling t;
  if (strip_width <= 0) strip_width = std::clamp(98304 / (SPAB_SCRATCH_ROWS * C) - 8, 32, 256);
  t.strips = (W + strip_width - 1) / strip_width;
  t.strip_width = (W + t.strips - 1) / t.strips;
  if (band_height <= 0) {
    const int64_t per_band = int64_t(B) * t.strips;
    const int64_t want = std::max<int64_t>(1, (2 * int64_t(threads) + per_band - 1) / per_band);
    band_height = std::max(8, int((H + want - 1) / want));
  }
  t.band_height = std::min(band_height, H);
  t.bands = (H + t.band_height - 1) / t.band_height;
  const int n1 = (t.strip_width + 4 + vw - 1) / vw;
  t.row_length = (OFF + int64_t(n1) * vw + 2 + 15) / 16 * 16;
  return t;
}

using TensorArg = std::array<int64_t, 5>;  // data_ptr, stride n, c, h, w
using Dims = std::array<int64_t, 4>;        // B, C, H, W

View view(const TensorArg& t) {
  return View{reinterpret_cast<float*>(static_cast<uintptr_t>(t[0])), t[1], t[2], t[3], t[4]};
}

const float* pointer(int64_t p) { return reinterpret_cast<const float*>(static_cast<uintptr_t>(p)); }

// Checks dims, fills pb's (B, C, H, W), runs pb on the chosen ISA (Problem or ConvStep).
template <class P>
void solve(P& pb, const Dims& dims, int threads, std::string isa, int strip_width, int band_height) {
  pb.B = int(dims[0]), pb.C = int(dims[1]), pb.H = int(dims[2]), pb.W = int(dims[3]);
  if (pb.B < 1 || pb.C < 1 || pb.H < 1 || pb.W < 1)
    throw std::invalid_argument("spab: every dimension of (B, C, H, W) must be >= 1");
  isa = resolve_isa(isa);
  const Tiling tl = make_tiling(pb.B, pb.C, pb.H, pb.W, threads, vector_width(isa), strip_width, band_height);
  if (isa == "avx512") avx512::run(pb, tl, threads);
  else if (isa == "avx2") avx2::run(pb, tl, threads);
  else scalar::run(pb, tl, threads);
}

void set_weights(Problem& pb, const std::array<int64_t, 6>& weights) {
  for (int i = 0; i < 3; ++i) pb.conv[i] = ConvWeights{pointer(weights[2 * i]), pointer(weights[2 * i + 1])};
}

void pack(int64_t C, int64_t w, int64_t packed, const std::string& isa) {
  auto* dst = reinterpret_cast<float*>(static_cast<uintptr_t>(packed));
  const std::string which = resolve_isa(isa);
  if (which == "avx512") avx512::pack_weights(int(C), pointer(w), dst);
  else if (which == "avx2") avx2::pack_weights(int(C), pointer(w), dst);
  else scalar::pack_weights(int(C), pointer(w), dst);
}

void forward(const Dims& dims, const TensorArg& x, const TensorArg& out, const TensorArg& h1,
             const std::array<int64_t, 6>& weights, int threads, const std::string& isa,
             int strip_width, int band_height) {
  Problem pb;
  pb.x = view(x), pb.out = view(out), pb.h1 = view(h1);
  set_weights(pb, weights);
  solve(pb, dims, threads, isa, strip_width, band_height);
}

void recompute(const Dims& dims, const TensorArg& x, const TensorArg& g_out,
               const std::array<TensorArg, 6>& outputs, const std::array<int64_t, 6>& weights,
               int threads, const std::string& isa, int strip_width, int band_height) {
  Problem pb;
  pb.recompute = true;
  pb.x = view(x), pb.g_out = view(g_out);
  pb.h1 = view(outputs[0]), pb.h2 = view(outputs[1]), pb.d1 = view(outputs[2]);
  pb.d2 = view(outputs[3]), pb.g_o3 = view(outputs[4]), pb.g_xres = view(outputs[5]);
  set_weights(pb, weights);
  solve(pb, dims, threads, isa, strip_width, band_height);
}

void conv(const Dims& dims, const TensorArg& in, const TensorArg& out, int64_t w, int64_t b,
          const std::optional<TensorArg>& add, const std::optional<TensorArg>& mul, int threads,
          const std::string& isa, int strip_width, int band_height) {
  ConvStep st;
  st.in = view(in), st.out = view(out), st.conv = ConvWeights{pointer(w), pointer(b)};
  if (add) st.add = view(*add);
  if (mul) st.mul = view(*mul);
  solve(st, dims, threads, isa, strip_width, band_height);
}

void wgrad(const Dims& dims, const TensorArg& g, const TensorArg& in, int64_t dw, int64_t db,
           int threads, const std::string& isa, int strip_width, int band_height) {
  WGradStep st;
  st.g = view(g), st.in = view(in);
  st.dw = reinterpret_cast<float*>(static_cast<uintptr_t>(dw));
  st.db = reinterpret_cast<float*>(static_cast<uintptr_t>(db));
  solve(st, dims, threads, isa, strip_width, band_height);
}

}  // namespace dsclora::spab

PYBIND11_MODULE(_spab, m) {
  namespace s = dsclora::spab;
  m.doc() = "Fused SPAB block (float32, CPU): forward, the backward's recompute and conv steps.";
  m.def("isas", &s::isas, "Instruction sets this CPU runs, best first.");
  m.def("pack", &s::pack, py::arg("C"), py::arg("w"), py::arg("packed"), py::arg("isa") = "auto",
        "Weight (C, C, 3, 3) contiguous float32 at pointer w -> C*C*9 floats at `packed` in the "
        "layout of the kernel for `isa`.");
  m.def("forward", &s::forward, py::arg("dims"), py::arg("x"), py::arg("out"), py::arg("h1"),
        py::arg("weights"), py::arg("threads"), py::arg("isa") = "auto", py::arg("strip_width") = 0,
        py::arg("band_height") = 0, py::call_guard<py::gil_scoped_release>(),
        "x (B,C,H,W) -> out, h1. Tensors as (data_ptr, *strides); weights as 6 pointers "
        "(w1 packed by `pack` for the same isa, b1, w2, b2, w3, b3).");
  m.def("recompute", &s::recompute, py::arg("dims"), py::arg("x"), py::arg("g_out"),
        py::arg("outputs"), py::arg("weights"), py::arg("threads"), py::arg("isa") = "auto",
        py::arg("strip_width") = 0, py::arg("band_height") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "(x, dL/dout) -> outputs (h1, h2, silu'(a1), silu'(a2), dL/do3, g_out*(sigmoid(o3)-0.5)).");
  m.def("conv", &s::conv, py::arg("dims"), py::arg("inp"), py::arg("out"), py::arg("w"), py::arg("b"),
        py::arg("add") = py::none(), py::arg("mul") = py::none(), py::arg("threads") = 1,
        py::arg("isa") = "auto", py::arg("strip_width") = 0, py::arg("band_height") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "out = (conv3x3(inp, w, b, padding 1) + add) * mul; w packed by `pack`, add/mul optional.");
  m.def("wgrad", &s::wgrad, py::arg("dims"), py::arg("g"), py::arg("inp"), py::arg("dw"), py::arg("db"),
        py::arg("threads") = 1, py::arg("isa") = "auto", py::arg("strip_width") = 0,
        py::arg("band_height") = 0, py::call_guard<py::gil_scoped_release>(),
        "Weight gradient of conv3x3(inp, w, b, padding 1) given g = dL/doutput: dw (C, C, 3, 3) "
        "and db (C,) float32 at pointers dw, db (0: not computed). Deterministic.");
}
