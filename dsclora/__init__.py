"""dsclora: DSCLoRA fine-tuning, fused kernels and fast inference for SPAN super-resolution."""
from .models import SPAN, load_model

__version__ = "0.1.0"
__all__ = ["SPAN", "load_model", "__version__"]
