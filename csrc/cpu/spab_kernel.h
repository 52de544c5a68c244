// The fused SPAB block on one SIMD instruction set (SPEC §2):
//   h1 = silu(conv(x, w1)); h2 = silu(conv(h1, w2)); o3 = conv(h2, w3);
//   out = (o3 + x) * (sigmoid(o3) - 0.5)
//
// spab.cpp compiles this file once per ISA through isa_copies.h; the vector code uses that ISA's
// traits V (spab_simd.h), the shared types (View, Problem, Tiling, block_size) come from spab.cpp.
//
// Layout and schedule. A work item is one image n, a band of output rows [r0, r1) and a strip
// of output columns [c0, c1). Inside an item every tensor row lives in a planar scratch row
// [C][L] (channel-major, columns contiguous, vectors run along the width, so no channel
// padding is needed for any C). Buffer column OFF holds image column c0. Rows stream through
// ring buffers (x, h1, h2) in groups of Winograd::M rows: at step i the item computes h1 group
// i, h2 group i - 1 and o3 group i - 2 (run_item), so the three convolutions chain in cache and
// only the 3-pixel halo of each band and strip (rounded to groups) is computed twice. Each
// group's 3x3 convolution is a Winograd F(M, 3) along the rows (conv_rows_winograd); the
// backward's ConvStep uses the direct 3x3 tiles. Rows and columns outside the image are zero
// in every ring (the zero padding of each convolution).

using V = Simd<kIsa>;
using reg = typename V::reg;
constexpr int VW = V::width;

// ---- the convolution: CB output channels x NW pixel vectors in registers ----
// A register tile holds CB x NW accumulators, CB broadcast weights and one input vector. The
// convolution has ROWS x 3 taps: ROWS = 3 is the 3x3 convolution, ROWS = 1 a 1x3 one (the
// Winograd products below, on transformed rows).

// out[co0+k][x0 + j*VW ...] = bias + sum_{ci, dy < ROWS, dx} w[co0+k][ci][dy][dx] * in[dy][ci][x + dx - 1]
// with the weights packed by pack_weights: the block's [ci][tap][k] at wp + co0 * 3 * ROWS * C;
// bias nullptr: zero.
template <int CB, int NW, int ROWS>
void conv_tile(const float* const* in, int64_t L, int C, const float* wp,
               const float* bias, int co0, int x0, float* out) {
  reg acc[CB][NW];
  DSCLORA_UNROLL(32) for (int k = 0; k < CB; ++k) {
    const reg b = V::set1(bias ? bias[co0 + k] : 0.0f);
    DSCLORA_UNROLL(32) for (int j = 0; j < NW; ++j) acc[k][j] = b;
  }
  const float* w_ci = wp + int64_t(co0) * 3 * ROWS * C;
  for (int ci = 0; ci < C; ++ci, w_ci += 3 * ROWS * CB) {
    DSCLORA_UNROLL(32) for (int dy = 0; dy < ROWS; ++dy) {
      const float* row = in[dy] + ci * L + x0 - 1;
      DSCLORA_UNROLL(32) for (int dx = 0; dx < 3; ++dx) {
        // CB broadcast weights stay in registers, each input vector is loaded once.
        const float* w = w_ci + (dy * 3 + dx) * CB;
        reg wk[CB];
        DSCLORA_UNROLL(32) for (int k = 0; k < CB; ++k) wk[k] = V::set1(w[k]);
        DSCLORA_UNROLL(32) for (int j = 0; j < NW; ++j) {
          const reg v = V::load(row + dx + j * VW);
          DSCLORA_UNROLL(32) for (int k = 0; k < CB; ++k) acc[k][j] = V::fmadd(wk[k], v, acc[k][j]);
        }
      }
    }
  }
  DSCLORA_UNROLL(32) for (int k = 0; k < CB; ++k) {
    DSCLORA_UNROLL(32) for (int j = 0; j < NW; ++j) V::store(out + (co0 + k) * L + x0 + j * VW, acc[k][j]);
  }
}

