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
// ring buffers: x (4 rows), h1 (3), h2 (3); at step t the item computes h1 row t, h2 row t-1
// and o3 row t-2, so the three convolutions chain in cache and only the 3-pixel halo of each
// band and strip is computed twice. Rows and columns outside the image are zero in every
// ring (the zero padding of each convolution).

using V = Simd<kIsa>;
using reg = typename V::reg;
constexpr int VW = V::width;

// ---- the convolution: CB output channels x NW pixel vectors in registers ----
// A register tile holds CB x NW accumulators, CB broadcast weights and one input vector.

// out[co0+k][x0 + j*VW ...] = bias + sum_{ci, dy, dx} w[co0+k][ci][dy][dx] * in[dy][ci][x + dx - 1]
// with the weights packed by pack_weights: the block's [ci][tap][k] at wp + co0 * 9 * C.
template <int CB, int NW>
void conv_tile(const float* const* in, int64_t L, int C, const float* wp,
               const float* bias, int co0, int x0, float* out) {
  reg acc[CB][NW];
  DSCLORA_UNROLL(32) for (int k = 0; k < CB; ++k) {
    const reg b = V::set1(bias[co0 + k]);
    DSCLORA_UNROLL(32) for (int j = 0; j < NW; ++j) acc[k][j] = b;
  }
  const float* w_ci = wp + int64_t(co0) * 9 * C;
  for (int ci = 0; ci < C; ++ci, w_ci += 9 * CB) {
    DSCLORA_UNROLL(32) for (int dy = 0; dy < 3; ++dy) {
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
template <int CB, int NW>
void conv_tile_n(int nw, const float* const* in, int64_t L, int C, const float* wp,
                 const float* bias, int co0, int x0, float* out) {
  if constexpr (NW > 1) {
    if (nw < NW) return conv_tile_n<CB, NW - 1>(nw, in, L, C, wp, bias, co0, x0, out);
  }
  conv_tile<CB, NW>(in, L, C, wp, bias, co0, x0, out);
}

// All nvec pixel vectors of a row in the fewest tiles, of balanced sizes (33 vectors with
// NW = 4: six tiles of 4 and three of 3, not eight of 4 and an inefficient one of 1).
template <int CB>
void conv_block_row(const float* const* in, int64_t L, int C, const float* wp,
                    const float* bias, int co0, int x0, int nvec, float* out) {
  constexpr int NW = V::acc_regs / CB;
  const int tiles = (nvec + NW - 1) / NW, base = nvec / tiles, larger = nvec % tiles;
  for (int t = 0, j = 0; t < tiles; ++t) {
    const int nw = base + (t < larger);
    conv_tile_n<CB, NW>(nw, in, L, C, wp, bias, co0, x0 + j * VW, out);
    j += nw;
  }
}

// One output row: nvec pixel vectors from buffer column x0, all C output channels.
void conv_row(const float* const* in, int64_t L, int C, const ConvWeights& w, int x0,
              int nvec, float* out) {
  for (int co0 = 0; co0 < C;) {
    const int cb = block_size(C - co0, V::max_block);
    if (cb == 4) {
      if constexpr (V::max_block >= 4) conv_block_row<4>(in, L, C, w.packed, w.bias, co0, x0, nvec, out);
    } else if (cb == 3) {
      conv_block_row<3>(in, L, C, w.packed, w.bias, co0, x0, nvec, out);
    } else if (cb == 2) {
      conv_block_row<2>(in, L, C, w.packed, w.bias, co0, x0, nvec, out);
    } else {
      conv_block_row<1>(in, L, C, w.packed, w.bias, co0, x0, nvec, out);
    }
    co0 += cb;
  }
}

// Weights (co, ci, 3, 3) -> the layout conv_tile reads: for each register block of output
// channels [co0, co0 + cb) (conv_row's partition), [ci][tap][k] at co0 * 9 * C.
void pack_weights(int C, const float* w, float* packed) {
  for (int co0 = 0; co0 < C;) {
    const int cb = block_size(C - co0, V::max_block);
    for (int ci = 0; ci < C; ++ci)
      for (int tap = 0; tap < 9; ++tap)
        for (int k = 0; k < cb; ++k)
          packed[int64_t(co0) * 9 * C + (ci * 9 + tap) * cb + k] = w[(int64_t(co0 + k) * C + ci) * 9 + tap];
    co0 += cb;
  }
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

// The rows of a SPAB work item, carved out of SPAB_SCRATCH_ROWS rows of C x L floats.
struct Scratch {
  float* x[4];
  float* h1[3];
  float* h2[3];
  float* acc;  // conv output row
  float* g;    // dL/dout row (recompute only)
  Scratch(float* p, int C, int64_t L) {
    for (auto& r : x) r = p, p += C * L;
    for (auto& r : h1) r = p, p += C * L;
    for (auto& r : h2) r = p, p += C * L;
    acc = p, p += C * L;
    g = p;
  }
};

inline int ring(int y, int n) { return ((y % n) + n) % n; }

void run_item(const Problem& pb, const Tiling& tl, float* mem, int n, int r0, int r1, int c0, int c1) {
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
    float* row = s.x[ring(y, 4)];
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

  load_x(r0 - 3);
  load_x(r0 - 2);
  for (int t = r0 - 2; t <= r1 + 1; ++t) {
    load_x(t + 1);
    {  // h1 row t
      float* h1 = s.h1[ring(t, 3)];
      if (t < 0 || t >= H) {
        std::fill(h1, h1 + C * L, 0.0f);
      } else {
        const float* in[3] = {s.x[ring(t - 1, 4)], s.x[ring(t, 4)], s.x[ring(t + 1, 4)]};
        conv_row(in, L, C, pb.conv[0], x1, n1, s.acc);
        const bool core = t >= r0 && t < r1;
        rowwise(C, L, x1, n1, SiluOp{s.acc, h1, pb.recompute && core});
        clear_outside(h1, x1, n1);
        if (core) {
          store_core(pb.h1, h1, t);
          if (pb.recompute) store_core(pb.d1, s.acc, t);
        }
      }
    }
    const int u = t - 1;  // h2 row u
    if (u >= r0 - 1 && u <= r1) {
      float* h2 = s.h2[ring(u, 3)];
      if (u < 0 || u >= H) {
        std::fill(h2, h2 + C * L, 0.0f);
      } else {
        const float* in[3] = {s.h1[ring(u - 1, 3)], s.h1[ring(u, 3)], s.h1[ring(u + 1, 3)]};
        conv_row(in, L, C, pb.conv[1], x2, n2, s.acc);
        const bool core = u >= r0 && u < r1;
        rowwise(C, L, x2, n2, SiluOp{s.acc, h2, pb.recompute && core});
        clear_outside(h2, x2, n2);
        if (core && pb.recompute) {
          store_core(pb.h2, h2, u);
          store_core(pb.d2, s.acc, u);
        }
      }
    }
    const int v = t - 2;  // o3 row v, always inside the image
    if (v >= r0 && v < r1) {
      const float* in[3] = {s.h2[ring(v - 1, 3)], s.h2[ring(v, 3)], s.h2[ring(v + 1, 3)]};
      conv_row(in, L, C, pb.conv[2], x3, n3, s.acc);
      const float* x = s.x[ring(v, 4)];
      if (pb.recompute) {
        load_row(pb.g_out, n, v, c0, c1, s.g + OFF, L, C);
        rowwise(C, L, x3, n3, AttentionGradOp{s.acc, x, s.g});
        store_core(pb.g_o3, s.acc, v);
        store_core(pb.g_xres, s.g, v);
      } else {
        rowwise(C, L, x3, n3, AttentionOp{s.acc, x});
        store_core(pb.out, s.acc, v);
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
    conv_row(rows, L, C, st.conv, OFF, nvec, acc);
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

