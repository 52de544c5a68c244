"""The one measurement toolkit of the benchmarks (``bench/``, ``dsclora bench``): calls timed
with CUDA events on the GPU and ``perf_counter`` on the CPU, after warm-up, candidates interleaved
round-robin (a load spike on a shared machine then hits all of them alike), medians and minima,
and peak memory (the GPU allocator's, or the process's resident set)."""
import contextlib
import resource
import statistics
import time
from typing import Callable, Iterator


def call_seconds(fn: Callable[[], object], device: str = "cpu") -> float:
    """Seconds of one call ``fn()``: CUDA events around it (synchronised) when ``device`` is a
    CUDA device, else ``perf_counter``."""
    if not str(device).startswith("cuda"):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def repeat(fn: Callable[[], object], device: str = "cpu", warmup: int = 1, repeats: int = 5) -> list[float]:
    """Seconds of ``repeats`` calls ``fn()`` after ``warmup`` untimed ones."""
    return interleaved({"fn": fn}, device, warmup, repeats)["fn"]


def interleaved(fns: dict[str, Callable[[], object]], device: str = "cpu", warmup: int = 1,
                repeats: int = 5) -> dict[str, list[float]]:
    """name -> seconds of each of ``repeats`` calls, the candidates called round-robin after
    ``warmup`` untimed calls each."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(call_seconds(fn, device))
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def minima(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: min(t) for name, t in times.items()}


class Peak:
    """Filled when its ``with`` block ends: ``bytes``, the peak memory inside it."""

    bytes: int = 0


@contextlib.contextmanager
def cuda_peak(device: str = "cuda", relative: bool = True) -> Iterator[Peak]:
    """``with cuda_peak() as peak:`` -- afterwards ``peak.bytes`` is the allocator's peak inside
    the block (``torch.cuda.max_memory_allocated``), minus what was allocated before it if
    ``relative``."""
    import torch

    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device) if relative else 0
    torch.cuda.reset_peak_memory_stats(device)
    peak = Peak()
    yield peak
    torch.cuda.synchronize(device)
    peak.bytes = torch.cuda.max_memory_allocated(device) - base


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (``ru_maxrss``; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_growth(fn: Callable[[], object]) -> int:
    """Bytes the resident set grew above its size before ``fn()`` at its peak during the call.
    On Linux the peak is reset first (``/proc/self/clear_refs``), so any earlier peak does not
    hide it; elsewhere it is the growth of ``ru_maxrss`` (run in a fresh process)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (VmHWM)
        before = _status_kib("VmRSS")
    except OSError:
        before_peak = peak_rss_bytes()
        fn()
        return peak_rss_bytes() - before_peak
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
