"""Build the optional compiled kernels of dsclora_kernels.

Every ``csrc/<name>.cpp`` becomes the extension module ``dsclora_kernels._<name>``:
plain C++17 + pybind11 on tensor addresses, shapes and strides (csrc/tensor_view.h),
independent of torch's C++ ABI (the torch ops are registered in Python with
``torch.library.custom_op``). On x86-64 the SIMD code selects AVX-512 / AVX2 at run time
(csrc/cpu_features.h), so the build needs no -march flag; other CPUs and compilers get the
generic path.

The kernels are optional: when one does not build (no C++17 compiler, an unsupported
platform), ``pip install .`` still succeeds and the reason is written to
``dsclora_kernels/_build_report.json``, which ``dsclora info`` and the first use of the op
show (the op then runs its PyTorch reference).

``DSCLORA_EXTENSIONS=a,b`` builds only the named modules (a development convenience).
"""
import json
import os
import platform
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.errors import BaseError, CCompilerError

ROOT = Path(__file__).parent
ONLY = {n for n in os.environ.get("DSCLORA_EXTENSIONS", "").split(",") if n}
HEADERS = sorted(str(h.relative_to(ROOT)) for h in (ROOT / "csrc").glob("*.h"))
#: Written next to the built modules: {name: "built" or why it was not}; read by dsclora_kernels._extension.
BUILD_REPORT = "_build_report.json"
#: (compile, link) flags per compiler type; every other type takes the "unix" ones (GCC, clang, MinGW).
FLAGS = {"unix": (["-O3", "-pthread", "-fno-math-errno"], ["-pthread"]), "msvc": (["/O2"], [])}


def cpu_extensions():
    exts = []
    for src in sorted((ROOT / "csrc").glob("*.cpp")):
        if ONLY and src.stem not in ONLY:
            continue
        exts.append(
            Pybind11Extension(
                f"dsclora_kernels._{src.stem}",
                [str(src.relative_to(ROOT))],
                include_dirs=["csrc"],
                depends=HEADERS,
                cxx_std=17,
            )
        )
    return exts


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install: an extension that does not build is skipped,
    with the reason in BUILD_REPORT."""

    def build_extensions(self):
        compile_flags, link_flags = FLAGS.get(self.compiler.compiler_type, FLAGS["unix"])
        for ext in self.extensions:
            ext.extra_compile_args += compile_flags
            ext.extra_link_args += link_flags
        self.report = {}
        super().build_extensions()
        if self.extensions:
            path = Path(self.get_ext_fullpath(self.extensions[0].name)).parent / BUILD_REPORT
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.report, indent=1) + "\n")

    def build_extension(self, ext):
        name = ext.name.rsplit("._", 1)[-1]
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
