// Tile kernels of the blockwise spatial-affinity L1 loss for one instruction set.
//
// No include guard on purpose: affinity.cpp compiles this file once per instruction set through
// isa_copies.h (kIsa, kVectorBytes, simd_vector.h). The code uses the vectors of simd_vector.h,
// so one source serves SSE2, NEON, AVX2 and AVX-512; register blocking is explicit (accumulator
// arrays of vectors, fully unrolled). The exact recomputation of tied entries runs the same tile
// code in double.
//
// Layout: every feature map is channel-major, x[c * ld + pixel], pixels zero beyond N.

template <typename T> using Vec = Vector<T, kVectorBytes>;

constexpr int kTileColumns = 6;  // columns j per difference micro-tile
constexpr int kTileChannels = kVectorBytes == 64 ? 12 : 6;  // channels per gradient micro-tile (avx512: 12)

template <typename T> constexpr int kLanes = kVectorBytes / sizeof(T);
constexpr int kGroupVectors = 2;  // vectors of rows i per micro-tile
template <typename T> constexpr int kGroupRows = kGroupVectors * kLanes<T>;

template <typename T> DSCLORA_INLINE Vec<T> load(const T* p) { return load_vector<Vec<T>>(p); }
template <typename T> DSCLORA_INLINE void store(T* p, Vec<T> v) { store_vector(p, v); }
template <typename T> DSCLORA_INLINE Vec<T> broadcast(T x) { return splat<Vec<T>>(x); }

template <typename T> DSCLORA_INLINE T lowest(Vec<T> v) {
  T least = v[0];
  for (int l = 1; l < kLanes<T>; ++l) least = std::min(least, v[l]);
  return least;
}

// acc[m][v] += x[k, i0 + v*lanes ...] * x[k, j0 + m] summed over channels k: a (kGroupRows x MJ)
// block of the affinity x̂ᵀx̂ from x's Operand at (i0, j0), rows vectorised, columns broadcast.
template <typename T, int MJ>
DSCLORA_INLINE void affinity_block(const Operand<T>& x, Vec<T> (&acc)[MJ][kGroupVectors]) {
  for (int64_t k = 0; k < x.channels; ++k) {
    const T* rows = x.rows + k * x.row_ld;
    const T* columns = x.columns + k * x.column_ld;
    Vec<T> a[kGroupVectors];
    DSCLORA_UNROLL(16) for (int v = 0; v < kGroupVectors; ++v) a[v] = load(rows + v * kLanes<T>);
    DSCLORA_UNROLL(16) for (int m = 0; m < MJ; ++m) {
      const Vec<T> b = broadcast(columns[m]);
      DSCLORA_UNROLL(16) for (int v = 0; v < kGroupVectors; ++v) acc[m][v] += a[v] * b;
    }
  }
}

// d = S − T on one micro-tile (kGroupRows<T> x MJ) from the student's and the teacher's operand.
// S and T are computed by the same operations, so identical operands give D = 0 exactly. S first
// (parked in L1), then T in the same accumulators: enough independent FMA chains.
template <typename T, int MJ>
DSCLORA_INLINE void difference_block(const Operand<T>& student, const Operand<T>& teacher,
                                     Vec<T> (&d)[MJ][kGroupVectors]) {
  Vec<T> s[MJ][kGroupVectors], t[MJ][kGroupVectors] = {};
  affinity_block<T, MJ>(student, t);
  DSCLORA_UNROLL(16) for (int m = 0; m < MJ; ++m) {
    DSCLORA_UNROLL(16) for (int v = 0; v < kGroupVectors; ++v) {
      s[m][v] = t[m][v];
      t[m][v] = Vec<T>{};
    }
  }
  affinity_block<T, MJ>(teacher, t);
  DSCLORA_UNROLL(16) for (int m = 0; m < MJ; ++m) {
    DSCLORA_UNROLL(16) for (int v = 0; v < kGroupVectors; ++v) d[m][v] = s[m][v] - t[m][v];
  }
}

