// Instruction sets of the CPU kernels and the compiler-specific syntax they need, for every module.
//
// Each module compiles its hot code once per instruction set (isa_copies.h) and picks one at run time:
//   "avx512"  AVX-512 F/DQ/VL/BW with AVX2 and FMA (x86-64, GCC or clang)
//   "avx2"    AVX2 and FMA (x86-64, GCC or clang)
//   "generic" every CPU and compiler: 16-byte vectors (SSE2, NEON) with GCC/clang, plain C++17 elsewhere
// Everything GCC/clang-specific is behind the macros of this file; with other compilers (MSVC)
// or -DDSCLORA_STANDARD_CPP (how CI checks that configuration) only the standard C++ path is built.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#if (defined(__GNUC__) || defined(__clang__)) && !defined(_MSC_VER) && !defined(DSCLORA_STANDARD_CPP)
#define DSCLORA_GNU 1  // GCC or clang (not clang-cl): attributes, vector extensions, __builtin_cpu_supports
#endif
#if defined(DSCLORA_GNU) && defined(__x86_64__)
#define DSCLORA_X86 1  // the avx2 and avx512 paths are compiled
#endif

// The generic copy's vector size in bytes (isa_copies.h, spab_simd.h). A test build sets 64
// (-DDSCLORA_GENERIC_VECTOR_BYTES=64): the portable copy then has the avx512 copy's geometry (16
// floats a vector, its register tiles), so that a CPU without AVX-512 runs that geometry's code
// against the references (tests/test_portability.py). Releases keep 16.
#ifndef DSCLORA_GENERIC_VECTOR_BYTES
#define DSCLORA_GENERIC_VECTOR_BYTES 16
#endif

#define DSCLORA_PRAGMA(...) _Pragma(#__VA_ARGS__)

#ifdef DSCLORA_GNU
#define DSCLORA_INLINE inline __attribute__((always_inline))
#define DSCLORA_NOINLINE __attribute__((noinline))
#define DSCLORA_UNROLL(n) DSCLORA_PRAGMA(GCC unroll n)
#else
#define DSCLORA_INLINE inline
#define DSCLORA_NOINLINE
#define DSCLORA_UNROLL(n)
#endif

#ifdef DSCLORA_X86
// Target features of the two x86 paths; detection below checks exactly these.
#define DSCLORA_AVX2_FEATURES "avx2,fma"
#define DSCLORA_AVX512_FEATURES "avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"
// Every function declared between DSCLORA_TARGET_PUSH(features) and DSCLORA_TARGET_POP is
// compiled for `features` (such code is only called after detection says the CPU has them).
#ifdef __clang__
#define DSCLORA_TARGET_PUSH(features) \
  DSCLORA_PRAGMA(clang attribute push(__attribute__((target(features))), apply_to = function))
#define DSCLORA_TARGET_POP DSCLORA_PRAGMA(clang attribute pop)
#else
#define DSCLORA_TARGET_PUSH(features) DSCLORA_PRAGMA(GCC push_options) DSCLORA_PRAGMA(GCC target(features))
#define DSCLORA_TARGET_POP DSCLORA_PRAGMA(GCC pop_options)
#endif
#endif

namespace dsclora::cpu {

enum class Isa { avx512, avx2, generic };

inline const char* name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

// The instruction sets this CPU runs with this build, best first; always ends with generic.
inline std::vector<Isa> supported() {
  std::vector<Isa> isas;
#ifdef DSCLORA_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    isas.push_back(Isa::avx512);
  if (avx2) isas.push_back(Isa::avx2);
#endif
  isas.push_back(Isa::generic);
  return isas;
}

inline std::vector<std::string> supported_names() {
  std::vector<std::string> names;
  for (Isa isa : supported()) names.push_back(name(isa));
  return names;
}

// "auto" (or "") -> the best supported set; a name -> that set, if this CPU runs it.
inline Isa resolve(const std::string& requested, const char* module) {
  const std::vector<Isa> isas = supported();
  if (requested.empty() || requested == "auto") return isas.front();
  std::string list;
  for (Isa isa : isas) {
    if (requested == name(isa)) return isa;
    list += (list.empty() ? "" : ", ") + std::string(name(isa));
  }
  throw std::invalid_argument(std::string(module) + ": instruction set '" + requested +
                              "' is not supported here (supported: " + list + ")");
}

}  // namespace dsclora::cpu
