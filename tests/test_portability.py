"""Portability of the C++ kernels and their one checked call path.

* Every csrc/cpu/*.cpp compiles to an object with -Wall -Wextra -Werror for aarch64 (Linux ARM, what
  Apple Silicon also gets: no x86 code), with clang, with the host g++, and in the standard-C++-only
  configuration other compilers (MSVC) get. `.ci/run` installs the compilers and sets
  DSCLORA_REQUIRE_CROSS_COMPILERS=1, so there a missing compiler fails instead of skipping.
* A failed extension build does not fail the install; the reason reaches `dsclora info` and the op.
* The avx512 copies' geometry (16-float vectors, their register tiles) runs, exactly, on any CPU: in
  a test build whose portable copy has it.
* Only checked CPU memory reaches C++ (dsclora_kernels._native); DSCLORA_CPU_ISA chooses the
  instruction set; an exception on a C++ worker thread becomes a Python error.
"""
import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from dsclora.info import report
from dsclora_kernels import EXTENSIONS, _extension, _log, _native, affinity, spab, triton_support, use_backend
from dsclora_kernels.affinity import cpu as affinity_cpu
from dsclora_kernels.affinity import prepare
from dsclora_kernels.spab import cpu as spab_cpu

SPAB = importlib.import_module("dsclora_kernels.spab").BACKENDS
ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
REQUIRE_COMPILERS = os.environ.get("DSCLORA_REQUIRE_CROSS_COMPILERS") == "1"

# configuration: (compiler, extra flags)
COMPILERS = {
    "aarch64-g++": ("aarch64-linux-gnu-g++", []),
    "clang++": ("clang++", []),
    "g++": ("g++", []),
    "standard-c++": ("g++", ["-DDSCLORA_STANDARD_CPP"]),  # no GCC/clang extensions: what MSVC compiles
}


def missing(what: str) -> None:
    """Skip, or fail where CI requires the compilers."""
    if REQUIRE_COMPILERS:
        pytest.fail(f"{what}; DSCLORA_REQUIRE_CROSS_COMPILERS=1 requires it (.ci/run installs it)")
    pytest.skip(what)


