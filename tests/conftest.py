import contextlib
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


@pytest.fixture(params=["avx512", "avx2", "generic"])
def cpu_isa(request, monkeypatch) -> str:
    """Runs the test once per instruction set of the C++ kernels (csrc/common/cpu_features.h) that this
    CPU runs, chosen the way users choose it: the DSCLORA_CPU_ISA environment variable."""
    from dsclora_kernels import EXTENSIONS, _native

    isa = request.param
    assert isa in _native.ISAS
    supported = next((s for s in map(_native.supported_isas, EXTENSIONS) if s), None)
    if supported is None:
        pytest.skip("no C++ extension is built")
    if isa not in supported:
        pytest.skip(f"this CPU does not run {isa}")
    monkeypatch.setenv(_native.ISA_VARIABLE, isa)
    return isa


@pytest.fixture
def expect_launches():
    """``with expect_launches("spab.forward", ...):`` fails unless the block launched each named
    Triton kernel (names of ``dsclora_kernels._launches``): the fused path ran, no fallback.
    ``when=False`` checks nothing (a test parametrised over backends)."""
    from dsclora_kernels import _launches  # after TRITON_INTERPRET is set above

    @contextlib.contextmanager
    def expect(*kernels, when=True):
        with _launches.counting() as launched:
            yield launched
        missing = [k for k in kernels if when and not launched[k]]
        assert not missing, f"Triton kernels {missing} were not launched (launched: {dict(launched)})"

    return expect
