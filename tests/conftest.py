import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run (slowly) on CPU tensors in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(os.environ.get("DSCLORA_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    """The read-only ../shared folder (weights, datasets); tests needing it skip without it."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED} (set DSCLORA_SHARED)")
    return SHARED


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
