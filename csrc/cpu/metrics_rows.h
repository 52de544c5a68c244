// The row loops of the metrics kernels for one instruction set (the compiler vectorises them).
//
// No include guard on purpose: metrics.cpp compiles this file once per instruction set through
// isa_copies.h; Moments comes from metrics.cpp.

// Y = 16 + 65.481 R + 128.553 G + 24.966 B with R, G, B = samples / 255 (ITU-R BT.601).
void y_row(const double* src, int64_t width, int64_t col_stride, int64_t channel_stride, double* dst) {
  for (int64_t x = 0; x < width; ++x) {
    const double* p = src + x * col_stride;
    dst[x] = 16.0 + 65.481 * (p[0] / 255.0) + 128.553 * (p[channel_stride] / 255.0) +
             24.966 * (p[2 * channel_stride] / 255.0);
  }
}

// v += w * (ra, rb, ra², rb², ra·rb) over n columns (one tap of the vertical pass).
inline void add_row_tap(const double* __restrict ra, const double* __restrict rb, double w, int64_t n,
                        double* __restrict va, double* __restrict vb, double* __restrict vaa,
                        double* __restrict vbb, double* __restrict vab) {
  for (int64_t x = 0; x < n; ++x) {
    const double xa = ra[x], xb = rb[x];
    va[x] += w * xa;
    vb[x] += w * xb;
    vaa[x] += w * (xa * xa);
    vbb[x] += w * (xb * xb);
    vab[x] += w * (xa * xb);
  }
}

// h += w * v[shift:] for the five moments (one tap of the horizontal pass).
inline void add_column_tap(const Moments& v, int64_t shift, double w, int64_t n, double* __restrict ha,
                           double* __restrict hb, double* __restrict haa, double* __restrict hbb,
                           double* __restrict hab) {
  const double* __restrict va = v.a.data() + shift;
  const double* __restrict vb = v.b.data() + shift;
  const double* __restrict vaa = v.aa.data() + shift;
  const double* __restrict vbb = v.bb.data() + shift;
  const double* __restrict vab = v.ab.data() + shift;
  for (int64_t x = 0; x < n; ++x) {
    ha[x] += w * va[x];
    hb[x] += w * vb[x];
    haa[x] += w * vaa[x];
    hbb[x] += w * vbb[x];
    hab[x] += w * vab[x];
  }
}

// Sum of the SSIM map over output columns [0, n) of one output row. a, b point at the
// first of the k input rows (and at the first input column); uses n + k - 1 input columns.
double ssim_tile_sum(const double* a, int64_t a_row_stride, const double* b, int64_t b_row_stride, int64_t n,
                     const double* window, int k, double c1, double c2, Moments& vert, Moments& horz) {
  const int64_t in_width = n + k - 1;
  vert.zero(in_width);
  for (int t = 0; t < k; ++t)
    add_row_tap(a + t * a_row_stride, b + t * b_row_stride, window[t], in_width, vert.a.data(), vert.b.data(),
                vert.aa.data(), vert.bb.data(), vert.ab.data());
  horz.zero(n);
  for (int t = 0; t < k; ++t)
    add_column_tap(vert, t, window[t], n, horz.a.data(), horz.b.data(), horz.aa.data(), horz.bb.data(),
                   horz.ab.data());
  double *ha = horz.a.data(), *hb = horz.b.data(), *haa = horz.aa.data(), *hbb = horz.bb.data(),
         *hab = horz.ab.data();
  // The map overwrites ha; four partial sums keep the reduction short and deterministic.
  for (int64_t x = 0; x < n; ++x) {
    const double mu_a = ha[x], mu_b = hb[x];
    const double mu_aa = mu_a * mu_a, mu_bb = mu_b * mu_b, mu_ab = mu_a * mu_b;
    const double var_a = haa[x] - mu_aa, var_b = hbb[x] - mu_bb, cov = hab[x] - mu_ab;
    ha[x] = ((2.0 * mu_ab + c1) * (2.0 * cov + c2)) / ((mu_aa + mu_bb + c1) * (var_a + var_b + c2));
  }
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t x = 0;
  for (; x + 4 <= n; x += 4)
    for (int j = 0; j < 4; ++j) s[j] += ha[x + j];
  for (; x < n; ++x) s[0] += ha[x];
  return (s[0] + s[1]) + (s[2] + s[3]);
}