@pytest.mark.parametrize("config", COMPILERS)
def test_every_source_compiles_without_warnings(config, tmp_path):
    compiler, flags = COMPILERS[config]
    if not SOURCES:
        pytest.skip("no csrc/ next to the tests (an installed package only)")
    if shutil.which(compiler) is None:
        missing(f"{compiler} is not installed (Debian: apt-get install clang g++-aarch64-linux-gnu)")
    try:
        import pybind11
    except ImportError:
        missing("pybind11 is not installed (pip install '.[test]')")
    # Python's headers are the host's: fine for a syntax and code-generation check of aarch64.
    system = [f"-isystem{pybind11.get_include()}", f"-isystem{sysconfig.get_paths()['include']}"]
    command = [compiler, "-std=c++17", "-O3", "-fPIC", "-Wall", "-Wextra", "-Werror", *flags, *system,
               f"-I{ROOT / 'csrc' / 'common'}", f"-I{ROOT / 'csrc' / 'cpu'}", "-c"]
    jobs = {src.name: subprocess.Popen([*command, str(src), "-o", str(tmp_path / f"{src.stem}.o")],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for src in SOURCES}
    output = {name: job.communicate()[0] for name, job in jobs.items()}
    failed = {name: output[name] for name, job in jobs.items() if job.returncode != 0}
    assert not failed, "\n".join(f"{' '.join(command)} {name}:\n{text[-6000:]}" for name, text in failed.items())
    assert all((tmp_path / f"{src.stem}.o").stat().st_size > 0 for src in SOURCES)


# ---- a failed build ----

def _build_ext(tmp_path, *options, **env):
    """Run setup.py's build_ext into tmp_path with ``options`` and ``env`` added; it must exit 0.
    Returns (the finished process, the build report it wrote)."""
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp"), *options],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result, json.loads((tmp_path / "lib" / "dsclora_kernels" / _extension.BUILD_REPORT.name).read_text())


def test_failed_extension_build_does_not_fail_the_install(tmp_path):
    """setup.py's build_ext with a compiler that always fails: exit 0 and the reason in the report."""
    if not (ROOT / "setup.py").is_file():
        pytest.skip("no setup.py next to the tests (an installed package only)")
    pytest.importorskip("pybind11")
    result, outcomes = _build_ext(tmp_path, CC="false", CXX="false", DSCLORA_EXTENSIONS="metrics")
    assert list(outcomes) == ["metrics"]
    assert "C++ build failed at install time" in outcomes["metrics"] and "CompileError" in outcomes["metrics"]
    assert not list((tmp_path / "lib").rglob("_metrics*"))
    assert "was not built" in result.stderr


def test_missing_pybind11_does_not_fail_the_install(tmp_path):
    """setup.py where pybind11 cannot be imported (``pip install --no-build-isolation .`` without
    it): exit 0, no compiled module, the reason in the report."""
    if not (ROOT / "setup.py").is_file():
        pytest.skip("no setup.py next to the tests (an installed package only)")
    hidden = tmp_path / "hide" / "pybind11"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('pybind11 hidden by the test')\n")
    _, outcomes = _build_ext(tmp_path, PYTHONPATH=str(hidden.parent), DSCLORA_EXTENSIONS="metrics,spab")
    assert sorted(outcomes) == ["metrics", "spab"]
    assert all("pybind11 was not installed at build time" in why and "hidden by the test" in why
               for why in outcomes.values())
    assert not list((tmp_path / "lib").rglob("_metrics*")) and not list((tmp_path / "lib").rglob("_spab*"))


def test_inplace_build_reports_next_to_the_sources_and_survives_a_failed_module(tmp_path):
    """``setup.py build_ext --inplace`` (a development build) in a copy of the project: a module
    that fails to build does not fail the command (nothing to copy back), and the report lands
    in the source package, where the modules are imported from."""
    if not (ROOT / "setup.py").is_file():
        pytest.skip("no setup.py next to the tests (an installed package only)")
    pytest.importorskip("pybind11")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    for package in ("dsclora", "dsclora_kernels"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").touch()
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path,
        env={**os.environ, "CC": "false", "CXX": "false", "DSCLORA_EXTENSIONS": "metrics"},
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    outcomes = json.loads((tmp_path / "dsclora_kernels" / _extension.BUILD_REPORT.name).read_text())
    assert list(outcomes) == ["metrics"] and "C++ build failed" in outcomes["metrics"]
    assert not list((tmp_path / "dsclora_kernels").glob("_metrics*"))


def test_the_avx512_geometry_is_exact_on_any_cpu(tmp_path):
    """The avx512 copies run only on AVX-512 CPUs. Built with -DDSCLORA_GENERIC_VECTOR_BYTES=64,
    the portable copy has their geometry (16 floats a vector, 24-accumulator tiles of up to 4
    channels, the affinity tiles; only the 1:1 intrinsic wrappers differ), so the spab and
    affinity tests run that code against the references here, in a child with that build."""
    if not (ROOT / "setup.py").is_file():
        pytest.skip("no setup.py next to the tests (an installed package only)")
    pytest.importorskip("pybind11")
    if "avx512" in _native.supported_isas("spab"):
        pytest.skip("this CPU runs the avx512 copies themselves (the cpu_isa tests)")
    _build_ext(tmp_path, "--parallel", str(os.cpu_count() or 1), DSCLORA_EXTENSIONS="spab,affinity",
               CPPFLAGS="-DDSCLORA_GENERIC_VECTOR_BYTES=64")
    package = tmp_path / "path" / "dsclora_kernels"
    shutil.copytree(ROOT / "dsclora_kernels", package,
                    ignore=shutil.ignore_patterns("_*.so", "_*.pyd", _extension.BUILD_REPORT.name, "__pycache__"))
    for built in (tmp_path / "lib" / "dsclora_kernels").iterdir():
        shutil.copy(built, package)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package.parent), str(ROOT)]), "DSCLORA_CPU_ISA": "generic"}
    probe = "from dsclora_kernels import _extension; m = _extension.load('spab'); print(m.__file__, m.vector_floats('generic'))"
    where, floats = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True,
                                   capture_output=True, text=True).stdout.split()
    assert Path(where).parent == package and floats == "16"
    tests = [str(ROOT / "tests" / name) for name in ("test_spab.py", "test_affinity.py")]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests,
                             "-k", "not avx2 and not avx512 and not cuda and not triton"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]


