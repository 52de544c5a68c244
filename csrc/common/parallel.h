// Minimal parallel-for over an index range with std::thread.
//
// The extension does not link torch, so it cannot use at::parallel_for; the Python side
// passes torch.get_num_threads() so that our kernels use the same thread budget as torch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace dsclora {

// Calls fn(begin, end) on contiguous chunks of [0, n) using up to num_threads threads
// (the calling thread does the first chunk). Chunks are deterministic for a given
// (n, num_threads), so per-chunk partial results can be reduced deterministically.
// An exception thrown by fn on any thread is rethrown on the calling thread once every
// chunk has finished (the first one caught; a thread that cannot be started runs its
// chunk on the calling thread instead), so it reaches Python as an error, never std::terminate.
template <typename Fn>
void parallel_for(int64_t n, int num_threads, Fn&& fn) {
  if (n <= 0) return;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, n));
  if (threads == 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::exception_ptr first_error;
  std::mutex error_mutex;
  const auto guarded = [&](int64_t begin, int64_t end) {
    try {
      fn(begin, end);
    } catch (...) {
      const std::lock_guard<std::mutex> lock(error_mutex);
      if (!first_error) first_error = std::current_exception();
    }
  };
  const int64_t chunk = (n + threads - 1) / threads;
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t begin = t * chunk, end = std::min(n, begin + chunk);
    if (begin >= end) continue;
    try {
      workers.emplace_back(guarded, begin, end);
    } catch (const std::system_error&) {
      guarded(begin, end);
    }
  }
  guarded(int64_t{0}, std::min(n, chunk));
  for (auto& w : workers) w.join();
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace dsclora
