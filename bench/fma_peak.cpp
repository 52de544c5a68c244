// The FMA peak of this CPU: `fma_peak THREADS` prints the GFLOP/s of THREADS threads each
// running 12 independent chains of vector fused multiply-adds (the widest vectors -march=native
// allows: 16 lanes with AVX-512, else 8), all threads at once. 2 FLOP per lane per FMA.
// Built and run by bench_peers.py: c++ -O3 -march=native -pthread fma_peak.cpp
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#ifdef __AVX512F__
using Vec = __m512;
static Vec splat(float v) { return _mm512_set1_ps(v); }
static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
#else
using Vec = __m256;
static Vec splat(float v) { return _mm256_set1_ps(v); }
static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
#endif
constexpr int kLanes = sizeof(Vec) / sizeof(float), kChains = 12;
constexpr long kIterations = 100000000;

static float chains() {  // kIterations x kChains FMAs; the result keeps them alive
  Vec acc[kChains];
  const Vec b = splat(0.9999f), c = splat(0.0001f);
  for (Vec& a : acc) a = splat(0.1f);
  for (long k = 0; k < kIterations; ++k) {
#pragma GCC unroll 12
    for (Vec& a : acc) a = fma(a, b, c);  // no -ffast-math: nothing folds
  }
  float lanes[kLanes], sum = 0;
  for (Vec& a : acc) {
    std::memcpy(lanes, &a, sizeof(lanes));
    sum += lanes[0];
  }
  return sum;
}

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  std::vector<std::thread> pool;
  std::vector<float> sums(threads);
  const auto start = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) pool.emplace_back([&sums, t] { sums[t] = chains(); });
  for (auto& thread : pool) thread.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%.1f\n", threads * double(kIterations) * kChains * kLanes * 2 / seconds / 1e9);
  return sums[0] == 12345.f;  // never: the sums are used
}