def test_extensions_are_the_cpu_sources():
    """EXTENSIONS (named by the ops' "cpp" backends) is what setup.py builds: csrc/cpu/*.cpp."""
    if not SOURCES:
        pytest.skip("no csrc/ next to the tests (an installed package only)")
    assert EXTENSIONS == tuple(sorted(src.stem for src in SOURCES))


def test_missing_module_says_why_the_build_failed(tmp_path, monkeypatch):
    build_report = tmp_path / "_build_report.json"
    build_report.write_text(json.dumps({"metrics": "its C++ build failed at install time (test)", "spab": "built"}))
    monkeypatch.setattr(_extension, "BUILD_REPORT", build_report)
    monkeypatch.setattr(_extension, "_MODULES", {})
    monkeypatch.setattr(_extension, "_REASONS", {})
    monkeypatch.setattr(_log, "FALLBACKS", {})
    real_import = importlib.import_module

    def import_module(name):
        if name in ("dsclora_kernels._metrics", "dsclora_kernels._affinity"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name)

    monkeypatch.setattr(_extension.importlib, "import_module", import_module)
    with pytest.warns(RuntimeWarning, match=r"_metrics was not built: its C\+\+ build failed at install time \(test\)"):
        assert _extension.load("metrics") is None
    with pytest.warns(RuntimeWarning, match="_affinity was not part of this install's build"):
        assert _extension.load("affinity") is None
    text = report()
    assert "_metrics: dsclora_kernels._metrics was not built: its C++ build failed" in text
    assert "_affinity: dsclora_kernels._affinity was not part of this install's build" in text


# ---- only checked CPU memory crosses into C++ ----

class RecordingModule:
    """Stands in for a compiled module: records every kernel call instead of running it."""

    def __init__(self):
        self.calls = []

    def supported_isas(self):
        return ["generic"]

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append(name)


@pytest.fixture
def recorder(monkeypatch):
    module = RecordingModule()
    for name in ("spab", "affinity", "metrics"):
        monkeypatch.setitem(_extension._MODULES, name, module)
    return module


def test_forced_cpp_backend_rejects_tensors_off_the_cpu():
    for device in ("cuda", "meta"):
        with use_backend("cpp"), pytest.raises(RuntimeError, match=f"on {device}.*CPU tensors only"):
            SPAB.choose(torch.device(device), torch.empty(1, 4, 1, 1, device="meta"))


