// SIMD vector traits for the SPAB kernel: one struct per instruction set, same interface.
//
// Every member carries its ISA as a target attribute, so the file compiles without -m flags
// and the caller (csrc/spab_kernel.h, instantiated once per ISA) picks one at run time.
// A register tile of the convolution holds up to `acc_regs` accumulators of up to
// `max_block` output channels, plus max_block broadcast weights and one input vector
// (12 + 3 + 1 = 16 ymm; 24 + 4 + 1 of 32 zmm).
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace dsclora::spab {

#define SPAB_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline
#define SPAB_AVX512 __attribute__((target("avx512f,avx2,fma"), always_inline)) inline

// Portable fallback (and the reference for the vector paths): one float per "vector".
struct Scalar {
  using reg = float;
  static constexpr int width = 1;
  static constexpr int acc_regs = 12;
  static constexpr int max_block = 3;
  static inline reg load(const float* p) { return *p; }
  static inline void store(float* p, reg v) { *p = v; }
  static inline reg set1(float v) { return v; }
  static inline reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  static inline reg add(reg a, reg b) { return a + b; }
  static inline reg sub(reg a, reg b) { return a - b; }
  static inline reg mul(reg a, reg b) { return a * b; }
  static inline reg div(reg a, reg b) { return a / b; }
  static inline reg min(reg a, reg b) { return a < b ? a : b; }
  static inline reg max(reg a, reg b) { return a > b ? a : b; }
  static inline reg round(reg a) { return std::nearbyint(a); }
  static inline float hsum(reg a) { return a; }
  // 2^n for an integral-valued n in [-126, 127].
  static inline reg pow2i(reg n) {
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float r;
    std::memcpy(&r, &bits, sizeof r);
    return r;
  }
};

struct Avx2 {
  using reg = __m256;
  static constexpr int width = 8;
  static constexpr int acc_regs = 12;
  static constexpr int max_block = 3;
  static SPAB_AVX2 reg load(const float* p) { return _mm256_loadu_ps(p); }
  static SPAB_AVX2 void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static SPAB_AVX2 reg set1(float v) { return _mm256_set1_ps(v); }
  static SPAB_AVX2 reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static SPAB_AVX2 reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static SPAB_AVX2 reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static SPAB_AVX2 reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static SPAB_AVX2 reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static SPAB_AVX2 reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static SPAB_AVX2 reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static SPAB_AVX2 reg round(reg a) {
    return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static SPAB_AVX2 float hsum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static SPAB_AVX2 reg pow2i(reg n) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(bits);
  }
};

struct Avx512 {
  using reg = __m512;
  static constexpr int width = 16;
  static constexpr int acc_regs = 24;
  static constexpr int max_block = 4;
  static SPAB_AVX512 reg load(const float* p) { return _mm512_loadu_ps(p); }
  static SPAB_AVX512 void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static SPAB_AVX512 reg set1(float v) { return _mm512_set1_ps(v); }
  static SPAB_AVX512 reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static SPAB_AVX512 reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static SPAB_AVX512 reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static SPAB_AVX512 reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static SPAB_AVX512 reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static SPAB_AVX512 reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static SPAB_AVX512 reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static SPAB_AVX512 reg round(reg a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static SPAB_AVX512 float hsum(reg a) { return _mm512_reduce_add_ps(a); }
  static SPAB_AVX512 reg pow2i(reg n) {
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_castsi512_ps(bits);
  }
};

#undef SPAB_AVX2
#undef SPAB_AVX512

}  // namespace dsclora::spab