// A tile of nw <= NW pixel vectors.
template <int CB, int NW, int ROWS>
void conv_tile_n(int nw, const float* const* in, int64_t L, int C, const float* wp,
                 const float* bias, int co0, int x0, float* out) {
  if constexpr (NW > 1) {
    if (nw < NW) return conv_tile_n<CB, NW - 1, ROWS>(nw, in, L, C, wp, bias, co0, x0, out);
  }
  conv_tile<CB, NW, ROWS>(in, L, C, wp, bias, co0, x0, out);
}

// All nvec pixel vectors of a row in the fewest tiles, of balanced sizes (33 vectors with
// NW = 4: six tiles of 4 and three of 3, not eight of 4 and an inefficient one of 1).
template <int CB, int ROWS>
void conv_block_row(const float* const* in, int64_t L, int C, const float* wp,
                    const float* bias, int co0, int x0, int nvec, float* out) {
  constexpr int NW = V::acc_regs / CB;
  const int tiles = (nvec + NW - 1) / NW, base = nvec / tiles, larger = nvec % tiles;
  for (int t = 0, j = 0; t < tiles; ++t) {
    const int nw = base + (t < larger);
    conv_tile_n<CB, NW, ROWS>(nw, in, L, C, wp, bias, co0, x0 + j * VW, out);
    j += nw;
  }
}

// One output row: nvec pixel vectors from buffer column x0, all C output channels, of the
// ROWS x 3 convolution with weights wp (packed by pack_weights) and bias (nullptr: zero).
template <int ROWS>
void conv_row(const float* const* in, int64_t L, int C, const float* wp, const float* bias, int x0,
              int nvec, float* out) {
  for (int co0 = 0; co0 < C;) {
    const int cb = block_size(C - co0, V::max_block);
    if (cb == 4) {
      if constexpr (V::max_block >= 4) conv_block_row<4, ROWS>(in, L, C, wp, bias, co0, x0, nvec, out);
    } else if (cb == 3) {
      conv_block_row<3, ROWS>(in, L, C, wp, bias, co0, x0, nvec, out);
    } else if (cb == 2) {
      conv_block_row<2, ROWS>(in, L, C, wp, bias, co0, x0, nvec, out);
    } else {
      conv_block_row<1, ROWS>(in, L, C, wp, bias, co0, x0, nvec, out);
    }
    co0 += cb;
  }
}

// Weights w[co][ci][tap] (taps = 3 x ROWS per pair) -> the layout conv_tile<., ., ROWS> reads:
// for each register block of output channels [co0, co0 + cb) (conv_row's partition),
// [ci][tap][k] at co0 * taps * C.
void pack_weights(int C, int taps, const float* w, float* packed) {
  for (int co0 = 0; co0 < C;) {
    const int cb = block_size(C - co0, V::max_block);
    for (int ci = 0; ci < C; ++ci)
      for (int tap = 0; tap < taps; ++tap)
        for (int k = 0; k < cb; ++k)
          packed[int64_t(co0) * taps * C + (ci * taps + tap) * cb + k] =
              w[(int64_t(co0 + k) * C + ci) * taps + tap];
    co0 += cb;
  }
}

// ---- Winograd F(M, 3) along the rows (Lavin & Gray 2016): M output rows of a 3x3 convolution
// from its M + 2 input rows r_i with (M + 2) x 3 convolutions of one row instead of 3 x M:
//   u_k = sum_i BT[k][i] r_i,  m_k = conv1x3(u_k, G_k w),  out_r = bias + sum_k AT[r][k] m_k
// (G_k w: the row taps of w combined by G[k][dy]). The rows' vectors run along the width, so
// the transforms are elementwise on rows.