def test_a_broken_triton_interpreter_is_named_not_run(monkeypatch):
    """The interpreter is probed once (a kernel with a runtime loop bound, e.g. impossible for
    Triton 3.6 under NumPy 2.4); forcing Triton on CPU tensors then fails with that reason."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not torch.cuda.is_available():  # without a GPU this suite runs the interpreter: it must work
        assert triton_support.interpreter_status() == "available"
    monkeypatch.setattr(triton_support, "interpreter_status", lambda: "the Triton 0.0 interpreter fails")
    assert triton_support.triton_status() == "the Triton 0.0 interpreter fails"
    with use_backend("triton"), pytest.raises(RuntimeError, match="'triton' forced but the Triton 0.0 interpreter"):
        SPAB.choose(torch.device("cpu"), torch.empty(0))


def test_no_pointer_to_non_cpu_memory_reaches_the_kernels(recorder):
    """Each C++ call path given tensors not in CPU memory (meta: no GPU here) raises before any call."""
    x = torch.empty(1, 4, 3, 3, device="meta")
    w = torch.empty(4, 4, 3, 3, device="meta")
    weights = (w, torch.empty(4, device="meta")) * 3
    calls = [
        lambda: spab_cpu.packed_weights(weights),
        lambda: spab_cpu.input_grad(x, x, w),
        lambda: spab_cpu.weight_grads(x, x, w, True, True),
        lambda: affinity_cpu.l1_pass(*[prepare.Normalised(x.flatten(2), x.flatten(2), x[:, :1].flatten(2))] * 2,
                                   True, True, "ieee", 1e-8),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="is on meta; the C\\+\\+ kernels take CPU tensors only"):
            call()
    assert recorder.calls == []


@pytest.mark.parametrize("bad,dtype,layout,match", [
    (torch.zeros(3, 4, dtype=torch.float64), torch.float32, "strided", "x must be float32, got float64"),
    (torch.zeros(3, 4).t(), torch.float32, "contiguous", "x must be contiguous"),
    (np.zeros((3, 4))[:, ::2], torch.float64, "rows", "x must have unit stride in its last dimension"),
    (torch.zeros(3, 4).to_sparse(), torch.float32, "strided", "layout torch.sparse_coo"),
    ([1.0, 2.0], torch.float32, "strided", "must be a torch.Tensor or a numpy array"),
])
def test_tensor_arguments_are_checked(bad, dtype, layout, match):
    with pytest.raises((TypeError, ValueError), match=match):
        _native.tensor(bad, "test: x", dtype, layout)


def test_tensor_argument_describes_the_memory_and_keeps_it_alive():
    t = torch.arange(24.0).reshape(2, 3, 4)[:, ::2, 1:]
    arg = _native.tensor(t, "test: t", torch.float32)
    assert tuple(arg) == (t.data_ptr(), "float32", (2, 2, 3), (12, 8, 1))
    a = np.zeros((5, 6))[::-1]
    arg = _native.tensor(a, "test: a", torch.float64, "rows")
    assert tuple(arg) == (a.ctypes.data, "float64", (5, 6), (-6, 1)) and arg.tensor is a
    assert _native.tensor(None, "test: absent", torch.float32) is None


def test_cpp_checks_its_tensor_arguments_again():
    """Called directly (not through dsclora_kernels._native), the modules still reject bad TensorArgs."""
    ext = _extension.load("spab")
    if ext is None:
        pytest.skip(_extension.status("spab"))
    x = torch.zeros(1, 2, 3, 3)
    packed_size = ext.packed_floats(2)
    weights = [_native.tensor(t, "w", torch.float32) for t in (torch.zeros(packed_size), torch.zeros(2))] * 3
    arg = lambda t: _native.tensor(t, "t", t.dtype)  # noqa: E731
    with pytest.raises(ValueError, match=r"spab: out must have shape \(1, 2, 3, 3\), got \(1, 2, 3, 4\)"):
        ext.forward(arg(x), arg(torch.zeros(1, 2, 3, 4)), arg(x), weights, threads=1)
    with pytest.raises(ValueError, match="spab: h1 must be float32, got float64"):
        ext.forward(arg(x), arg(x), arg(x.double()), weights, threads=1)
    with pytest.raises(ValueError, match=f"spab: packed w2 must have shape \\({packed_size},\\)"):
        ext.forward(arg(x), arg(x), arg(x), weights[:2] + [arg(torch.zeros(packed_size - 1))] + weights[3:], threads=1)
    with pytest.raises(ValueError, match="spab: dw must be contiguous"):
        ext.wgrad(arg(x), arg(x), arg(torch.zeros(2, 2, 3, 3).transpose(0, 1)), None)
    with pytest.raises(ValueError, match="spab: input must have 4 dimensions"):
        ext.forward(arg(x[0]), arg(x), arg(x), weights, threads=1)


# ---- the instruction set: DSCLORA_CPU_ISA ----

def test_instruction_set_from_the_environment(monkeypatch, recorder):
    monkeypatch.setattr(recorder, "supported_isas", lambda: ["avx2", "generic"])
    assert _native.isa("spab") == "avx2"
    for value, chosen in (("auto", "avx2"), ("generic", "generic")):
        monkeypatch.setenv("DSCLORA_CPU_ISA", value)
        assert _native.isa("spab") == chosen
    monkeypatch.setenv("DSCLORA_CPU_ISA", "avx512")
    with pytest.raises(RuntimeError, match="DSCLORA_CPU_ISA='avx512': this CPU does not run it; supported here: "
                                           "avx2, generic"):
        _native.isa("spab")
    monkeypatch.setenv("DSCLORA_CPU_ISA", "neon")
    with pytest.raises(RuntimeError, match="DSCLORA_CPU_ISA='neon': unknown instruction set"):
        _native.call("metrics", "ssim_mean")
    assert recorder.calls == []


def test_every_op_and_dsclora_info_follow_the_environment(monkeypatch):
    if any(_extension.load(name) is None for name in ("spab", "affinity", "metrics")):
        pytest.skip("needs every C++ extension")
    x = torch.randn(1, 2, 4, 4)
    weights = [torch.randn(2, 2, 3, 3), torch.randn(2)] * 3
    plane = np.random.default_rng(0).random((12, 12)) * 255
    ops = {
        "spab": lambda: spab(x, *weights),
        "affinity": lambda: affinity.spatial_affinity_loss(x, x.flip(3)),
        "metrics": lambda: importlib.import_module("dsclora_kernels.metrics").ssim_mean(plane, plane),
    }
    monkeypatch.setenv("DSCLORA_CPU_ISA", "avx3")
    for name, op in ops.items():
        with use_backend("cpp"), pytest.raises(RuntimeError, match="DSCLORA_CPU_ISA='avx3': unknown"):
            op()
    assert "DSCLORA_CPU_ISA: avx3" in report()
    supported = _native.supported_isas("spab")
    monkeypatch.setenv("DSCLORA_CPU_ISA", supported[-1])
    text = report()
    for name in ops:
        assert f"_{name}: available, instruction sets {', '.join(supported)}; running {supported[-1]}" in text


def test_cpp_rejects_an_instruction_set_it_cannot_run():
    ext = _extension.load("metrics")
    if ext is None:
        pytest.skip(_extension.status("metrics"))
    plane = _native.tensor(np.zeros((12, 12)), "plane", torch.float64)
    window = _native.tensor(np.ones(11) / 11, "window", torch.float64)
    with pytest.raises(ValueError, match=r"ssim: instruction set 'sse5' is not supported here \(supported: .*\)"):
        ext.ssim_mean(plane, plane, window, 1.0, 1.0, threads=1, isa="sse5")


# ---- errors on C++ worker threads ----

@pytest.mark.parametrize("fail_at", [0, 37, 99])  # the calling thread's chunk, a worker's, the last one
def test_an_exception_on_a_worker_thread_becomes_a_python_error(fail_at):
    ext = _extension.load("metrics")
    if ext is None:
        pytest.skip(_extension.status("metrics"))
    with pytest.raises(RuntimeError, match=f"parallel_for test: item {fail_at} failed"):
        ext._test_parallel_for_failure(100, 4, fail_at)
    assert ext._test_parallel_for_failure(100, 4, -1) == 100  # and without a failure every item runs


def test_cpu_inference_does_not_import_triton():
    """The Triton backends are imported when first chosen: importing the kernels and the CPU
    inference path (spab_forward) never pay Triton's import (~0.3 s of every CLI start). (The
    custom ops' first call imports torch._dynamo, which imports Triton itself.)"""
    code = ("import sys, torch, dsclora_kernels\n"
            "x = torch.rand(1, 4, 6, 6)\n"
            "dsclora_kernels.spab_forward(x, *[torch.rand(4, 4, 3, 3), torch.rand(4)] * 3)\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
