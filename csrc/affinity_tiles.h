// Tile kernels of the blockwise spatial-affinity L1 loss for one instruction set.
//
// No include guard on purpose: affinity.cpp includes this file once per instruction set, inside a
// namespace that defines kVectorBytes (SIMD width), kTileColumns (columns j per difference
// micro-tile) and kTileChannels (channels per gradient micro-tile), under a matching
// `#pragma GCC target`. The code uses GCC vector extensions, so one source serves SSE2, AVX2 and
// AVX-512; register blocking is explicit (accumulator arrays of vectors, fully unrolled).
//
// Layout: every feature map is channel-major, x[c * ld + pixel], pixels zero beyond N.

template <typename T> struct VecOf;
template <> struct VecOf<float> { typedef float type __attribute__((vector_size(kVectorBytes))); };
template <> struct VecOf<double> { typedef double type __attribute__((vector_size(kVectorBytes))); };
template <typename T> using Vec = typename VecOf<T>::type;

template <typename T> constexpr int kLanes = kVectorBytes / sizeof(T);
constexpr int kGroupVectors = 2;  // vectors of rows i per micro-tile
template <typename T> constexpr int kGroupRows = kGroupVectors * kLanes<T>;

#define DSCLORA_INLINE inline __attribute__((always_inline))
#define DSCLORA_UNROLL _Pragma("GCC unroll 16")

template <typename T> DSCLORA_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T> DSCLORA_INLINE void store(T* p, Vec<T> v) { std::memcpy(p, &v, sizeof v); }
// x * 1 folds away, leaving a single broadcast instruction.
template <typename T> DSCLORA_INLINE Vec<T> broadcast(T x) { return x * (Vec<T>{} + T(1)); }

// acc[m][v] += x[k, i0 + v*lanes ...] * x[k, j0 + m] summed over channels k: a (rows x MJ) block of
// the affinity x̂ᵀx̂, rows vectorised, columns broadcast.
template <typename T, int MJ>
DSCLORA_INLINE void affinity_block(const T* x, int64_t channels, int64_t ld, int64_t i0, int64_t j0,
                                   Vec<T> (&acc)[MJ][kGroupVectors]) {
  for (int64_t k = 0; k < channels; ++k) {
    const T* row = x + k * ld;
    Vec<T> a[kGroupVectors];
    DSCLORA_UNROLL for (int v = 0; v < kGroupVectors; ++v) a[v] = load(row + i0 + v * kLanes<T>);
    DSCLORA_UNROLL for (int m = 0; m < MJ; ++m) {
      const Vec<T> b = broadcast(row[j0 + m]);
      DSCLORA_UNROLL for (int v = 0; v < kGroupVectors; ++v) acc[m][v] += a[v] * b;
    }
  }
}

// D = S − T on rows [i0, i0 + kGroupRows) x columns [j0, j0 + MJ); returns Σ|D| and, when `signs`
// is given, writes sign(D) transposed: signs[m * signs_ld + r] = sign(D[i0 + r, j0 + m]).
// S and T use separate accumulators and the same operation order, so identical student and
// teacher features give D = 0 exactly (sign 0).
template <typename T, int MJ>
DSCLORA_INLINE double difference_tile(const T* xs, int64_t cs, const T* xt, int64_t ct, int64_t ld,
                                      int64_t i0, int64_t j0, T* signs, int64_t signs_ld) {
  Vec<T> s[MJ][kGroupVectors] = {}, t[MJ][kGroupVectors] = {};
  affinity_block<T, MJ>(xs, cs, ld, i0, j0, s);
  affinity_block<T, MJ>(xt, ct, ld, i0, j0, t);
  const Vec<T> one = Vec<T>{} + T(1), zero = {};
  Vec<T> abs_sum = {};
  DSCLORA_UNROLL for (int m = 0; m < MJ; ++m) {
    DSCLORA_UNROLL for (int v = 0; v < kGroupVectors; ++v) {
      const Vec<T> d = s[m][v] - t[m][v];
      abs_sum += d > 0 ? d : -d;
      if (signs) store(signs + m * signs_ld + v * kLanes<T>, (d > 0 ? one : zero) - (d < 0 ? one : zero));
    }
  }
  T total = 0;
  for (int l = 0; l < kLanes<T>; ++l) total += abs_sum[l];
  return total;
}

// Σ|D| over rows [i_begin, i_begin + rows) x columns [j0, j0 + columns), micro-tiles of MJ columns
// (the remainder by smaller MJ); signs as in difference_tile, indexed from (i_begin, j0).
template <typename T, int MJ>
double difference_columns(const T* xs, int64_t cs, const T* xt, int64_t ct, int64_t ld, int64_t i_begin,
                          int64_t rows, int64_t j0, int64_t columns, T* signs, int64_t signs_ld) {
  double total = 0;
  int64_t j = 0;
  for (; j + MJ <= columns; j += MJ) {
    for (int64_t r = 0; r < rows; r += kGroupRows<T>) {
      T* tile = signs ? signs + j * signs_ld + r : nullptr;
      total += difference_tile<T, MJ>(xs, cs, xt, ct, ld, i_begin + r, j0 + j, tile, signs_ld);
    }
  }
  if constexpr (MJ > 1) {
    if (j < columns) {
      T* rest = signs ? signs + j * signs_ld : nullptr;
      total += difference_columns<T, MJ - 1>(xs, cs, xt, ct, ld, i_begin, rows, j0 + j, columns - j, rest,
                                             signs_ld);
    }
  }
  return total;
}

