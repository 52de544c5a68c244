// dsclora_kernels._spab: the fused SPAB block on the CPU (float32), SPEC §2.
//
// forward:   x -> (out, h1)
// recompute: (x, dL/dout) -> (h1, h2, silu'(a1), silu'(a2), dL/do3, residual share of dL/dx),
//            the intermediates the backward needs, so the forward saves only x.
// conv:      out = (conv3x3(in, w) + add) * mul, the backward's input-gradient steps (with the
//            transposed, flipped weights) and their pointwise tails in one pass.
// wgrad:     the weight and bias gradients of a 3x3 convolution.
// The convolution kernels are in spab_kernel.h, compiled once per instruction set of
// cpu_features.h by isa_copies.h and chosen at run time; the build needs no -march flag.
// Tensors arrive as TensorArgs (tensor_view.h: address, dtype, shape, strides; pybind11 only, no
// torch headers); weights arrive pre-packed by `pack` for the ISA that runs (dsclora_kernels/spab.py
// caches them).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "parallel.h"
#include "spab_simd.h"
#include "tensor_view.h"

namespace py = pybind11;

namespace dsclora::spab {

// A (B, C, H, W) float tensor: data pointer and strides in elements.
struct View {
  float* data = nullptr;
  int64_t sn = 0, sc = 0, sh = 0, sw = 0;
  float* at(int n, int c, int y, int x) const { return data + n * sn + c * sc + y * sh + x * sw; }
};

struct ConvWeights {
  const float* packed;    // by pack_weights of the ISA that runs
  const float* winograd;  // the Winograd::N 1x3 convolutions of pack_winograd (SPAB forward)
  const float* bias;      // [co]
};

// Winograd F(2, 3) along the rows (points 0, 1, -1, infinity; Lavin & Gray 2016): two output
// rows from four input rows with four 1x3 convolutions instead of six: 1.5x fewer products,
// errors of the order of the direct convolution's (every coefficient is 0, +-1 or 1/2).
struct Winograd {
  static constexpr int M = 2, N = 4;
  static constexpr float BT[N][N] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr double G[N][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  static constexpr float AT[M][N] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

// Floats `pack` writes per weight (C, C, 3, 3): the 3x3 layout, then the Winograd 1x3 ones.
inline int64_t packed_floats(int64_t C) { return C * C * (9 + 3 * Winograd::N); }

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

// Scratch rows (of C x row_length floats) per thread: SPAB rings x 3M + 1, h1 3M, h2 3M, the
// Winograd rows u and m (N), dL/dout; a ConvStep's input ring 3, conv output, add, mul; a
// WGradStep's chunk of WGRAD_ROWS rows of g and WGRAD_ROWS + 2 of the input.
constexpr int SPAB_SCRATCH_ROWS = 9 * Winograd::M + 1 + Winograd::N + 2, CONV_SCRATCH_ROWS = 6, WGRAD_ROWS = 4;

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

#define DSCLORA_ISA_BODY "spab_kernel.h"
#include "isa_copies.h"

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
  const int n1 = (t.strip_width + 4 + vw - 1) / vw;  // h1's vectors; its Winograd input spans one more
  t.row_length = (OFF + int64_t(n1 + 1) * vw + 2 + 15) / 16 * 16;
  return t;
}

using Shape = std::array<int64_t, 4>;  // B, C, H, W

// The (B, C, H, W) float32 images of one call: each of the first one's shape, any strides.
struct Images {
  Shape shape;

  explicit Images(const TensorArg& first) : shape(dsclora::view<float, 4>(first, "spab: input").shape) {
    for (int64_t d : shape)
      if (d < 1 || d > std::numeric_limits<int>::max())
        throw std::invalid_argument("spab: every dimension (B, C, H, W) must be in [1, 2^31), got " +
                                    shape_string(shape));
  }

  View operator()(const TensorArg& arg, const char* name) const {
    const std::string what = std::string("spab: ") + name;
    const auto v = dsclora::view<float, 4>(arg, what);
    expect_shape(v, shape, what);
    return View{v.data, v.strides[0], v.strides[1], v.strides[2], v.strides[3]};
  }

