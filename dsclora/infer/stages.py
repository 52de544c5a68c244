"""Busy time per pipeline stage, to tell which stage bounds a run (shown on the progress bar)."""
import threading
import time
from contextlib import contextmanager


class StageClock:
    """Seconds each stage spent working, divided by its number of workers.

    ``stages`` maps a stage name (decode, network, encode) to how many workers run it; the
    stage with the most work per worker is the one bounding the throughput.
    """

    def __init__(self, stages: dict[str, int]):
        self.workers = dict(stages)
        self.busy = dict.fromkeys(stages, 0.0)
        self._lock = threading.Lock()

    @contextmanager
    def timing(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.busy[stage] += elapsed

    def bound(self) -> str:
        """The stage with the most busy seconds per worker so far."""
        with self._lock:
            return max(self.busy, key=lambda s: self.busy[s] / self.workers[s])

    def per_worker(self) -> dict[str, float]:
        with self._lock:
            return {s: self.busy[s] / self.workers[s] for s in self.busy}
