"""The SPAN family and checkpoint loading."""
from .conv3xc import Conv3XC, collapse_branches
from .loading import CheckpointError, SpanConfig, detect_config, load_model, read_state_dict
from .span import SPAB, SPAN

__all__ = [
    "SPAN", "SPAB", "Conv3XC", "collapse_branches", "load_model", "read_state_dict",
    "detect_config", "SpanConfig", "CheckpointError",
]
