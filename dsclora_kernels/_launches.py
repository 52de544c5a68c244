"""Counts of fused Triton kernel launches, so that a test can check that a fast path really ran."""
import collections
import contextlib
from typing import Iterator

_COUNTS: collections.Counter = collections.Counter()


def record(kernel: str) -> None:
    """Count one launch of ``kernel`` (e.g. ``"spab.forward"``)."""
    _COUNTS[kernel] += 1


@contextlib.contextmanager
def counting() -> Iterator[collections.Counter]:
    """``with counting() as launched:`` -- afterwards ``launched`` holds the launches made inside."""
    before = _COUNTS.copy()
    launched: collections.Counter = collections.Counter()
    try:
        yield launched
    finally:
        launched.update(_COUNTS - before)
