// One copy of a module's per-instruction-set body for each instruction set of cpu_features.h, and
// the call that picks one at run time. In a module's namespace:
//
//   #define DSCLORA_ISA_BODY "spab_kernel.h"
//   #include "isa_copies.h"
//   ...
//   DSCLORA_ISA_CALL(isa, run(pb, tiling, threads));  // avx512::run, avx2::run or generic::run
//
// The body is compiled in namespaces generic, avx2 and avx512 (the x86 ones only where
// DSCLORA_X86), each with simd_vector.h and the constants
//   kIsa          that copy's cpu::Isa (a body derives its own tuning from it)
//   kVectorBytes  its SIMD width: 16 (SSE2, NEON, plain C++), 32 (AVX2), 64 (AVX-512).
//                 A body derives its tuning from kVectorBytes where the avx512 copy's differs, so
//                 that the test build of cpu_features.h gives generic that geometry.
// Every function of an x86 copy, lambdas included, is compiled for that instruction set: the copy
// sits in a target region (DSCLORA_TARGET_PUSH) rather than having an attribute on each function,
// so that no helper can miss it (a function without the target cannot inline an intrinsic, an
// always_inline function with it, and passes 32- or 64-byte vectors with another ABI). The row
// bookkeeping around the vector loops is thus compiled for the target too (spab kept it baseline
// code before: the same speed, measured). Code outside the copies (the module's helpers, the
// standard library) may be inlined into them.
//
// No include guard on purpose: one inclusion per body. Needs cpu_features.h, <cstring>, <type_traits>.

#ifndef DSCLORA_ISA_BODY
#error "define DSCLORA_ISA_BODY (the per-instruction-set header) before including isa_copies.h"
#endif

namespace generic {
constexpr ::dsclora::cpu::Isa kIsa = ::dsclora::cpu::Isa::generic;
constexpr int kVectorBytes = DSCLORA_GENERIC_VECTOR_BYTES;  // 16 but in a test build (cpu_features.h)
#include "simd_vector.h"
#include DSCLORA_ISA_BODY
}  // namespace generic

#ifdef DSCLORA_X86
DSCLORA_TARGET_PUSH(DSCLORA_AVX2_FEATURES)
namespace avx2 {
constexpr ::dsclora::cpu::Isa kIsa = ::dsclora::cpu::Isa::avx2;
constexpr int kVectorBytes = 32;
#include "simd_vector.h"
#include DSCLORA_ISA_BODY
}  // namespace avx2
DSCLORA_TARGET_POP

// GCC 12's AVX-512 intrinsics (min, max, round, reduce, ...) pass _mm512_undefined_ps() as the
// masked-off source and trip false -W(maybe-)uninitialized warnings (GCC bug 105593).
#ifndef __clang__
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
DSCLORA_TARGET_PUSH(DSCLORA_AVX512_FEATURES)
namespace avx512 {
constexpr ::dsclora::cpu::Isa kIsa = ::dsclora::cpu::Isa::avx512;
constexpr int kVectorBytes = 64;
#include "simd_vector.h"
#include DSCLORA_ISA_BODY
}  // namespace avx512
DSCLORA_TARGET_POP
#ifndef __clang__
#pragma GCC diagnostic pop
#endif
#endif  // DSCLORA_X86

#undef DSCLORA_ISA_BODY

// DSCLORA_ISA_CALL(isa, expression): `expression`, which starts with a name of the body, evaluated
// in the copy for `isa` (a cpu::Isa this CPU runs); e.g. DSCLORA_ISA_CALL(isa, run<T>(p)), or
// DSCLORA_ISA_CALL(isa, y_row) for a pointer to that copy's y_row.
#ifdef DSCLORA_X86
#define DSCLORA_ISA_CALL(isa, ...)                                     \
  [&] {                                                                \
    switch (isa) {                                                     \
      case ::dsclora::cpu::Isa::avx512: return avx512::__VA_ARGS__;    \
      case ::dsclora::cpu::Isa::avx2: return avx2::__VA_ARGS__;        \
      default: return generic::__VA_ARGS__;                            \
    }                                                                  \
  }()
#else
#define DSCLORA_ISA_CALL(isa, ...) ((void)(isa), generic::__VA_ARGS__)
#endif
