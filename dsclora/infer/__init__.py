"""Fast inference: SPAN with every re-parameterisation and adapter merged, on fused ops.

``dsclora.infer.load(weights)`` returns an ``Upscaler``; ``dsclora infer`` is the command line.
"""
from .merge import MergedSpan, merge_span
from .network import FusedSpan
from .tiling import RECEPTIVE_RADIUS
from .upscaler import Upscaler, load
from .weights import DSCF_X4, DownloadError, RemoteWeights, fetch

__all__ = [
    "load", "Upscaler", "MergedSpan", "merge_span", "FusedSpan", "RECEPTIVE_RADIUS",
    "fetch", "RemoteWeights", "DSCF_X4", "DownloadError",
]
