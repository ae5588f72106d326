"""Shared test set-up.

Without a CUDA device the Triton kernels run on CPU tensors under Triton's interpreter,
which must be switched on before triton is imported anywhere: that is done here, first.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:  # CI replays the same examples every run (a landing must not hinge on a lucky draw); local runs explore.
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:
    pass

from grkernels.kernels import triton_usable  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu":
    # The test models are tiny: one intra-op thread is as fast, and far faster when CI's two cores are shared
    # (measured on the TRL tests: 91 s -> 14 s). Multi-process tests set their own workers' threads.
    torch.set_num_threads(1)


@pytest.fixture
def device() -> str:
    """The device kernels are tested on: CUDA when present, else CPU (Triton interpreter)."""
    return DEVICE


requires_triton = pytest.mark.skipif(
    not triton_usable(DEVICE), reason="triton is not installed (or not usable on this device)"
)