// Weights w (C, C, 3, 3) -> N 1x3 convolutions (G_k w), each packed for conv_row<1>.
void pack_winograd(int C, const float* w, float* packed) {
  std::vector<float> gw(int64_t(C) * C * 3);
  for (int k = 0; k < Winograd::N; ++k) {
    for (int64_t pair = 0; pair < int64_t(C) * C; ++pair)
      for (int dx = 0; dx < 3; ++dx) {
        double sum = 0.0;
        for (int dy = 0; dy < 3; ++dy) sum += Winograd::G[k][dy] * double(w[pair * 9 + dy * 3 + dx]);
        gw[pair * 3 + dx] = float(sum);
      }
    pack_weights(C, 3, gw.data(), packed + int64_t(k) * C * C * 3);
  }
}

// Weights w (C, C, 3, 3) -> `pack`'s layout: the 3x3 convolution's (9 C^2 floats), then pack_winograd's.
void pack_conv(int C, const float* w, float* packed) {
  pack_weights(C, 9, w, packed);
  pack_winograd(C, w, packed + int64_t(C) * C * 9);
}

// dst[c][j] = sum_i BT[K][i] rows[i][c][j], elementwise on buffer columns [x0, x0 + nvec*VW) of all C
// (K a constant: the zero and +-1 coefficients fold away).
template <int K>
void transform_in(const float* const* rows, int64_t L, int C, int x0, int nvec, float* dst) {
  for (int c = 0; c < C; ++c) {
    const int64_t base = c * L + x0;
    for (int j = 0; j < nvec; ++j) {
      reg u = V::set1(0.0f);
      DSCLORA_UNROLL(8) for (int i = 0; i < Winograd::N; ++i) {
        if (Winograd::BT[K][i] != 0.0f) u = V::fmadd(V::set1(Winograd::BT[K][i]), V::load(rows[i] + base + j * VW), u);
      }
      V::store(dst + base + j * VW, u);
    }
  }
}

// out[r] = bias + sum_k AT[r][k] m[k] for the M output rows, on [x0, x0 + nvec*VW) of all C;
// out[r] may be m[r] (every m is read before a row is written).
void transform_out(float* const* m, const float* bias, int64_t L, int C, int x0, int nvec,
                   float* const* out) {
  for (int c = 0; c < C; ++c) {
    const reg b = V::set1(bias[c]);
    for (int j = 0; j < nvec; ++j) {
      const int64_t i = c * L + x0 + j * VW;
      reg mk[Winograd::N], y[Winograd::M];
      for (int k = 0; k < Winograd::N; ++k) mk[k] = V::load(m[k] + i);
      for (int r = 0; r < Winograd::M; ++r) {
        y[r] = b;
        for (int k = 0; k < Winograd::N; ++k)
          if (Winograd::AT[r][k] != 0.0f) y[r] = V::fmadd(V::set1(Winograd::AT[r][k]), mk[k], y[r]);
      }
      for (int r = 0; r < Winograd::M; ++r) V::store(out[r] + i, y[r]);
    }
  }
}

// m[k] = conv1x3(u_k, G_k w) for k = K .. N-1, u_k made from in[0 .. M+2) in the one row u.
template <int K = 0>
void winograd_products(const float* const* in, int64_t L, int C, const ConvWeights& w, int x0,
                       int nvec, float* u, float* const* m) {
  const float* u_rows[1] = {u};
  transform_in<K>(in, L, C, x0 - 1, nvec + 1, u);  // the 1x3 taps read one column either side
  conv_row<1>(u_rows, L, C, w.winograd + int64_t(K) * C * C * 3, nullptr, x0, nvec, m[K]);
  if constexpr (K + 1 < Winograd::N) winograd_products<K + 1>(in, L, C, w, x0, nvec, u, m);
}

// The 3x3 convolution of M output rows from in[0 .. M+2) (rows y0-1 .. y0+M) on buffer columns
// [x0, x0 + nvec*VW): out[r] = row y0 + r; scratch u (1 row) and m (N rows) of C x L floats.
void conv_rows_winograd(const float* const* in, int64_t L, int C, const ConvWeights& w, int x0,
                        int nvec, float* u, float* const* m, float* const* out) {
  winograd_products(in, L, C, w, x0, nvec, u, m);
  transform_out(m, w.bias, L, C, x0, nvec, out);
}

// ---- pointwise math ----

