"""Build the optional compiled kernels of dsclora_kernels.

Every ``csrc/<name>.cpp`` becomes the extension module ``dsclora_kernels._<name>``:
plain C++17 + pybind11 on raw pointers, shapes and strides, independent of torch's
C++ ABI (the torch ops are registered in Python with ``torch.library.custom_op``).
SIMD code selects AVX-512 / AVX2 at run time, so the build is portable.

``DSCLORA_EXTENSIONS=a,b`` builds only the named modules (a development convenience).
"""
import os
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent
ONLY = {n for n in os.environ.get("DSCLORA_EXTENSIONS", "").split(",") if n}


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
                cxx_std=17,
                extra_compile_args=["-O3", "-pthread", "-fno-math-errno"],
                extra_link_args=["-pthread"],
            )
        )
    return exts


setup(ext_modules=cpu_extensions(), cmdclass={"build_ext": build_ext})
