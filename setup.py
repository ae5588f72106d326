"""Build entry point of grkernels.

Metadata lives in pyproject.toml. This file adds the optional C++ CPU ops in ``csrc/``:
they are compiled as a torch extension when torch is importable at build time (install
with ``pip install --no-build-isolation``), and skipped otherwise, so that ``python -m
build`` in an isolated environment never pulls a CUDA torch just to build a wheel.
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
    ext = CppExtension("grkernels._C", sources, extra_compile_args=["-O3", "-ffp-contract=off"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cpp_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
