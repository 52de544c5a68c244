"""Build the optional compiled kernels of dsclora_kernels.

Every ``csrc/cpu/<name>.cpp`` becomes the extension module ``dsclora_kernels._<name>``
(shared headers in csrc/common/):
plain C++17 + pybind11 on tensor addresses, shapes and strides (csrc/common/tensor_view.h),
independent of torch's C++ ABI (the torch ops are registered in Python with
``torch.library.custom_op``). On x86-64 the SIMD code selects AVX-512 / AVX2 at run time
(csrc/common/cpu_features.h), so the build needs no -march flag; other CPUs and compilers get the
generic path.

The kernels are optional: when one does not build (no C++17 compiler, an unsupported
platform), ``pip install .`` still succeeds and the reason is written to
``dsclora_kernels/_build_report.json``, which ``dsclora info`` and the first use of the op
show (the op then runs its PyTorch reference).

Without pybind11 (``pip install --no-build-isolation .`` where it is missing) the package
installs without the compiled kernels, and the report says so.

``DSCLORA_EXTENSIONS=a,b`` builds only the named modules (a development convenience).
CUDA kernels (csrc/cuda/, none yet) will be built the same optional way when nvcc is found,
into the same report.
"""
import json
import os
import platform
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

ROOT = Path(__file__).parent
ONLY = {n for n in os.environ.get("DSCLORA_EXTENSIONS", "").split(",") if n}
INCLUDE_DIRS = ["csrc/common", "csrc/cpu"]
HEADERS = sorted(str(h.relative_to(ROOT)) for d in INCLUDE_DIRS for h in (ROOT / d).glob("*.h"))
#: Written next to the built modules: {name: "built" or why it was not}; read by dsclora_kernels._extension.
BUILD_REPORT = "_build_report.json"
#: (compile, link) flags per compiler type; every other type takes the "unix" ones (GCC, clang, MinGW).
FLAGS = {"unix": (["-O3", "-pthread", "-fno-math-errno"], ["-pthread"]), "msvc": (["/O2"], [])}


def pybind11_extension():
    """(pybind11's Extension class, None) or (None, why the kernels cannot be built)."""
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError as exc:
        return None, (f"pybind11 was not installed at build time ({exc}); install it and reinstall "
                      "(`pip install pybind11 && pip install --no-build-isolation .`, or `pip install .`)")
    return Pybind11Extension, None


def cpu_extensions():
    """One extension per csrc/cpu/*.cpp; without pybind11, placeholders that carry the reason."""
    extension_class, missing = pybind11_extension()
    exts = []
    for src in sorted((ROOT / "csrc" / "cpu").glob("*.cpp")):
        if ONLY and src.stem not in ONLY:
            continue
        name, sources = f"dsclora_kernels._{src.stem}", [str(src.relative_to(ROOT))]
        if extension_class is None:
            ext = Extension(name, sources)
            ext.not_built = missing
        else:
            ext = extension_class(name, sources, include_dirs=INCLUDE_DIRS, depends=HEADERS, cxx_std=17)
        exts.append(ext)
    return exts


def module_name(ext) -> str:
    """The report's key of an extension: "spab" for dsclora_kernels._spab."""
    return ext.name.rsplit("._", 1)[-1]


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install: an extension that does not build is skipped,
    with the reason in BUILD_REPORT."""

    def run(self):
        self.report = {}
        super().run()  # builds into build_lib, then with --inplace copies the modules to the sources
        if self.extensions:  # next to the modules: build_lib, or the sources with --inplace
            path = Path(self.get_ext_fullpath(self.extensions[0].name)).parent / BUILD_REPORT
            earlier = json.loads(path.read_text()) if ONLY and path.is_file() else {}  # a partial rebuild
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(earlier | self.report, indent=1) + "\n")

    def copy_extensions_to_source(self):
        """--inplace: copy the modules that built (a skipped one has no file to copy)."""
        every = self.extensions
        self.extensions = [ext for ext in every if self.report.get(module_name(ext)) == "built"]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = every

    def build_extensions(self):
        compile_flags, link_flags = FLAGS.get(self.compiler.compiler_type, FLAGS["unix"])
        for ext in self.extensions:
            ext.extra_compile_args += compile_flags
            ext.extra_link_args += link_flags
        super().build_extensions()

    def build_extension(self, ext):
        name = module_name(ext)
        if getattr(ext, "not_built", None):
            self.report[name] = ext.not_built
            self.warn(f"dsclora_kernels._{name} was not built, its ops will run the PyTorch reference: {ext.not_built}")
            return
        try:
            super().build_extension(ext)
        except (CCompilerError, BaseError, OSError) as exc:
            self.report[name] = (
                f"its C++ build failed at install time ({platform.system()} {platform.machine()}, "
                f"{type(exc).__name__}: {exc}); `pip install -v .` shows the compiler output"
            )
            self.warn(f"dsclora_kernels._{name} was not built, its ops will run the PyTorch reference: "
                      f"{self.report[name]}")
        else:
            self.report[name] = "built"


setup(ext_modules=cpu_extensions(), cmdclass={"build_ext": OptionalBuildExt})