// g[c0 + m, i0 + r] += Σ_j x[c0 + m, j0 + j] * signs[j * signs_ld + r] for MC channels and one group
// of rows r: the gradient update G[:, I] += X[:, J] sign(D_IJ)ᵀ, accumulators in registers.
template <typename T, int MC>
DSCLORA_INLINE void gradient_tile(const T* x, int64_t ld, int64_t c0, int64_t j0, int64_t columns,
                                  const T* signs, int64_t signs_ld, T* g, int64_t i0) {
  Vec<T> acc[MC][kGroupVectors];
  DSCLORA_UNROLL for (int m = 0; m < MC; ++m) {
    DSCLORA_UNROLL for (int v = 0; v < kGroupVectors; ++v) acc[m][v] = load(g + (c0 + m) * ld + i0 + v * kLanes<T>);
  }
  for (int64_t j = 0; j < columns; ++j) {
    Vec<T> sign[kGroupVectors];
    DSCLORA_UNROLL for (int v = 0; v < kGroupVectors; ++v) sign[v] = load(signs + j * signs_ld + v * kLanes<T>);
    DSCLORA_UNROLL for (int m = 0; m < MC; ++m) {
      const Vec<T> b = broadcast(x[(c0 + m) * ld + j0 + j]);
      DSCLORA_UNROLL for (int v = 0; v < kGroupVectors; ++v) acc[m][v] += b * sign[v];
    }
  }
  DSCLORA_UNROLL for (int m = 0; m < MC; ++m) {
    DSCLORA_UNROLL for (int v = 0; v < kGroupVectors; ++v) store(g + (c0 + m) * ld + i0 + v * kLanes<T>, acc[m][v]);
  }
}

// G[c, i_begin + r] += Σ_j X[c, j0 + j] signs[j, r] for channels [c_begin, channels), MC at a time
// (the remainder by smaller MC), all row groups of the block.
template <typename T, int MC>
void gradient_columns(const T* x, int64_t channels, int64_t ld, int64_t c_begin, int64_t i_begin, int64_t rows,
                      int64_t j0, int64_t columns, const T* signs, int64_t signs_ld, T* g) {
  int64_t c = c_begin;
  for (; c + MC <= channels; c += MC) {
    for (int64_t r = 0; r < rows; r += kGroupRows<T>)
      gradient_tile<T, MC>(x, ld, c, j0, columns, signs + r, signs_ld, g, i_begin + r);
  }
  if constexpr (MC > 1) {
    if (c < channels) gradient_columns<T, MC - 1>(x, channels, ld, c, i_begin, rows, j0, columns, signs, signs_ld, g);
  }
}

// Σ|D| of one row block of one image against column tiles [j_begin, ld); with gradient outputs,
// accumulates G_s[:, block] and G_t[:, block]. In `upper` mode (no gradients) only columns from
// the block on are visited: the diagonal block once, the rest twice (D is symmetric).
template <typename T>
double row_block(const T* xs, int64_t cs, const T* xt, int64_t ct, int64_t ld, T* gs, T* gt,
                 int64_t i_begin, bool upper, T* signs) {
  const bool gradients = gs || gt;
  double total = 0;
  int64_t j0 = upper ? i_begin : 0;
  while (j0 < ld) {
    const bool diagonal = upper && j0 == i_begin;
    const int64_t columns = diagonal ? kRowBlock : std::min(kColumnTile, ld - j0);
    const double weight = upper && !diagonal ? 2.0 : 1.0;
    total += weight * difference_columns<T, kTileColumns>(xs, cs, xt, ct, ld, i_begin, kRowBlock, j0, columns,
                                                          gradients ? signs : nullptr, kRowBlock);
    if (gs) gradient_columns<T, kTileChannels>(xs, cs, ld, 0, i_begin, kRowBlock, j0, columns, signs, kRowBlock, gs);
    if (gt) gradient_columns<T, kTileChannels>(xt, ct, ld, 0, i_begin, kRowBlock, j0, columns, signs, kRowBlock, gt);
    j0 += columns;
  }
  return total;
}

// The whole pass for one element type: returns Σ_b Σ_ij |D_ij| and fills gs / gt (if non-null,
// zero-initialised by the caller) with G = Σ_j sign(D_ij) x̂_j. Work items are (image, row block);
// each owns its rows of G and its loss slot, so the result is independent of the thread count.
template <typename T>
double run(const Problem& p) {
  const int64_t blocks = p.ld / kRowBlock, items = p.batch * blocks;
  const bool upper = !p.gs && !p.gt;
  std::vector<double> partial(items, 0.0);
  parallel_for(items, p.threads, [&](int64_t begin, int64_t end) {
    std::vector<T> signs(upper ? 0 : kColumnTile * kRowBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, w = item % blocks;
      // In upper mode block k costs blocks - k tiles: interleave cheap and dear blocks so that
      // contiguous chunks of items carry equal work.
      const int64_t block = w % 2 == 0 ? w / 2 : blocks - 1 - w / 2;
      const T* xs = static_cast<const T*>(p.xs) + b * p.cs * p.ld;
      const T* xt = static_cast<const T*>(p.xt) + b * p.ct * p.ld;
      T* gs = p.gs ? static_cast<T*>(p.gs) + b * p.cs * p.ld : nullptr;
      T* gt = p.gt ? static_cast<T*>(p.gt) + b * p.ct * p.ld : nullptr;
      partial[item] = row_block<T>(xs, p.cs, xt, p.ct, p.ld, gs, gt, block * kRowBlock, upper, signs.data());
    }
  });
  double total = 0;
  for (double v : partial) total += v;
  return total;
}

#undef DSCLORA_INLINE
#undef DSCLORA_UNROLL