// exp(x), relative error ~1e-7: x = n ln2 + r, |r| <= ln2/2, exp(r) by the Cephes expf
// polynomial (S. Moshier, Cephes Math Library), 2^n through the exponent bits.
inline reg vexp(reg x) {
  x = V::min(V::max(x, V::set1(-87.3f)), V::set1(88.3f));
  const reg n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  reg r = V::fmadd(n, V::set1(-0.693359375f), x);
  r = V::fmadd(n, V::set1(2.12194440e-4f), r);
  reg p = V::set1(1.9875691500e-4f);
  p = V::fmadd(p, r, V::set1(1.3981999507e-3f));
  p = V::fmadd(p, r, V::set1(8.3334519073e-3f));
  p = V::fmadd(p, r, V::set1(4.1665795894e-2f));
  p = V::fmadd(p, r, V::set1(1.6666665459e-1f));
  p = V::fmadd(p, r, V::set1(5.0000001201e-1f));
  p = V::fmadd(V::mul(p, r), r, V::add(r, V::set1(1.0f)));
  return V::mul(p, V::pow2i(n));
}

inline reg vsigmoid(reg x) {
  const reg one = V::set1(1.0f);
  return V::div(one, V::add(one, vexp(V::sub(V::set1(0.0f), x))));
}

// Each op maps one vector position i of its planar rows (i = c * L + column).
struct SiluOp {  // h = silu(a); with d: d = silu'(a) = s (1 + a (1 - s)), written over a
  float* a;
  float* h;
  bool grad;
  void operator()(int64_t i) const {
    const reg av = V::load(a + i), s = vsigmoid(av);
    V::store(h + i, V::mul(av, s));
    if (grad) {
      const reg one = V::set1(1.0f);
      V::store(a + i, V::mul(s, V::fmadd(av, V::sub(one, s), one)));
    }
  }
};

struct AttentionOp {  // out = (o3 + x) * (sigmoid(o3) - 0.5), written over o3
  float* o3;
  const float* x;
  void operator()(int64_t i) const {
    const reg o = V::load(o3 + i), s = vsigmoid(o);
    V::store(o3 + i, V::mul(V::add(o, V::load(x + i)), V::sub(s, V::set1(0.5f))));
  }
};

// With g = dL/dout: dL/do3 = g ((s - 0.5) + (o3 + x) s (1 - s)) written over o3,
// the residual's share dL/dx = g (s - 0.5) written over g.
struct AttentionGradOp {
  float* o3;
  const float* x;
  float* g;
  void operator()(int64_t i) const {
    const reg o = V::load(o3 + i), s = vsigmoid(o), gv = V::load(g + i);
    const reg e = V::sub(s, V::set1(0.5f));
    const reg ds = V::mul(s, V::sub(V::set1(1.0f), s));
    V::store(o3 + i, V::mul(gv, V::fmadd(V::add(o, V::load(x + i)), ds, e)));
    V::store(g + i, V::mul(gv, e));
  }
};

struct EpilogueOp {  // acc = (acc + add) * mul; add and mul optional (nullptr)
  float* acc;
  const float* add;
  const float* mul;
  void operator()(int64_t i) const {
    reg v = V::load(acc + i);
    if (add) v = V::add(v, V::load(add + i));
    if (mul) v = V::mul(v, V::load(mul + i));
    V::store(acc + i, v);
  }
};

template <class Op>
void rowwise(int C, int64_t L, int x0, int nvec, const Op& op) {
  for (int c = 0; c < C; ++c)
    for (int j = 0; j < nvec; ++j) op(c * L + x0 + j * VW);
}

// ---- one work item ----

