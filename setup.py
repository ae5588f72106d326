"""Build entry point of grkernels.

Metadata lives in pyproject.toml. This file adds the C++ CPU ops in ``csrc/``:
they are compiled as the torch extension ``grkernels._C`` when torch is importable at build time
(``pip install --no-build-isolation [-e] .``, what ``make setup`` runs; an editable install builds it
in place), and skipped otherwise, so that ``python -m build`` in an isolated environment never pulls
a CUDA torch just to build a wheel. Without the extension every op runs on the torch reference
(``python -m grkernels info`` says so). ``GRKERNELS_NO_EXT=1`` skips the build.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup


def _cpp_extensions() -> tuple[list, dict]:
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("GRKERNELS_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    depends = sorted(glob.glob(os.path.join("csrc", "*.h")) + glob.glob(os.path.join("csrc", "*.inc")))
    # -ffp-contract=off: no FMA contraction, so the AVX2 and baseline builds of csrc/simd.inc give the same bits;
    # -Wno-psabi: the AVX vector arguments of its static helpers never cross a translation unit (no ABI concern);
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in ATen's headers: without it the kernels run
    # on one thread (the libgomp torch has loaded serves the extension too)
    ext = CppExtension(
        "grkernels._C",
        sources,
        depends=depends,
        extra_compile_args=["-O3", "-ffp-contract=off", "-Wno-psabi", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cpp_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