// The float64 operands of the exact recomputation of D for one row block and one column tile:
// F[c, i] · r_i in float64 (raw features times the inverse norm r = 1 / (‖F‖ + eps)), channel-major
// like x̂ and zero beyond the n pixels, so the tile code reads them as it reads x̂, never past the
// raw (C, n) rows. Each thread keeps one; the row block's and the column tile's values are
// computed on the first tie that needs them (inputs without ties never pay for them).
template <typename T>
class ExactOperands {
 public:
  void start_row_block(const Image<T>& im, int64_t i_begin) {
    im_ = &im;
    i_begin_ = i_begin;
    rows_ready_ = false;
  }

  void start_column_tile(int64_t j_begin) {
    j_begin_ = j_begin;
    columns_ready_ = false;
  }

  // The student's / teacher's operand of the micro-tile at rows i0, columns j0 (inside the current
  // row block and column tile).
  Operand<double> student(int64_t i0, int64_t j0) { return operand(0, im_->cs, i0, j0); }
  Operand<double> teacher(int64_t i0, int64_t j0) { return operand(im_->cs, im_->ct, i0, j0); }

 private:
  // Row strides: a row block / column tile plus one cache line, so channels do not share L1 sets.
  static constexpr int64_t kRowLd = kRowBlock + 8, kColumnLd = kColumnTile + 8;

  Operand<double> operand(int64_t first_channel, int64_t channels, int64_t i0, int64_t j0) {
    if (!rows_ready_) fill(i_begin_, kRowBlock, kRowLd, rows_);
    if (!columns_ready_) fill(j_begin_, kColumnTile, kColumnLd, columns_);
    rows_ready_ = columns_ready_ = true;
    return Operand<double>{rows_.data() + first_channel * kRowLd + (i0 - i_begin_), kRowLd,
                           columns_.data() + first_channel * kColumnLd + (j0 - j_begin_), kColumnLd, channels};
  }

  // out[c * ld + k] = F[c, first + k] · r[first + k] for the pixels first + k < n, else 0; the
  // student's channels, then the teacher's.
  void fill(int64_t first, int64_t count, int64_t ld, std::vector<double>& out) const {
    const Image<T>& im = *im_;
    out.resize((im.cs + im.ct) * ld);
    const int64_t pixels = std::clamp<int64_t>(im.n - first, 0, count);
    auto side = [&](const T* f, const double* r, int64_t channels, double* o) {
      for (int64_t c = 0; c < channels; ++c, o += ld) {
        const T* fc = f + c * im.n + first;
        for (int64_t k = 0; k < pixels; ++k) o[k] = fc[k] * r[first + k];  // vectorised by the compiler
        std::fill(o + pixels, o + count, 0.0);
      }
    };
    side(im.fs, im.rs, im.cs, out.data());
    side(im.ft, im.rt, im.ct, out.data() + im.cs * ld);
  }

  const Image<T>* im_ = nullptr;
  int64_t i_begin_ = 0, j_begin_ = 0;
  bool rows_ready_ = false, columns_ready_ = false;
  std::vector<double> rows_, columns_;
};

// Replaces every entry of d with |d| < tie_bound by D recomputed in float64 from the raw features
// (exact signs); the bound covers the rounding of x̂ and of the dot products in T. The rows are
// recomputed a float64 micro-tile (kGroupRows<double> rows) at a time, by the code above in
// double, and only where `smallest` (min |d| per row vector of d) shows a tie.
template <typename T, int MJ>
DSCLORA_NOINLINE void refine_ties(const Image<T>& im, ExactOperands<T>& exact, int64_t i0, int64_t j0,
                                  const Vec<T> (&smallest)[kGroupVectors], Vec<T> (&d)[MJ][kGroupVectors]) {
  constexpr int kPart = kGroupRows<double> / kLanes<T>;  // vectors of d per float64 micro-tile
  const Vec<T> bound = broadcast(im.tie_bound);
  for (int first = 0; first < kGroupVectors; first += kPart) {
    Vec<T> least = smallest[first];
    for (int u = 1; u < kPart; ++u) least = minimum(least, smallest[first + u]);
    if (!(lowest<T>(least) < im.tie_bound)) continue;
    const int64_t i = i0 + first * kLanes<T>;
    Vec<double> exact_d[MJ][kGroupVectors];
    difference_block<double, MJ>(exact.student(i, j0), exact.teacher(i, j0), exact_d);
    for (int m = 0; m < MJ; ++m) {
      T values[kGroupRows<double>];  // column m of the exact D, in T
      for (int v = 0; v < kGroupVectors; ++v) store_converted(values + v * kLanes<double>, exact_d[m][v]);
      for (int u = 0; u < kPart; ++u) {
        Vec<T>& x = d[m][first + u];
        x = select_less(absolute(x), bound, load(values + u * kLanes<T>), x);
      }
    }
  }
}

