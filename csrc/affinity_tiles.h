// Tile kernels of the blockwise spatial-affinity L1 loss for one instruction set.
//
// No include guard on purpose: affinity.cpp includes this file once per instruction set, inside a
// namespace that defines kVectorBytes (SIMD width), kTileColumns (columns j per difference
// micro-tile) and kTileChannels (channels per gradient micro-tile), after simd_vector.h and, for
// x86, inside that instruction set's target region. The code uses the vectors of simd_vector.h,
// so one source serves SSE2, NEON, AVX2 and AVX-512; register blocking is explicit (accumulator
// arrays of vectors, fully unrolled).
//
// Layout: every feature map is channel-major, x[c * ld + pixel], pixels zero beyond N.

template <typename T> using Vec = Vector<T, kVectorBytes>;

template <typename T> constexpr int kLanes = kVectorBytes / sizeof(T);
constexpr int kGroupVectors = 2;  // vectors of rows i per micro-tile
template <typename T> constexpr int kGroupRows = kGroupVectors * kLanes<T>;

template <typename T> DSCLORA_INLINE Vec<T> load(const T* p) { return load_vector<Vec<T>>(p); }
template <typename T> DSCLORA_INLINE void store(T* p, Vec<T> v) { store_vector(p, v); }
template <typename T> DSCLORA_INLINE Vec<T> broadcast(T x) { return splat<Vec<T>>(x); }

// acc[m][v] += x[k, i0 + v*lanes ...] * x[k, j0 + m] summed over channels k: a (rows x MJ) block of
// the affinity x̂ᵀx̂, rows vectorised, columns broadcast.
template <typename T, int MJ>
DSCLORA_INLINE void affinity_block(const T* x, int64_t channels, int64_t ld, int64_t i0, int64_t j0,
                                   Vec<T> (&acc)[MJ][kGroupVectors]) {
  for (int64_t k = 0; k < channels; ++k) {
    const T* row = x + k * ld;
    Vec<T> a[kGroupVectors];
    DSCLORA_UNROLL(16) for (int v = 0; v < kGroupVectors; ++v) a[v] = load(row + i0 + v * kLanes<T>);
    DSCLORA_UNROLL(16) for (int m = 0; m < MJ; ++m) {
      const Vec<T> b = broadcast(row[j0 + m]);
      DSCLORA_UNROLL(16) for (int v = 0; v < kGroupVectors; ++v) acc[m][v] += a[v] * b;
    }
  }
}

// Replaces every entry of d with |d| < tie_bound by D recomputed in float64 from the raw features
// (exact signs); the bound covers the rounding of x̂ and of the float32 dot products.
template <typename T, int MJ>
DSCLORA_NOINLINE void refine_ties(const Image<T>& im, int64_t i0, int64_t j0, Vec<T> (&d)[MJ][kGroupVectors]) {
  for (int m = 0; m < MJ; ++m) {
    for (int v = 0; v < kGroupVectors; ++v) {
      for (int l = 0; l < kLanes<T>; ++l) {
        const int64_t i = i0 + v * kLanes<T> + l, j = j0 + m;
        const T value = d[m][v][l];
        if (!(value < im.tie_bound && -value < im.tie_bound) || i >= im.n || j >= im.n) continue;
        d[m][v][l] = static_cast<T>(exact_difference(im, i, j));
      }
    }
  }
}

// D = S − T on rows [i0, i0 + kGroupRows) x columns [j0, j0 + MJ); returns Σ|D| and, when `signs`
// is given, writes sign(D) transposed: signs[m * signs_ld + r] = sign(D[i0 + r, j0 + m]).
// S and T are computed by the same operations, so identical student and teacher features give
// D = 0 exactly (sign 0).
template <typename T, int MJ>
DSCLORA_INLINE double difference_tile(const Image<T>& im, int64_t i0, int64_t j0, T* signs, int64_t signs_ld) {
  // S first (parked in L1), then T in the same accumulators: enough independent FMA chains.
  Vec<T> s[MJ][kGroupVectors], d[MJ][kGroupVectors] = {};
  affinity_block<T, MJ>(im.xs, im.cs, im.ld, i0, j0, d);
  DSCLORA_UNROLL(16) for (int m = 0; m < MJ; ++m) {
    DSCLORA_UNROLL(16) for (int v = 0; v < kGroupVectors; ++v) {
      s[m][v] = d[m][v];
      d[m][v] = Vec<T>{};
    }
  }
  affinity_block<T, MJ>(im.xt, im.ct, im.ld, i0, j0, d);
  Vec<T> smallest = broadcast(std::numeric_limits<T>::infinity());
  DSCLORA_UNROLL(16) for (int m = 0; m < MJ; ++m) {
    DSCLORA_UNROLL(16) for (int v = 0; v < kGroupVectors; ++v) {
      d[m][v] = s[m][v] - d[m][v];
      const Vec<T> a = absolute(d[m][v]);
      smallest = minimum(a, smallest);
    }
  }
  if (signs && im.tie_bound > 0) {
    T least = smallest[0];
    for (int l = 1; l < kLanes<T>; ++l) least = std::min(least, smallest[l]);
    if (least < im.tie_bound) refine_ties<T, MJ>(im, i0, j0, d);
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
double difference_columns(const Image<T>& im, int64_t i_begin, int64_t j0, int64_t columns, T* signs) {
  double total = 0;
  int64_t j = 0;
  for (; j + MJ <= columns; j += MJ) {
    for (int64_t r = 0; r < kRowBlock; r += kGroupRows<T>) {
      T* tile = signs ? signs + j * kRowBlock + r : nullptr;
      total += difference_tile<T, MJ>(im, i_begin + r, j0 + j, tile, kRowBlock);
    }
  }
  if constexpr (MJ > 1) {
    if (j < columns)
      total += difference_columns<T, MJ - 1>(im, i_begin, j0 + j, columns - j, signs ? signs + j * kRowBlock : nullptr);
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
double row_block(const Image<T>& im, int64_t i_begin, T* signs) {
  const bool upper = !im.gs && !im.gt;
  double total = 0;
  int64_t j0 = upper ? i_begin : 0;
  while (j0 < im.width) {
    const bool diagonal = upper && j0 == i_begin;
    const int64_t columns = diagonal ? kRowBlock : std::min(kColumnTile, im.width - j0);
    const double weight = upper && !diagonal ? 2.0 : 1.0;
    total += weight * difference_columns<T, kTileColumns>(im, i_begin, j0, columns, upper ? nullptr : signs);
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
    for (int64_t item = begin; item < end; ++item) {
      const int64_t w = item % blocks;
      // Without gradients block k costs blocks - k tiles: interleave cheap and dear blocks so
      // that contiguous chunks of items carry equal work.
      const int64_t block = w % 2 == 0 ? w / 2 : blocks - 1 - w / 2;
      partial[item] = row_block<T>(image<T>(p, item / blocks), block * kRowBlock, signs.data());
    }
  });
  double total = 0;
  for (double v : partial) total += v;
  return total;
}
