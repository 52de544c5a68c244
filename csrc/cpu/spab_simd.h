// SIMD vector traits of the SPAB kernel, Simd<isa>: one specialisation per instruction set of
// cpu_features.h, same interface; each copy of spab_kernel.h (isa_copies.h) uses its own. The
// members of the x86 ones are compiled for their instruction set (a target region).
// A register tile of the convolution holds up to `acc_regs` accumulators of up to
// `max_block` output channels, plus max_block broadcast weights and one input vector
// (12 + 3 + 1 = 16 ymm or xmm; 24 + 4 + 1 of 32 zmm or NEON registers).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu_features.h"

#ifdef DSCLORA_X86
#include <immintrin.h>
#endif

namespace dsclora::spab {

namespace simd {
#include "simd_vector.h"
}  // namespace simd

template <cpu::Isa> struct Simd;

// Every CPU: 16-byte vectors (SSE2 on x86-64, NEON on ARM, plain C++ without vector extensions);
// in the test build of cpu_features.h, 64-byte ones with the avx512 traits' tiles.
template <>
struct Simd<cpu::Isa::generic> {
  using reg = simd::Vector<float, DSCLORA_GENERIC_VECTOR_BYTES>;
  static constexpr int width = DSCLORA_GENERIC_VECTOR_BYTES / 4;
#if defined(__aarch64__) || DSCLORA_GENERIC_VECTOR_BYTES == 64  // 32 vector registers (or as avx512)
  static constexpr int acc_regs = 24;
  static constexpr int max_block = 4;
#else
  static constexpr int acc_regs = 12;
  static constexpr int max_block = 3;
#endif
  static DSCLORA_INLINE reg load(const float* p) { return simd::load_vector<reg>(p); }
  static DSCLORA_INLINE void store(float* p, reg v) { simd::store_vector(p, v); }
  static DSCLORA_INLINE reg set1(float v) { return simd::splat<reg>(v); }
  static DSCLORA_INLINE reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  static DSCLORA_INLINE reg add(reg a, reg b) { return a + b; }
  static DSCLORA_INLINE reg sub(reg a, reg b) { return a - b; }
  static DSCLORA_INLINE reg mul(reg a, reg b) { return a * b; }
  static DSCLORA_INLINE reg div(reg a, reg b) { return a / b; }
  static DSCLORA_INLINE reg min(reg a, reg b) { return simd::minimum(a, b); }
  static DSCLORA_INLINE reg max(reg a, reg b) { return simd::maximum(a, b); }
  // Nearest integer (ties to even) for |a| < 2^22: a + 1.5 * 2^23 has no fraction bits left.
  static DSCLORA_INLINE reg round(reg a) {
    const reg magic = set1(12582912.0f);
    return (a + magic) - magic;
  }
  static DSCLORA_INLINE float hsum(reg a) {
    float sum = 0.0f;
    for (int i = 0; i < width; ++i) sum += a[i];
    return sum;
  }
  // 2^n for an integral-valued n in [-126, 127], through the exponent bits.
  static DSCLORA_INLINE reg pow2i(reg n) {
    reg r{};
    for (int i = 0; i < width; ++i) {
      const int32_t bits = (static_cast<int32_t>(n[i]) + 127) << 23;
      float f;
      std::memcpy(&f, &bits, sizeof f);
      r[i] = f;
    }
    return r;
  }
};

#ifdef DSCLORA_X86
DSCLORA_TARGET_PUSH(DSCLORA_AVX2_FEATURES)
template <>
struct Simd<cpu::Isa::avx2> {
  using reg = __m256;
  static constexpr int width = 8;
  static constexpr int acc_regs = 12;
  static constexpr int max_block = 3;
  static DSCLORA_INLINE reg load(const float* p) { return _mm256_loadu_ps(p); }
  static DSCLORA_INLINE void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static DSCLORA_INLINE reg set1(float v) { return _mm256_set1_ps(v); }
  static DSCLORA_INLINE reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static DSCLORA_INLINE reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static DSCLORA_INLINE reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static DSCLORA_INLINE reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static DSCLORA_INLINE reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static DSCLORA_INLINE reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static DSCLORA_INLINE reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static DSCLORA_INLINE reg round(reg a) {
    return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static DSCLORA_INLINE float hsum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static DSCLORA_INLINE reg pow2i(reg n) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(bits);
  }
};
DSCLORA_TARGET_POP

DSCLORA_TARGET_PUSH(DSCLORA_AVX512_FEATURES)
template <>
struct Simd<cpu::Isa::avx512> {
  using reg = __m512;
  static constexpr int width = 16;
  static constexpr int acc_regs = 24;
  static constexpr int max_block = 4;
  static DSCLORA_INLINE reg load(const float* p) { return _mm512_loadu_ps(p); }
  static DSCLORA_INLINE void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static DSCLORA_INLINE reg set1(float v) { return _mm512_set1_ps(v); }
  static DSCLORA_INLINE reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static DSCLORA_INLINE reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static DSCLORA_INLINE reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static DSCLORA_INLINE reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static DSCLORA_INLINE reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static DSCLORA_INLINE reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static DSCLORA_INLINE reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static DSCLORA_INLINE reg round(reg a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static DSCLORA_INLINE float hsum(reg a) { return _mm512_reduce_add_ps(a); }
  static DSCLORA_INLINE reg pow2i(reg n) {
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_castsi512_ps(bits);
  }
};

DSCLORA_TARGET_POP
#endif  // DSCLORA_X86

}  // namespace dsclora::spab