// D = S − T on rows [i0, i0 + kGroupRows) x columns [j0, j0 + MJ); returns Σ|D| and, when `signs`
// is given, writes sign(D) transposed: signs[m * signs_ld + r] = sign(D[i0 + r, j0 + m]), with
// ties refined (refine_ties) when im.tie_bound > 0. Identical student and teacher features give
// D = 0 exactly (sign 0).
template <typename T, int MJ>
DSCLORA_INLINE double difference_tile(const Image<T>& im, ExactOperands<T>& exact, int64_t i0, int64_t j0,
                                      T* signs, int64_t signs_ld) {
  Vec<T> d[MJ][kGroupVectors];
  difference_block<T, MJ>(tile_operand(im.xs, im.cs, im.ld, i0, j0), tile_operand(im.xt, im.ct, im.ld, i0, j0), d);
  if (signs && im.tie_bound > 0) {
    Vec<T> smallest[kGroupVectors];  // min |D| per row vector
    DSCLORA_UNROLL(16) for (int v = 0; v < kGroupVectors; ++v) {
      smallest[v] = absolute(d[0][v]);
      DSCLORA_UNROLL(16) for (int m = 1; m < MJ; ++m) smallest[v] = minimum(absolute(d[m][v]), smallest[v]);
    }
    Vec<T> least = smallest[0];
    DSCLORA_UNROLL(16) for (int v = 1; v < kGroupVectors; ++v) least = minimum(least, smallest[v]);
    if (lowest<T>(least) < im.tie_bound) refine_ties<T, MJ>(im, exact, i0, j0, smallest, d);
  }
  Vec<T> abs_sum = {};
  DSCLORA_UNROLL(16) for (int m = 0; m < MJ; ++m) {
    DSCLORA_UNROLL(16) for (int v = 0; v < kGroupVectors; ++v) {
      abs_sum += absolute(d[m][v]);
      if (signs) store(signs + m * signs_ld + v * kLanes<T>, signum(d[m][v]));
    }
  }
  T total = 0;
  for (int l = 0; l < kLanes<T>; ++l) total += abs_sum[l];
  return total;
}

// Σ|D| over rows [i_begin, i_begin + kRowBlock) x columns [j0, j0 + columns), micro-tiles of MJ
// columns (the remainder by smaller MJ); signs as in difference_tile, indexed from (i_begin, j0).
template <typename T, int MJ>
double difference_columns(const Image<T>& im, ExactOperands<T>& exact, int64_t i_begin, int64_t j0, int64_t columns,
                          T* signs) {
  double total = 0;
  int64_t j = 0;
  for (; j + MJ <= columns; j += MJ) {
    for (int64_t r = 0; r < kRowBlock; r += kGroupRows<T>) {
      T* tile = signs ? signs + j * kRowBlock + r : nullptr;
      total += difference_tile<T, MJ>(im, exact, i_begin + r, j0 + j, tile, kRowBlock);
    }
  }
  if constexpr (MJ > 1) {
    if (j < columns)
      total += difference_columns<T, MJ - 1>(im, exact, i_begin, j0 + j, columns - j,
                                             signs ? signs + j * kRowBlock : nullptr);
  }
  return total;
}