// The rows of a SPAB work item, carved out of SPAB_SCRATCH_ROWS rows of C x L floats: the
// rings x, h1, h2, the Winograd scratch u and m, and a dL/dout row.
struct Scratch {
  static constexpr int M = Winograd::M, X_RING = 3 * M + 1, H_RING = 3 * M;
  float* x[X_RING];
  float* h1[H_RING];
  float* h2[H_RING];
  float* u;
  float* m[Winograd::N];
  float* g;  // dL/dout row (recompute only)
  Scratch(float* p, int C, int64_t L) {
    for (auto& r : x) r = p, p += C * L;
    for (auto& r : h1) r = p, p += C * L;
    for (auto& r : h2) r = p, p += C * L;
    u = p, p += C * L;
    for (auto& r : m) r = p, p += C * L;
    g = p;
  }
};
static_assert(SPAB_SCRATCH_ROWS == Scratch::X_RING + 2 * Scratch::H_RING + Winograd::N + 2, "scratch rows");

inline int ring(int y, int n) { return ((y % n) + n) % n; }
inline int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Output rows of every stage come in groups of M = Winograd::M rows at r0 + i * M: h1 covers
// rows [r0 - 2, r1 + 2), h2 [r0 - 1, r1 + 1), o3 [r0, r1); step i computes h1 group i, h2
// group i - 1 (from h1 groups i - 2 .. i) and o3 group i - 2 (from h2 groups i - 3 .. i - 1).
// A row computed beyond what a later stage needs may read ring rows not yet written (zero or
// stale but finite); no needed row depends on it.
void run_item(const Problem& pb, const Tiling& tl, float* mem, int n, int r0, int r1, int c0, int c1) {
  constexpr int M = Winograd::M;
  const int C = pb.C, H = pb.H, W = pb.W, tw = c1 - c0;
  const int64_t L = tl.row_length;
  Scratch s(mem, C, L);
  // Buffer column b holds image column c0 - OFF + b.
  const auto col = [&](int image_col) { return image_col - c0 + OFF; };
  // Vector counts of the three stages: h1 on [c0-2, c1+2), h2 on [c0-1, c1+1), o3 on [c0, c1).
  const int n1 = (tw + 4 + VW - 1) / VW, n2 = (tw + 2 + VW - 1) / VW, n3 = (tw + VW - 1) / VW;
  const int x1 = OFF - 2, x2 = OFF - 1, x3 = OFF;
  std::fill(mem, mem + SPAB_SCRATCH_ROWS * C * L, 0.0f);
  const int xa = std::max(0, c0 - 3), xb = std::min(W, c1 + 3);

  const auto load_x = [&](int y) {
    float* row = s.x[ring(y, Scratch::X_RING)];
    if (y < 0 || y >= H) std::fill(row, row + C * L, 0.0f);
    else load_row(pb.x, n, y, xa, xb, row + col(xa), L, C);
  };
  // Zero the columns of a freshly computed row [x0, x0 + nvec*VW) that lie outside the image.
  const auto clear_outside = [&](float* row, int x0, int nvec) {
    const int b_lo = col(0), b_hi = col(W), end = x0 + nvec * VW;
    for (int c = 0; c < C; ++c) {
      float* r = row + c * L;
      for (int b = x0; b < std::min(b_lo, end); ++b) r[b] = 0.0f;
      for (int b = std::max(b_hi, x0); b < end; ++b) r[b] = 0.0f;
    }
  };
  const auto store_core = [&](const View& v, const float* row, int y) {
    store_row(row + OFF, L, C, v, n, y, c0, tw);
  };
  // The convolution of the M rows from row y0 of a ring (its rows y0 - 1 .. y0 + M) into s.m[0 .. M).
  const auto conv_group = [&](float* const* rows, int ring_size, int y0, const ConvWeights& w, int x0, int nvec) {
    const float* in[M + 2];
    for (int i = 0; i < M + 2; ++i) in[i] = rows[ring(y0 - 1 + i, ring_size)];
    conv_rows_winograd(in, L, C, w, x0, nvec, s.u, s.m, s.m);
  };
  // h = silu(a) of group y0 into the ring `h` (rows outside the image zero); core rows stored to
  // h_out and, with silu'(a), to d_out, each when given.
  const auto silu_group = [&](float* const* h, int y0, int x0, int nvec, const View* h_out, const View* d_out) {
    for (int r = 0; r < M; ++r) {
      const int y = y0 + r;
      float* row = h[ring(y, Scratch::H_RING)];
      if (y < 0 || y >= H) {
        std::fill(row, row + C * L, 0.0f);
        continue;
      }
      const bool core = y >= r0 && y < r1;
      rowwise(C, L, x0, nvec, SiluOp{s.m[r], row, d_out && core});
      clear_outside(row, x0, nvec);
      if (core && h_out) store_core(*h_out, row, y);
      if (core && d_out) store_core(*d_out, s.m[r], y);
    }
  };

  const int first = floor_div(-2, M), last_h1 = floor_div(r1 + 1 - r0, M), last_h2 = floor_div(r1 - r0, M),
            last_o3 = floor_div(r1 - 1 - r0, M);
  int next_x = r0 + first * M - 1;
  // Groups wholly outside the image skip their convolution (silu_group zeroes such rows).
  const auto inside = [&](int y0) { return y0 + M > 0 && y0 < H; };
  for (int i = first; i <= last_o3 + 2; ++i) {
    const int y1 = r0 + i * M, y2 = y1 - M, y3 = y2 - M;  // first rows of the h1, h2, o3 groups
    for (; next_x <= y1 + M; ++next_x) load_x(next_x);  // h1's input; o3's residual rows stay
    if (i <= last_h1) {
      if (inside(y1)) conv_group(s.x, Scratch::X_RING, y1, pb.conv[0], x1, n1);
      silu_group(s.h1, y1, x1, n1, &pb.h1, pb.recompute ? &pb.d1 : nullptr);
    }
    if (i - 1 >= first && i - 1 <= last_h2) {
      if (inside(y2)) conv_group(s.h1, Scratch::H_RING, y2, pb.conv[1], x2, n2);
      silu_group(s.h2, y2, x2, n2, pb.recompute ? &pb.h2 : nullptr, pb.recompute ? &pb.d2 : nullptr);
    }
    if (i - 2 < 0 || i - 2 > last_o3) continue;
    conv_group(s.h2, Scratch::H_RING, y3, pb.conv[2], x3, n3);
    for (int r = 0; r < M && y3 + r < r1; ++r) {  // o3 rows, inside the image
      const int v = y3 + r;
      const float* x = s.x[ring(v, Scratch::X_RING)];
      if (pb.recompute) {
        load_row(pb.g_out, n, v, c0, c1, s.g + OFF, L, C);
        rowwise(C, L, x3, n3, AttentionGradOp{s.m[r], x, s.g});
        store_core(pb.g_o3, s.m[r], v);
        store_core(pb.g_xres, s.g, v);
      } else {
        rowwise(C, L, x3, n3, AttentionOp{s.m[r], x});
        store_core(pb.out, s.m[r], v);
      }
    }
  }
}

