"""Fast inference: SPAN with every re-parameterisation and adapter merged, on fused ops."""
from .merge import MergedSpan, merge_span
from .network import FusedSpan

__all__ = ["MergedSpan", "merge_span", "FusedSpan"]