// g[c0 + m, i0 + r] += Σ_j x[c0 + m, j0 + j] * signs[j * kRowBlock + r] for MC channels and one
// group of rows r: the gradient update G[:, I] += X[:, J] sign(D_IJ)ᵀ, accumulators in registers.
template <typename T, int MC>
DSCLORA_INLINE void gradient_tile(const T* x, int64_t ld, int64_t c0, int64_t j0, int64_t columns,
                                  const T* signs, T* g, int64_t i0) {
  Vec<T> acc[MC][kGroupVectors];
  DSCLORA_UNROLL(16) for (int m = 0; m < MC; ++m) {
    DSCLORA_UNROLL(16) for (int v = 0; v < kGroupVectors; ++v) acc[m][v] = load(g + (c0 + m) * ld + i0 + v * kLanes<T>);
  }
  for (int64_t j = 0; j < columns; ++j) {
    Vec<T> sign[kGroupVectors];
    DSCLORA_UNROLL(16) for (int v = 0; v < kGroupVectors; ++v) sign[v] = load(signs + j * kRowBlock + v * kLanes<T>);
    DSCLORA_UNROLL(16) for (int m = 0; m < MC; ++m) {
      const Vec<T> b = broadcast(x[(c0 + m) * ld + j0 + j]);
      DSCLORA_UNROLL(16) for (int v = 0; v < kGroupVectors; ++v) acc[m][v] += b * sign[v];
    }
  }
  DSCLORA_UNROLL(16) for (int m = 0; m < MC; ++m) {
    DSCLORA_UNROLL(16) for (int v = 0; v < kGroupVectors; ++v) store(g + (c0 + m) * ld + i0 + v * kLanes<T>, acc[m][v]);
  }
}

// G[c, i_begin + r] += Σ_j X[c, j0 + j] signs[j, r] for channels [c_begin, channels), MC at a time
// (the remainder by smaller MC), all row groups of the block.
template <typename T, int MC>
void gradient_columns(const T* x, int64_t channels, int64_t ld, int64_t c_begin, int64_t i_begin, int64_t j0,
                      int64_t columns, const T* signs, T* g) {
  int64_t c = c_begin;
  for (; c + MC <= channels; c += MC) {
    for (int64_t r = 0; r < kRowBlock; r += kGroupRows<T>)
      gradient_tile<T, MC>(x, ld, c, j0, columns, signs + r, g, i_begin + r);
  }
  if constexpr (MC > 1) {
    if (c < channels) gradient_columns<T, MC - 1>(x, channels, ld, c, i_begin, j0, columns, signs, g);
  }
}

// Σ|D| of one row block of one image against all column tiles; with gradient outputs, accumulates
// G_s[:, block] and G_t[:, block]. Without them only columns from the block on are visited: the
// diagonal block once, the rest twice (D is symmetric).
template <typename T>
double row_block(const Image<T>& im, int64_t i_begin, T* signs, ExactOperands<T>& exact) {
  const bool upper = !im.gs && !im.gt;
  double total = 0;
  int64_t j0 = upper ? i_begin : 0;
  exact.start_row_block(im, i_begin);
  while (j0 < im.width) {
    exact.start_column_tile(j0);
    const bool diagonal = upper && j0 == i_begin;
    const int64_t columns = diagonal ? kRowBlock : std::min(kColumnTile, im.width - j0);
    const double weight = upper && !diagonal ? 2.0 : 1.0;
    total += weight * difference_columns<T, kTileColumns>(im, exact, i_begin, j0, columns, upper ? nullptr : signs);
    if (im.gs) gradient_columns<T, kTileChannels>(im.xs, im.cs, im.ld, 0, i_begin, j0, columns, signs, im.gs);
    if (im.gt) gradient_columns<T, kTileChannels>(im.xt, im.ct, im.ld, 0, i_begin, j0, columns, signs, im.gt);
    j0 += columns;
  }
  return total;
}

// The whole pass for one element type: returns Σ_b Σ_ij |D_ij| and fills G_s / G_t (if requested;
// zero-initialised by the caller) with G = Σ_j sign(D_ij) x̂_j. Work items are (image, row block);
// each owns its rows of G and its loss slot, so the result is independent of the thread count.
template <typename T>
double run(const Problem& p) {
  const int64_t blocks = row_blocks(p.n), items = p.batch * blocks;
  const bool upper = !p.gs && !p.gt;
  std::vector<double> partial(items, 0.0);
  parallel_for(items, p.threads, [&](int64_t begin, int64_t end) {
    std::vector<T> signs(upper ? 0 : kColumnTile * kRowBlock);
    ExactOperands<T> exact;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t w = item % blocks;
      // Without gradients block k costs blocks - k tiles: interleave cheap and dear blocks so
      // that contiguous chunks of items carry equal work.
      const int64_t block = w % 2 == 0 ? w / 2 : blocks - 1 - w / 2;
      const Image<T> im = image<T>(p, item / blocks);
      partial[item] = row_block<T>(im, block * kRowBlock, signs.data(), exact);
    }
  });
  double total = 0;
  for (double v : partial) total += v;
  return total;
}