// out = (conv(in, w) + add) * mul on one item: input rows stream through a ring of 3.
void run_conv_item(const ConvStep& st, const Tiling& tl, float* mem, int n, int r0, int r1, int c0, int c1) {
  const int C = st.C, H = st.H, W = st.W, tw = c1 - c0, nvec = (tw + VW - 1) / VW;
  const int64_t L = tl.row_length;
  float* in[3] = {mem, mem + C * L, mem + 2 * C * L};
  float *acc = mem + 3 * C * L, *add = mem + 4 * C * L, *mul = mem + 5 * C * L;
  std::fill(mem, mem + CONV_SCRATCH_ROWS * C * L, 0.0f);
  const int xa = std::max(0, c0 - 1), xb = std::min(W, c1 + 1);
  const auto load_in = [&](int y) {
    float* row = in[ring(y, 3)];
    if (y < 0 || y >= H) std::fill(row, row + C * L, 0.0f);
    else load_row(st.in, n, y, xa, xb, row + xa - c0 + OFF, L, C);
  };
  load_in(r0 - 1);
  load_in(r0);
  for (int y = r0; y < r1; ++y) {
    load_in(y + 1);
    const float* rows[3] = {in[ring(y - 1, 3)], in[ring(y, 3)], in[ring(y + 1, 3)]};
    conv_row<3>(rows, L, C, st.conv.packed, st.conv.bias, OFF, nvec, acc);
    if (st.add.data) load_row(st.add, n, y, c0, c1, add + OFF, L, C);
    if (st.mul.data) load_row(st.mul, n, y, c0, c1, mul + OFF, L, C);
    rowwise(C, L, OFF, nvec, EpilogueOp{acc, st.add.data ? add : nullptr, st.mul.data ? mul : nullptr});
    store_row(acc + OFF, L, C, st.out, n, y, c0, tw);
  }
}