  View optional(const std::optional<TensorArg>& arg, const char* name) const {
    return arg ? (*this)(*arg, name) : View{};
  }
};

template <size_t N>
float* contiguous(const std::optional<TensorArg>& arg, const std::array<int64_t, N>& shape, const std::string& name) {
  return contiguous_data<float>(arg, shape, "spab: " + name);
}

float* vector(const std::optional<TensorArg>& arg, int64_t size, const std::string& name) {
  return contiguous(arg, std::array<int64_t, 1>{size}, name);
}

// Convolution i's weights packed by `pack` (packed_floats(C),) and bias (C,).
ConvWeights conv_weights(const TensorArg& packed, const TensorArg& bias, int64_t C, int i) {
  const std::string n = std::to_string(i + 1);
  const float* p = vector(packed, packed_floats(C), "packed w" + n);
  return ConvWeights{p, p + C * C * 9, vector(bias, C, "b" + n)};
}

using Weights = std::array<TensorArg, 6>;  // w1 packed by `pack`, b1, w2 packed, b2, w3 packed, b3

void set_weights(Problem& pb, const Weights& weights, int64_t C) {
  for (int i = 0; i < 3; ++i) pb.conv[i] = conv_weights(weights[2 * i], weights[2 * i + 1], C, i);
}

// Fills pb's (B, C, H, W) and runs pb (a Problem, ConvStep or WGradStep) on the chosen ISA.
template <class P>
void solve(P& pb, const Shape& shape, int threads, const std::string& isa_name, int strip_width, int band_height) {
  pb.B = int(shape[0]), pb.C = int(shape[1]), pb.H = int(shape[2]), pb.W = int(shape[3]);
  const cpu::Isa isa = cpu::resolve(isa_name, "spab");
  const Tiling tl = make_tiling(pb.B, pb.C, pb.H, pb.W, threads, DSCLORA_ISA_CALL(isa, VW), strip_width, band_height);
  DSCLORA_ISA_CALL(isa, run(pb, tl, threads));
}

int vector_floats(const std::string& isa_name) { return DSCLORA_ISA_CALL(cpu::resolve(isa_name, "spab"), VW); }

void pack(const TensorArg& w, const TensorArg& packed, const std::string& isa_name) {
  const int64_t C = dsclora::view<float, 4>(w, "spab: w").shape[0];
  const float* src = contiguous(w, Shape{C, C, 3, 3}, "w");
  float* dst = vector(packed, packed_floats(C), "packed");
  DSCLORA_ISA_CALL(cpu::resolve(isa_name, "spab"), pack_conv(int(C), src, dst));
}

void forward(const TensorArg& x, const TensorArg& out, const TensorArg& h1, const Weights& weights, int threads,
             const std::string& isa, int strip_width, int band_height) {
  const Images images(x);
  Problem pb;
  pb.x = images(x, "x"), pb.out = images(out, "out"), pb.h1 = images(h1, "h1");
  set_weights(pb, weights, images.shape[1]);
  solve(pb, images.shape, threads, isa, strip_width, band_height);
}

void recompute(const TensorArg& x, const TensorArg& g_out, const std::array<TensorArg, 6>& outputs,
               const Weights& weights, int threads, const std::string& isa, int strip_width, int band_height) {
  const Images images(x);
  Problem pb;
  pb.recompute = true;
  pb.x = images(x, "x"), pb.g_out = images(g_out, "g_out");
  pb.h1 = images(outputs[0], "h1"), pb.h2 = images(outputs[1], "h2"), pb.d1 = images(outputs[2], "d1");
  pb.d2 = images(outputs[3], "d2"), pb.g_o3 = images(outputs[4], "g_o3"), pb.g_xres = images(outputs[5], "g_xres");
  set_weights(pb, weights, images.shape[1]);
  solve(pb, images.shape, threads, isa, strip_width, band_height);
}

void conv(const TensorArg& in, const TensorArg& out, const TensorArg& w, const TensorArg& b,
          const std::optional<TensorArg>& add, const std::optional<TensorArg>& mul, int threads,
          const std::string& isa, int strip_width, int band_height) {
  const Images images(in);
  ConvStep st;
  st.in = images(in, "inp"), st.out = images(out, "out"), st.conv = conv_weights(w, b, images.shape[1], 0);
  st.add = images.optional(add, "add"), st.mul = images.optional(mul, "mul");
  solve(st, images.shape, threads, isa, strip_width, band_height);
}

void wgrad(const TensorArg& g, const TensorArg& in, const std::optional<TensorArg>& dw,
           const std::optional<TensorArg>& db, int threads, const std::string& isa, int strip_width,
           int band_height) {
  const Images images(g);
  const int64_t C = images.shape[1];
  WGradStep st;
  st.g = images(g, "g"), st.in = images(in, "inp");
  st.dw = contiguous(dw, Shape{C, C, 3, 3}, "dw"), st.db = vector(db, C, "db");
  solve(st, images.shape, threads, isa, strip_width, band_height);
}

}  // namespace dsclora::spab

PYBIND11_MODULE(_spab, m) {
  namespace s = dsclora::spab;
  m.doc() = "Fused SPAB block (float32, CPU): forward, the backward's recompute and conv steps. Tensors are "
            "TensorArgs (address, dtype, shape, strides) made by dsclora_kernels._native.";
  m.def("supported_isas", &dsclora::cpu::supported_names, "Instruction sets this CPU runs, best first.");
  m.def("vector_floats", &s::vector_floats, py::arg("isa") = "auto", "Floats per vector of `isa`'s copy (4 generic, 8 avx2, 16 avx512).");
  m.def("packed_floats", &s::packed_floats, py::arg("C"), "Size of `pack`'s output for C channels.");
  m.def("pack", &s::pack, py::arg("w"), py::arg("packed"), py::arg("isa") = "auto",
        "Weight w (C, C, 3, 3) contiguous -> packed (packed_floats(C),) in the layout of the kernel for `isa`: "
        "the 3x3 convolution's, then the Winograd 1x3 ones.");
  m.def("forward", &s::forward, py::arg("x"), py::arg("out"), py::arg("h1"), py::arg("weights"),
        py::arg("threads"), py::arg("isa") = "auto", py::arg("strip_width") = 0, py::arg("band_height") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "x (B,C,H,W) -> out, h1 (same shape, any strides); weights (w1 packed by `pack` for the same isa, b1, "
        "w2, b2, w3, b3).");
  m.def("recompute", &s::recompute, py::arg("x"), py::arg("g_out"), py::arg("outputs"), py::arg("weights"),
        py::arg("threads"), py::arg("isa") = "auto", py::arg("strip_width") = 0, py::arg("band_height") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "(x, dL/dout) -> outputs (h1, h2, silu'(a1), silu'(a2), dL/do3, g_out*(sigmoid(o3)-0.5)).");
  m.def("conv", &s::conv, py::arg("inp"), py::arg("out"), py::arg("w"), py::arg("b"), py::arg("add") = py::none(),
        py::arg("mul") = py::none(), py::arg("threads") = 1, py::arg("isa") = "auto", py::arg("strip_width") = 0,
        py::arg("band_height") = 0, py::call_guard<py::gil_scoped_release>(),
        "out = (conv3x3(inp, w, b, padding 1) + add) * mul; w packed by `pack`, add/mul optional.");
  m.def("wgrad", &s::wgrad, py::arg("g"), py::arg("inp"), py::arg("dw") = py::none(), py::arg("db") = py::none(),
        py::arg("threads") = 1, py::arg("isa") = "auto", py::arg("strip_width") = 0, py::arg("band_height") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "Weight gradient of conv3x3(inp, w, b, padding 1) given g = dL/doutput: dw (C, C, 3, 3) and db (C,) "
        "(None: not computed). Deterministic.");
}