// dW[co][ci][dy][dx] += sum over `rows` rows and nvec vectors of g[co] * in[ci] shifted by
// (dy - 1, dx - 1), for co in [co0, co0 + CB): g rows [rows][C][L] hold the item's output
// pixels from column OFF, in rows [rows + 2][C][L] the input from one row above.
template <int CB>
void wgrad_tile(const float* g, const float* in, int64_t L, int C, int rows, int nvec,
                int co0, int ci, int dy, double* dw) {
  reg acc[CB][3];
  DSCLORA_UNROLL(32) for (int k = 0; k < CB; ++k) {
    DSCLORA_UNROLL(32) for (int dx = 0; dx < 3; ++dx) acc[k][dx] = V::set1(0.0f);
  }
  for (int r = 0; r < rows; ++r) {
    const float* gr = g + (int64_t(r) * C + co0) * L + OFF;
    const float* ir = in + (int64_t(r + dy) * C + ci) * L + OFF - 1;
    for (int j = 0; j < nvec; ++j) {
      const reg v0 = V::load(ir + j * VW), v1 = V::load(ir + j * VW + 1), v2 = V::load(ir + j * VW + 2);
      DSCLORA_UNROLL(32) for (int k = 0; k < CB; ++k) {
        const reg gk = V::load(gr + k * L + j * VW);
        acc[k][0] = V::fmadd(gk, v0, acc[k][0]);
        acc[k][1] = V::fmadd(gk, v1, acc[k][1]);
        acc[k][2] = V::fmadd(gk, v2, acc[k][2]);
      }
    }
  }
  DSCLORA_UNROLL(32) for (int k = 0; k < CB; ++k) {
    double* dw_k = dw + (int64_t(co0 + k) * C + ci) * 9 + dy * 3;
    DSCLORA_UNROLL(32) for (int dx = 0; dx < 3; ++dx) dw_k[dx] += V::hsum(acc[k][dx]);
  }
}

// One item's share of dW (C, C, 3, 3) and db (C) in dw, db: rows stream in chunks of
// WGRAD_ROWS output rows (plus the input halo), small enough to stay in L1/L2.
void run_wgrad_item(const WGradStep& st, const Tiling& tl, float* mem, double* dw, double* db,
                    int n, int r0, int r1, int c0, int c1) {
  const int C = st.C, H = st.H, W = st.W, tw = c1 - c0, nvec = (tw + VW - 1) / VW;
  const int64_t L = tl.row_length;
  float* g = mem;
  float* in = mem + WGRAD_ROWS * C * L;
  std::fill(mem, mem + (2 * WGRAD_ROWS + 2) * C * L, 0.0f);
  const int xa = std::max(0, c0 - 1), xb = std::min(W, c1 + 1);
  for (int y0 = r0; y0 < r1; y0 += WGRAD_ROWS) {
    const int rows = std::min(WGRAD_ROWS, r1 - y0);
    for (int r = 0; r < rows; ++r) load_row(st.g, n, y0 + r, c0, c1, g + r * C * L + OFF, L, C);
    for (int r = 0; r < rows + 2; ++r) {
      float* row = in + r * C * L;
      const int y = y0 - 1 + r;
      if (y < 0 || y >= H) std::fill(row, row + C * L, 0.0f);
      else load_row(st.in, n, y, xa, xb, row + xa - c0 + OFF, L, C);
    }
    if (dw) {
      for (int co0 = 0; co0 < C;) {
        const int cb = block_size(C - co0, 4);
        for (int ci = 0; ci < C; ++ci)
          for (int dy = 0; dy < 3; ++dy) {
            if (cb == 4) wgrad_tile<4>(g, in, L, C, rows, nvec, co0, ci, dy, dw);
            else if (cb == 3) wgrad_tile<3>(g, in, L, C, rows, nvec, co0, ci, dy, dw);
            else if (cb == 2) wgrad_tile<2>(g, in, L, C, rows, nvec, co0, ci, dy, dw);
            else wgrad_tile<1>(g, in, L, C, rows, nvec, co0, ci, dy, dw);
          }
        co0 += cb;
      }
    }
    if (db) {
      for (int co = 0; co < C; ++co)
        for (int r = 0; r < rows; ++r) {
          const float* gr = g + (int64_t(r) * C + co) * L + OFF;
          for (int i = 0; i < tw; ++i) db[co] += gr[i];
        }
    }
  }
}

// Every (image, band, strip) item on up to `threads` threads, each pulling the next item;
// item(i, scratch, n, r0, r1, c0, c1) gets `scratch_floats` floats of its thread's scratch.
template <class Item>
void run_items(int B, int H, int W, const Tiling& tl, int threads, size_t scratch_floats, Item item) {
  const int64_t items = int64_t(B) * tl.bands * tl.strips;
  std::atomic<int64_t> next{0};
  const int workers = int(std::min<int64_t>(threads, items));
  parallel_for(workers, workers, [&](int64_t, int64_t) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t i; (i = next.fetch_add(1)) < items;) {
      const int strip = int(i % tl.strips), band = int(i / tl.strips % tl.bands);
      const int n = int(i / (int64_t(tl.strips) * tl.bands));
      const int r0 = band * tl.band_height, r1 = std::min(H, r0 + tl.band_height);
      const int c0 = strip * tl.strip_width, c1 = std::min(W, c0 + tl.strip_width);
      item(i, scratch.data(), n, r0, r1, c0, c1);
    }
  });
}

void run(const Problem& pb, const Tiling& tl, int threads) {
  run_items(pb.B, pb.H, pb.W, tl, threads, size_t(SPAB_SCRATCH_ROWS) * pb.C * tl.row_length,
            [&](int64_t, float* mem, int n, int r0, int r1, int c0, int c1) {
              run_item(pb, tl, mem, n, r0, r1, c0, c1);
            });
}

void run(const ConvStep& st, const Tiling& tl, int threads) {
  run_items(st.B, st.H, st.W, tl, threads, size_t(CONV_SCRATCH_ROWS) * st.C * tl.row_length,
            [&](int64_t, float* mem, int n, int r0, int r1, int c0, int c1) {
              run_conv_item(st, tl, mem, n, r0, r1, c0, c1);
            });
}

// Per-item partial sums in double, added up in item order: deterministic for any thread count.
void run(const WGradStep& st, const Tiling& tl, int threads) {
  const int C = st.C;
  const int64_t items = int64_t(st.B) * tl.bands * tl.strips, per_item = int64_t(C) * C * 9 + C;
  std::vector<double> partial(items * per_item, 0.0);
  run_items(st.B, st.H, st.W, tl, threads, size_t(2 * WGRAD_ROWS + 2) * C * tl.row_length,
            [&](int64_t i, float* mem, int n, int r0, int r1, int c0, int c1) {
              double* dw = partial.data() + i * per_item;
              run_wgrad_item(st, tl, mem, st.dw ? dw : nullptr, st.db ? dw + per_item - C : nullptr,
                             n, r0, r1, c0, c1);
            });
  for (int64_t k = 0; k < per_item; ++k) {
    double sum = 0.0;
    for (int64_t i = 0; i < items; ++i) sum += partial[i * per_item + k];
    if (k < per_item - C) {
      if (st.dw) st.dw[k] = float(sum);
    } else if (st.db) {
      st.db[k - (per_item - C)] = float(sum);
    }
  }
}

